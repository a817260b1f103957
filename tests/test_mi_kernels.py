"""Contingency and policy kernels against their NumPy twins (tests/naive_mi.py), with hypothesis."""

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynrules.kernels import contingency as C
from dynrules.kernels import policies as P
from dynrules.kernels import selection as K

from . import naive, naive_mi

# Coarse levels make equal scores (zero votes) and equal criteria (ties) common.
LEVELS = np.array([-1.0, -0.5, 0.0, 0.5, 1.0], np.float32)


@st.composite
def ratings(draw):
    n = draw(st.integers(1, 60))
    n_rules = draw(st.integers(1, 16))
    k = draw(st.integers(1, n_rules))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        a = rng.integers(-127, 128, (n, n_rules), dtype=np.int8) // 64 * 64
        b = rng.integers(-127, 128, (n, n_rules), dtype=np.int8) // 64 * 64
        a, b = a.astype(np.int8), b.astype(np.int8)
        relevance = rng.integers(0, 128, (n, n_rules), dtype=np.int8)
        scale = 1 / 127
    else:
        a, b = rng.choice(LEVELS, (n, n_rules)), rng.choice(LEVELS, (n, n_rules))
        relevance = rng.choice(np.abs(LEVELS), (n, n_rules))
        scale = 1.0
    truth = rng.integers(0, 2, n).astype(np.int8)
    return a, b, relevance, truth, k, scale


@settings(max_examples=80, deadline=None)
@given(ratings(), st.integers(0, 60))
def test_vote_counts_match_naive_and_stream_by_chunks(data, cut):
    a, b, _, truth, _, _ = data
    want = naive_mi.vote_counts(a, b, truth)
    whole = np.zeros_like(want)
    C.vote_counts(a, b, truth, whole)
    np.testing.assert_array_equal(whole, want)
    cut = min(cut, a.shape[0])
    chunked = np.zeros_like(want)
    C.vote_counts(a[:cut], b[:cut], truth[:cut], chunked)
    C.vote_counts(a[cut:], b[cut:], truth[cut:], chunked)
    np.testing.assert_array_equal(chunked, want)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-1, 1), st.integers(0, 1)), max_size=200))
def test_label_counts_match_naive(pairs):
    label = np.array([p[0] for p in pairs], np.int8)
    truth = np.array([p[1] for p in pairs], np.int8)
    out = np.zeros((3, 2), np.int64)
    C.label_counts(label, truth, out)
    np.testing.assert_array_equal(out, naive_mi.label_counts(label, truth))


@settings(max_examples=60, deadline=None)
@given(ratings())
def test_votes_agreement_and_moments_match_naive(data):
    a, b, _, _, _, scale = data
    votes = np.empty(a.shape, np.int8)
    C.votes_of(a, b, votes)
    np.testing.assert_array_equal(votes, naive_mi.votes(a, b))
    agree, both = np.zeros((a.shape[1],) * 2, np.int64), np.zeros((a.shape[1],) * 2, np.int64)
    C.vote_agreement(votes, agree, both)
    want_agree, want_both = naive_mi.vote_agreement(votes)
    np.testing.assert_array_equal(agree, want_agree)
    np.testing.assert_array_equal(both, want_both)
    sums, squares = np.zeros(a.shape[1]), np.zeros(a.shape[1])
    C.discrepancy_moments(a, b, scale, sums, squares)
    d = (a.astype(np.float64) - b.astype(np.float64)) * scale
    np.testing.assert_allclose(sums, d.sum(axis=0), atol=1e-12)
    np.testing.assert_allclose(squares, (d * d).sum(axis=0), atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=6, max_size=6), st.booleans())
def test_table_mi_matches_definition(cells, miller_madow):
    table = np.asarray(cells, np.float64).reshape(1, 3, 2)
    out = np.empty(1)
    C.mutual_information_nats(table, miller_madow, out)
    assert out[0] / np.log(2) == pytest.approx(
        naive_mi.mutual_information_bits(table[0], miller_madow), abs=1e-12
    )


def test_resampling_keeps_totals_and_does_not_depend_on_thread_count():
    tables = np.array(
        [[[30, 5], [0, 0], [7, 40]], [[1, 1], [1, 1], [1, 1]], [[0, 0], [0, 0], [0, 0]]], np.float64
    )
    runs = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        out = np.empty((200, 3))
        C.resampled_mutual_information(tables, 200, 5, True, out)
        runs.append(out)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    np.testing.assert_array_equal(runs[0], runs[1])
    assert np.all(runs[0][:, 2] == 0.0)  # an empty table stays empty
    # A resample of a table with an empty row keeps that row empty, and MI stays plausible.
    assert np.all(np.isfinite(runs[0])) and runs[0][:, 0].std() > 0


