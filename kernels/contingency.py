"""Contingency counting: rule votes and policy labels against a binary truth, and vote agreement.

A rule's vote is the sign of its discrepancy, sign(a_i − b_i) ∈ {−, 0, +}; only the sign is
read, so ``scale`` never matters here and int8 / float32 inputs are compared as stored. Truth is
an int8 array holding 1 where A is the better response and 0 where B is.

Tables use the vote (or label) on axis −2 in the order (−, 0, +) and the truth on axis −1 in
the order (B, A):

    vote_counts   out[R, 3, 2]  += #{pairs: vote of rule i = v, truth = t}
    label_counts  out[3, 2]     += #{pairs: label = v, truth = t}

Every kernel *adds* into ``out`` so that a store can be streamed chunk by chunk. Parallel
kernels give each block of ROW_BLOCK rows a private table and sum the tables in block order at
the end: integer counts are exact, so the result is identical for any thread count or chunking.
"""

import numba
import numpy as np

from .config import EXACT, PARALLEL_EXACT, ROW_BLOCK

NEGATIVE, TIE, POSITIVE = 0, 1, 2


@numba.njit(**PARALLEL_EXACT)
def vote_counts(a, b, truth, out):
    """Add each rule's vote-by-truth counts of rows a, b [n, R] (truth [n]) into out [R, 3, 2]."""
    n, n_rules = a.shape
    n_blocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
    # Per block and truth value, counts of positive and of negative votes per rule: the inner
    # loop over rules is then a branch-free, vectorisable compare-and-add. Zero votes are
    # whatever is left of the rows with that truth value.
    positive = np.zeros((n_blocks, 2, n_rules), np.int64)
    negative = np.zeros((n_blocks, 2, n_rules), np.int64)
    rows_of = np.zeros((n_blocks, 2), np.int64)
    for block in numba.prange(n_blocks):
        for row in range(block * ROW_BLOCK, min(n, (block + 1) * ROW_BLOCK)):
            value = np.int64(truth[row])
            rows_of[block, value] += 1
            pos = positive[block, value]
            neg = negative[block, value]
            for i in range(n_rules):
                pos[i] += np.int64(a[row, i] > b[row, i])
                neg[i] += np.int64(a[row, i] < b[row, i])
    for block in range(n_blocks):
        for t in range(2):
            for i in range(n_rules):
                p = positive[block, t, i]
                m = negative[block, t, i]
                out[i, POSITIVE, t] += p
                out[i, NEGATIVE, t] += m
                out[i, TIE, t] += rows_of[block, t] - p - m


@numba.njit(**PARALLEL_EXACT)
def label_counts(label, truth, out):
    """Add the label-by-truth counts of label [n] ∈ {−1, 0, +1} and truth [n] into out [3, 2]."""
    n = label.shape[0]
    n_blocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
    partial = np.zeros((n_blocks, 3, 2), np.int64)
    for block in numba.prange(n_blocks):
        for row in range(block * ROW_BLOCK, min(n, (block + 1) * ROW_BLOCK)):
            partial[block, np.int64(label[row]) + 1, np.int64(truth[row])] += 1
    for block in range(n_blocks):
        for v in range(3):
            for t in range(2):
                out[v, t] += partial[block, v, t]


@numba.njit(**PARALLEL_EXACT)
def discrepancy_moments(a, b, scale, out_sum, out_sum_squares):
    """Add Σ d_i and Σ d_i² per rule (d = (a − b)·scale, float64) into out_sum, out_sum_squares [R].

    Sums run in row order within a block and blocks are added in order, so the result does not
    depend on the thread count.
    """
    n, n_rules = a.shape
    n_blocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
    sums = np.zeros((n_blocks, n_rules), np.float64)
    squares = np.zeros((n_blocks, n_rules), np.float64)
    for block in numba.prange(n_blocks):
        s = sums[block]
        q = squares[block]
        for row in range(block * ROW_BLOCK, min(n, (block + 1) * ROW_BLOCK)):
            for i in range(n_rules):
                d = (np.float64(a[row, i]) - np.float64(b[row, i])) * scale
                s[i] += d
                q[i] += d * d
    for block in range(n_blocks):
        for i in range(n_rules):
            out_sum[i] += sums[block, i]
            out_sum_squares[i] += squares[block, i]


