"""Slow, obviously-correct NumPy twins of the kernels. Tests compare the kernels against these."""

from fractions import Fraction

import numpy as np

MASK64 = (1 << 64) - 1


def alpha_fraction(alpha):
    """(p, q): the fraction nearest alpha with q <= 1024, if it is within 1e-9 of alpha."""
    fraction = Fraction(alpha).limit_denominator(1024)
    if alpha < 0 or abs(float(fraction) - alpha) > 1e-9:
        raise ValueError(f"alpha {alpha} is no fraction p/q with q <= 1024")
    return fraction.numerator, fraction.denominator


def criterion(a, b, relevance, name, alpha, scale, relevance_scale, weight=None):
    """The selection criterion in float32, operation for operation as documented in the kernel.

    int8 ratings: stored units and alpha = p/q, so without weights every value is an integer.
    """
    stored_units = a.dtype == np.int8
    spread = np.abs(a.astype(np.float32) - b.astype(np.float32))
    if not stored_units:
        spread = spread * np.float32(scale)
    if weight is not None:
        spread = spread * weight.astype(np.float32)
    if name == "absolute":
        return spread
    rel = relevance.astype(np.float32)
    if stored_units:
        if name == "product":
            return rel * spread
        p, q = alpha_fraction(alpha)
        return np.float32(q) * rel + np.float32(p) * spread
    rel = rel * np.float32(relevance_scale)
    if name == "additive":
        return rel + np.float32(alpha) * spread
    return rel * spread


def margin_of(a_row, b_row, indices, scale):
    """(Σ a_i − b_i over indices, in that order, in float64) · scale."""
    total = 0.0
    for i in indices:
        total += float(a_row[i]) - float(b_row[i])
    return total * scale


def select_top_k(a, b, relevance, k, name, alpha, scale, relevance_scale, weight=None):
    """(index [n, k], margin [n]) by a full stable sort per row: criterion descending, index ascending."""
    values = criterion(a, b, relevance, name, alpha, scale, relevance_scale, weight)
    index = np.empty((a.shape[0], k), np.int64)
    margin = np.empty(a.shape[0])
    for row in range(a.shape[0]):
        order = sorted(range(a.shape[1]), key=lambda i: (-float(values[row, i]), i))[:k]
        index[row] = order
        margin[row] = margin_of(a[row], b[row], order, scale)
    return index, margin


def splitmix64(state):
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


def random_rules(n, n_rules, k, seed, first_pair):
    out = np.empty((n, k), np.int64)
    for row in range(n):
        perm = list(range(n_rules))
        state = (seed ^ (((first_pair + row) * 0xD1B54A32D192ED03) & MASK64)) & MASK64
        for j in range(k):
            state, r = splitmix64(state)
            pick = j + r % (n_rules - j)
            perm[j], perm[pick] = perm[pick], perm[j]
        out[row] = sorted(perm[:k])
    return out


def labels_of(margin):
    return np.array([1 if m > 0 else (-1 if m < 0 else 0) for m in margin], np.int8)
