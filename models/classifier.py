"""Encoder + linear head: the reward model (one output) and the rule adapter's building block.

:class:`EncoderClassifier` pools the encoder's hidden states at explicit lengths
(models.pooling.pool) and applies a linear head initialised near zero (std 1e-3, zero bias),
so an untrained reward model scores every text ≈ 0 and the first Bradley–Terry loss is
≈ log 2. With ``num_outputs=1`` it is the reward model; with one output per rule it is a
multi-label rule adapter on the same encoder.

Parameters live as a pure dict of (possibly sharded) arrays; the module structure travels as
an NNX graphdef, and :func:`apply` merges the two inside jitted functions.

A model directory (what training exports) is a checkpoint directory in the usual layout
with the head added: ``model.safetensors`` holds HF BERT keys under ``bert.`` plus
``classifier.weight`` [outputs, hidden] and ``classifier.bias``; ``config.json`` is a HF
BERT config with a ``dynrules`` section (outputs, pooling, max_length, template).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynrules.atomic import atomic_path
from dynrules.errors import DynrulesError
from dynrules.models.bert import BertConfig, BertEncoder
from dynrules.models.bert_checkpoint import (
    hf_tensors_from_params,
    params_from_hf_tensors,
    read_config,
    resolve_checkpoint_dir,
)
from dynrules.models.pooling import pool
from dynrules.models.templates import TEMPLATE
from dynrules.models.tokenizer import TextTokenizer

HEAD_STD = 1e-3
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What defines a model's function: architecture, head size, pooling, text handling."""

    encoder: BertConfig
    num_outputs: int = 1
    pooling: str = "mean"
    max_length: int = 256
    template: str = TEMPLATE

    def to_dict(self) -> dict:
        return {
            "encoder": dataclasses.asdict(self.encoder),
            "num_outputs": self.num_outputs,
            "pooling": self.pooling,
            "max_length": self.max_length,
            "template": self.template,
        }

    @classmethod
    def from_dict(cls, raw: dict) -> ModelSpec:
        return cls(
            encoder=BertConfig.from_dict(raw["encoder"]),
            num_outputs=int(raw["num_outputs"]),
            pooling=raw["pooling"],
            max_length=int(raw["max_length"]),
            template=raw["template"],
        )


class EncoderClassifier(nnx.Module):
    """BERT encoder → pooled vector → ``num_outputs`` logits (float32)."""

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs, dtype=jnp.float32, remat: bool = False):
        self.encoder = BertEncoder(spec.encoder, rngs=rngs, dtype=dtype, remat=remat)
        self.pooling = spec.pooling
        width = spec.encoder.hidden_size
        self.head_kernel = nnx.Param(
            HEAD_STD * jax.random.normal(rngs.params(), (width, spec.num_outputs), jnp.float32),
            logical_axes=("embed", "classes"),
        )
        self.head_bias = nnx.Param(
            jnp.zeros((spec.num_outputs,), jnp.float32), logical_axes=("classes",)
        )

    def __call__(self, input_ids: jax.Array, lengths: jax.Array) -> jax.Array:
        pooled = pool(self.encoder(input_ids, lengths), lengths, self.pooling)
        return pooled @ self.head_kernel[...] + self.head_bias[...]


def abstract_model(spec: ModelSpec, *, dtype=jnp.float32, remat: bool = False):
    """(graphdef, abstract nnx.State) without allocating any weights."""
    model = nnx.eval_shape(
        lambda: EncoderClassifier(spec, rngs=nnx.Rngs(0), dtype=dtype, remat=remat)
    )
    return nnx.split(model)


def apply(graphdef, params: dict, input_ids: jax.Array, lengths: jax.Array) -> jax.Array:
    """Logits [batch, outputs] of the model ``graphdef`` with weights ``params`` (pure dict)."""
    return nnx.merge(graphdef, params)(input_ids, lengths)


def initial_head(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    key = jax.random.key(seed)
    kernel = HEAD_STD * jax.random.normal(
        key, (spec.encoder.hidden_size, spec.num_outputs), jnp.float32
    )
    return {
        "head_kernel": np.asarray(kernel),
        "head_bias": np.zeros((spec.num_outputs,), np.float32),
    }


# --------------------------------------------------------------------------- model directories


@dataclasses.dataclass
class LoadedModel:
    """A model directory read from disk: its spec, host weights and tokenizer."""

    directory: Path
    spec: ModelSpec
    params: dict
    tokenizer: TextTokenizer


def read_model(directory: str | Path) -> LoadedModel:
    """Read an exported model directory (see module doc); clear errors for foreign checkpoints."""
    from safetensors.numpy import load_file

    directory = resolve_checkpoint_dir(directory)
    raw = read_config(directory)
    extra = raw.get("dynrules")
    if not isinstance(extra, dict):
        raise DynrulesError(
            f"{directory}: config.json has no 'dynrules' section: not a model exported by "
            "`dynrules train-rm` (a plain encoder checkpoint goes in the `encoder` config key)"
        )
    try:
        spec = ModelSpec(
            encoder=BertConfig.from_dict(raw),
            num_outputs=int(extra["num_outputs"]),
            pooling=extra["pooling"],
            max_length=int(extra["max_length"]),
            template=extra["template"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DynrulesError(f"{directory}/config.json: bad 'dynrules' section ({exc})") from exc
    if spec.template != TEMPLATE:
        raise DynrulesError(
            f"{directory}: text template {spec.template!r} unknown (expected {TEMPLATE!r})"
        )
    tensors = load_file(str(directory / "model.safetensors"))
    params = {
        "encoder": params_from_hf_tensors(tensors, spec.encoder, directory / "model.safetensors")
    }
    for key in ("classifier.weight", "classifier.bias"):
        if key not in tensors:
            raise DynrulesError(f"{directory}/model.safetensors: missing tensor {key!r}")
    kernel, bias = tensors["classifier.weight"].T, tensors["classifier.bias"]
    if kernel.shape != (spec.encoder.hidden_size, spec.num_outputs) or bias.shape != (
        spec.num_outputs,
    ):
        raise DynrulesError(f"{directory}/model.safetensors: classifier shape {kernel.shape[::-1]} "
                            f"does not match config ({spec.num_outputs} outputs)")  # fmt: skip
    params["head_kernel"] = np.ascontiguousarray(kernel, np.float32)
    params["head_bias"] = np.asarray(bias, np.float32)
    return LoadedModel(directory, spec, params, TextTokenizer(directory / "tokenizer.json"))


def export_model(host_params: dict, spec: ModelSpec, tokenizer_file: Path, out_dir: Path) -> None:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer.json) atomically.

    The tensors use Hugging Face ``BertForSequenceClassification`` key names; note that HF
    pools differently (pooler + [CLS]), so outside dynrules apply ``dynrules.pooling`` yourself.
    """
    from safetensors.numpy import save_file

    tensors = hf_tensors_from_params(host_params["encoder"], prefix="bert.")
    tensors["classifier.weight"] = np.ascontiguousarray(np.asarray(host_params["head_kernel"]).T)
    tensors["classifier.bias"] = np.asarray(host_params["head_bias"])
    config = spec.encoder.to_hf_dict() | {
        "architectures": ["BertForSequenceClassification"],
        "num_labels": spec.num_outputs,
        "dynrules": {
            "num_outputs": spec.num_outputs,
            "pooling": spec.pooling,
            "max_length": spec.max_length,
            "template": spec.template,
        },
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
