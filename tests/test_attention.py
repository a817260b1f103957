"""models.attention: every implementation against XLA's, values and gradients, and the models
built on it. The Pallas kernels run in interpret mode on the CPU (slowly): shapes stay tiny.

Rows are 200 tokens, so the kernels' padding to a multiple of 128 is exercised too; 4 query
heads over 2 KV heads (grouped-query) when causal, as the decoder has them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynrules.errors import DynrulesError
from dynrules.models import attention as att

TIME, HEADS, HEAD_DIM = 200, 4, 64
SEGMENTS = np.array(  # packed rows: texts 1, 2, … and padding 0
    [[1] * 70 + [2] * 90 + [3] * 30 + [0] * 10, [1] * 120 + [2] * 60 + [0] * 20], np.int32
)
LENGTHS = np.array([150, 77], np.int32)  # one text a row, right-padded
KERNELS = ("splash", "pallas_gpu")


def _inputs(kv_heads: int, dtype=jnp.float32, seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = [(2, TIME, HEADS, HEAD_DIM), *[(2, TIME, kv_heads, HEAD_DIM)] * 2]
    return [jnp.asarray(rng.standard_normal(shape), dtype) for shape in shapes]


def _rows(kind: str) -> tuple[dict, np.ndarray]:
    """attend's row keywords and the [batch, time] positions whose outputs must agree."""
    if kind == "packed":  # padding attends to padding in every implementation
        return {"segment_ids": jnp.asarray(SEGMENTS)}, np.ones(SEGMENTS.shape, bool)
    if kind == "unpacked":
        return {"lengths": jnp.asarray(LENGTHS)}, np.arange(TIME)[None] < LENGTHS[:, None]
    return {}, np.ones((2, TIME), bool)  # full rows, no padding


def _outputs_and_grads(implementation, q, k, v, rows, real, causal):
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    weights = weights * jnp.asarray(real)[:, :, None, None]  # only real positions count

    def loss(q, k, v):
        out = att.attend(q, k, v, causal=causal, implementation=implementation, **rows)
        return (out.astype(jnp.float32) * weights).sum(), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


@pytest.mark.parametrize("implementation", KERNELS)
@pytest.mark.parametrize("kind", ["packed", "unpacked", "full"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_kernels_equal_xla_in_values_and_gradients(implementation, kind, causal):
    q, k, v = _inputs(kv_heads=2 if causal else HEADS)
    rows, real = _rows(kind)
    out, grads = _outputs_and_grads(implementation, q, k, v, rows, real, causal)
    ref_out, ref_grads = _outputs_and_grads("xla", q, k, v, rows, real, causal)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref_out)[real], atol=1e-4)
    for name, grad, ref in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(grad, ref, atol=1e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("implementation", KERNELS)
def test_kernels_in_bfloat16_stay_within_bf16_rounding_of_xla(implementation):
    """bf16 inputs: |kernel − XLA| ≤ 2e-2 on outputs of unit scale (bf16 keeps 8 bits: a few
    roundings of 2⁻⁸ ≈ 4e-3 each), measured against XLA's float32 result of the same inputs."""
    q, k, v = _inputs(kv_heads=2, dtype=jnp.bfloat16)
    rows, real = _rows("packed")
    out, _ = _outputs_and_grads(implementation, q, k, v, rows, real, True)
    exact, _ = _outputs_and_grads(
        "xla", *(x.astype(jnp.float32) for x in (q, k, v)), rows, real, True
    )
    assert out.dtype == jnp.bfloat16
    assert float(jnp.abs(out.astype(jnp.float32) - exact).max()) <= 2e-2


def test_auto_picks_by_platform_and_unknown_names_are_refused():
    def choose(implementation, platform, packed=True, dtype=jnp.bfloat16):
        return att.resolve(implementation, packed=packed, dtype=dtype, platform=platform)

    assert choose("auto", "cpu") == "segment_cpu"
    assert choose("auto", "cpu", packed=False, dtype=jnp.float32) == "segment_cpu"
    assert choose("splash", "cpu") == "splash"
    assert choose("auto", "tpu", packed=False, dtype=jnp.float32) == "splash"
    assert choose("auto", "gpu") == "pallas_gpu"
    assert choose("auto", "gpu", packed=False) == "cudnn"
    assert choose("auto", "gpu", dtype=jnp.float32) == "xla"
    q, k, v = _inputs(kv_heads=2)
    with pytest.raises(DynrulesError, match="attention must be one of"):
        att.attend(q, k, v, causal=True, implementation="flash")


def test_splash_blocks_divide_the_padded_length():
    assert att.splash_block(128, 64) == 128
    assert att.splash_block(384, 128) == 128
    assert att.splash_block(768, 128) == 256
    assert att.splash_block(8192, 128) == 512
    assert att.splash_block(8192, 512) == 256


def _tiny_models(attention: str):
    from flax import nnx

    from dynrules.models.bert import BertConfig, BertEncoder
    from dynrules.models.llama import LlamaConfig, LlamaDecoder

    encoder = BertEncoder(
        BertConfig(
            vocab_size=64,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=256,
        ),
        rngs=nnx.Rngs(0),
        attention=attention,
    )
    decoder = LlamaDecoder(
        LlamaConfig(
            vocab_size=64,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=64,
        ),
        rngs=nnx.Rngs(0),
        attention=attention,
    )
    return encoder, decoder


def hidden_states(
    attention: str, packed_real: np.ndarray, *, differentiated: bool = False
) -> list[np.ndarray]:
    """The tiny encoder's and decoder's hidden states with ``attention``: on rows of LENGTHS at
    their real tokens, then on the packed rows of SEGMENTS where ``packed_real``; computed as
    the primal output of a VJP over the parameters when ``differentiated`` (the forward a
    training step runs)."""
    from flax import nnx

    def run(model, *args, **kwargs):
        if not differentiated:
            return model(*args, **kwargs)
        graphdef, params = nnx.split(model)
        return jax.vjp(lambda p: nnx.merge(graphdef, p)(*args, **kwargs), params)[0]

    ids = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, TIME)), jnp.int32)
    positions = np.zeros_like(SEGMENTS)
    for row, segments in enumerate(SEGMENTS):  # each token's place in its own text
        for segment in np.unique(segments):
            where = segments == segment
            positions[row, where] = np.arange(where.sum())
    real = np.arange(TIME)[None] < LENGTHS[:, None]
    packed = {"segments": jnp.asarray(SEGMENTS), "positions": jnp.asarray(positions)}
    models = _tiny_models(attention)
    unpacked = [np.asarray(run(model, ids, jnp.asarray(LENGTHS)))[real] for model in models]
    return unpacked + [np.asarray(run(model, ids, **packed))[packed_real] for model in models]


