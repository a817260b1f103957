"""Softmax attention over packed rows on the CPU: each segment's own diagonal block, nothing else.

Rows hold texts side by side as contiguous runs of one segment id (models.tokenizer.pack_batch:
1, 2, … and 0 for padding). A token attends to the keys of its own run only (and to those at or
before it when causal), so the kernels compute each run's block of the score matrix and never
the cross-segment blocks XLA computes only to mask them. Padding (id 0) gets output 0 and
gradient 0. A segment id that comes back later in the row starts a new text: ids are runs, not
sets (XLA's mask would join the two runs; pack_batch never makes them).

Layout: q, out [batch, time, heads, head_dim], k, v [batch, time, kv_heads, head_dim] (grouped
query: query head h reads kv head h // (heads // kv_heads)), float32, as the models hold them.
Each run is copied into contiguous scratch anyway (the scaled queries, the keys and values the
group's query heads share), and that gather reads head_dim contiguous floats a token; taking
[batch, heads, time, head_dim] instead would save nothing here and cost XLA a transpose of
every input and output, forward and backward.

Work items are (row, kv head): the query heads of a group run in one item, so dk and dv
accumulate over the group without two threads ever writing the same slice. Items are dealt to
a few chunks per thread; a chunk allocates its scratch once, sized by the longest run.

Matrix products go through ``np.dot`` (BLAS sgemm on contiguous float32). The exponential is
``_exp_into``, a float32 polynomial LLVM vectorises (no SVML here; ``np.exp`` is a scalar libm
call per score). Forward: scores = (q·scale)·kᵀ, a stable softmax (row max subtracted), out = p·v,
and the log-sum-exp of each query row kept for the backward, which recomputes
p = exp(scores − lse): dv = pᵀ·do, dp = do·vᵀ, ds = p∘(dp − rowsum(do∘o)), dq = ds·k·scale,
dk = dsᵀ·q·scale.
"""

import numba
import numpy as np

from .blas_threads import set_local_threads
from .config import EXACT, PARALLEL_EXACT

CHUNKS_PER_THREAD = 4  # work chunks (each with its own scratch) per thread: load balance

# Cephes' expf: exp(x) = 2ⁿ·exp(r), n = round(x / ln 2), r = x − n·ln 2 in two parts, exp(r) a
# degree-7 polynomial on |r| ≤ ln 2 / 2 (relative error ≤ 2 ulp, tested).
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_P0 = np.float32(1.9875691500e-4)
_P1 = np.float32(1.3981999507e-3)
_P2 = np.float32(8.3334519073e-3)
_P3 = np.float32(4.1665795894e-2)
_P4 = np.float32(1.6666665459e-1)
_P5 = np.float32(5.0000001201e-1)
_EXP_FLOOR = np.float32(-87.0)  # below it exp(x) < 2⁻¹²⁵: taken as 0 (scores minus their max)


@numba.njit(**EXACT)
def _exp_into(x, bits, count):
    """x[:count] ← exp(x[:count]) for x ≤ 0 (0 below _EXP_FLOOR); ``bits`` int32 scratch ≥ count."""
    for j in range(count):
        value = x[j]
        small = value < _EXP_FLOOR
        value = max(value, _EXP_FLOOR)
        n = np.floor(value * _LOG2E + np.float32(0.5))
        r = value - n * _LN2_HI - n * _LN2_LO
        p = _P0 * r + _P1
        p = p * r + _P2
        p = p * r + _P3
        p = p * r + _P4
        p = p * r + _P5
        p = p * r * r + r + np.float32(1.0)
        bits[j] = (np.int32(n) + np.int32(127)) << np.int32(23)
        x[j] = np.float32(0.0) if small else p
    scale = bits[:count].view(np.float32)
    for j in range(count):
        x[j] *= scale[j]


@numba.njit(**EXACT)
def _run_end(ids, start):
    """The end of the run of equal ids starting at ``start``."""
    end = start + 1
    while end < ids.shape[0] and ids[end] == ids[start]:
        end += 1
    return end


@numba.njit(**EXACT)
def longest_run(segment_ids):
    """The longest run of one nonzero segment id in any row (at least 1)."""
    longest = 1
    for b in range(segment_ids.shape[0]):
        start = 0
        while start < segment_ids.shape[1]:
            end = _run_end(segment_ids[b], start)
            if segment_ids[b, start] != 0:
                longest = max(longest, end - start)
            start = end
    return longest


@numba.njit(**EXACT)
def work_split(q, k, segment_ids, chunks):
    """(group, scale, longest, items, chunks): query heads per kv head, the softmax scale
    1/√head_dim, the longest run, the work items (row, kv head) and the chunks they are dealt
    to (at most ``chunks``, at most one an item)."""
    group = q.shape[2] // k.shape[2]
    scale = np.float32(1.0 / np.sqrt(q.shape[3]))
    items = q.shape[0] * k.shape[2]
    return group, scale, longest_run(segment_ids), items, max(1, min(items, chunks))


