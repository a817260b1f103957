"""Slow, obviously-correct NumPy twin of kernels/attention.py: per row, per head, per run of
one segment id, a plain softmax in float64. Padding (id 0) gives output 0 and gradient 0."""

import numpy as np


def runs(ids):
    """[(start, end)] of the runs of equal nonzero ids in one row."""
    found, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or ids[t] != ids[start]:
            if ids[start] != 0:
                found.append((start, t))
            start = t
    return found


def attention(q, k, v, segment_ids, causal):
    """(out, lse): q [batch, time, heads, dim], k, v [batch, time, kv_heads, dim]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, _, heads, dim = q.shape
    group = heads // k.shape[2]
    out = np.zeros(q.shape)
    lse = np.zeros(q.shape[:3])
    for b in range(batch):
        for start, end in runs(segment_ids[b]):
            for h in range(heads):
                scores = q[b, start:end, h] @ k[b, start:end, h // group].T / np.sqrt(dim)
                if causal:
                    scores[np.triu_indices(end - start, 1)] = -np.inf
                top = scores.max(axis=1, keepdims=True)
                weights = np.exp(scores - top)
                total = weights.sum(axis=1, keepdims=True)
                out[b, start:end, h] = weights / total @ v[b, start:end, h // group]
                lse[b, start:end, h] = (top + np.log(total))[:, 0]
    return out, lse


def attention_grads(q, k, v, segment_ids, causal, dout):
    """(dq, dk, dv) of ``sum(attention(q, k, v)[0] * dout)``, softmax differentiated by hand."""
    q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
    batch, _, heads, dim = q.shape
    group = heads // k.shape[2]
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for b in range(batch):
        for start, end in runs(segment_ids[b]):
            span = slice(start, end)
            for h in range(heads):
                g = h // group
                scores = q[b, span, h] @ k[b, span, g].T / np.sqrt(dim)
                if causal:
                    scores[np.triu_indices(end - start, 1)] = -np.inf
                p = np.exp(scores - scores.max(axis=1, keepdims=True))
                p /= p.sum(axis=1, keepdims=True)
                do = dout[b, span, h]
                dv[b, span, g] += p.T @ do
                dp = do @ v[b, span, g].T
                ds = p * (dp - (dp * p).sum(axis=1, keepdims=True))
                dq[b, span, h] = ds @ k[b, span, g] / np.sqrt(dim)
                dk[b, span, g] += ds.T @ q[b, span, h] / np.sqrt(dim)
    return dq, dk, dv
