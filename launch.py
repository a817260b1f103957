"""Run one dynrules command as N local processes of one JAX job (``dynrules launch``).

Each process gets the variables a multi-process job needs, on this machine only::

    JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT   process 0 runs the coordinator there (free port)
    JAX_COORDINATOR_BIND_ADDRESS=127.0.0.1:PORT   ...bound to loopback, not to every interface
    JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=I

and `train-rm`, `score` and `eval` join the job when they see them
(:func:`dynrules.train.sharding.join_job`). Output lines are forwarded with a ``[I]`` prefix.
The launch fails if any process fails; when one process fails or is killed, the others are
stopped (SIGTERM, then SIGKILL after a grace period), so a broken job never hangs waiting
for a peer that is gone. The exit code is that of the first failure seen (128 + signal for a
signal). It is for trying a multi-process job on one machine (tests, smoke tests); on a TPU
pod or a cluster the scheduler starts the processes (README, "Several processes").
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from dynrules.errors import DynrulesError

POLL_SECONDS = 0.05


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_environment(
    index: int, processes: int, port: int, devices_per_process: int | None = None
) -> dict[str, str]:
    """The environment of process ``index`` of a local job (the variables above added)."""
    address = f"127.0.0.1:{port}"
    env = dict(os.environ)
    env.update(
        JAX_COORDINATOR_ADDRESS=address,
        JAX_COORDINATOR_BIND_ADDRESS=address,
        JAX_NUM_PROCESSES=str(processes),
        JAX_PROCESS_ID=str(index),
        PYTHONUNBUFFERED="1",  # lines reach the prefixing reader as they are printed
    )
    if devices_per_process:
        flag = f"--xla_force_host_platform_device_count={devices_per_process}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    return env


def launch(
    command: Sequence[str],
    processes: int,
    *,
    devices_per_process: int | None = None,
    grace_seconds: float = 10.0,
) -> int:
    """Run ``dynrules COMMAND…`` as ``processes`` local processes; the job's exit code.

    Its first line on stderr names the processes' ids: ``launch: N processes (pids …) …``.
    """
    if processes < 1:
        raise DynrulesError(f"launch: --processes must be at least 1, got {processes}")
    if not command:
        raise DynrulesError("launch: no command given (dynrules launch --processes N -- COMMAND …)")
    port = free_port()
    children: list[subprocess.Popen] = []
    forwarders: list[threading.Thread] = []
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # a terminated launcher stops its job
        previous = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        for index in range(processes):
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", "dynrules", *command],
                    env=process_environment(index, processes, port, devices_per_process),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
            )
        pids = " ".join(str(child.pid) for child in children)
        sys.stderr.write(
            f"launch: {processes} processes (pids {pids}), coordinator 127.0.0.1:{port}\n"
        )
        sys.stderr.flush()
        for index, child in enumerate(children):  # output waits in the pipes until here
            for pipe, sink in ((child.stdout, sys.stdout), (child.stderr, sys.stderr)):
                forwarder = threading.Thread(target=_forward, args=(pipe, sink, f"[{index}] "))
                forwarder.start()
                forwarders.append(forwarder)
        failure = _wait_for_job(children)
    finally:
        _stop(children, grace_seconds)
        for forwarder in forwarders:
            forwarder.join()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return failure


def _wait_for_job(children: list[subprocess.Popen]) -> int:
    """0 when every process succeeds; a failure's code as soon as one is seen."""
    while True:
        codes = [child.poll() for child in children]
        for code in codes:
            if code not in (None, 0):
                return 128 - code if code < 0 else code
        if all(code == 0 for code in codes):
            return 0
        time.sleep(POLL_SECONDS)


def _stop(children: list[subprocess.Popen], grace_seconds: float) -> None:
    """SIGTERM every process still running, SIGKILL what is left after the grace period."""
    running = [child for child in children if child.poll() is None]
    for child in running:
        child.terminate()
    deadline = time.monotonic() + grace_seconds
    for child in running:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _forward(pipe, sink, prefix: str) -> None:
    with pipe:
        for line in iter(pipe.readline, b""):
            text = line.decode("utf-8", "replace")
            sink.write(prefix + text + ("" if text.endswith("\n") else "\n"))
            sink.flush()


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the launcher dies, even by SIGKILL (Linux prctl)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
