"""Agreement of the embedded judge's adaptive top-5 labels with human labels, with intervals.

Held-out real pairs only: PyRIT's human harm scores turned into pairs (the held-out prompts of
:func:`dynrules.engine.datasets.pyrit_pairs`; the judge's constants were set on the train
prompts) and Anthropic's HH-RLHF harmless-base test split from ../shared/data (benchmark data,
never used at run time). Run: ``python -m benchmarks.judge_agreement [--hh-pairs N] [--json]``.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

from dynrules.bench.judge import judge_agreement, rate_in_memory, ratings_agreement
from dynrules.engine.datasets import pyrit_pairs
from dynrules.engine.judges.embedded import EmbeddedJudge
from dynrules.engine.pairs import normalize
from dynrules.engine.pool import load_pool

HH_TEST = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
)


def hh_pairs(limit: int | None) -> list[dict]:
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as handle:
        records = [normalize(json.loads(line), i, HH_TEST, i + 1) for i, line in enumerate(handle)]
    return records[:limit] if limit else records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--hh-pairs", type=int, default=0, help="first N HH test pairs (0 = all 2,312)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    judge = EmbeddedJudge(load_pool())
    heldout = pyrit_pairs("heldout")
    a, b, relevance, failed = rate_in_memory(judge, heldout)
    result = {
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
    if HH_TEST.exists():
        result["hh_harmless_test"] = judge_agreement(judge, hh_pairs(args.hh_pairs))
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
