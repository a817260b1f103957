"""Per-pair rule discrepancies, top-k selection, labels and margins.

Inputs are pair-major rating matrices ``a`` and ``b`` (scores of responses A and B, [n, R]) and
optionally ``relevance`` [n, R], stored as float32 or int8 (int8 holds round(127·s); ``scale``
and ``relevance_scale`` turn stored units back into [-1, 1] and [0, 1]).

Criterion per rule i, with d_i = a_i − b_i and weight_i = 1 unless given:

float32 ratings, evaluated in float32 in exactly this order, spread_i = |d_i|·scale·weight_i:
    ADDITIVE  relevance_i·relevance_scale + alpha·spread_i   (the published choice, alpha = 0.5)
    PRODUCT   relevance_i·relevance_scale · spread_i
    ABSOLUTE  spread_i                                       (no relevance)
int8 ratings, in stored units (relevance and scores share the unit 1/127, so relevance_scale must
equal scale), with alpha = p/q (see :func:`alpha_fraction`) and spread_i = |d_i|·weight_i:
    ADDITIVE  q·relevance_i + p·spread_i
    PRODUCT   relevance_i · spread_i
    ABSOLUTE  spread_i
Without weights every int8 criterion is an exact integer, so equal criteria are truly equal
(float rounding would split some of them at random) and the kernel ranks them in 16-bit integer
lanes; with weights it is a float32 value, in that order. Both rank as the real-number criterion
relevance + alpha·|d| does, times a positive constant. int8 relevance must lie in [0, 127].

The k largest criteria are selected; on equal criteria the lower rule index wins, so results
do not depend on thread count or chunking. Indices come out in rank order (criterion
descending, index ascending). Margins are (Σ_{i∈S} (a_i − b_i))·scale, the sum taken in float64
in that order — exact for int8 — so an exact tie is an exact zero.

How the top k are found: each criterion becomes an unsigned integer key whose high bits order
the criterion and whose low s bits hold 2^s − 1 − i, so keys are distinct and the larger key is
the better rule by the ties rule (16-bit keys with s = 7 for int8 ratings of up to 128 rules and
alpha = 1/2, 32-bit keys with s = 8 up to 256 rules, else 64-bit keys with s = 32; float32
criteria map order-preserving onto 32 bits, in 64-bit keys). Round j takes the largest key
below the previous round's, as the largest (key − previous) mod 2^width — a subtract and a max
per vector lane, no compare, no store — and four rows are ranked at once so that the rounds'
horizontal reductions overlap. Rows are padded to whole vector blocks with key 0, which no rule
has (a rule's index part is 2^s − 1 − i ≥ 1 while fewer than 2^s rules) or, with 2^s rules,
there is no padding.
"""

import functools
from typing import Any, Literal

import numba
import numpy as np
from numba.core import types
from numba.extending import overload

from .config import EXACT, PARALLEL_EXACT, ROW_BLOCK, VECTOR_BYTES

ADDITIVE, PRODUCT, ABSOLUTE = 0, 1, 2
Criterion = Literal["additive", "product", "absolute"]
CRITERIA: dict[Criterion, int] = {"additive": ADDITIVE, "product": PRODUCT, "absolute": ABSOLUTE}

MAX_ALPHA_DENOMINATOR = 1024
# Largest |relevance| and |a − b| in int8 units; q·127 + p·255 must stay exact in float32.
INT8_MAX_RELEVANCE, INT8_MAX_SPREAD = 127, 255
EXACT_FLOAT32_INTEGERS = 1 << 24
ROWS_AT_ONCE = 4  # rows ranked together (the kernels below are written out for four)


@numba.njit(**EXACT)
def alpha_fraction(alpha):
    """alpha as p/q with the smallest q ≤ 1024 within 1e-9 (0.5 = 1/2, 0.3 = 3/10).

    int8 criteria are the exact integers q·relevance + p·|d|; raises ValueError for an alpha
    that is negative, no such fraction, or too large for those integers to stay exact.
    """
    if alpha >= 0:
        for q in range(1, MAX_ALPHA_DENOMINATOR + 1):
            p = np.int64(np.rint(alpha * q))
            if abs(p / q - alpha) <= 1e-9:
                if q * INT8_MAX_RELEVANCE + p * INT8_MAX_SPREAD < EXACT_FLOAT32_INTEGERS:
                    return p, np.int64(q)
                break
    raise ValueError(
        "with int8 ratings alpha must be a fraction p/q, q <= 1024, between 0 and about 65,000"
    )


def holds_integers(array):
    """True for an integer array. Inside a kernel it is a compile-time constant (see overload)."""
    return np.issubdtype(array.dtype, np.integer)


@overload(holds_integers)
def _holds_integers_compiled(array):
    result = isinstance(array.dtype, types.Integer)
    return lambda array: result


