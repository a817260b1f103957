"""Attention for the encoder and the decoder: one entry point, interchangeable implementations.

:func:`attend` takes queries [batch, time, heads, head_dim] and keys / values [batch, time,
kv_heads, head_dim] (grouped-query when kv_heads < heads) with the rows described by what the
models have: ``lengths`` (one right-padded text a row), ``segment_ids`` (packed rows: a token
sees only its own segment; models.tokenizer.pack_batch numbers texts 1, 2, … and padding 0) or
neither, causal or not. The implementations (models.choices.ATTENTION):

- ``xla``: ``jax.nn.dot_product_attention`` with an explicit boolean mask (the reference).
  It materialises the float32 [batch, heads, time, time] score tensor.
- ``splash``: Pallas splash attention (TPU, what MaxText runs): flash attention in VMEM tiles
  that skips the tiles its causal mask rules out, segment ids checked per tile.
- ``pallas_gpu``: Pallas' Triton flash attention with segment ids (GPU).
- ``cudnn``: cuDNN's fused flash attention through ``jax.nn.dot_product_attention``; it has
  lengths but no segment ids, so packed rows go to ``pallas_gpu`` instead.
- ``segment_cpu``: kernels.attention, a Numba kernel that computes each segment's own diagonal
  block of the scores only, with BLAS matmuls per segment and head, in float32 (CPU). XLA calls
  it as an FFI custom call inside the compiled step (kernels.xla_ffi), forward and backward
  (a ``jax.custom_vjp``).
- ``auto``: ``splash`` on TPU; on a GPU under 16-bit compute ``pallas_gpu`` for packed rows and
  ``cudnn`` for unpacked ones; ``segment_cpu`` on a CPU; ``xla`` otherwise (float32 compute on
  a GPU, which neither fused kernel runs exactly). The platform is the devices' of the
  ``sharding`` mesh when there is one (so an ahead-of-time compile for a TPU slice picks splash
  on a CPU host), else ``jax.default_backend()``, decided when the step is traced.

Every implementation gives the same outputs at real tokens; at padded positions they differ
(the Pallas kernels let padding attend to padding, XLA padding of unpacked rows to the text,
``segment_cpu`` gives 0) and are no one's business. On a CPU the Pallas kernels run in
interpret mode: slowly, for tests.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dynrules.errors import DynrulesError
from dynrules.models.choices import ATTENTION

KERNEL_TILE = 128  # both kernels take sequences in multiples of this (splash: the TPU lane width)
_PADDING_SEGMENT = -1  # added positions: a segment of their own, seen by no real token


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    segment_ids: jax.Array | None = None,
    lengths: jax.Array | None = None,
    mask: jax.Array | None = None,
    implementation: str = "auto",
    sharding=None,
) -> jax.Array:
    """Attention of ``q`` over ``k``, ``v`` → [batch, time, heads, head_dim] in q's dtype.

    ``segment_ids`` [batch, time] or ``lengths`` [batch] (or neither) describe the rows; ``mask``
    [batch, time, time'] is an explicit boolean mask instead (the decoder's cached prefixes,
    whose keys every segment of a row sees: not a segment-id mask, so it always runs on XLA).
    ``sharding``: the models' activation sharding (train.sharding.ActivationSharding); its
    ``mesh`` and ``spec(logical_axes, shape)`` run the Pallas kernels shard by shard
    (``shard_map``), which XLA's partitioner cannot do for a custom call; None: one device.
    """
    if implementation not in ATTENTION:
        raise DynrulesError(
            f"attention must be one of {', '.join(ATTENTION)}, got {implementation!r}"
        )
    if mask is not None:
        return _xla(q, k, v, causal=False, segment_ids=None, lengths=None, mask=mask)
    platform = _platform(sharding)
    chosen = resolve(
        implementation,
        packed=segment_ids is not None,
        dtype=q.dtype,
        platform=platform,
    )
    if chosen == "xla":
        return _xla(q, k, v, causal=causal, segment_ids=segment_ids, lengths=lengths, mask=None)
    if chosen == "cudnn":
        if segment_ids is not None:
            raise DynrulesError(
                "cuDNN attention has no segment ids: use pallas_gpu for packed rows"
            )
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, key_value_seq_lengths=lengths, implementation="cudnn"
        )
    segments = _kernel_segments(q.shape[:2], segment_ids, lengths)
    if chosen == "segment_cpu":  # any length: no tiles to pad to
        segment_kernel = functools.partial(_segment_cpu, causal=causal)
        return _run_kernel(segment_kernel, q, k, v, segments, sharding, tile=1)
    interpret = platform == "cpu"
    kernel = _splash if chosen == "splash" else _pallas_gpu
    return _run_kernel(
        functools.partial(kernel, causal=causal, interpret=interpret),
        q,
        k,
        v,
        segments,
        sharding,
        tile=KERNEL_TILE,
    )


def resolve(implementation: str, *, packed: bool, dtype, platform: str) -> str:
    """The implementation ``auto`` stands for on ``platform`` (cpu, gpu, tpu; module doc) for
    packed rows or not under compute ``dtype``; the others stand for themselves."""
    if implementation != "auto":
        return implementation
    if platform == "tpu":
        return "splash"
    if platform == "gpu" and jnp.dtype(dtype).itemsize == 2:
        return "pallas_gpu" if packed else "cudnn"
    if platform == "cpu":
        return "segment_cpu"
    return "xla"


def _platform(sharding) -> str:
    """The platform the step is compiled for: its mesh's devices', else the default backend."""
    mesh = getattr(sharding, "mesh", None)
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def _xla(q, k, v, *, causal, segment_ids, lengths, mask):
    """The reference: XLA's attention with the boolean mask the rows need."""
    time = q.shape[1]
    if mask is None and segment_ids is not None:
        mask = segment_ids[:, :, None] == segment_ids[:, None, :]
        if causal:
            mask &= jnp.tril(jnp.ones((time, time), bool))[None]
    if mask is not None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")
    if causal:  # lengths mask the padded keys; a real token does not see them anyway
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, key_value_seq_lengths=lengths, implementation="xla"
        )
    key_mask = None if lengths is None else (jnp.arange(time)[None] < lengths[:, None])
    key_mask = None if key_mask is None else key_mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=key_mask, implementation="xla")