@numba.njit(**EXACT)
def _zero(x, b, start, end, first_head, heads):
    """x[b, start:end, first_head : first_head + heads, :] ← 0."""
    for t in range(start, end):
        for h in range(first_head, first_head + heads):
            for d in range(x.shape[3]):
                x[b, t, h, d] = np.float32(0.0)


@numba.njit(**EXACT)
def _gather(src, b, start, length, head, scale, dst):
    """dst[:length] ← src[b, start : start + length, head, :] · scale."""
    for i in range(length):
        for d in range(src.shape[3]):
            dst[i, d] = src[b, start + i, head, d] * scale


@numba.njit(**EXACT)
def _softmax_rows(scores, length, causal, row_max, row_sum, bits):
    """Rows of scores [length, length] ← exp(score − row max) (0 above the diagonal when causal);
    their maxima and sums into row_max, row_sum."""
    for i in range(length):
        row = scores[i]
        keys = i + 1 if causal else length
        top = row[0]
        for j in range(1, keys):
            top = max(top, row[j])
        for j in range(keys):
            row[j] -= top
        _exp_into(row, bits, keys)
        total = np.float32(0.0)
        for j in range(keys):
            total += row[j]
        for j in range(keys, length):
            row[j] = np.float32(0.0)
        row_max[i] = top
        row_sum[i] = total


@numba.njit(**EXACT)
def forward_chunk(q, k, v, segment_ids, causal, out, lse, work, chunk):
    """Work items chunk, chunk + chunks, … of :func:`forward` (``work``: :func:`work_split`'s)."""
    time, dim = q.shape[1], q.shape[3]
    kv_heads = k.shape[2]
    group, scale, longest, items, chunks = work
    qs = np.empty((longest, dim), np.float32)
    ks = np.empty((longest, dim), np.float32)
    vs = np.empty((longest, dim), np.float32)
    o = np.empty((longest, dim), np.float32)
    flat = np.empty(longest * longest, np.float32)
    row_max = np.empty(longest, np.float32)
    row_sum = np.empty(longest, np.float32)
    bits = np.empty(longest, np.int32)
    threads = set_local_threads(1)  # its products run on this thread (blas_threads)
    for item in range(chunk, items, chunks):
        b = item // kv_heads
        g = item % kv_heads
        start = 0
        while start < time:
            end = _run_end(segment_ids[b], start)
            length = end - start
            if segment_ids[b, start] == 0:
                _zero(out, b, start, end, g * group, group)
                lse[b, start:end, g * group : (g + 1) * group] = np.float32(0.0)
                start = end
                continue
            _gather(k, b, start, length, g, np.float32(1.0), ks)
            _gather(v, b, start, length, g, np.float32(1.0), vs)
            scores = flat[: length * length].reshape(length, length)
            for h in range(g * group, (g + 1) * group):
                _gather(q, b, start, length, h, scale, qs)
                np.dot(qs[:length], ks[:length].T, scores)
                _softmax_rows(scores, length, causal, row_max, row_sum, bits)
                np.dot(scores, vs[:length], o[:length])
                for i in range(length):
                    norm = np.float32(1.0) / row_sum[i]
                    lse[b, start + i, h] = row_max[i] + np.log(row_sum[i])
                    for d in range(dim):
                        out[b, start + i, h, d] = o[i, d] * norm
            start = end
    set_local_threads(threads)


@numba.njit(**PARALLEL_EXACT)
def forward(q, k, v, segment_ids, causal, chunks, out, lse):
    """Attention of each run of ``segment_ids`` [batch, time] over itself into ``out`` (q's
    shape) and the log-sum-exp of each query row's scaled scores into ``lse`` [batch, time,
    heads] (0 at padding)."""
    # One scan for the longest run, shared by the chunks.
    work = work_split(q, k, segment_ids, chunks)
    for chunk in numba.prange(work[4]):
        forward_chunk(q, k, v, segment_ids, causal, out, lse, work, chunk)