@numba.njit(**EXACT)
def criterion_coefficients(a, criterion, alpha, scale, relevance_scale):
    """(spread_scale, relevance_coef, spread_coef), float32, of :func:`criterion_of` for ``a``'s dtype."""
    if holds_integers(a):
        if relevance_scale != scale:
            raise ValueError("with int8 ratings relevance_scale must equal scale (one unit, 1/127)")
        p, q = alpha_fraction(alpha) if criterion == ADDITIVE else (np.int64(1), np.int64(1))
        return np.float32(1.0), np.float32(q), np.float32(p)
    return np.float32(scale), np.float32(relevance_scale), np.float32(alpha)


@numba.njit(inline="always", **EXACT)
def criterion_of(
    a_value, b_value, relevance_value, weight, criterion, spread_scale, relevance_coef, spread_coef
):
    """One rule's float32 criterion, operation for operation as in the module docstring."""
    spread = abs(np.float32(a_value) - np.float32(b_value)) * spread_scale * weight
    if criterion == ADDITIVE:
        return np.float32(relevance_value) * relevance_coef + spread_coef * spread
    if criterion == PRODUCT:
        return np.float32(relevance_value) * relevance_coef * spread
    return spread


@numba.njit(inline="always", **EXACT)
def _ordered_bits(value):
    """float32 → uint32 in the same order; −0.0 and +0.0 map to the same key, as they compare."""
    bits = np.float32(value).view(np.int32)
    signed = bits if bits >= 0 else -(bits & np.int32(0x7FFFFFFF))
    return np.uint32(signed) ^ np.uint32(0x80000000)


@numba.njit(inline="always", **EXACT)
def index_shift(key_bits):
    """Low bits of a key that hold the rule index, by key width (a constant inside kernels)."""
    return 7 if key_bits == 16 else (8 if key_bits == 32 else 32)


