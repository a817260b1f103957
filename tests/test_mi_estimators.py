"""MI estimators, G-test and intervals against analytic cases; streaming statistics over a store."""

import math

import numpy as np
import pytest

from dynrules.engine import mi as M
from dynrules.engine.pool import Rule, RulePool
from dynrules.engine.store import PairTableWriter, RatingStore
from dynrules.errors import InputError

from . import naive_mi


def binary_entropy(p):
    return -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def test_independent_variables_plug_in_bias_and_miller_madow():
    rng = np.random.default_rng(0)
    n, kx, ky = 2000, 3, 2
    p = np.outer([0.3, 0.2, 0.5], [0.6, 0.4]).ravel()
    tables = rng.multinomial(n, p, size=4000).reshape(-1, kx, ky)
    expected_bias = (kx - 1) * (ky - 1) / (2 * n * math.log(2))
    plug_in = M.mutual_information(tables, "plug-in").mean()
    assert plug_in == pytest.approx(expected_bias, rel=0.08)
    assert abs(M.mutual_information(tables).mean()) < 0.08 * expected_bias


def test_binary_symmetric_channel():
    for flip in (0.0, 0.05, 0.2, 0.5):
        exact = 1e6 * np.array([[(1 - flip) / 2, flip / 2], [flip / 2, (1 - flip) / 2]])
        want = 1.0 - (binary_entropy(flip) if 0 < flip < 1 else 0.0)
        assert float(M.mutual_information(exact, "plug-in")) == pytest.approx(want, abs=1e-9)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2, 1_000_000)
    y = x ^ (rng.random(1_000_000) < 0.1)
    table = np.zeros((2, 2))
    np.add.at(table, (x, y), 1)
    assert float(M.mutual_information(table)) == pytest.approx(1 - binary_entropy(0.1), abs=3e-3)


def test_vectorised_estimators_match_the_definition():
    rng = np.random.default_rng(2)
    tables = rng.integers(0, 30, (50, 3, 2))
    tables[0] = 0
    tables[1, 1] = 0
    for estimator, miller_madow in (("plug-in", False), ("miller-madow", True)):
        got = M.mutual_information(tables, estimator)
        want = [naive_mi.mutual_information_bits(t, miller_madow) for t in tables]
        np.testing.assert_allclose(got, want, atol=1e-12)
    with pytest.raises(ValueError):
        M.mutual_information(tables, "kde")


def test_chi2_survival_function():
    for x in (0.1, 1.0, 5.0, 30.0):
        assert M.chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-12)
        assert M.chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-10)
    assert M.chi2_sf(0.0, 3) == 1.0 and M.chi2_sf(5.0, 0) == 1.0
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 7, 12, 30, 99):
        for x in (0.01, 0.5, 2.0, df * 0.9, df + 1.5, 3.0 * df, 200.0):
            assert M.chi2_sf(x, df) == pytest.approx(stats.chi2.sf(x, df), rel=1e-9, abs=1e-300)


def test_g_test_has_its_nominal_size_under_independence():
    rng = np.random.default_rng(3)
    tables = rng.multinomial(
        3000, np.outer([0.2, 0.1, 0.7], [0.5, 0.5]).ravel(), size=3000
    ).reshape(-1, 3, 2)
    p = M.g_test_p_value(tables)
    assert 0.035 < np.mean(p < 0.05) < 0.065
    assert float(M.g_test_p_value(np.array([[500, 10], [0, 0], [10, 500]]))) < 1e-100


def test_resampling_interval_covers_the_true_value():
    rng = np.random.default_rng(4)
    flip, n = 0.2, 5000
    truth = 1 - binary_entropy(flip)
    tables = rng.multinomial(
        n, [(1 - flip) / 2, flip / 2, flip / 2, (1 - flip) / 2], size=200
    ).reshape(-1, 2, 2)
    low, high = M.bootstrap_interval(tables, resamples=1000, seed=9)
    assert low.shape == (200,) and np.all(low <= high)
    assert 0.9 <= np.mean((low <= truth) & (truth <= high)) <= 0.99
    again = M.bootstrap_interval(tables, resamples=1000, seed=9)
    np.testing.assert_array_equal(again[0], low)


