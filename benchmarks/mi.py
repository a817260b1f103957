"""`dynrules bench mi`: per-rule vote MI over N pairs × R rules, side by side with a loop of
scikit-learn's ``mutual_info_score`` (one call per rule, on a subsample, scaled to pairs per
second) and with the parallel read roofline (one pass reading a and b, nothing else).

    point_seconds          count every rule's vote-by-truth table and take its Miller–Madow MI
    interval_1000_seconds  the same plus a 1,000-resample interval for every rule's MI
"""

from __future__ import annotations

import numpy as np

from dynrules.benchmarks.selection import best_seconds
from dynrules.engine.mi import bootstrap_interval, mutual_information
from dynrules.kernels import contingency as C
from dynrules.kernels import roofline


def sklearn_loop(a, b, truth) -> list[float]:
    """Per-rule MI the ordinary way: votes by NumPy, one mutual_info_score call per rule."""
    from sklearn.metrics import mutual_info_score

    return [mutual_info_score(truth, np.sign(a[:, i] - b[:, i])) for i in range(a.shape[1])]


def bench_mi(
    n_pairs: int,
    n_rules: int = 100,
    *,
    sklearn_pairs: int = 20_000,
    resamples: int = 1000,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    rng = np.random.default_rng(seed)
    a = rng.random((n_pairs, n_rules), np.float32) * 2 - 1
    b = rng.random((n_pairs, n_rules), np.float32) * 2 - 1
    truth = rng.integers(0, 2, n_pairs, dtype=np.int8)

    def point():
        counts = np.zeros((n_rules, 3, 2), np.int64)
        C.vote_counts(a, b, truth, counts)
        return counts, mutual_information(counts)

    def with_interval():
        counts, mi = point()
        return mi, bootstrap_interval(counts, resamples=resamples, seed=seed)

    sub = min(sklearn_pairs, n_pairs)
    point_seconds = best_seconds(point, repeats)
    interval_seconds = best_seconds(with_interval, repeats)
    results = {
        "sklearn_loop": sub / best_seconds(lambda: sklearn_loop(a[:sub], b[:sub], truth[:sub]), 1),
        "kernel": n_pairs / point_seconds,
        "roofline": n_pairs / best_seconds(lambda: roofline.read_sum(a, b, a, False), repeats),
    }
    ratios = {
        "kernel / sklearn_loop": results["kernel"] / results["sklearn_loop"],
        "kernel / roofline": results["kernel"] / results["roofline"],
        "interval_1000 / point": interval_seconds / point_seconds,
    }
    return {
        "benchmark": "mi",
        "pairs": n_pairs,
        "rules": n_rules,
        "results": {name: round(v, 1) for name, v in results.items()},
        "point_seconds": round(point_seconds, 6),
        "interval_1000_seconds": round(interval_seconds, 6),
        "resamples": resamples,
        "ratios": {name: round(v, 3) for name, v in ratios.items()},
    }
