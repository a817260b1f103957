"""A Llama-family decoder in Flax NNX (the architecture; file IO is in models.decoder_io).

Covers Llama 2 / 3.x, SmolLM2, Mistral and Qwen2/2.5: RMSNorm, rotary position embeddings
(with Llama-3 or linear frequency scaling), grouped-query attention, SwiGLU, tied or untied
embeddings, optional QKV / output / MLP biases. The configuration is read from a Hugging Face
``config.json`` (:meth:`LlamaConfig.from_hf_dict`).

Layers are stored stacked on a leading ``layers`` axis and run with ``jax.lax.scan``, so one
layer is compiled once whatever the depth; ``remat`` wraps that one layer in
``jax.checkpoint`` with a named policy. Attention heads keep their own axis in the weights
(``q_kernel`` is [layers, embed, heads, head_dim]), so tensor parallelism can split heads
without reshapes. Every parameter carries ``logical_axes`` metadata; train.sharding maps the
names (vocab, embed, heads, kv_heads, head_dim, mlp, layers) onto mesh axes, and the
optional ``constrain`` callback does the same for activations (batch, length, embed, mlp).

Texts are right-padded and their real lengths passed explicitly: causal attention means a
real token never sees the padding, and padded keys are masked as well, so a text's hidden
states do not depend on what else is in the batch. Packed rows (several texts a row,
models.tokenizer.pack_batch) pass ``segments`` and ``positions`` instead: attention is causal
within a segment and blind to the others (a block-diagonal mask), and each token is rotated
by its position in its own text. Attention goes through models.attention (``attention``: XLA,
splash on TPU, Pallas or cuDNN on a GPU, a Numba kernel on a CPU). :meth:`LlamaDecoder.after_prefixes` runs packed rows
that continue shared prefixes (one conversation, many questions about it: models.answers); its
mask, prefix keys that every segment of a row sees, is not a segment-id mask and runs on XLA.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynrules.errors import DynrulesError
from dynrules.models.attention import attend
from dynrules.models.layers import check_frozen, scan_layers

MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "llama3", "linear")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The architecture fields the forward pass uses (flat, hashable, JSON-friendly)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | llama3 | linear
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_position: int = 8192  # llama3 only
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: q/k/v projections have biases
    o_bias: bool = False  # Llama attention_bias=True: the output projection too
    mlp_bias: bool = False
    sliding_window: int = 0  # 0 = full attention; otherwise texts longer than it are refused
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise DynrulesError(
                f"model_type {self.model_type!r} is not a supported decoder; "
                f"supported: {', '.join(MODEL_TYPES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise DynrulesError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise DynrulesError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_type not in ROPE_TYPES:
            raise DynrulesError(
                f"rope scaling {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            )

    @classmethod
    def from_dict(cls, raw: dict) -> LlamaConfig:
        """From our own field names (what :meth:`to_dict` wrote)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf_dict(cls, raw: dict, source: str = "config.json") -> LlamaConfig:
        """From a Hugging Face config.json of a Llama, Mistral or Qwen2 model."""
        model_type = raw.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise DynrulesError(
                f"{source}: model_type {model_type!r} is not a supported decoder "
                f"(supported: {', '.join(MODEL_TYPES)})"
            )
        try:
            heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            fields = {
                "vocab_size": int(raw["vocab_size"]),
                "hidden_size": hidden,
                "intermediate_size": int(raw["intermediate_size"]),
                "num_hidden_layers": int(raw["num_hidden_layers"]),
                "num_attention_heads": heads,
                "num_key_value_heads": int(raw.get("num_key_value_heads") or heads),
                "head_dim": int(raw.get("head_dim") or hidden // heads),
                "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-6)),
                "rope_theta": float(raw.get("rope_theta", 10000.0)),
                "max_position_embeddings": int(raw.get("max_position_embeddings", 4096)),
                "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
                "model_type": model_type,
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise DynrulesError(f"{source}: missing or bad field {exc}") from exc
        if raw.get("hidden_act", "silu") != "silu":
            raise DynrulesError(f"{source}: hidden_act {raw['hidden_act']!r} (only silu)")
        if model_type == "qwen2":
            fields["qkv_bias"] = True
            if raw.get("use_sliding_window"):
                fields["sliding_window"] = int(raw.get("sliding_window") or 0)
        else:
            fields["qkv_bias"] = fields["o_bias"] = bool(raw.get("attention_bias", False))
            fields["mlp_bias"] = bool(raw.get("mlp_bias", False))
            fields["sliding_window"] = int(raw.get("sliding_window") or 0)
        fields |= _rope_fields(raw.get("rope_scaling"), source)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = raw.get(name)
            if isinstance(value, list):  # Llama 3.x lists several end tokens; keep the first
                value = value[0] if value else None
            fields[name] = None if value is None else int(value)
        return cls(**fields)

    def to_hf_dict(self) -> dict:
        """A Hugging Face config.json (``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` family)."""
        raw = {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self._hf_rope_scaling(),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "qwen2":
            raw["use_sliding_window"] = bool(self.sliding_window)
            raw["sliding_window"] = self.sliding_window or None
        else:
            raw["attention_bias"] = self.qkv_bias
            raw["mlp_bias"] = self.mlp_bias
            if self.model_type == "mistral":
                raw["sliding_window"] = self.sliding_window or None
        return raw

    def _hf_rope_scaling(self) -> dict | None:
        if self.rope_type == "default":
            return None
        if self.rope_type == "linear":
            return {"rope_type": "linear", "factor": self.rope_factor}
        return {
            "rope_type": "llama3",
            "factor": self.rope_factor,
            "low_freq_factor": self.rope_low_freq_factor,
            "high_freq_factor": self.rope_high_freq_factor,
            "original_max_position_embeddings": self.rope_original_max_position,
        }

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in jax.tree.leaves(param_shapes(self), is_leaf=_is_shape))


def _rope_fields(scaling: dict | None, source: str) -> dict:
    if not scaling:
        return {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {}
    if kind == "linear":
        return {"rope_type": "linear", "rope_factor": float(scaling["factor"])}
    if kind == "llama3":
        return {
            "rope_type": "llama3",
            "rope_factor": float(scaling["factor"]),
            "rope_low_freq_factor": float(scaling["low_freq_factor"]),
            "rope_high_freq_factor": float(scaling["high_freq_factor"]),
            "rope_original_max_position": int(scaling["original_max_position_embeddings"]),
        }
    raise DynrulesError(
        f"{source}: rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
    )


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """Per-pair rotation frequencies [head_dim / 2], with the config's scaling applied.

    Llama 3 scaling (as in Hugging Face ``_compute_llama3_parameters``): long wavelengths are
    slowed by ``factor``, short ones kept, and the band between interpolated smoothly.
    """
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if config.rope_type == "linear":
        return (inv / config.rope_factor).astype(np.float32)
    if config.rope_type == "llama3":
        old = config.rope_original_max_position
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        wavelength = 2 * np.pi / inv
        scaled = np.where(wavelength > old / low, inv / config.rope_factor, inv)
        smooth = (old / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / config.rope_factor + smooth * scaled
        medium = (wavelength >= old / high) & (wavelength <= old / low)
        inv = np.where(medium, blended, scaled)
    return inv.astype(np.float32)


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def param_shapes(config: LlamaConfig, *, lm_head: bool = False) -> dict:
    """Shapes of the parameter tree (the pure-dict layout of :class:`LlamaDecoder`)."""
    d, f, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    h, kv, e = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    layer = {
        "attn_norm": (d,),
        "q_kernel": (d, h, e),
        "k_kernel": (d, kv, e),
        "v_kernel": (d, kv, e),
        "o_kernel": (h, e, d),
        "mlp_norm": (d,),
        "gate_kernel": (d, f),
        "up_kernel": (d, f),
        "down_kernel": (f, d),
    }
    if config.qkv_bias:
        layer |= {"q_bias": (h, e), "k_bias": (kv, e), "v_bias": (kv, e)}
    if config.o_bias:
        layer["o_bias"] = (d,)
    if config.mlp_bias:
        layer |= {"gate_bias": (f,), "up_bias": (f,), "down_bias": (d,)}
    shapes = {
        "embed": (config.vocab_size, d),
        "final_norm": (d,),
        "layers": {name: (n, *shape) for name, shape in layer.items()},
    }
    if lm_head and not config.tie_word_embeddings:
        shapes["lm_head"] = (d, config.vocab_size)
    return shapes


# Logical axis names per parameter; train.sharding maps them to mesh axes.
PARAM_AXES = {
    "embed": ("vocab", "embed"),
    "final_norm": ("embed",),
    "lm_head": ("embed", "vocab"),
}
LAYER_AXES = {
    "attn_norm": ("embed",),
    "q_kernel": ("embed", "heads", "head_dim"),
    "k_kernel": ("embed", "kv_heads", "head_dim"),
    "v_kernel": ("embed", "kv_heads", "head_dim"),
    "o_kernel": ("heads", "head_dim", "embed"),
    "q_bias": ("heads", "head_dim"),
    "k_bias": ("kv_heads", "head_dim"),
    "v_bias": ("kv_heads", "head_dim"),
    "o_bias": ("embed",),
    "mlp_norm": ("embed",),
    "gate_kernel": ("embed", "mlp"),
    "up_kernel": ("embed", "mlp"),
    "down_kernel": ("mlp", "embed"),
    "gate_bias": ("mlp",),
    "up_bias": ("mlp",),
    "down_bias": ("embed",),
}


def _initial_value(name: str, shape: tuple, key: jax.Array, dtype) -> jax.Array:
    if name.endswith("norm"):
        return jnp.ones(shape, dtype)
    if name.endswith("bias"):
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)  # HF init range


class DecoderLayers(nnx.Module):
    """All decoder layers, each parameter stacked on a leading ``layers`` axis."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        for name, shape in param_shapes(config)["layers"].items():
            value = _initial_value(name, shape, rngs.params(), param_dtype)
            setattr(self, name, nnx.Param(value, logical_axes=("layers", *LAYER_AXES[name])))


def _no_constraint(x: jax.Array, logical_axes: tuple) -> jax.Array:
    return x


class LlamaDecoder(nnx.Module):
    """Token ids + explicit lengths → final hidden states [batch, time, hidden] (after the norm).

    ``dtype`` is the compute dtype of matmuls and the residual stream (norms and softmax run in
    float32); ``param_dtype`` the storage dtype of the weights. ``lm_head=True`` adds the
    output projection for next-token logits (:meth:`logits`; tied models reuse the embedding);
    a reward model does not need it. ``constrain(x, logical_axes)`` may pin activation
    shardings (train.sharding supplies one); the default leaves them to the compiler.
    ``attention`` names the implementation (models.choices.ATTENTION, see models.attention);
    a ``constrain`` with a ``mesh`` also runs the attention kernels shard by shard. The first
    ``frozen`` layers run without a backward pass; ``unroll`` writes the others out instead of
    looping over them (models.layers; the trainer's choice on a CPU).
    """

    if TYPE_CHECKING:  # set in __init__, one per entry of param_shapes (the layers aside)
        embed: nnx.Param
        final_norm: nnx.Param

    def __init__(
        self,
        config: LlamaConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: str = "none",
        lm_head: bool = False,
        constrain: Callable[[jax.Array, tuple], jax.Array] = _no_constraint,
        attention: str = "auto",
        frozen: int = 0,
        unroll: bool = False,
    ):
        if remat not in REMAT_POLICIES:
            raise DynrulesError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
        self.config = config
        self.dtype = dtype
        self.remat = remat
        self.attention = attention
        self.constrain = constrain
        self.frozen = check_frozen(frozen, config.num_hidden_layers)
        self.unroll = unroll
        for name, shape in param_shapes(config, lm_head=lm_head).items():
            if name != "layers":
                value = _initial_value(name, shape, rngs.params(), param_dtype)
                setattr(self, name, nnx.Param(value, logical_axes=PARAM_AXES[name]))
        self.layers = DecoderLayers(config, rngs=rngs, param_dtype=param_dtype)

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
        _check_window(config, time)
        hidden = jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)
        hidden = self.constrain(hidden, ("batch", "length", "embed"))
        rope = _rope_tables(config, time)  # [time, head_dim/2]
        if segments is None:
            assert lengths is not None, "unpacked rows need their lengths"
            lengths = lengths.astype(jnp.int32)
        else:  # each token's own position's rotation: [batch, time, head_dim/2]
            assert positions is not None, "packed rows need their positions"
            cos, sin = rope
            rope = (jnp.take(cos, positions, axis=0), jnp.take(sin, positions, axis=0))
        rows = {"segment_ids": segments, "lengths": lengths}
        layer_params = self._layer_params()

        def step(hidden, params):
            hidden, _ = _layer(
                hidden, params, config=config, rows=rows, rope=rope, **self._layer_options()
            )
            return hidden, None

        policy = REMAT_POLICIES[self.remat]
        if policy is not None:
            step = jax.checkpoint(step, policy=policy, prevent_cse=False)
        hidden = scan_layers(
            step,
            hidden,
            layer_params,
            self.frozen,
            unroll=self.unroll,
        )
        return _rms_norm(hidden, self.final_norm[...], config.rms_norm_eps)

    def after_prefixes(
        self,
        prefix_ids: jax.Array,
        prefix_lengths: jax.Array,
        input_ids: jax.Array,
        segments: jax.Array,
        positions: jax.Array,
        prefix_of_row: jax.Array,
    ) -> jax.Array:
        """Hidden states [rows, time, hidden] of packed rows that continue shared prefixes.

        ``prefix_ids`` [prefixes, P] (right-padded, ``prefix_lengths``) are encoded once, in the
        same layer scan; row r continues prefix ``prefix_of_row[r]``: each of its segments sees
        that prefix and itself (causally), its ``positions`` continuing after the prefix. One
        conversation, many questions about it: the conversation is computed once, not once a
        question (models.answers).
        """
        config = self.config
        span, time = prefix_ids.shape[1], input_ids.shape[1]
        _check_window(config, span + time)
        embed = self.embed[...]
        prefixes = jnp.take(embed, prefix_ids, axis=0).astype(self.dtype)
        hidden = jnp.take(embed, input_ids, axis=0).astype(self.dtype)
        tables = _rope_tables(config, span + time)
        prefix_rope = tuple(table[:span] for table in tables)
        rope = tuple(jnp.take(table, positions, axis=0) for table in tables)
        seen = jnp.arange(span)[None, :] < jnp.take(prefix_lengths, prefix_of_row)[:, None]
        lengths = jnp.maximum(prefix_lengths, 1).astype(jnp.int32)  # an empty prefix: no NaNs
        own = _segment_mask(segments)
        mask = jnp.concatenate([jnp.broadcast_to(seen[:, None], (*own.shape[:2], span)), own], -1)
        layer_params = self._layer_params()
        options = {"config": config, **self._layer_options()}

        def step(carry, params):
            prefixes, hidden = carry
            prefixes, (keys, values) = _layer(
                prefixes, params, rows={"lengths": lengths}, rope=prefix_rope, **options
            )
            before = (
                jnp.take(keys, prefix_of_row, axis=0),
                jnp.take(values, prefix_of_row, axis=0),
            )
            hidden, _ = _layer(
                hidden, params, rows={"mask": mask}, rope=rope, before=before, **options
            )
            return (prefixes, hidden), None

        (_, hidden), _ = jax.lax.scan(step, (prefixes, hidden), layer_params)
        return _rms_norm(hidden, self.final_norm[...], config.rms_norm_eps)

    def _layer_options(self) -> dict:
        """The layer's keywords that come from the module's settings."""
        return {"dtype": self.dtype, "constrain": self.constrain, "attention": self.attention}

    def _layer_params(self) -> dict:
        """The stacked layer weights, as the layer scan takes them."""
        return {
            name: variable[...]
            for name, variable in vars(self.layers).items()
            if isinstance(variable, nnx.Param)
        }

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Next-token logits [batch, time, vocab] (float32) from :meth:`__call__`'s output."""
        if hasattr(self, "lm_head"):
            kernel = self.lm_head[...]
        elif self.config.tie_word_embeddings:
            kernel = self.embed[...].T
        else:
            raise DynrulesError("this decoder was built without its lm_head (lm_head=False)")
        return (hidden.astype(self.dtype) @ kernel.astype(self.dtype)).astype(jnp.float32)


def _check_window(config: LlamaConfig, time: int) -> None:
    if config.sliding_window and time > config.sliding_window:
        raise DynrulesError(
            f"texts of {time} tokens exceed the model's sliding attention window of "
            f"{config.sliding_window}, which dynrules does not implement; use a max_length "
            f"≤ {config.sliding_window}"
        )


def _rope_tables(config: LlamaConfig, time: int) -> tuple[jax.Array, jax.Array]:
    """cos and sin of every position's rotation angles [time, head_dim/2]."""
    angles = np.arange(time, dtype=np.float32)[:, None] * rope_inverse_frequencies(config)
    return jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))


def _segment_mask(segments: jax.Array) -> jax.Array:
    """[batch, time, time]: causal attention within each segment of packed rows."""
    time = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]
    return same & jnp.tril(jnp.ones((time, time), bool))[None]


def _rms_norm(x, scale, eps):
    x32 = x.astype(jnp.float32)  # statistics in float32 even under bf16 compute
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def _rotate(x, rope):
    """Hugging Face's rotate-half RoPE layout: pairs are (i, i + head_dim/2). ``rope`` holds
    cos and sin per position [time, head_dim/2], or per token [batch, time, head_dim/2]."""
    cos, sin = (r[..., None, :] for r in rope)  # broadcast over heads
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], -1)
    return rotated.astype(x.dtype)