def test_agreement_ties_and_coverage():
    table = np.array([[30, 10], [5, 5], [20, 60]])  # rows: label -, 0, +; columns: truth B, A
    assert float(M.agreement(table)) == pytest.approx((60 + 30) / 120)
    assert int(M.ties(table)) == 10 and float(M.coverage(table)) == pytest.approx(120 / 130)
    summary = M.label_summary(table, resamples=200)
    assert summary.ci_low <= summary.mi_bits <= summary.ci_high
    assert M.label_summary(np.array([[0, 0], [7, 3], [0, 0]]), resamples=50).agreement is None


def _store(tmp_path, a, b, truth, chunk_rows=64, field="truth"):
    pool = RulePool("t", tuple(Rule(f"r{i}", "t", f"rule {i}") for i in range(a.shape[1])))
    store = RatingStore.create(
        tmp_path / "store", pool=pool, n_pairs=a.shape[0], chunk_rows=chunk_rows
    )
    store.write_rows(0, a, b)
    writer = PairTableWriter(store.pairs_path)
    writer.write({"id": [str(i) for i in range(a.shape[0])], field: truth})
    writer.close()
    return store


def test_streaming_statistics_match_whole_arrays(tmp_path):
    rng = np.random.default_rng(5)
    a = rng.choice(np.float32([-1, 0, 0.5, 1]), (300, 7))
    b = rng.choice(np.float32([-1, 0, 0.5, 1]), (300, 7))
    truth = rng.integers(0, 2, 300)
    store = _store(tmp_path, a, b, truth)
    labels = M.truth_labels(store, "truth")
    stats = M.rule_statistics(store, labels, redundancy_pairs=100)
    np.testing.assert_array_equal(stats.vote_counts, naive_mi.vote_counts(a, b, labels))
    d = a.astype(np.float64) - b
    np.testing.assert_allclose(stats.discrepancy_std(), d.std(axis=0), atol=1e-12)
    sample = np.arange(0, 300, 3)
    agree, both = naive_mi.vote_agreement(naive_mi.votes(a[sample], b[sample]))
    np.testing.assert_array_equal(stats.agree, agree)
    np.testing.assert_array_equal(stats.both, both)
    np.testing.assert_array_equal(M.subsample_rows(64, 128, 3), np.arange(66, 128, 3) - 64)


def test_truth_must_be_binary(tmp_path):
    a = np.zeros((4, 2), np.float32)
    store = _store(tmp_path, a, a, np.array([1.0, 0.0, 0.5, 1.0]))
    with pytest.raises(InputError, match="pair 2 has 0.5"):
        M.truth_labels(store, "truth")
    with pytest.raises(InputError, match="no pair field 'human'"):
        M.truth_labels(store, "human")
    np.testing.assert_array_equal(
        M.truth_labels(store, np.array([True, False, True, True])), [1, 0, 1, 1]
    )


def test_parse_ks():
    from dynrules.engine.ablate import parse_ks

    assert parse_ks("5,1,3-4,3", 10) == [1, 3, 4, 5]
    assert parse_ks("1-R", 4) == [1, 2, 3, 4] and parse_ks("R", 7) == [7]


def test_ablate_a_store_without_relevance(tmp_path):
    from dynrules.engine.ablate import ablate

    rng = np.random.default_rng(6)
    a = rng.choice(np.float32([-1, 0, 0.5, 1]), (500, 6))
    b = rng.choice(np.float32([-1, 0, 0.5, 1]), (500, 6))
    store = _store(tmp_path, a, b, rng.integers(0, 2, 500))
    rows = ablate(store, "truth", [2], resamples=50).rows
    assert {(r.policy, r.criterion) for r in rows} == {
        ("adaptive", "absolute"),
        ("zscore", "absolute"),
        ("greedy", "absolute"),
        ("all", None),
        ("random", None),
        ("fixed", None),
    }
    assert all(r.ties > 0 and 0 < r.coverage < 1 for r in rows)  # coarse levels: exact ties happen