@pytest.mark.parametrize("threads", [1, 2])
def test_counts_do_not_depend_on_thread_count(threads):
    rng = np.random.default_rng(3)
    a, b = rng.choice(LEVELS, (9000, 30)), rng.choice(LEVELS, (9000, 30))
    truth = rng.integers(0, 2, 9000).astype(np.int8)
    results = []
    for n_threads in (1, min(threads, numba.config.NUMBA_NUM_THREADS)):
        numba.set_num_threads(n_threads)
        counts, sums, squares = np.zeros((30, 3, 2), np.int64), np.zeros(30), np.zeros(30)
        C.vote_counts(a, b, truth, counts)
        C.discrepancy_moments(a, b, 1.0, sums, squares)
        results.append((counts, sums, squares))
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for x, y in zip(results[0], results[1], strict=True):
        np.testing.assert_array_equal(x, y)


@settings(max_examples=80, deadline=None)
@given(ratings(), st.sampled_from(sorted(K.CRITERIA)), st.data())
def test_weighted_top_k_matches_naive(data, criterion, draw):
    a, b, relevance, _, k, scale = data
    weight = np.asarray(
        draw.draw(
            st.lists(
                st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=a.shape[1], max_size=a.shape[1]
            )
        ),
        np.float32,
    )
    index, margin = np.empty((a.shape[0], k), np.int16), np.empty(a.shape[0])
    K.select_top_k(
        a, b, relevance, k, K.CRITERIA[criterion], 0.5, scale, scale, index, margin, weight=weight
    )
    want_index, want_margin = naive.select_top_k(
        a, b, relevance, k, criterion, 0.5, scale, scale, weight
    )
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_array_equal(margin, want_margin)


@settings(max_examples=80, deadline=None)
@given(ratings(), st.sampled_from(sorted(K.CRITERIA)), st.sampled_from([0.0, 0.5, 1.0]), st.data())
def test_greedy_matches_naive(data, criterion, discount, draw):
    a, b, relevance, _, k, scale = data
    n_rules = a.shape[1]
    rng = np.random.default_rng(draw.draw(st.integers(0, 2**32 - 1)))
    redundancy = rng.choice(np.array([0.0, 0.25, 0.5, 1.0], np.float32), (n_rules, n_rules))
    weight = np.ones(n_rules, np.float32)
    index, margin = np.empty((a.shape[0], k), np.int16), np.empty(a.shape[0])
    P.select_greedy(
        a,
        b,
        relevance,
        k,
        K.CRITERIA[criterion],
        0.5,
        scale,
        scale,
        weight,
        redundancy,
        discount,
        index,
        margin,
    )
    want_index, want_margin = naive_mi.greedy(
        a, b, relevance, k, criterion, 0.5, scale, scale, weight, redundancy, discount
    )
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_array_equal(margin, want_margin)


@settings(max_examples=40, deadline=None)
@given(ratings(), st.sampled_from(sorted(K.CRITERIA)))
def test_unit_weights_and_zero_discount_reduce_to_top_k(data, criterion):
    a, b, relevance, _, k, scale = data
    n, n_rules = a.shape
    ones, redundancy = np.ones(n_rules, np.float32), np.ones((n_rules, n_rules), np.float32)
    want_index, want_margin = np.empty((n, k), np.int16), np.empty(n)
    K.select_top_k(
        a, b, relevance, k, K.CRITERIA[criterion], 0.5, scale, scale, want_index, want_margin
    )
    for run in (
        lambda i, m: K.select_top_k(
            a, b, relevance, k, K.CRITERIA[criterion], 0.5, scale, scale, i, m, weight=ones
        ),
        lambda i, m: P.select_greedy(
            a,
            b,
            relevance,
            k,
            K.CRITERIA[criterion],
            0.5,
            scale,
            scale,
            ones,
            redundancy,
            0.0,
            i,
            m,
        ),
    ):
        index, margin = np.empty((n, k), np.int16), np.empty(n)
        run(index, margin)
        np.testing.assert_array_equal(index, want_index)
        np.testing.assert_array_equal(margin, want_margin)


def test_greedy_skips_a_duplicate():
    # Rules 0 and 1 are duplicates with the largest discrepancy; rule 2 is independent.
    a = np.array([[1.0, 0.95, 0.5, 0.0]], np.float32)
    b = np.zeros_like(a)
    redundancy = np.eye(4, dtype=np.float32)
    redundancy[0, 1] = redundancy[1, 0] = 0.95
    index, margin = np.empty((1, 2), np.int16), np.empty(1)
    P.select_greedy(
        a,
        b,
        a,
        2,
        K.ABSOLUTE,
        0.5,
        1.0,
        1.0,
        np.ones(4, np.float32),
        redundancy,
        1.0,
        index,
        margin,
    )
    assert index.tolist() == [[0, 2]] and margin[0] == pytest.approx(1.5)
