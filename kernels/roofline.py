"""The memory roofline: one parallel pass that only reads what the selection kernel reads."""

import numba
import numpy as np

from .config import PARALLEL_REASSOC, ROW_BLOCK
from .selection import holds_integers


@numba.njit(**PARALLEL_REASSOC)
def read_sum(a, b, relevance, use_relevance):
    """Sum every element of a, b (and relevance) once; the sum keeps the loads from being elided.

    Integer ratings are summed as integers (exactly): converting them to float would make the
    pass compute-bound rather than a measure of reading.
    """
    n, n_rules = a.shape
    n_blocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
    partial = np.zeros(n_blocks, np.float64)
    for block in numba.prange(n_blocks):
        if holds_integers(a):
            total = np.int64(0)
            for row in range(block * ROW_BLOCK, min(n, (block + 1) * ROW_BLOCK)):
                acc = np.int32(0)  # at most 3·128 per rule: no overflow below 5 million rules
                for i in range(n_rules):
                    acc += np.int32(a[row, i]) + np.int32(b[row, i])
                    if use_relevance:
                        acc += np.int32(relevance[row, i])
                total += acc
            partial[block] = total
        else:
            acc_float = np.float32(0.0)
            for row in range(block * ROW_BLOCK, min(n, (block + 1) * ROW_BLOCK)):
                for i in range(n_rules):
                    acc_float += np.float32(a[row, i]) + np.float32(b[row, i])
                    if use_relevance:
                        acc_float += np.float32(relevance[row, i])
            partial[block] = acc_float
    return partial.sum()
