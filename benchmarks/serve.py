"""``dynrules bench serve``: the reward server against offline scoring of the same model.

One run, one machine, one model: all-MiniLM-L6-v2 with a random linear head (length 256),
exported as a model directory. Data: ``clients × requests`` synthetic pairs (prompt + two
responses of 10–120 words); a request carries one pair (two items), so requests/s = pairs/s.

- offline: the scorer ``dynrules score`` runs (warm: every bucket compiled first) over all
  the pairs' texts in one call, as ``score`` scores a chunk of a file; measured before the
  server starts and after it stops, and averaged (the load of a shared machine drifts);
- server: ``dynrules serve`` with its default options in a process of its own, then one
  client sending requests one after another (c1), then ``clients`` concurrent clients each
  sending ``requests`` (c64), from this process (asyncio + httpx); p50/p99 are the c64
  request latencies. A request fails when it is not answered 200 or its rewards differ from
  the offline rewards by more than 1e-4.

The server and the clients share the machine's cores, as a trainer and its reward server on
one host do.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dynrules.benchmarks.rewardmodel import synthetic_pairs
from dynrules.errors import DynrulesError
from dynrules.launch import free_port

TOLERANCE = 1e-4


def _model_dir(directory: Path, max_length: int, seed: int) -> Path:
    """MiniLM + a random head (std 0.05: rewards spread over about ±1) as a model directory."""
    from dynrules.models import bert_checkpoint as bert_ckpt
    from dynrules.models import classifier as mdl

    loaded = bert_ckpt.read_checkpoint(None)
    spec = mdl.ModelSpec(loaded.config, max_length=max_length)
    head = np.random.default_rng(seed).normal(0, 0.05, (loaded.config.hidden_size, 1))
    params = {
        "encoder": loaded.params,
        "head_kernel": head.astype(np.float32),
        "head_bias": np.zeros(1, np.float32),
    }
    mdl.export_model(params, spec, loaded.tokenizer, directory)
    return directory


async def _load(url: str, requests: list[list[list[dict]]], expected: list[np.ndarray]) -> dict:
    """Each inner list is one client's requests (each a list of items), sent one after another;
    all clients at once."""
    import httpx

    latencies: list[float] = []
    failures: collections.Counter[str] = collections.Counter()

    async def client(http, mine, wanted):
        for items, want in zip(mine, wanted, strict=True):
            started = time.perf_counter()
            try:
                reply = await http.post(f"{url}/v1/rewards", json={"items": items})
            except httpx.TransportError as exc:
                failures[type(exc).__name__] += 1
                continue
            latencies.append(time.perf_counter() - started)
            if reply.status_code != 200:
                failures[f"HTTP {reply.status_code}"] += 1
            elif not np.allclose(reply.json()["rewards"], want, atol=TOLERANCE, rtol=0):
                failures["wrong rewards"] += 1

    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
    async with httpx.AsyncClient(limits=limits, timeout=600) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http, r, e) for r, e in zip(requests, expected, strict=True)))
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "latencies": np.array(latencies), "failures": failures}


def bench_serve(
    *,
    clients: int = 64,
    requests: int = 20,
    c1_requests: int = 64,
    max_length: int = 256,
    seed: int = 0,
) -> dict:
    from dynrules.train.data import load_preferences
    from dynrules.train.scoring import Scorer

    n_pairs = clients * requests
    pairs = load_preferences(synthetic_pairs(n_pairs, seed))
    items = [
        [{"prompt": p.prompt, "response": p.chosen}, {"prompt": p.prompt, "response": p.rejected}]
        for p in pairs
    ]
    texts = [t for p in pairs for t in p.texts()]
    with tempfile.TemporaryDirectory(prefix="dynrules-bench-serve-") as tmp:
        model = _model_dir(Path(tmp) / "model", max_length, seed)

        scorer = Scorer.from_model_dir(model)
        scorer.warm_up()

        def score_offline():
            started = time.perf_counter()
            rewards = scorer.rewards(texts).reshape(n_pairs, 2)
            return rewards, n_pairs / (time.perf_counter() - started)

        offline, offline_before = score_offline()

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = Path(tmp) / "server.log"
        started = time.perf_counter()
        with open(log_path, "w") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "dynrules", "serve", str(model), "--port", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            from dynrules.client import RewardClient

            with RewardClient(url) as probe:
                while not probe.ready():
                    if server.poll() is not None:
                        raise DynrulesError(f"the server exited: {log_path.read_text()[-2000:]}")
                    time.sleep(0.2)
            startup = time.perf_counter() - started
            c1 = asyncio.run(_load(url, [items[:c1_requests]], [offline[:c1_requests]]))
            per_client = [slice(c * requests, (c + 1) * requests) for c in range(clients)]
            items_before, batches_before = _batch_totals(url)
            c64 = asyncio.run(
                _load(url, [items[s] for s in per_client], [offline[s] for s in per_client])
            )
            items_after, batches_after = _batch_totals(url)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()

        _, offline_after = score_offline()  # again: a shared machine's load drifts

    offline_rate = (offline_before + offline_after) / 2
    c64_rate = n_pairs / c64["seconds"]
    failures = c1["failures"] + c64["failures"]
    return {
        "benchmark": "serve",
        "setup": {
            "model": "all-MiniLM-L6-v2 reward model",
            "max_length": max_length,
            "clients": clients,
            "requests_per_client": requests,
            "c1_requests": c1_requests,
            "items_per_request": 2,
            "cpus": os.cpu_count(),
        },
        "offline_pairs_per_s": offline_rate,
        "server_pairs_per_s_c1": min(c1_requests, n_pairs) / c1["seconds"],
        "server_pairs_per_s_c64": c64_rate,
        "p50_ms": float(np.percentile(c64["latencies"], 50) * 1000),
        "p99_ms": float(np.percentile(c64["latencies"], 99) * 1000),
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "c64_over_offline": c64_rate / offline_rate,
        "offline_runs_pairs_per_s": [offline_before, offline_after],
        "server_mean_batch_items_c64": (items_after - items_before)
        / max(batches_after - batches_before, 1),
        "server_startup_s": startup,
    }


def _batch_totals(url: str) -> tuple[float, float]:
    """(items, model batches) the server has run so far, from its /metrics."""
    import httpx

    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(("dynrules_batch_items_sum", "dynrules_batch_items_count")):
            name, value = line.split()
            values[name] = float(value)
    return values["dynrules_batch_items_sum"], values["dynrules_batch_items_count"]
