"""The CPU segment kernel: kernels.attention against its NumPy twin (tests/naive_attention.py),
with hypothesis, and models.attention's ``segment_cpu`` against XLA's attention: values and
gradients on packed, unpacked and full rows, under jit, remat and a mesh, and the models built
on it. The kernel gives padding (segment 0) output 0, so values are compared at real tokens.
"""

from __future__ import annotations

import ctypes
import textwrap

import jax
import jax.numpy as jnp
import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynrules.kernels import attention as K
from dynrules.kernels import blas_threads
from dynrules.kernels.blas_threads import set_local_threads
from dynrules.models import attention as att

from . import naive_attention
from .test_attention import (
    LENGTHS,
    SEGMENTS,
    TIME,
    _inputs,
    _outputs_and_grads,
    hidden_states,
    on_four_host_devices,
)


@st.composite
def packed_rows(draw):
    """q, k, v, segment ids [batch, time] as runs (padding 0 anywhere, ids may repeat), causal."""
    batch = draw(st.integers(1, 3))
    time = draw(st.integers(1, 40))
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(1, 3))
    dim = draw(st.integers(1, 16))
    ids = np.zeros((batch, time), np.int32)
    for b in range(batch):
        t = 0
        while t < time:
            length = draw(st.integers(1, time - t))
            ids[b, t : t + length] = draw(st.integers(0, 3))
            t += length
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = rng.standard_normal((batch, time, heads, dim)).astype(np.float32)
    k, v = (rng.standard_normal((batch, time, kv_heads, dim)).astype(np.float32) for _ in "kv")
    scale = draw(st.sampled_from([1.0, 4.0]))  # 4: peaked softmaxes
    return q * np.float32(scale), k, v, ids, draw(st.booleans()), rng