def _kernel_segments(shape, segment_ids, lengths) -> jax.Array:
    """Segment ids [batch, time] for the kernels: packed rows' own, or real tokens 1 and padding
    0 (padding then attends to padding only: no row without a key, no NaN)."""
    if segment_ids is not None:
        return segment_ids.astype(jnp.int32)
    if lengths is not None:
        return (jnp.arange(shape[1])[None] < lengths[:, None]).astype(jnp.int32)
    return jnp.ones(shape, jnp.int32)


def _run_kernel(kernel, q, k, v, segments, sharding, *, tile: int):
    """``kernel`` on rows padded to a multiple of ``tile`` (the Pallas kernels' KERNEL_TILE; 1:
    as they are), per shard when ``sharding`` has a mesh; the padding is cut off again."""
    time = q.shape[1]
    extra = -time % tile
    if extra:  # padded positions get a segment of their own: they change no real token
        q, k, v = (jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))) for x in (q, k, v))
        segments = jnp.pad(segments, ((0, 0), (0, extra)), constant_values=_PADDING_SEGMENT)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None:
        return kernel(q, k, v, segments)[:, :time]
    q_spec = sharding.spec(("batch", "length", "heads", "head_dim"), q.shape)
    kv_spec = sharding.spec(("batch", "length", "kv_heads", "head_dim"), k.shape)
    if kv_spec[2] != q_spec[2]:  # query heads split but KV heads not: each shard its groups' KV
        k, v = (jnp.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v))
        kv_spec = q_spec
    segment_spec = jax.sharding.PartitionSpec(q_spec[0], q_spec[1])
    per_shard = jax.shard_map(
        kernel,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, segment_spec),
        out_specs=q_spec,
        check_vma=False,
    )
    return per_shard(q, k, v, segments)[:, :time]