def _project(x, kernel, bias, spec, dtype):
    """``spec`` ("t…,…->t…", t the tokens) on ``x`` [batch, time, …] with batch and time
    flattened into one token dim: the kernel's gradient is then one contraction over tokens,
    which XLA's CPU backend runs without transposing its operands first (as models.bert's
    ``_dense``)."""
    tokens = x.reshape(-1, *x.shape[2:])
    out = jnp.einsum(spec, tokens, kernel.astype(dtype))
    out = out.reshape(*x.shape[:2], *out.shape[1:])
    return out if bias is None else out + bias.astype(dtype)


def _layer(hidden, p, *, config: LlamaConfig, rows, rope, dtype, constrain, attention, before=None):
    """One decoder layer: (hidden, (keys, values)). ``rows``: what :func:`attend` knows of the
    rows (``lengths``, ``segment_ids`` or an explicit ``mask``). ``before``: keys and values
    [batch, time', kv_heads, head_dim] placed ahead of this row's own (a cached prefix; the
    mask covers both)."""
    x = _rms_norm(hidden, p["attn_norm"], config.rms_norm_eps)
    q = _rotate(_project(x, p["q_kernel"], p.get("q_bias"), "td,dhe->the", dtype), rope)
    k = _rotate(_project(x, p["k_kernel"], p.get("k_bias"), "td,dhe->the", dtype), rope)
    v = _project(x, p["v_kernel"], p.get("v_bias"), "td,dhe->the", dtype)
    own = (k, v)
    if before is not None:
        k, v = (jnp.concatenate([b, o], axis=1) for b, o in zip(before, own, strict=True))
    attended = attend(q, k, v, causal=True, implementation=attention, sharding=constrain, **rows)
    hidden = hidden + _project(attended, p["o_kernel"], p.get("o_bias"), "the,hed->td", dtype)
    hidden = constrain(hidden, ("batch", "length", "embed"))
    x = _rms_norm(hidden, p["mlp_norm"], config.rms_norm_eps)
    gate = _project(x, p["gate_kernel"], p.get("gate_bias"), "td,df->tf", dtype)
    up = _project(x, p["up_kernel"], p.get("up_bias"), "td,df->tf", dtype)
    inner = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    hidden = hidden + _project(inner, p["down_kernel"], p.get("down_bias"), "tf,fd->td", dtype)
    return constrain(hidden, ("batch", "length", "embed")), own


