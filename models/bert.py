"""A BERT-family text encoder in Flax NNX (the architecture; file IO is in bert_checkpoint).

Layers are stored stacked (a leading ``layers`` axis) and run with ``jax.lax.scan``: one
layer is compiled once whatever the depth, which keeps compile time flat for deep models
and lets ``remat`` wrap a single layer.

Every parameter carries ``logical_axes`` metadata (e.g. ``('embed', 'mlp')``); train.sharding
maps those names onto mesh axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from dynrules.errors import DynrulesError
from dynrules.models.attention import attend
from dynrules.models.choices import REMAT
from dynrules.models.layers import check_frozen, scan_layers


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The architecture fields of a Hugging Face BERT config.json that the forward pass uses."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_dict(cls, raw: dict) -> BertConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in raw.items() if k in names})
        if config.hidden_size % config.num_attention_heads:
            raise DynrulesError(
                f"hidden_size {config.hidden_size} is not divisible by "
                f"num_attention_heads {config.num_attention_heads}"
            )
        if config.hidden_act not in _ACTIVATIONS:
            raise DynrulesError(
                f"unsupported hidden_act {config.hidden_act!r}; supported: {sorted(_ACTIVATIONS)}"
            )
        return config

    def to_hf_dict(self) -> dict:
        """A config.json that Hugging Face ``BertModel`` also accepts."""
        return {"architectures": ["BertModel"], "model_type": "bert", **dataclasses.asdict(self)}


def _gelu_exact(x):
    """x·Φ(x) through erf, as PyTorch writes it: jax.nn.gelu's erfc form is the same function
    but 3.6 × slower forward on XLA's CPU backend (3.0 against 0.84 ms on MiniLM's
    [8, 384, 1536] activations)."""
    return x * (0.5 + 0.5 * jax.lax.erf(x * math.sqrt(0.5)))


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _gelu_exact,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


def param_shapes(config: BertConfig) -> dict:
    d, f, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    layer = {
        "query_kernel": (d, d),
        "query_bias": (d,),
        "key_kernel": (d, d),
        "key_bias": (d,),
        "value_kernel": (d, d),
        "value_bias": (d,),
        "attn_out_kernel": (d, d),
        "attn_out_bias": (d,),
        "attn_ln_scale": (d,),
        "attn_ln_bias": (d,),
        "mlp_in_kernel": (d, f),
        "mlp_in_bias": (f,),
        "mlp_out_kernel": (f, d),
        "mlp_out_bias": (d,),
        "mlp_ln_scale": (d,),
        "mlp_ln_bias": (d,),
    }
    return {
        "word_embeddings": (config.vocab_size, d),
        "position_embeddings": (config.max_position_embeddings, d),
        "token_type_embeddings": (config.type_vocab_size, d),
        "embeddings_ln_scale": (d,),
        "embeddings_ln_bias": (d,),
        "layers": {name: (n, *shape) for name, shape in layer.items()},
    }


# Logical axis names per parameter; train.sharding maps them to mesh axes.
_EMBEDDING_AXES = {
    "word_embeddings": ("vocab", "embed"),
    "position_embeddings": (None, "embed"),
    "token_type_embeddings": (None, "embed"),
    "embeddings_ln_scale": ("embed",),
    "embeddings_ln_bias": ("embed",),
}
_LAYER_AXES = {
    "query_kernel": ("embed", "qkv"),
    "query_bias": ("qkv",),
    "key_kernel": ("embed", "qkv"),
    "key_bias": ("qkv",),
    "value_kernel": ("embed", "qkv"),
    "value_bias": ("qkv",),
    "attn_out_kernel": ("qkv", "embed"),
    "attn_out_bias": ("embed",),
    "attn_ln_scale": ("embed",),
    "attn_ln_bias": ("embed",),
    "mlp_in_kernel": ("embed", "mlp"),
    "mlp_in_bias": ("mlp",),
    "mlp_out_kernel": ("mlp", "embed"),
    "mlp_out_bias": ("embed",),
    "mlp_ln_scale": ("embed",),
    "mlp_ln_bias": ("embed",),
}


def _initial_value(name: str, shape: tuple, key: jax.Array, std: float = 0.02) -> jax.Array:
    if name.endswith("ln_scale"):
        return jnp.ones(shape, jnp.float32)
    if name.endswith("bias"):
        return jnp.zeros(shape, jnp.float32)
    return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)


class EncoderLayers(nnx.Module):
    """All transformer layers, each parameter stacked on a leading ``layers`` axis."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        shapes = param_shapes(config)["layers"]
        for name, shape in shapes.items():
            value = _initial_value(name, shape, rngs.params())
            setattr(self, name, nnx.Param(value, logical_axes=("layers", *_LAYER_AXES[name])))


