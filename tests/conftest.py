"""Shared fixtures. Tests run on the CPU; nothing here imports JAX."""

import json
import os

import numpy as np
import pytest

from dynrules.engine.pool import Rule, RulePool

# The suite runs on the CPU whatever accelerator plugins are installed: with libtpu (the tpu
# extra) JAX would otherwise probe for a TPU in every process, and hold libtpu's lock file.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture
def small_pool():
    return RulePool("small", tuple(Rule(f"r{i}", "test", f"rule number {i}") for i in range(8)))


def write_jsonl(path, records):
    with open(path, "w") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def scored_records(n, n_rules, seed=0, published=True, relevance=True):
    rng = np.random.default_rng(seed)
    names = (
        ("responseA", "responseB", "scoresA", "scoresB")
        if published
        else ("response_a", "response_b", "scores_a", "scores_b")
    )
    records = []
    for i in range(n):
        record = {
            "prompt": f"prompt {i}",
            names[0]: f"answer A{i}",
            names[1]: f"answer B{i}",
            names[2]: rng.uniform(-1, 1, n_rules).round(3).tolist(),
            names[3]: rng.uniform(-1, 1, n_rules).round(3).tolist(),
            "truth": int(i % 2),
        }
        if relevance:
            record["relevance"] = rng.uniform(0, 1, n_rules).round(3).tolist()
        records.append(record)
    return records