def random_params(config: LlamaConfig, seed: int = 0, *, lm_head: bool = False) -> dict:
    """Freshly initialised decoder weights (pure dict of NumPy arrays), e.g. for small test models.

    Drawn with NumPy, as the module initialises them (norms 1, biases 0, weights N(0, 0.02²)):
    initialising through JAX op by op would compile every random draw.
    """
    rng = np.random.default_rng(seed)

    def draw(name, shape):
        if name.endswith("norm"):
            return np.ones(shape, np.float32)
        if name.endswith("bias"):
            return np.zeros(shape, np.float32)
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)

    shapes = param_shapes(config, lm_head=lm_head)
    params = {name: draw(name, shape) for name, shape in shapes.items() if name != "layers"}
    params["layers"] = {name: draw(name, shape) for name, shape in shapes["layers"].items()}
    return params


def with_params(config: LlamaConfig, params: dict, **options) -> LlamaDecoder:
    """A :class:`LlamaDecoder` holding ``params`` (a pure dict), built without initialising.

    ``options`` are the constructor's keywords (dtype, remat, lm_head, …); ``lm_head`` must
    match whether ``params`` has one.
    """
    abstract = nnx.eval_shape(lambda: LlamaDecoder(config, rngs=nnx.Rngs(0), **options))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def train_flops_per_token(config: LlamaConfig, seq: int) -> float:
    """Model FLOPs per token of one training step (forward + backward) of the backbone.

    PaLM's count (appendix B): 6 × the matmul parameters (embeddings excluded: a lookup) plus
    12 × layers × heads × head_dim × seq for the attention scores and values, whatever remat
    recomputes and although causal masking skips half the score matrix.
    """
    d, f, e = config.hidden_size, config.intermediate_size, config.head_dim
    h, kv = config.num_attention_heads, config.num_key_value_heads
    per_layer = d * h * e * 2 + d * kv * e * 2 + 3 * d * f
    return (
        6.0 * per_layer * config.num_hidden_layers + 12.0 * config.num_hidden_layers * h * e * seq
    )