def splash_block(time: int, head_dim: int) -> int:
    """Splash's tile along the sequence (queries and keys, forward and backward alike).

    ``time`` is a multiple of KERNEL_TILE (128, the lane width every kernel block must be a
    multiple of). The largest of 512, 256, 128 that divides it: larger tiles amortise the
    per-tile overhead (512 is MaxText's default for every splash block); a tile holds
    block × head_dim queries, keys and values and a float32 block × block score tile in VMEM,
    so head dims above 256 take half the tile.
    """
    largest = 512 if head_dim <= 256 else 256
    return next(block for block in (largest, largest // 2, 128) if time % block == 0)


def _splash(q, k, v, segments, *, causal: bool, interpret: bool):
    """Splash attention over rows of a multiple of KERNEL_TILE tokens, vmapped over the batch."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    _, time, heads, head_dim = q.shape
    block = splash_block(time, head_dim)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    head_mask = (masks.CausalMask if causal else masks.FullMask)((time, time))
    kernel = splash.make_splash_mha(  # grouped-query: kv heads divide the query heads
        masks.MultiHeadMask([head_mask] * heads),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )

    def row(q, k, v, segments):  # [heads, time, head_dim] each, as splash takes them
        return kernel(q, k, v, segment_ids=splash.SegmentIds(segments, segments))

    # Splash applies no softmax scale: scale the queries as XLA does (1 / √head_dim).
    q = q * jnp.asarray(1 / math.sqrt(head_dim), q.dtype)
    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    out = jax.vmap(row)(heads_first(q), heads_first(k), heads_first(v), segments)
    return heads_first(out)


def _pallas_gpu(q, k, v, segments, *, causal: bool, interpret: bool):
    """Pallas' Triton flash attention; it has no grouped-query form, so KV heads are repeated."""
    from jax.experimental.pallas.ops.gpu import attention

    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
    return attention.mha(
        q,
        k,
        v,
        segments,
        sm_scale=float(1 / np.sqrt(q.shape[-1])),
        causal=causal,
        interpret=interpret,
    )


def _segment_cpu(q, k, v, segments, *, causal: bool):
    """kernels.attention on float32 copies of q, k, v; the result in q's dtype. Padding (segment
    0) comes out 0."""
    f32 = (x.astype(jnp.float32) for x in (q, k, v))
    return _segment_attention(causal, *f32, segments).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _segment_attention(causal: bool, q, k, v, segments):
    """The kernel's forward; differentiated, it also keeps the log-sum-exp its backward reads."""
    return _segment_forward(causal, q, k, v, segments)[0]


@functools.cache
def _segment_targets() -> tuple[str, str]:
    """The FFI targets of kernels.xla_ffi's forward and backward, registered once a process."""
    from dynrules.kernels import xla_ffi

    names = ("dynrules_segment_attention", "dynrules_segment_attention_grads")
    for name, handler in zip(names, (xla_ffi.forward, xla_ffi.backward), strict=True):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler.address), platform="cpu")
    return names


def _segment_forward(causal: bool, q, k, v, segments):
    """(out, residuals): the kernel's output, and what the backward reads (its log-sum-exp)."""
    from dynrules.kernels import attention as kernel

    kernel.check_shapes(q.shape, k.shape, segments.shape)
    segments = segments.astype(jnp.int32)
    out, lse = jax.ffi.ffi_call(
        _segment_targets()[0],
        (
            jax.ShapeDtypeStruct(q.shape, jnp.float32),
            jax.ShapeDtypeStruct(q.shape[:3], jnp.float32),
        ),
        vmap_method="sequential",
    )(q, k, v, segments, jnp.asarray(causal, jnp.int32))
    return out, (q, k, v, segments, out, lse)


def _segment_backward(causal: bool, residuals, dout):
    q, k, v, segments, out, lse = residuals
    dq, dk, dv = jax.ffi.ffi_call(
        _segment_targets()[1],
        (
            jax.ShapeDtypeStruct(q.shape, jnp.float32),
            jax.ShapeDtypeStruct(k.shape, jnp.float32),
            jax.ShapeDtypeStruct(k.shape, jnp.float32),
        ),
        vmap_method="sequential",
    )(q, k, v, segments, jnp.asarray(causal, jnp.int32), out, lse, dout.astype(jnp.float32))
    return dq, dk, dv, None  # segment ids: integers, no gradient


_segment_attention.defvjp(_segment_forward, _segment_backward)
