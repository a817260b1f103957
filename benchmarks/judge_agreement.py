"""Agreement of the embedded judge's adaptive top-5 labels with human labels, with intervals.

Held-out real pairs only: PyRIT's human harm scores turned into pairs (the held-out prompts of
:func:`dynrules.engine.datasets.pyrit_pairs`; the judge's constants were set on the train
prompts) and Anthropic's HH-RLHF harmless-base test split (benchmark data beside the repository,
:data:`dynrules.benchmarks.paths.HH_TEST`, never used at run time). Run:
``dynrules bench judge-agreement [--hh-pairs N] [--json]``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from dynrules.benchmarks.judge import judge_agreement, rate_in_memory, ratings_agreement
from dynrules.benchmarks.paths import HH_TEST, hh_test
from dynrules.engine.datasets import pyrit_pairs
from dynrules.engine.judges.embedded import EmbeddedJudge
from dynrules.engine.pairs import normalize
from dynrules.engine.pool import load_pool


def hh_pairs(path: Path, limit: int | None) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        records = [normalize(json.loads(line), i, path, i + 1) for i, line in enumerate(handle)]
    return records[:limit] if limit else records


def bench_judge_agreement(*, hh_pairs_limit: int = 0, data: str | Path | None = None) -> dict:
    """The embedded judge's agreement with human labels on PyRIT's held-out pairs (overall and
    by subset) and on the first ``hh_pairs_limit`` HH test pairs (0: all); the HH part is left
    out when ``data`` is not given and the file beside the repository is not there."""
    judge = EmbeddedJudge(load_pool())
    heldout = pyrit_pairs("heldout")
    a, b, relevance, failed = rate_in_memory(judge, heldout)
    result = {
        "benchmark": "judge-agreement",
        "judge": judge.identity["judge"],
        "pyrit_heldout": {**ratings_agreement(a, b, relevance, heldout), "failed_cells": failed},
    }
    by_subset = {}
    for subset in sorted({r["subset"] for r in heldout}):
        rows = np.array([r["subset"] == subset for r in heldout])
        by_subset[subset] = ratings_agreement(
            a[rows], b[rows], relevance[rows], [r for r in heldout if r["subset"] == subset]
        )
    result["pyrit_heldout_by_subset"] = by_subset
    if data or HH_TEST.is_file():
        result["hh_harmless_test"] = judge_agreement(judge, hh_pairs(hh_test(data), hh_pairs_limit))
    return result