@numba.njit(**PARALLEL_EXACT)
def votes_of(a, b, out):
    """Votes sign(a − b) ∈ {−1, 0, +1} as int8 into out [n, R]."""
    n, n_rules = a.shape
    for row in numba.prange(n):
        for i in range(n_rules):
            out[row, i] = np.int8(a[row, i] > b[row, i]) - np.int8(a[row, i] < b[row, i])


@numba.njit(**PARALLEL_EXACT)
def vote_agreement(votes, out_agree, out_both):
    """For every ordered rule pair (i, j), over the rows of votes [n, R]: add into [R, R] arrays
    out_both (rows where both votes are non-zero) and out_agree (rows where they are also equal).

    Each thread owns whole rows i of the outputs, so no private tables are needed.
    """
    n, n_rules = votes.shape
    for i in numba.prange(n_rules):
        agree = np.zeros(n_rules, np.int64)
        both = np.zeros(n_rules, np.int64)
        for row in range(n):
            vi = votes[row, i]
            if vi == 0:
                continue
            for j in range(n_rules):
                vj = votes[row, j]
                both[j] += np.int64(vj != 0)
                agree[j] += np.int64(vj == vi)
        for j in range(n_rules):
            out_agree[i, j] += agree[j]
            out_both[i, j] += both[j]


@numba.njit(**EXACT)
def _xlogx(x):
    return x * np.log(x) if x > 0 else 0.0


@numba.njit(**EXACT)
def _table_mi(table, miller_madow):
    """MI in nats of one table [Kx, Ky] of counts (float64); 0 for an empty table."""
    kx, ky = table.shape
    n = 0.0
    joint = 0.0
    m_xy = 0
    for x in range(kx):
        for y in range(ky):
            c = table[x, y]
            n += c
            joint += _xlogx(c)
            m_xy += c > 0
    if n == 0:
        return 0.0
    # N·I = Σ c ln c − Σ c_x ln c_x − Σ c_y ln c_y + N ln N, with 0 ln 0 = 0.
    marginals = 0.0
    m_x = 0
    for x in range(kx):
        row = 0.0
        for y in range(ky):
            row += table[x, y]
        marginals += _xlogx(row)
        m_x += row > 0
    m_y = 0
    for y in range(ky):
        column = 0.0
        for x in range(kx):
            column += table[x, y]
        marginals += _xlogx(column)
        m_y += column > 0
    # Rounding can leave a tiny negative for an independent table.
    nats = max(joint - marginals + _xlogx(n), 0.0) / n
    if miller_madow:
        nats += ((m_x - 1) + (m_y - 1) - (m_xy - 1)) / (2.0 * n)
    return nats


@numba.njit(**EXACT)
def mutual_information_nats(tables, miller_madow, out):
    """MI in nats of every table of tables [T, Kx, Ky] (float64 counts) into out [T]:
    plug-in, plus the Miller–Madow correction when ``miller_madow``. Serial: a table is a few
    dozen operations, less than waking a thread."""
    for t in range(tables.shape[0]):
        out[t] = _table_mi(tables[t], miller_madow)


@numba.njit(**PARALLEL_EXACT)
def resampled_mutual_information(tables, resamples, seed, miller_madow, out):
    """MI in nats of ``resamples`` multinomial resamples of each table [T, Kx, Ky] (integer counts,
    as float64) into out [resamples, T].

    A resample of a table with N counts draws Multinomial(N, c/N) cell by cell as conditional
    binomials. Table t's draws come from the generator seeded with seed + t at the start of its
    iteration (each thread owns its generator), so they depend on (seed, t) only, whatever the
    thread count.
    """
    n_tables, kx, ky = tables.shape
    for t in numba.prange(n_tables):
        np.random.seed(seed + t)
        flat = tables[t].reshape(kx * ky)
        n = np.int64(flat.sum())
        cells = np.empty(kx * ky, np.float64)
        drawn = cells.reshape((kx, ky))
        for r in range(resamples):
            left = n
            mass = 1.0
            for j in range(flat.shape[0]):
                p = flat[j] / n if n > 0 else 0.0
                count: int | np.int64
                if j == flat.shape[0] - 1 or left == 0:
                    count = left
                else:
                    count = np.random.binomial(int(left), min(1.0, p / mass)) if mass > 0 else 0
                cells[j] = count
                left -= count
                mass -= p
            out[r, t] = _table_mi(drawn, miller_madow)
