"""Per-pair rule discrepancies, top-k selection, labels and margins.

Inputs are pair-major rating matrices ``a`` and ``b`` (scores of responses A and B, [n, R]) and
optionally ``relevance`` [n, R], stored as float32 or int8 (int8 holds round(127·s); ``scale``
and ``relevance_scale`` turn stored units back into [-1, 1] and [0, 1]).

Criterion per rule i, with d_i = s_i(A) − s_i(B) and spread_i = |a_i − b_i|·scale·weight_i
(weight_i = 1 unless given), evaluated in float32 in exactly this order:
    ADDITIVE  relevance_i·relevance_scale + alpha·spread_i   (the published choice, alpha = 0.5)
    PRODUCT   relevance_i·relevance_scale · spread_i
    ABSOLUTE  spread_i                                       (no relevance)
The k largest criteria are selected; on equal criteria the lower rule index wins, so results
do not depend on thread count or chunking. Indices come out in rank order (criterion
descending, index ascending). Margins Σ_{i∈S} d_i are summed in float64 in that order, so an
exact tie is an exact zero.
"""

import numba
import numpy as np

from .config import EXACT, PARALLEL_EXACT, ROW_BLOCK

ADDITIVE, PRODUCT, ABSOLUTE = 0, 1, 2
CRITERIA = {"additive": ADDITIVE, "product": PRODUCT, "absolute": ABSOLUTE}


# Above this many candidates, ranking by counting (quadratic) costs more than insertion.
RANK_LIMIT = 32


@numba.njit(**EXACT)
def _insertion_top_k(candidate, candidate_value, n_candidates, k, best_value, best_index):
    """Top k of the candidates by a sorted insertion buffer; strict '>' keeps lower indices ahead."""
    for j in range(k):
        best_value[j] = np.float32(-1.0)
    for t in range(n_candidates):
        c = candidate_value[t]
        if c > best_value[k - 1]:
            j = k - 1
            while j > 0 and c > best_value[j - 1]:
                best_value[j] = best_value[j - 1]
                best_index[j] = best_index[j - 1]
                j -= 1
            best_value[j] = c
            best_index[j] = candidate[t]


def _make_select_top_k(criterion):
    # One compiled kernel per criterion keeps the criterion branch out of the vectorised loop.
    @numba.njit(**PARALLEL_EXACT)
    def select(a, b, relevance, k, alpha, scale, relevance_scale, weight, out_index, out_margin):
        n, n_rules = a.shape
        alpha32 = np.float32(alpha)
        scale32 = np.float32(scale)
        relevance_scale32 = np.float32(relevance_scale)
        group = n_rules // k
        n_blocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
        for block in numba.prange(n_blocks):
            value = np.empty(n_rules, np.float32)
            candidate = np.empty(n_rules, np.int64)
            candidate_value = np.empty(n_rules, np.float32)
            best_index = np.empty(k + 1, np.int64)  # slot k absorbs every rank >= k
            best_value = np.empty(k, np.float32)
            for row in range(block * ROW_BLOCK, min(n, (block + 1) * ROW_BLOCK)):
                # Pass 1 (vectorised): every rule's criterion.
                for i in range(n_rules):
                    spread = (
                        abs(np.float32(a[row, i]) - np.float32(b[row, i])) * scale32 * weight[i]
                    )
                    if criterion == ADDITIVE:
                        value[i] = (
                            np.float32(relevance[row, i]) * relevance_scale32 + alpha32 * spread
                        )
                    elif criterion == PRODUCT:
                        value[i] = np.float32(relevance[row, i]) * relevance_scale32 * spread
                    else:
                        value[i] = spread
                # Pass 2: a cheap lower bound on the k-th largest value — the smallest of the
                # maxima of k disjoint groups, each of which holds a value at least that large.
                bound = np.float32(np.inf)
                for g in range(k):
                    stop = n_rules if g == k - 1 else (g + 1) * group
                    group_max = np.float32(-1.0)
                    for i in range(g * group, stop):
                        group_max = max(group_max, value[i])
                    bound = min(bound, group_max)
                # Pass 3: branch-free compaction of the few candidates >= bound, in index order.
                n_candidates = 0
                for i in range(n_rules):
                    candidate[n_candidates] = i
                    candidate_value[n_candidates] = value[i]
                    n_candidates += value[i] >= bound
                # Pass 4: each candidate's rank = candidates ahead of it (larger value, or equal
                # and lower index); ranks are distinct, so the top k land in slots 0..k-1.
                # Branch-free, which beats an insertion buffer's unpredictable branches — but
                # quadratic, so rows with many equal values (say all-zero ratings) use insertion.
                if n_candidates <= RANK_LIMIT:
                    for t in range(n_candidates):
                        c = candidate_value[t]
                        rank = 0
                        for u in range(n_candidates):
                            rank += (candidate_value[u] > c) | ((candidate_value[u] == c) & (u < t))
                        best_index[min(rank, k)] = candidate[t]
                else:
                    _insertion_top_k(
                        candidate, candidate_value, n_candidates, k, best_value, best_index
                    )
                margin = 0.0
                for j in range(k):
                    i = best_index[j]
                    out_index[row, j] = i
                    margin += (np.float64(a[row, i]) - np.float64(b[row, i])) * scale
                out_margin[row] = margin

    return select


_SELECT_TOP_K = {c: _make_select_top_k(c) for c in (ADDITIVE, PRODUCT, ABSOLUTE)}


def select_top_k(
    a, b, relevance, k, criterion, alpha, scale, relevance_scale, out_index, out_margin, weight=None
):
    """Fill out_index[n, k] and out_margin[n] with each pair's top-k rules and their margin.

    ``relevance`` is not read for ABSOLUTE; pass any 2-D array (for example ``a``). ``weight``
    [R] float32 multiplies each rule's |d| in the criterion (1 / the rule's discrepancy spread
    gives the z-scored criterion); None means 1, which leaves every value unchanged.
    """
    if weight is None:
        weight = np.ones(a.shape[1], np.float32)
    _SELECT_TOP_K[criterion](
        a, b, relevance, k, alpha, scale, relevance_scale, weight, out_index, out_margin
    )


@numba.njit(**PARALLEL_EXACT)
def margins_of_rows(a, b, index, scale, out_margin):
    """Margin per pair over its own rule indices index[n, k], summed in the given order."""
    n, k = index.shape
    for row in numba.prange(n):
        margin = 0.0
        for j in range(k):
            i = index[row, j]
            margin += (np.float64(a[row, i]) - np.float64(b[row, i])) * scale
        out_margin[row] = margin


@numba.njit(**PARALLEL_EXACT)
def margins_of_fixed(a, b, rules, scale, out_margin):
    """Margin per pair over the same rule indices ``rules`` [k] for every pair, in that order."""
    n = a.shape[0]
    for row in numba.prange(n):
        margin = 0.0
        for i in rules:
            margin += (np.float64(a[row, i]) - np.float64(b[row, i])) * scale
        out_margin[row] = margin


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


@numba.njit(**PARALLEL_EXACT)
def labels_of_margins(margin, out_label):
    """+1 where A is preferred (margin > 0), −1 where B is, 0 for an exact tie."""
    for row in numba.prange(margin.shape[0]):
        m = margin[row]
        out_label[row] = 1 if m > 0 else (-1 if m < 0 else 0)