@settings(max_examples=60, deadline=None)
@given(packed_rows())
def test_kernel_forward_and_backward_match_the_numpy_twin(data):
    q, k, v, ids, causal, rng = data
    out, lse = K.attention(q, k, v, ids, causal=causal)
    want_out, want_lse = naive_attention.attention(q, k, v, ids, causal)
    np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5, rtol=1e-5)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    grads = K.attention_grads(q, k, v, ids, out, lse, dout, causal=causal)
    wants = naive_attention.attention_grads(q, k, v, ids, causal, dout)
    for name, grad, want in zip("qkv", grads, wants, strict=True):
        np.testing.assert_allclose(grad, want, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")
    padding = ids == 0
    assert not out[padding].any() and not grads[0][padding].any()
    assert not grads[1][padding].any() and not grads[2][padding].any()


@settings(max_examples=30, deadline=None)
@given(packed_rows(), st.integers(1, 9))
def test_chunks_run_in_any_order_equal_the_parallel_kernels_bit_for_bit(data, chunks):
    """The FFI handlers run the chunks in whatever order XLA's threads claim them, split for
    however many threads XLA's pool has: a work item's arithmetic is the same in any chunk."""
    q, k, v, ids, causal, rng = data
    out, lse = K.attention(q, k, v, ids, causal=causal)
    work = K.work_split(q, k, ids, chunks)
    got_out, got_lse = np.empty_like(out), np.empty_like(lse)
    for chunk in reversed(range(work[4])):
        K.forward_chunk(q, k, v, ids, causal, got_out, got_lse, work, chunk)
    np.testing.assert_array_equal(got_out, out)
    np.testing.assert_array_equal(got_lse, lse)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    grads = K.attention_grads(q, k, v, ids, out, lse, dout, causal=causal)
    got = np.empty_like(q), np.empty_like(k), np.empty_like(k)
    for chunk in reversed(range(work[4])):
        K.backward_chunk(q, k, v, ids, causal, out, lse, dout, *got, work, chunk)
    for name, grad, want in zip("qkv", got, grads, strict=True):
        np.testing.assert_array_equal(grad, want, err_msg=f"d{name}")


def _ffi_outputs(q, k, v, ids, dout, causal):
    """(out, dq, dk, dv) of the FFI handlers inside one compiled function."""

    def run(q, k, v, dout):
        out, vjp = jax.vjp(lambda q, k, v: att._segment_attention(causal, q, k, v, ids), q, k, v)
        return out, *vjp(dout)

    return [np.asarray(x) for x in jax.jit(run)(q, k, v, dout)]


@pytest.mark.parametrize("causal", [False, True])
def test_the_ffi_handlers_share_their_chunks_with_xlas_pool_and_equal_the_kernels(causal):
    """Inside XLA the handlers deal their chunks to XLA's intra-op threads (kernels.xla_ffi;
    what that gains is the benchmarks' to say): on rows enough for every thread the results
    equal the NumPy API's bit for bit, and four
    devices calling the handlers at once (one pool between them) neither deadlock nor mix up
    their calls."""
    rng = np.random.default_rng(7)
    batch, time, heads, kv_heads, dim = 6, 96, 4, 2, 16
    ids = np.repeat(np.arange(1, 5, dtype=np.int32), time // 4)[None].repeat(batch, 0)
    ids[:, -10:] = 0
    q = rng.standard_normal((batch, time, heads, dim)).astype(np.float32)
    k, v = (rng.standard_normal((batch, time, kv_heads, dim)).astype(np.float32) for _ in "kv")
    dout = rng.standard_normal(q.shape).astype(np.float32)
    want_out, lse = K.attention(q, k, v, ids, causal=causal)
    wants = [want_out, *K.attention_grads(q, k, v, ids, want_out, lse, dout, causal=causal)]
    for name, got, want in zip(
        ("out", "dq", "dk", "dv"), _ffi_outputs(q, k, v, ids, dout, causal), wants, strict=True
    ):
        np.testing.assert_array_equal(got, want, err_msg=name)

    report = on_four_host_devices(
        textwrap.dedent(
            """
            import json
            import jax, numpy as np
            from jax.sharding import NamedSharding, PartitionSpec as P
            from dynrules.kernels import attention as K
            from dynrules.models import attention as att
            from dynrules.train import sharding as shd
            rng = np.random.default_rng(7)
            batch, time, heads, kv_heads, dim = 8, 96, 4, 2, 16
            ids = np.repeat(np.arange(1, 5, dtype=np.int32), time // 4)[None].repeat(batch, 0)
            q = rng.standard_normal((batch, time, heads, dim)).astype(np.float32)
            k, v = (rng.standard_normal((batch, time, kv_heads, dim)).astype(np.float32) for _ in "kv")
            rows = NamedSharding(shd.make_mesh("data=4"), P("data"))
            f = jax.jit(lambda q, k, v, ids: att._segment_attention(CAUSAL, q, k, v, ids))
            for _ in range(5):
                got = np.asarray(f(*(jax.device_put(x, rows) for x in (q, k, v, ids))))
            want, _ = K.attention(q, k, v, ids, causal=CAUSAL)
            print(json.dumps({"devices": len(jax.devices()), "max_diff": float(abs(got - want).max())}))
            """
        ).replace("CAUSAL", str(causal)),
        timeout=240,
    )
    assert report == {"devices": 4, "max_diff": 0.0}


def test_segment_cpu_is_an_ffi_custom_call_inside_the_compiled_step():
    """No host callback: a training step calls the Numba handlers through XLA's typed FFI, and a
    forward on its own (scoring) the forward handler alone."""
    q, k, v = _inputs(2)

    def loss(q, k, v):
        out = att.attend(q, k, v, causal=True, segment_ids=SEGMENTS, implementation="segment_cpu")
        return (out**2).sum()

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).as_text()
    assert "dynrules_segment_attention" in hlo and "dynrules_segment_attention_grads" in hlo
    assert "callback" not in hlo
    forward_only = jax.jit(loss).lower(q, k, v).as_text()
    assert "dynrules_segment_attention" in forward_only
    assert "dynrules_segment_attention_grads" not in forward_only and "callback" not in forward_only


@numba.njit
def _threads_after_kernels(q, k, v, segment_ids, threads):
    """The calling thread's BLAS count seen after both kernels ran a chunk with it set."""
    set_local_threads(threads)
    out = np.empty_like(q)
    lse = np.empty(q.shape[:3], np.float32)
    work = K.work_split(q, k, segment_ids, 1)
    K.forward_chunk(q, k, v, segment_ids, False, out, lse, work, 0)
    grads = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    K.backward_chunk(q, k, v, segment_ids, False, out, lse, out, *grads, work, 0)
    return set_local_threads(0)  # returns the count it replaces


def test_kernels_run_their_products_on_one_blas_thread_and_restore_the_callers_count():
    """The kernels set the calling thread's OpenBLAS count to 1 for their products (inside a
    step XLA's threads would otherwise contend with OpenBLAS's) and hand it back unchanged."""
    library = blas_threads.blas_library()
    assert library is not None
    has_setter = hasattr(ctypes.CDLL(library), blas_threads.OPENBLAS_SETTER)
    assert blas_threads.controls_threads() == has_setter
    if not has_setter:
        pytest.skip(f"{library}: no {blas_threads.OPENBLAS_SETTER} (not OpenBLAS >= 0.3.27)")
    q, k, v = (np.asarray(x) for x in _inputs(2))
    segments = np.asarray(SEGMENTS, np.int32)
    assert _threads_after_kernels(q, k, v, segments, 3) == 3
    assert _threads_after_kernels(q, k, v, segments, 2) == 2


def test_kernel_exp_is_within_two_ulps_and_zero_far_below():
    x = np.linspace(-100, 0, 200_001, dtype=np.float32)
    y = x.copy()
    K._exp_into(y, np.empty(len(y), np.int32), len(y))
    want = np.exp(x.astype(np.float64))
    normal = x >= -87
    assert np.all(np.abs(y - want)[normal] <= 2.4e-7 * want[normal])
    assert not y[~normal].any()


def _real(kind: str) -> tuple[dict, np.ndarray]:
    """attend's row keywords and the real tokens (where segment_cpu's outputs are XLA's)."""
    if kind == "packed":
        return {"segment_ids": jnp.asarray(SEGMENTS)}, SEGMENTS != 0
    if kind == "unpacked":
        return {"lengths": jnp.asarray(LENGTHS)}, np.arange(TIME)[None] < LENGTHS[:, None]
    return {}, np.ones((2, TIME), bool)


@pytest.mark.parametrize("kind", ["packed", "unpacked", "full"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_segment_cpu_equals_xla_in_values_and_gradients(kind, causal):
    """Rows of 200 tokens (no multiple of anything), 4 query heads over 2 KV heads when causal:
    outputs within 1e-5, gradients within 1e-4, under jit (_outputs_and_grads)."""
    q, k, v = _inputs(kv_heads=2 if causal else 4)
    rows, real = _real(kind)
    out, grads = _outputs_and_grads("segment_cpu", q, k, v, rows, real, causal)
    ref_out, ref_grads = _outputs_and_grads("xla", q, k, v, rows, real, causal)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref_out)[real], atol=1e-5)
    assert not np.asarray(out)[~real].any()
    for name, grad, ref in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(grad, ref, atol=1e-4, err_msg=f"d{name}")


def test_segment_cpu_under_remat_and_in_bfloat16():
    q, k, v = _inputs(kv_heads=2)
    rows, real = _real("packed")

    def loss(q, k, v):
        out = att.attend(q, k, v, causal=True, implementation="segment_cpu", **rows)
        return (out.astype(jnp.float32) ** 2).sum()

    plain = jax.grad(loss, (0, 1, 2))(q, k, v)
    remat = jax.jit(jax.grad(jax.checkpoint(loss), (0, 1, 2)))(q, k, v)
    for got, want in zip(remat, plain, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    halves = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out, _ = _outputs_and_grads("segment_cpu", *halves, rows, real, True)
    exact, _ = _outputs_and_grads("xla", *(x.astype(jnp.float32) for x in halves), rows, real, True)
    assert out.dtype == jnp.bfloat16
    assert float(jnp.abs(out.astype(jnp.float32) - exact)[real].max()) <= 2e-2


@pytest.mark.slow
def test_encoder_and_decoder_with_segment_cpu_give_xla_hidden_states():
    """At real tokens (packed padding comes out 0 from the kernel's attention), in the forward of
    a differentiated step (the kernel's) and in a forward on its own (XLA's)."""
    want = hidden_states("xla", SEGMENTS != 0)
    for differentiated in (True, False):
        got = hidden_states("segment_cpu", SEGMENTS != 0, differentiated=differentiated)
        for got_states, want_states in zip(got, want, strict=True):
            np.testing.assert_allclose(got_states, want_states, atol=1e-5)


_SHARDED = textwrap.dedent(
    """
    import json, numpy as np, jax, jax.numpy as jnp
    from dynrules.models import attention as att
    from dynrules.train import sharding as shd

    mesh = shd.make_mesh("data=2,tensor=2")
    layout = shd.ActivationSharding(mesh)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((4, 100, 4, 16)), jnp.float32)
    report = {}
    for kv_heads in (1, 2):  # 1: repeated per tensor shard; 2: split with the query heads
        k, v = (jnp.asarray(rng.standard_normal((4, 100, kv_heads, 16)), jnp.float32)
                for _ in range(2))
        segments = jnp.asarray(np.repeat([[1] * 40 + [2] * 52 + [0] * 8], 4, 0), jnp.int32)
        real = np.asarray(segments != 0)[:, :, None, None]
        def loss(q, k, v, name="segment_cpu", sharding=layout):
            out = att.attend(q, k, v, causal=True, segment_ids=segments,
                             implementation=name, sharding=sharding)
            return (out * out * real).sum(), out * real
        step = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
        (_, out), grads = step(q, k, v)
        (_, ref), ref_grads = jax.value_and_grad(
            lambda q, k, v: loss(q, k, v, "xla", None), (0, 1, 2), has_aux=True)(q, k, v)
        report[kv_heads] = max(float(jnp.abs(a - b).max())
                               for a, b in zip((out, *grads), (ref, *ref_grads)))
        report[f"{kv_heads}_calls"] = step.lower(q, k, v).as_text().count("manual_computation")
    print(json.dumps(report))
    """
)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_segment_cpu_runs_per_shard_on_a_mesh():
    """Four host devices, rows over data and query heads over tensor: the kernel runs inside
    shard_map (a manual computation), one callback a shard, and still equals XLA."""
    report = on_four_host_devices(_SHARDED, timeout=110)
    for kv_heads in ("1", "2"):
        assert report[kv_heads] < 1e-4, report
        assert report[kv_heads + "_calls"] >= 1, report
