"""Redundancy-aware greedy selection (the z-scored criterion is select_top_k with a weight).

It reads the same inputs as ``kernels.selection.select_top_k``, including ``weight`` [R]
(float32), and evaluates the same float32 criterion (``selection.criterion_of``: for float32
ratings relevance·relevance_scale + alpha·|d|·scale·weight and so on, for int8 ratings the same in
stored units with alpha = p/q).

Greedy selection picks k rules one at a time: the next rule maximises
    criterion_i · (1 − discount · max_{j chosen} redundancy[j, i])
so a rule that (nearly) duplicates one already chosen is passed over. With discount 0 it selects
exactly what top-k selects, in the same order. Ties go to the lower rule index; margins are
(Σ_{i∈S} d_i)·scale, summed in float64 in selection order, as in kernels.selection.
"""

import numba
import numpy as np

from .config import PARALLEL_EXACT, ROW_BLOCK
from .selection import criterion_coefficients, criterion_of


@numba.njit(**PARALLEL_EXACT)
def select_greedy(
    a,
    b,
    relevance,
    k,
    criterion,
    alpha,
    scale,
    relevance_scale,
    weight,
    redundancy,
    discount,
    out_index,
    out_margin,
):
    """Redundancy-aware greedy selection into out_index [n, k] (pick order) and out_margin [n].

    ``redundancy`` [R, R] float32 in [0, 1]; ``discount`` in [0, 1].
    """
    n, n_rules = a.shape
    spread_scale, relevance_coef, spread_coef = criterion_coefficients(
        a, criterion, alpha, scale, relevance_scale
    )
    discount32 = np.float32(discount)
    n_blocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
    for block in numba.prange(n_blocks):
        value = np.empty(n_rules, np.float32)
        penalty = np.empty(n_rules, np.float32)
        taken = np.empty(n_rules, np.bool_)
        for row in range(block * ROW_BLOCK, min(n, (block + 1) * ROW_BLOCK)):
            for i in range(n_rules):
                value[i] = criterion_of(
                    a[row, i],
                    b[row, i],
                    relevance[row, i],
                    weight[i],
                    criterion,
                    spread_scale,
                    relevance_coef,
                    spread_coef,
                )
            penalty[:] = 0.0
            taken[:] = False
            for j in range(k):
                best = -1
                best_score = np.float32(-1.0)
                for i in range(n_rules):
                    if not taken[i]:
                        score = value[i] * (np.float32(1.0) - discount32 * penalty[i])
                        if score > best_score:
                            best_score = score
                            best = i
                taken[best] = True
                out_index[row, j] = best
                for i in range(n_rules):
                    penalty[i] = max(penalty[i], redundancy[best, i])
            total = 0.0
            for j in range(k):
                i = out_index[row, j]
                total += np.float64(a[row, i]) - np.float64(b[row, i])
            out_margin[row] = total * scale