class BertEncoder(nnx.Module):
    """BERT encoder: token ids + explicit lengths → hidden states [batch, time, hidden].

    Right padding with explicit ``lengths`` (never inferred from pad ids): positions ≥ length
    are masked as attention keys, and real tokens never see them, so a text's hidden states
    do not depend on the padding around it.

    Packed rows (several texts a row) pass ``segments`` and ``positions`` instead of lengths
    (models.tokenizer.pack_batch): a token attends only to its own segment (a block-diagonal
    mask) and takes the position embedding of its place in its own text, so each text's
    hidden states are those it has alone.

    ``attention`` names the implementation (models.choices.ATTENTION, see models.attention).
    ``constrain`` is the activation sharding (train.sharding.ActivationSharding): the encoder
    uses its mesh only to run the attention kernels shard by shard. The first ``frozen`` layers
    run without a backward pass; ``unroll`` writes the others out instead of looping over them
    (models.layers; the trainer's choice on a CPU).
    """

    if TYPE_CHECKING:  # set in __init__, one per entry of param_shapes (the layers aside)
        word_embeddings: nnx.Param
        position_embeddings: nnx.Param
        token_type_embeddings: nnx.Param
        embeddings_ln_scale: nnx.Param
        embeddings_ln_bias: nnx.Param

    def __init__(
        self,
        config: BertConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        remat: bool | str = False,
        attention: str = "auto",
        constrain=None,
        frozen: int = 0,
        unroll: bool = False,
    ):
        self.config = config
        self.frozen = check_frozen(frozen, config.num_hidden_layers)
        self.unroll = unroll
        self.dtype = dtype
        self.attention = attention
        self.constrain = constrain
        # A policy name (models.choices.REMAT), or a bool: True recomputes whole layers.
        self.remat = remat if isinstance(remat, str) else ("full" if remat else "none")
        if self.remat not in REMAT:
            raise DynrulesError(f"remat must be one of {', '.join(REMAT)}, got {remat!r}")
        for name, shape in param_shapes(config).items():
            if name != "layers":
                value = _initial_value(name, shape, rngs.params())
                setattr(self, name, nnx.Param(value, logical_axes=_EMBEDDING_AXES[name]))
        self.layers = EncoderLayers(config, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        lengths: jax.Array | None = None,
        *,
        segments: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        config = self.config
        time = input_ids.shape[1]
        if segments is None:  # one text a row: padded keys are masked
            position_embeddings = self.position_embeddings[...][:time][None]
        else:  # packed rows: a token sees its own segment only
            assert positions is not None, "packed rows need their positions"
            position_embeddings = jnp.take(self.position_embeddings[...], positions, axis=0)
        attention = functools.partial(
            attend,
            causal=False,
            segment_ids=segments,
            lengths=None if segments is not None else lengths,
            implementation=self.attention,
            sharding=self.constrain,
        )
        hidden = (
            jnp.take(self.word_embeddings[...], input_ids, axis=0)
            + position_embeddings
            + self.token_type_embeddings[...][0][None, None]
        )
        hidden = _layer_norm(
            hidden,
            self.embeddings_ln_scale[...],
            self.embeddings_ln_bias[...],
            config.layer_norm_eps,
        )
        layer_params = {name: getattr(self.layers, name)[...] for name in _LAYER_AXES}
        step: Callable[..., jax.Array] = functools.partial(
            _layer, config=config, attention=attention, dtype=self.dtype
        )
        if self.remat == "full":
            step = jax.checkpoint(step)  # keep nothing: recompute the whole layer
        elif self.remat == "dots":  # keep the matmul outputs, recompute the rest
            step = jax.checkpoint(
                step, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable
            )
        return scan_layers(
            lambda h, p: (step(h, p), None),
            hidden,
            layer_params,
            self.frozen,
            unroll=self.unroll,
        )


def _layer_norm(x, scale, bias, eps):
    x = x.astype(jnp.float32)  # statistics in float32 even under bf16 compute
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def _dense(x, kernel, bias, dtype):
    """x [..., in] · kernel + bias, on the tokens flattened to [tokens, in]: the weight's
    gradient is then one matmul over the token dim, which XLA's CPU backend runs in place,
    where a 3-D product's gradient made it transpose both operands first (docs/performance.md)."""
    flat = x.reshape(-1, x.shape[-1]).astype(dtype)
    out = (flat @ kernel.astype(dtype)).astype(jnp.float32) + bias
    return out.reshape(*x.shape[:-1], kernel.shape[-1])


def _layer(hidden, p, *, config: BertConfig, attention, dtype):
    batch, time, width = hidden.shape
    heads = config.num_attention_heads

    def split_heads(x):
        return x.reshape(batch, time, heads, width // heads).astype(dtype)

    q = split_heads(_dense(hidden, p["query_kernel"], p["query_bias"], dtype))
    k = split_heads(_dense(hidden, p["key_kernel"], p["key_bias"], dtype))
    v = split_heads(_dense(hidden, p["value_kernel"], p["value_bias"], dtype))
    attended = attention(q, k, v)
    attended = attended.reshape(batch, time, width)
    hidden = _layer_norm(
        hidden + _dense(attended, p["attn_out_kernel"], p["attn_out_bias"], dtype),
        p["attn_ln_scale"],
        p["attn_ln_bias"],
        config.layer_norm_eps,
    )
    inner = _ACTIVATIONS[config.hidden_act](
        _dense(hidden, p["mlp_in_kernel"], p["mlp_in_bias"], dtype)
    )
    return _layer_norm(
        hidden + _dense(inner, p["mlp_out_kernel"], p["mlp_out_bias"], dtype),
        p["mlp_ln_scale"],
        p["mlp_ln_bias"],
        config.layer_norm_eps,
    )


def random_params(config: BertConfig, seed: int = 0) -> dict:
    """Freshly initialised encoder weights (pure dict), e.g. for small test models."""
    return nnx.to_pure_dict(nnx.split(BertEncoder(config, rngs=nnx.Rngs(seed)))[1])