@numba.njit(**EXACT)
def backward_chunk(q, k, v, segment_ids, causal, out, lse, dout, dq, dk, dv, work, chunk):
    """Work items chunk, chunk + chunks, … of :func:`backward` (``work``: :func:`work_split`'s)."""
    time, dim = q.shape[1], q.shape[3]
    kv_heads = k.shape[2]
    group, scale, longest, items, chunks = work
    qs = np.empty((longest, dim), np.float32)
    ks = np.empty((longest, dim), np.float32)
    vs = np.empty((longest, dim), np.float32)
    dos = np.empty((longest, dim), np.float32)
    tmp = np.empty((longest, dim), np.float32)
    dks = np.empty((longest, dim), np.float32)
    dvs = np.empty((longest, dim), np.float32)
    flat_p = np.empty(longest * longest, np.float32)
    flat_dp = np.empty(longest * longest, np.float32)
    delta = np.empty(longest, np.float32)
    bits = np.empty(longest, np.int32)
    threads = set_local_threads(1)
    for item in range(chunk, items, chunks):
        b = item // kv_heads
        g = item % kv_heads
        start = 0
        while start < time:
            end = _run_end(segment_ids[b], start)
            length = end - start
            if segment_ids[b, start] == 0:
                _zero(dq, b, start, end, g * group, group)
                _zero(dk, b, start, end, g, 1)
                _zero(dv, b, start, end, g, 1)
                start = end
                continue
            _gather(k, b, start, length, g, np.float32(1.0), ks)
            _gather(v, b, start, length, g, np.float32(1.0), vs)
            dks[:length] = np.float32(0.0)
            dvs[:length] = np.float32(0.0)
            p = flat_p[: length * length].reshape(length, length)
            dp = flat_dp[: length * length].reshape(length, length)
            for h in range(g * group, (g + 1) * group):
                _gather(q, b, start, length, h, scale, qs)
                _gather(dout, b, start, length, h, np.float32(1.0), dos)
                for i in range(length):
                    total = np.float32(0.0)
                    for d in range(dim):
                        total += dos[i, d] * out[b, start + i, h, d]
                    delta[i] = total
                np.dot(qs[:length], ks[:length].T, p)
                for i in range(length):  # p = exp(scores − lse), 0 above the diagonal
                    row = p[i]
                    keys = i + 1 if causal else length
                    top = lse[b, start + i, h]
                    for j in range(keys):
                        row[j] -= top
                    _exp_into(row, bits, keys)
                    for j in range(keys, length):
                        row[j] = np.float32(0.0)
                np.dot(p.T, dos[:length], tmp[:length])
                for i in range(length):
                    for d in range(dim):
                        dvs[i, d] += tmp[i, d]
                np.dot(dos[:length], vs[:length].T, dp)
                for i in range(length):  # ds = p ∘ (dp − delta), in p
                    for j in range(length):
                        p[i, j] *= dp[i, j] - delta[i]
                np.dot(p, ks[:length], tmp[:length])
                for i in range(length):
                    for d in range(dim):
                        dq[b, start + i, h, d] = tmp[i, d] * scale
                np.dot(p.T, qs[:length], tmp[:length])  # qs holds q·scale already
                for i in range(length):
                    for d in range(dim):
                        dks[i, d] += tmp[i, d]
            for i in range(length):
                for d in range(dim):
                    dk[b, start + i, g, d] = dks[i, d]
                    dv[b, start + i, g, d] = dvs[i, d]
            start = end
    set_local_threads(threads)


@numba.njit(**PARALLEL_EXACT)
def backward(q, k, v, segment_ids, causal, chunks, out, lse, dout, dq, dk, dv):
    """Gradients of ``forward``'s output: dq (q's shape), dk, dv (k's) from the cotangent
    ``dout``, the forward's ``out`` and ``lse``; 0 at padding."""
    work = work_split(q, k, segment_ids, chunks)
    for chunk in numba.prange(work[4]):
        backward_chunk(q, k, v, segment_ids, causal, out, lse, dout, dq, dk, dv, work, chunk)


def attention(q, k, v, segment_ids, *, causal: bool):
    """(out, lse) of ``forward`` on new arrays; inputs as the module doc says (made float32 and
    contiguous here)."""
    q, k, v = _read_only(q, k, v)
    (segment_ids,) = _read_only(segment_ids, dtype=np.int32)
    check_shapes(q.shape, k.shape, segment_ids.shape)
    out = np.empty_like(q)
    lse = np.empty(q.shape[:3], np.float32)
    forward(q, k, v, segment_ids, bool(causal), _chunks(), out, lse)
    return out, lse


def attention_grads(q, k, v, segment_ids, out, lse, dout, *, causal: bool):
    """(dq, dk, dv) of ``backward`` on new arrays."""
    q, k, v, out, lse, dout = _read_only(q, k, v, out, lse, dout)
    (segment_ids,) = _read_only(segment_ids, dtype=np.int32)
    check_shapes(q.shape, k.shape, segment_ids.shape)
    dq = np.empty_like(q)
    dk = np.empty_like(k)
    dv = np.empty_like(k)
    backward(q, k, v, segment_ids, bool(causal), _chunks(), out, lse, dout, dq, dk, dv)
    return dq, dk, dv


def _read_only(*arrays, dtype=np.float32) -> list[np.ndarray]:
    """Contiguous read-only views (copies where the dtype or layout needs one). Numba compiles
    a version per combination of writable and read-only arguments, and callers hand over either:
    one kind for all keeps it to one compilation (and one cache entry) here."""
    views = []
    for array in arrays:
        view = np.ascontiguousarray(array, dtype).view()
        view.flags.writeable = False
        views.append(view)
    return views


def _chunks() -> int:
    """Work chunks for the calling thread's Numba thread count (numba.get_num_threads inside a
    kernel would keep it out of the cache)."""
    return CHUNKS_PER_THREAD * numba.get_num_threads()


def check_shapes(q_shape, k_shape, segments_shape) -> None:
    """ValueError unless queries, keys / values and segment ids have the layouts above."""
    batch, time, heads, dim = q_shape
    if tuple(k_shape[:2]) != (batch, time) or k_shape[3] != dim or heads % k_shape[2]:
        raise ValueError(f"queries {tuple(q_shape)} and keys {tuple(k_shape)} do not fit")
    if tuple(segments_shape) != (batch, time):
        raise ValueError(f"segment ids {tuple(segments_shape)} do not fit queries {tuple(q_shape)}")
