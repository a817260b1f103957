"""The README's planning table: 1B / 3B / 8B / 70B reward models at sequence length 2048 on TPU slices.

Runs ``dynrules plan … --json`` once per (model, topology), each in a fresh process, and keeps
the results in benchmarks/results/plan.json, rewritten after every entry; a rerun skips the
entries already there, so a killed run resumes and a failed entry is retried (entries saved
before plans named their attention implementation are planned again). Then prints the Markdown
table.

Every run takes a global batch of 64 preference pairs (128 texts of 2048 tokens) with FSDP over
all chips, bf16 compute, float32 parameters and Adam state, full recomputation, and micro-batches
of one pair per chip (gradient accumulation makes up the 64): the least memory FSDP can do with
at that batch.

    dynrules bench plan-table           # compile what is missing, then print the table
    dynrules bench plan-table --table   # only print the table from the saved results
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys

from dynrules.atomic import atomic_path
from dynrules.benchmarks.paths import RESULTS as RESULTS_DIR
from dynrules.errors import DynrulesError

log = logging.getLogger(__name__)

RESULTS = RESULTS_DIR / "plan.json"
MODELS = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b")
TOPOLOGIES = {"v5e-8": 8, "v5e-64": 64, "v5p-8": 4, "v5p-128": 64}  # slice name → chips
SEQ, BATCH = 2048, 64
GIB = 2**30


def _key(model: str, topology: str) -> str:
    return f"{model} @ {topology}"


def _save(results: dict) -> None:
    with atomic_path(RESULTS) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")


def _machine() -> dict:
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at start",
        "jax": importlib.metadata.version("jax"),
        "libtpu": importlib.metadata.version("libtpu"),
    }


def run(results: dict) -> list[str]:
    """Plan every missing entry; returns the keys that failed (their errors printed)."""
    failed = []
    for model in MODELS:
        for topology, chips in TOPOLOGIES.items():
            key = _key(model, topology)
            if "attention" in results["plans"].get(key, {}):
                continue  # planned already; entries from before the attention field are redone
            command = [
                sys.executable,
                "-m",
                "dynrules",
                "plan",
                "--model",
                model,
                "--topology",
                topology,
                "--seq",
                str(SEQ),
                "--batch",
                str(BATCH),
                "--grad-accum",
                str(BATCH // chips),
                "--json",
            ]
            log.info("$ dynrules %s", " ".join(command[3:]))
            done = subprocess.run(
                command, capture_output=True, text=True, env=os.environ | {"JAX_PLATFORMS": "cpu"}
            )
            if done.returncode != 0:
                log.error(
                    "%s failed (exit %d):\n%s", key, done.returncode, done.stderr.strip()[-2000:]
                )
                failed.append(key)
                continue
            results["plans"][key] = json.loads(done.stdout.strip().splitlines()[-1])
            _save(results)
    return failed


def table(results: dict) -> str:
    lines = [
        "| model | params | slice (chips) | micro-batch × accumulation | GiB per chip (of HBM) "
        "| attention | fits | step at peak bf16 | compile |",
        "|---|---:|---|---:|---:|---|:-:|---:|---:|",
    ]
    for model in MODELS:
        for topology in TOPOLOGIES:
            plan = results["plans"].get(_key(model, topology))
            if plan is None:
                continue
            used = plan["bytes_per_device"]
            memory = "?" if used is None else f"{used / GIB:.1f}"
            seconds = plan["step_seconds_at_peak"]
            lines.append(
                f"| {model} | {plan['params'] / 1e9:.2f} B | {topology} ({plan['devices']}) "
                f"| {BATCH // plan['grad_accum']} × {plan['grad_accum']} "
                f"| {memory} ({plan['hbm_per_device'] / GIB:.2f}) "
                f"| {plan.get('attention', 'xla')} | {'yes' if plan['fits'] else 'no'} "
                f"| {'?' if seconds is None else f'{seconds:.2f} s'} "
                f"| {plan['compile_seconds']:.0f} s |"
            )
    return "\n".join(lines)


def plan_table(*, compile_missing: bool = True) -> str:
    """The Markdown table of the saved plans, after planning the missing entries unless
    ``compile_missing`` is false; an error naming the entries that failed (a rerun retries)."""
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"plans": {}}
    failed = []
    if compile_missing:
        results.setdefault("machine", _machine())
        failed = run(results)
    if failed:
        log.warning("the table so far:\n%s", table(results))
        raise DynrulesError(f"failed (rerun to retry): {', '.join(failed)}")
    return table(results)
