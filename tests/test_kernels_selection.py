"""Selection kernels against their NumPy twins (tests/naive.py), with hypothesis."""

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynrules.kernels import selection as K

from . import naive

# A coarse grid of values makes equal criteria (ties) common, which is where kernels go wrong.
FLOAT_LEVELS = np.array([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0], np.float32)


@st.composite
def ratings(draw, dtype=None):
    n = draw(st.integers(1, 40))
    n_rules = draw(st.integers(1, 48))  # past RANK_LIMIT too: both top-k paths
    k = draw(st.integers(1, n_rules))
    dtype = dtype or draw(st.sampled_from(["float32", "int8"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if dtype == "int8":
        a = rng.integers(-127, 128, (n, n_rules), dtype=np.int8)
        b = rng.integers(-127, 128, (n, n_rules), dtype=np.int8)
        relevance = rng.integers(0, 128, (n, n_rules), dtype=np.int8)
        if draw(st.booleans()):  # coarse levels: many ties
            a, b = (a // 64 * 64).astype(np.int8), (b // 64 * 64).astype(np.int8)
        scale = 1 / 127
    else:
        a = rng.choice(FLOAT_LEVELS, (n, n_rules))
        b = rng.choice(FLOAT_LEVELS, (n, n_rules))
        relevance = rng.choice(np.abs(FLOAT_LEVELS), (n, n_rules))
        if draw(st.booleans()):  # continuous values: no ties
            a = rng.uniform(-1, 1, (n, n_rules)).astype(np.float32)
            relevance = rng.uniform(0, 1, (n, n_rules)).astype(np.float32)
        scale = 1.0
    return a, b, relevance, k, scale


@settings(max_examples=150, deadline=None)
@given(ratings(), st.sampled_from(sorted(K.CRITERIA)), st.sampled_from([0.5, 1.0, 0.3]))
def test_select_top_k_matches_naive(data, criterion, alpha):
    a, b, relevance, k, scale = data
    index = np.empty((a.shape[0], k), np.int16)
    margin = np.empty(a.shape[0])
    K.select_top_k(a, b, relevance, k, K.CRITERIA[criterion], alpha, scale, scale, index, margin)
    want_index, want_margin = naive.select_top_k(a, b, relevance, k, criterion, alpha, scale, scale)
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_array_equal(margin, want_margin)  # bit for bit: same order, float64


@settings(max_examples=60, deadline=None)
@given(ratings(), st.integers(0, 2**63 - 1), st.integers(0, 10**6))
def test_random_rules_match_naive(data, seed, first_pair):
    a, b, _, k, scale = data
    n, n_rules = a.shape
    index = np.empty((n, k), np.int32)
    K.random_rules(n, n_rules, k, seed, first_pair, index)
    np.testing.assert_array_equal(index, naive.random_rules(n, n_rules, k, seed, first_pair))
    assert all(len(set(row)) == k for row in index.tolist())
    margin = np.empty(n)
    K.margins_of_rows(a, b, index, scale, margin)
    want = [naive.margin_of(a[r], b[r], index[r], scale) for r in range(n)]
    np.testing.assert_array_equal(margin, want)


@settings(max_examples=60, deadline=None)
@given(ratings(), st.data())
def test_fixed_margins_and_labels(data, draw):
    a, b, _, k, scale = data
    rules = np.asarray(draw.draw(st.permutations(range(a.shape[1])))[:k], np.int64)
    margin = np.empty(a.shape[0])
    K.margins_of_fixed(a, b, rules, scale, margin)
    np.testing.assert_array_equal(
        margin, [naive.margin_of(a[r], b[r], rules, scale) for r in range(a.shape[0])]
    )
    label = np.empty(a.shape[0], np.int8)
    K.labels_of_margins(margin, label)
    np.testing.assert_array_equal(label, naive.labels_of(margin))


def test_exact_tie_is_zero_and_lower_index_wins():
    a = np.array([[0.5, 0.5, -0.5, 0.5]], np.float32)
    b = np.array([[0.0, 0.0, 0.0, 0.0]], np.float32)
    relevance = np.ones_like(a)
    index = np.empty((1, 2), np.int16)
    margin = np.empty(1)
    K.select_top_k(a, b, relevance, 2, K.ADDITIVE, 0.5, 1.0, 1.0, index, margin)
    assert index.tolist() == [[0, 1]]  # four equal criteria: the two lowest indices
    K.select_top_k(
        a, b, relevance, 3, K.ADDITIVE, 0.5, 1.0, 1.0, np.empty((1, 3), np.int16), margin
    )
    fixed = np.empty(1)
    K.margins_of_fixed(a, b, np.array([1, 2]), 1.0, fixed)
    label = np.empty(1, np.int8)
    K.labels_of_margins(fixed, label)
    assert fixed[0] == 0.0 and label[0] == 0


@pytest.mark.parametrize("threads", [1, 2])
def test_results_do_not_depend_on_thread_count(threads):
    rng = np.random.default_rng(7)
    a = rng.choice(FLOAT_LEVELS, (5000, 40))
    b = rng.choice(FLOAT_LEVELS, (5000, 40))
    relevance = rng.choice(np.abs(FLOAT_LEVELS), (5000, 40))
    outputs = []
    for n_threads in (1, min(threads, numba.config.NUMBA_NUM_THREADS)):
        numba.set_num_threads(n_threads)
        index, margin = np.empty((5000, 5), np.int16), np.empty(5000)
        K.select_top_k(a, b, relevance, 5, K.ADDITIVE, 0.5, 1.0, 1.0, index, margin)
        random_index = np.empty((5000, 5), np.int16)
        K.random_rules(5000, 40, 5, 3, 0, random_index)
        outputs.append((index, margin, random_index))
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for x, y in zip(outputs[0], outputs[1], strict=True):
        np.testing.assert_array_equal(x, y)


def test_random_rules_are_reproducible_per_pair_across_chunking():
    whole = np.empty((100, 4), np.int16)
    K.random_rules(100, 30, 4, 11, 0, whole)
    tail = np.empty((40, 4), np.int16)
    K.random_rules(40, 30, 4, 11, 60, tail)
    np.testing.assert_array_equal(whole[60:], tail)


@pytest.mark.parametrize("level", [0.0, 0.5])
def test_rows_of_equal_values_rank_by_index(level):
    # Every criterion equal: the ties rule alone orders the rules.
    n_rules = 64
    a = np.full((3, n_rules), level, np.float32)
    b = np.zeros_like(a)
    index, margin = np.empty((3, 4), np.int16), np.empty(3)
    K.select_top_k(a, b, np.zeros_like(a), 4, K.ADDITIVE, 0.5, 1.0, 1.0, index, margin)
    assert index.tolist() == [[0, 1, 2, 3]] * 3
    np.testing.assert_array_equal(margin, [4 * level] * 3)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 9),
    st.integers(120, 300),
    st.sampled_from(sorted(K.CRITERIA)),
    st.sampled_from([0.5, 0.3, 60000.0]),
    st.integers(0, 2**32 - 1),
)
@pytest.mark.slow
def test_wide_int8_rows_use_wider_keys_and_match_naive(n, n_rules, criterion, alpha, seed):
    # Past 128 rules, or with a large alpha, int8 keys no longer fit 16 bits (32 or 64 instead).
    rng = np.random.default_rng(seed)
    a, b = (rng.integers(-128, 128, (n, n_rules), dtype=np.int8) for _ in range(2))
    relevance = rng.integers(0, 128, (n, n_rules), dtype=np.int8)
    k = int(rng.integers(1, n_rules + 1))
    index, margin = np.empty((n, k), np.int16), np.empty(n)
    K.select_top_k(
        a, b, relevance, k, K.CRITERIA[criterion], alpha, 1 / 127, 1 / 127, index, margin
    )
    want_index, want_margin = naive.select_top_k(
        a, b, relevance, k, criterion, alpha, 1 / 127, 1 / 127
    )
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_array_equal(margin, want_margin)


def test_int8_criteria_are_exact_so_equal_criteria_tie():
    # 2·3 + |4| = 2·5 + |0| = 10 exactly: a tie, so the lower index wins. In float32 units
    # (3/127 + 0.5·4/127 against 5/127) rounding makes the second larger.
    a = np.array([[4, 0]], np.int8)
    b = np.zeros_like(a)
    relevance = np.array([[3, 5]], np.int8)
    index, margin = np.empty((1, 1), np.int16), np.empty(1)
    K.select_top_k(a, b, relevance, 1, K.ADDITIVE, 0.5, 1 / 127, 1 / 127, index, margin)
    assert index.tolist() == [[0]]
    assert margin[0] == 4 / 127


def test_int8_margins_are_exact_so_a_tie_is_zero():
    a = np.array([[3, 0, 0]], np.int8)
    b = np.array([[0, 1, 2]], np.int8)
    for run in (
        lambda m: K.margins_of_fixed(a, b, np.array([0, 1, 2]), 1 / 127, m),
        lambda m: K.select_top_k(
            a, b, a, 3, K.ABSOLUTE, 0.5, 1 / 127, 1 / 127, np.empty((1, 3), np.int16), m
        ),
    ):
        margin = np.empty(1)
        run(margin)
        assert margin[0] == 0.0


@pytest.mark.parametrize(
    "relevance, alpha, message",
    [
        (-1, 0.5, "relevance must lie in"),
        (3, -0.5, "alpha must be"),
        (3, 1 / 3000, "alpha must be"),
    ],
)
def test_int8_rejects_what_it_cannot_rank_exactly(relevance, alpha, message):
    a = np.zeros((5, 4), np.int8)
    rel = np.full_like(a, relevance)
    index, margin = np.empty((5, 2), np.int16), np.empty(5)
    with pytest.raises(ValueError, match=message):
        K.select_top_k(a, a, rel, 2, K.ADDITIVE, alpha, 1 / 127, 1 / 127, index, margin)


@settings(max_examples=30, deadline=None)
@given(ratings(), st.booleans())
def test_roofline_reads_every_element_once(data, use_relevance):
    from dynrules.kernels.roofline import read_sum

    a, b, relevance, _, _ = data
    want = float(a.astype(np.float64).sum() + b.astype(np.float64).sum())
    if use_relevance:
        want += float(relevance.astype(np.float64).sum())
    # The roofline may reassociate its float32 sum: equal up to rounding, not bit for bit.
    assert read_sum(a, b, relevance, use_relevance) == pytest.approx(want, rel=1e-5, abs=1e-3)