@pytest.mark.slow
def test_encoder_and_decoder_with_splash_give_xla_hidden_states():
    everywhere = np.ones(SEGMENTS.shape, bool)  # padding attends to padding in both
    got, want = (hidden_states(attention, everywhere) for attention in ("splash", "xla"))
    for got_states, want_states in zip(got, want, strict=True):
        np.testing.assert_allclose(got_states, want_states, atol=1e-4)


def test_after_prefixes_works_whatever_the_implementation():
    """Rows after cached prefixes need a mask no segment ids express: they run on XLA, while
    the prefixes, ordinary rows, run on the chosen kernel."""
    rng = np.random.default_rng(3)
    prefix_ids = jnp.asarray(rng.integers(0, 64, (2, 8)), jnp.int32)
    inputs = {
        "prefix_ids": prefix_ids,
        "prefix_lengths": jnp.asarray([8, 5], jnp.int32),
        "input_ids": jnp.asarray(rng.integers(0, 64, (2, 12)), jnp.int32),
        "segments": jnp.asarray([[1] * 6 + [2] * 6, [1] * 9 + [0] * 3], jnp.int32),
        "positions": jnp.asarray([list(range(8, 14)) * 2, list(range(5, 14)) + [0] * 3]),
        "prefix_of_row": jnp.asarray([0, 1], jnp.int32),
    }
    outs = [_tiny_models(attention)[1].after_prefixes(**inputs) for attention in ("xla", "splash")]
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-4)


_SHARDED = textwrap.dedent(
    """
    import json, numpy as np, jax, jax.numpy as jnp
    from dynrules.models import attention as att
    from dynrules.train import sharding as shd

    mesh = shd.make_mesh("data=2,tensor=2")
    layout = shd.ActivationSharding(mesh)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((4, 128, 4, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((4, 128, 1, 64)), jnp.float32) for _ in range(2))
    segments = jnp.asarray(np.repeat([[1] * 50 + [2] * 70 + [0] * 8], 4, 0), jnp.int32)
    report = {}
    for name in ("splash", "pallas_gpu"):
        def loss(q, k, v, name=name, sharding=layout):
            out = att.attend(q, k, v, causal=True, segment_ids=segments,
                             implementation=name, sharding=sharding)
            return (out * out).sum(), out
        step = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
        (_, out), grads = step(q, k, v)
        (_, ref), ref_grads = jax.value_and_grad(
            lambda q, k, v: loss(q, k, v, "xla", None), (0, 1, 2), has_aux=True)(q, k, v)
        report[name] = max(float(jnp.abs(a - b).max())
                           for a, b in zip((out, *grads), (ref, *ref_grads)))
        report[name + "_calls"] = step.lower(q, k, v).as_text().count("manual_computation")
    print(json.dumps(report))
    """
)


def on_four_host_devices(code: str, timeout: int) -> dict:
    """The JSON that ``code`` prints last, run in a process of its own on four host devices."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=os.environ
        | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kernels_run_per_shard_on_a_mesh():
    """Four host devices, batch over data and query heads over tensor (the single KV head is
    repeated per shard): the kernels run inside shard_map (a manual computation) and still equal XLA."""
    report = on_four_host_devices(_SHARDED, timeout=280)
    for name in KERNELS:
        assert report[name] < 1e-4, report
        assert report[name + "_calls"] >= 1, report