@numba.njit(**EXACT)
def padded_width(n_rules, itemsize):
    """Row length of the key scratch: the vectoriser's unrolled block divides it, no remainder."""
    lanes = VECTOR_BYTES // itemsize
    return -(-n_rules // lanes) * lanes


@numba.njit(inline="always", **EXACT)
def _rank_four(keys, k, rows, out_index):
    """Top k of four rows of keys [4, width] (0 = padding) into out_index[rows[g], :k]."""
    key_type = keys.dtype.type
    mask = (1 << index_shift(np.iinfo(keys.dtype).bits)) - 1
    k0, k1, k2, k3 = keys[0], keys[1], keys[2], keys[3]
    # previous key, 0 standing for 2^width: on the first round every key is below it
    p0 = p1 = p2 = p3 = key_type(0)
    for j in range(k):
        w0 = w1 = w2 = w3 = key_type(0)
        for i in range(keys.shape[1]):
            w0 = max(w0, key_type(k0[i] - p0))
            w1 = max(w1, key_type(k1[i] - p1))
            w2 = max(w2, key_type(k2[i] - p2))
            w3 = max(w3, key_type(k3[i] - p3))
        p0, p1, p2 = key_type(w0 + p0), key_type(w1 + p1), key_type(w2 + p2)
        p3 = key_type(w3 + p3)
        out_index[rows[0], j] = mask - (np.int64(p0) & mask)
        out_index[rows[1], j] = mask - (np.int64(p1) & mask)
        out_index[rows[2], j] = mask - (np.int64(p2) & mask)
        out_index[rows[3], j] = mask - (np.int64(p3) & mask)


@numba.njit(inline="always", **EXACT)
def _margins(a, b, rows, n_distinct, k, scale, index, out_margin):
    for g in range(n_distinct):
        row = rows[g]
        total = 0.0
        for j in range(k):
            i = index[row, j]
            total += np.float64(a[row, i]) - np.float64(b[row, i])
        out_margin[row] = total * scale


@numba.njit(inline="always", **EXACT)
def _group(block_stop, first, rows):
    """Rows first..first+3 (the last row repeated past the block's end); how many are distinct."""
    for g in range(ROWS_AT_ONCE):
        rows[g] = min(first + g, block_stop - 1)
    return min(ROWS_AT_ONCE, block_stop - first)


def _make_select_float_keys(criterion):
    # One compiled kernel per criterion keeps the criterion branch out of the vectorised loop.
    @numba.njit(**PARALLEL_EXACT)
    def select(a, b, relevance, k, alpha, scale, relevance_scale, weight, out_index, out_margin):
        n, n_rules = a.shape
        spread_scale, relevance_coef, spread_coef = criterion_coefficients(
            a, criterion, alpha, scale, relevance_scale
        )
        width = padded_width(n_rules, 8)
        n_blocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
        for block in numba.prange(n_blocks):
            keys = np.zeros((ROWS_AT_ONCE, width), np.uint64)
            shift = index_shift(np.iinfo(keys.dtype).bits)
            tag = np.empty(n_rules, np.uint64)
            for i in range(n_rules):
                tag[i] = (1 << shift) - 1 - i
            rows = np.empty(ROWS_AT_ONCE, np.int64)
            start, stop = block * ROW_BLOCK, min(n, (block + 1) * ROW_BLOCK)
            for first in range(start, stop, ROWS_AT_ONCE):
                n_distinct = _group(stop, first, rows)
                for g in range(ROWS_AT_ONCE):
                    row_a, row_b, row_relevance = a[rows[g]], b[rows[g]], relevance[rows[g]]
                    row_keys = keys[g]
                    for i in range(n_rules):
                        value = criterion_of(
                            row_a[i],
                            row_b[i],
                            row_relevance[i],
                            weight[i],
                            criterion,
                            spread_scale,
                            relevance_coef,
                            spread_coef,
                        )
                        row_keys[i] = (np.uint64(_ordered_bits(value)) << shift) | tag[i]
                _rank_four(keys, k, rows, out_index)
                _margins(a, b, rows, n_distinct, k, scale, out_index, out_margin)

    return select


@functools.cache
def _select_integer_keys(criterion, p, q):
    # One compiled kernel per criterion and alpha = p/q: constant multipliers become shifts.
    @numba.njit(**PARALLEL_EXACT)
    def select(a, b, relevance, k, scale, key_like, out_index, out_margin):
        n, n_rules = a.shape
        key_type = key_like.dtype.type
        width = padded_width(n_rules, key_like.itemsize)
        # Rows are read width wide from their start (past the row's end, into the next row, so
        # that the loop has no remainder); the last rows go through zero-padded copies.
        flat_a, flat_b, flat_r = a.reshape(-1), b.reshape(-1), relevance.reshape(-1)
        n_blocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
        lowest = np.zeros(n_blocks, np.int64)
        for block in numba.prange(n_blocks):
            keys = np.zeros((ROWS_AT_ONCE, width), key_like.dtype)
            shift = index_shift(np.iinfo(keys.dtype).bits)
            tag = np.zeros(width, key_like.dtype)
            keep = np.zeros(width, key_like.dtype)  # all ones for a rule, 0 for padding
            for i in range(n_rules):
                tag[i] = (1 << shift) - 1 - i
                keep[i] = ~key_type(0)
            spare = np.zeros((3, width), np.int8)
            rows = np.empty(ROWS_AT_ONCE, np.int64)
            block_lowest: np.signedinteger[Any] = np.int64(0)
            start, stop = block * ROW_BLOCK, min(n, (block + 1) * ROW_BLOCK)
            for first in range(start, stop, ROWS_AT_ONCE):
                n_distinct = _group(stop, first, rows)
                for g in range(ROWS_AT_ONCE):
                    offset = rows[g] * n_rules
                    if offset + width <= flat_a.shape[0]:
                        row_a = flat_a[offset : offset + width]
                        row_b = flat_b[offset : offset + width]
                        row_relevance = flat_r[offset : offset + width]
                    else:
                        spare[0, :n_rules] = flat_a[offset : offset + n_rules]
                        spare[1, :n_rules] = flat_b[offset : offset + n_rules]
                        spare[2, :n_rules] = flat_r[offset : offset + n_rules]
                        row_a, row_b, row_relevance = spare[0], spare[1], spare[2]
                    row_keys = keys[g]
                    row_lowest = np.int8(0)
                    for i in range(width):
                        spread = key_type(abs(np.int16(row_a[i]) - np.int16(row_b[i])))
                        if criterion == ADDITIVE:
                            value = q * key_type(row_relevance[i]) + p * spread
                        elif criterion == PRODUCT:
                            value = key_type(row_relevance[i]) * spread
                        else:
                            value = spread
                        row_keys[i] = ((key_type(value) << shift) | tag[i]) & keep[i]
                        if criterion != ABSOLUTE:
                            row_lowest = min(row_lowest, row_relevance[i])
                    block_lowest = min(block_lowest, row_lowest)
                _rank_four(keys, k, rows, out_index)
                _margins(a, b, rows, n_distinct, k, scale, out_index, out_margin)
            lowest[block] = block_lowest
        return lowest.min() if n_blocks else 0

    return select


_SELECT_FLOAT_KEYS = {c: _make_select_float_keys(c) for c in (ADDITIVE, PRODUCT, ABSOLUTE)}


def _integer_key_dtype(criterion, p, q, n_rules):
    """Narrowest key dtype holding (largest criterion << index shift) | index."""
    largest = {
        ADDITIVE: q * INT8_MAX_RELEVANCE + p * INT8_MAX_SPREAD,
        PRODUCT: INT8_MAX_RELEVANCE * INT8_MAX_SPREAD,
        ABSOLUTE: INT8_MAX_SPREAD,
    }[criterion]
    for dtype in (np.uint16, np.uint32, np.uint64):
        bits = np.iinfo(dtype).bits
        shift = index_shift(bits)
        if n_rules <= 1 << shift and largest < 1 << (bits - shift):
            return np.dtype(dtype)
    raise ValueError(f"too many rules for 64-bit keys: {n_rules}")


def select_top_k(
    a, b, relevance, k, criterion, alpha, scale, relevance_scale, out_index, out_margin, weight=None
):
    """Fill out_index[n, k] and out_margin[n] with each pair's top-k rules and their margin.

    ``relevance`` is not read for ABSOLUTE; pass any 2-D array (for example ``a``). ``weight``
    [R] float32 multiplies each rule's |d| in the criterion (1 / the rule's discrepancy spread
    gives the z-scored criterion); None means 1, which leaves every value unchanged.
    """
    if not 0 <= k <= a.shape[1]:
        raise ValueError(f"k = {k} is not between 0 and the number of rules, {a.shape[1]}")
    if a.dtype == np.int8 and weight is None:
        if relevance_scale != scale:
            raise ValueError("with int8 ratings relevance_scale must equal scale (one unit, 1/127)")
        p, q = (int(x) for x in alpha_fraction(alpha)) if criterion == ADDITIVE else (1, 1)
        key_like = np.empty(0, _integer_key_dtype(criterion, p, q, a.shape[1]))
        a, b, relevance = (np.ascontiguousarray(x) for x in (a, b, relevance))
        lowest = _select_integer_keys(criterion, p, q)(
            a, b, relevance, k, scale, key_like, out_index, out_margin
        )
        if lowest < 0:
            raise ValueError("int8 relevance must lie in [0, 127] (round(127·relevance))")
        return
    if weight is None:
        weight = np.ones(a.shape[1], np.float32)
    _SELECT_FLOAT_KEYS[criterion](
        a, b, relevance, k, alpha, scale, relevance_scale, weight, out_index, out_margin
    )


@numba.njit(**PARALLEL_EXACT)
def margins_of_rows(a, b, index, scale, out_margin):
    """Margin per pair over its own rule indices index[n, k], summed in the given order."""
    n, k = index.shape
    for row in numba.prange(n):
        total = 0.0
        for j in range(k):
            i = index[row, j]
            total += np.float64(a[row, i]) - np.float64(b[row, i])
        out_margin[row] = total * scale


@numba.njit(**PARALLEL_EXACT)
def margins_of_fixed(a, b, rules, scale, out_margin):
    """Margin per pair over the same rule indices ``rules`` [k] for every pair, in that order."""
    n = a.shape[0]
    for row in numba.prange(n):
        total = 0.0
        for i in rules:
            total += np.float64(a[row, i]) - np.float64(b[row, i])
        out_margin[row] = total * scale


@numba.njit(**EXACT)
def splitmix64(state):
    """One step of SplitMix64: returns (next state, output). uint64 arithmetic wraps by design."""
    state = state + np.uint64(0x9E3779B97F4A7C15)
    z = state
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return state, z ^ (z >> np.uint64(31))


@numba.njit(**PARALLEL_EXACT)
def random_rules(n, n_rules, k, seed, first_pair, out_index):
    """k distinct random rules per pair, ascending, into out_index[n, k].

    Pair p's draw depends only on (seed, first_pair + p), so it is the same whatever the
    chunking, sharding or thread count: a partial Fisher–Yates shuffle driven by SplitMix64.
    """
    n_blocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
    for block in numba.prange(n_blocks):
        perm = np.empty(n_rules, np.int64)
        for row in range(block * ROW_BLOCK, min(n, (block + 1) * ROW_BLOCK)):
            for i in range(n_rules):
                perm[i] = i
            state = np.uint64(seed) ^ (np.uint64(first_pair + row) * np.uint64(0xD1B54A32D192ED03))
            for j in range(k):
                state, r = splitmix64(state)
                pick = j + np.int64(r % np.uint64(n_rules - j))
                perm[j], perm[pick] = perm[pick], perm[j]
            chosen = np.sort(perm[:k])
            for j in range(k):
                out_index[row, j] = chosen[j]


@numba.njit(**EXACT)
def labels_of_margins(margin, out_label):
    """+1 where A is preferred (margin > 0), −1 where B is, 0 for an exact tie.

    Serial: a nanosecond a pair, less than waking threads for a streamed chunk would cost.
    """
    for row in range(margin.shape[0]):
        m = margin[row]
        out_label[row] = 1 if m > 0 else (-1 if m < 0 else 0)
