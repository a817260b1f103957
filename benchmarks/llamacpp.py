"""llama.cpp's OpenAI-compatible server (``llama-cpp-python[server]``, the ``integration`` extra)
as a local process for benchmarks and integration checks: 127.0.0.1, a free port, its log in a
file, its CPU seconds and prompt tokens evaluated readable."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from dynrules.errors import DynrulesError
from dynrules.launch import free_port

ALIAS = "smol"  # the model name the server answers to
_EVALUATED = re.compile(r"prompt eval time =\s*[\d.]+ ms /\s*(\d+) tokens")


def installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaServer:
    """``python -m llama_cpp.server`` on 127.0.0.1, its log in a file, its counters readable."""

    def __init__(self, model: Path, log: Path, *options: str):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}/v1"
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model)]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--model_alias", ALIAS]
        command += options
        with open(log, "w") as handle:
            self.process = subprocess.Popen(
                command,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def wait_ready(self, seconds: float = 180.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DynrulesError(f"llama.cpp server exited: see {self.log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/models", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise DynrulesError(f"llama.cpp server not ready after {seconds:g} s: see {self.log}")

    def counters(self) -> dict[str, float]:
        """Server CPU seconds and prompt tokens evaluated so far (from /proc and its log)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        evaluated = sum(int(m) for m in _EVALUATED.findall(self.log.read_text(errors="ignore")))
        return {"server_cpu_s": cpu, "prompt_tokens_evaluated": float(evaluated)}

    def __enter__(self) -> LlamaServer:
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
