"""RewardBench-style grouping of pairwise results: counts, accuracy, length baseline, ties wrong."""

import numpy as np
import pytest

from dynrules.train.data import Pair
from dynrules.train.evaluate import GroupAccuracy, pair_report


def test_sections_and_subsets_with_counts_and_length_baseline():
    pairs = [
        Pair("long safe answer", "no", subset="x", section="refuse"),
        Pair("a", "longer one", subset="x", section="refuse"),
        Pair("answer here", "no", subset="y", section="respond"),
        Pair("answer", "no!", subset="y", section="respond"),
        Pair("tie", "tie!", subset="z"),
    ]
    chosen = np.array([1.0, 0.0, 2.0, 1.0, 0.5])
    rejected = np.array([0.0, 1.0, 1.0, 1.0, 0.5])  # pair 3 and 4 are ties: wrong
    report = pair_report(pairs, chosen, rejected)
    assert report.pairs == 5 and report.accuracy == pytest.approx(2 / 5)
    assert report.sections == {
        "all": GroupAccuracy(pairs=1, accuracy=0.0, length_baseline=0.0),
        "refuse": GroupAccuracy(pairs=2, accuracy=0.5, length_baseline=0.5),
        "respond": GroupAccuracy(pairs=2, accuracy=0.5, length_baseline=1.0),
    }
    assert report.subsets["y"] == GroupAccuracy(pairs=2, accuracy=0.5, length_baseline=1.0)
    weighted = sum(g.accuracy * g.pairs for g in report.sections.values()) / 5
    assert report.accuracy == pytest.approx(weighted)
