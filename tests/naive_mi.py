"""Slow, obviously-correct NumPy twins of the information kernels (contingency, policies)."""

import math

import numpy as np

from . import naive


def votes(a, b):
    return np.sign(a.astype(np.float64) - b.astype(np.float64)).astype(np.int64)


def vote_counts(a, b, truth):
    v = votes(a, b)
    out = np.zeros((a.shape[1], 3, 2), np.int64)
    for row in range(a.shape[0]):
        for i in range(a.shape[1]):
            out[i, v[row, i] + 1, truth[row]] += 1
    return out


def label_counts(label, truth):
    out = np.zeros((3, 2), np.int64)
    for value, t in zip(label, truth, strict=True):
        out[int(value) + 1, int(t)] += 1
    return out


def vote_agreement(v):
    n_rules = v.shape[1]
    agree = np.zeros((n_rules, n_rules), np.int64)
    both = np.zeros((n_rules, n_rules), np.int64)
    for i in range(n_rules):
        for j in range(n_rules):
            nonzero = (v[:, i] != 0) & (v[:, j] != 0)
            both[i, j] = nonzero.sum()
            agree[i, j] = (nonzero & (v[:, i] == v[:, j])).sum()
    return agree, both


def mutual_information_bits(table, miller_madow=True):
    """Σ p_xy log2(p_xy / (p_x p_y)) straight from the definition, plus Miller–Madow."""
    table = np.asarray(table, np.float64)
    n = table.sum()
    if n == 0:
        return 0.0
    p = table / n
    px, py = p.sum(axis=1), p.sum(axis=0)
    total = 0.0
    for x in range(table.shape[0]):
        for y in range(table.shape[1]):
            if p[x, y] > 0:
                total += p[x, y] * math.log(p[x, y] / (px[x] * py[y]))
    if miller_madow:
        m_x, m_y, m_xy = (px > 0).sum(), (py > 0).sum(), (p > 0).sum()
        total += ((m_x - 1) + (m_y - 1) - (m_xy - 1)) / (2 * n)
    return total / math.log(2)


def greedy(a, b, relevance, k, name, alpha, scale, relevance_scale, weight, redundancy, discount):
    values = naive.criterion(a, b, relevance, name, alpha, scale, relevance_scale, weight)
    index = np.empty((a.shape[0], k), np.int64)
    margin = np.empty(a.shape[0])
    for row in range(a.shape[0]):
        chosen = []
        for _ in range(k):
            scores = {}
            for i in range(a.shape[1]):
                if i not in chosen:
                    penalty = max((redundancy[j, i] for j in chosen), default=np.float32(0))
                    scores[i] = values[row, i] * (np.float32(1) - np.float32(discount) * penalty)
            chosen.append(min(scores, key=lambda i: (-float(scores[i]), i)))
        index[row] = chosen
        margin[row] = naive.margin_of(a[row], b[row], chosen, scale)
    return index, margin
