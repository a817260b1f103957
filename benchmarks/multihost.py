"""The cost of the multi-process path: training pairs/s of one process driving two devices
against two processes driving one device each, on this machine, in one run.

Both sides are the same `dynrules train-rm` job (same pairs, global batches, steps and mesh
size: data=2), started through `dynrules launch`: ``-n 1 --devices-per-process 2`` against
``-n 2 --devices-per-process 1``. The second pays for what a multi-host job pays for —
gradients all-reduced between processes (gloo over loopback on CPU), a barrier for each
checkpoint — and on a CPU machine also for two XLA thread pools sharing the cores. Throughput
is read from the run's metrics.jsonl, leaving out the first log window (compilation).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dynrules.benchmarks.rewardmodel import synthetic_pairs
from dynrules.errors import DynrulesError

SIDES = {"1 process x 2 devices": (1, 2), "2 processes x 1 device": (2, 1)}


def bench_multihost(
    *,
    pairs_per_step: int = 8,
    max_length: int = 128,
    steps: int = 20,
    log_every: int = 5,
    model: str = "",
    repeats: int = 2,
) -> dict:
    """Steady-state training pairs/s of each side (best of ``repeats``), their ratio, final losses."""
    if steps < 2 * log_every or steps % log_every:
        raise DynrulesError("bench multihost: steps must be two or more whole log windows")
    results = {name: 0.0 for name in SIDES}
    final_loss: dict[str, float] = {}
    wall: dict[str, list[float]] = {name: [] for name in SIDES}
    with tempfile.TemporaryDirectory(prefix="dynrules-bench-multihost-") as tmp:
        pairs = Path(tmp) / "pairs.jsonl"
        pairs.write_text("".join(json.dumps(p) + "\n" for p in synthetic_pairs(pairs_per_step * 8)))
        overrides = [
            f"steps={steps}",
            f"batch_size={pairs_per_step}",
            f"max_length={max_length}",
            f"log_every={log_every}",
            f"checkpoint_every={steps}",
            "eval_fraction=0",
            "learning_rate=1e-5",
            *([f"model={model}"] if model else []),
        ]
        turns = [side for _ in range(repeats) for side in SIDES.items()]
        for turn, (name, (processes, devices)) in enumerate(turns):
            run = Path(tmp) / f"run-{turn}"
            command = [
                sys.executable,
                "-m",
                "dynrules",
                "launch",
                "-n",
                str(processes),
                "--devices-per-process",
                str(devices),
                "--",
                "train-rm",
                str(pairs),
                "--out",
                str(run),
                "--json",
                *overrides,
            ]
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            wall[name].append(round(time.perf_counter() - started, 2))
            if done.returncode != 0:
                raise DynrulesError(f"bench multihost: {name} failed:\n{done.stderr[-2000:]}")
            windows = [
                record
                for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if record["split"] == "train"
            ][1:]  # the first window includes compilation
            window_pairs = log_every * pairs_per_step
            seconds = sum(window_pairs / window["pairs_per_s"] for window in windows)
            results[name] = max(results[name], len(windows) * window_pairs / seconds)
            final_loss[name] = windows[-1]["loss"]
    one, two = results.values()
    return {
        "benchmark": "multihost",
        "config": {
            "pairs_per_step": pairs_per_step,
            "max_length": max_length,
            "steps": steps,
            "log_every": log_every,
            "model": model or "all-MiniLM-L6-v2",
            "repeats": repeats,
        },
        "results": results,
        "ratios": {"two_processes_over_one": two / one},
        "final_loss": final_loss,
        "wall_seconds": wall,
    }
