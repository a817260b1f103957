"""Backbone + linear head: the reward model (one output) and the rule adapter's building block.

The backbone is a BERT encoder (models.bert) or a Llama-family decoder (models.llama).
:class:`Classifier` pools the backbone's hidden states at explicit lengths
(models.pooling.pool: mean by default for an encoder, the last real token for a decoder, as
``LlamaForSequenceClassification`` does) and applies a linear head initialised near zero
(std 1e-3), so an untrained reward model scores every text ≈ 0 and the first Bradley–Terry
loss is ≈ log 2. The encoder's head has a bias; the decoder's has none, like Hugging Face's
``score`` layer, so the export is exact. With ``num_outputs=1`` it is the reward model; with
one output per rule it is a multi-label rule adapter.

Parameters live as a pure dict of (possibly sharded) arrays — ``{"encoder": …, "head_kernel",
"head_bias"}`` or ``{"decoder": …, "head_kernel"}`` — and the module structure travels as an
NNX graphdef; :func:`apply` merges the two inside jitted functions.

A model directory (what training exports):

- encoder: ``model.safetensors`` with HF BERT keys under ``bert.`` plus ``classifier.weight``
  [outputs, hidden] and ``classifier.bias``; ``config.json`` a HF BERT config;
- decoder: the ``LlamaForSequenceClassification`` layout (``Qwen2…`` for Qwen2): backbone keys
  under ``model.`` plus ``score.weight`` [outputs, hidden]; ``config.json`` naming the
  architecture with ``num_labels`` and ``pad_token_id``; ``tokenizer_config.json`` with the
  chat template — what transformers and vLLM load as a reward model.

Both add ``tokenizer.json`` and a ``dynrules`` section in config.json (outputs, pooling,
max_length, template, truncation).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynrules.atomic import atomic_path
from dynrules.errors import DynrulesError
from dynrules.models import bert_checkpoint as bert_ckpt
from dynrules.models import decoder_io
from dynrules.models.bert import BertConfig, BertEncoder
from dynrules.models.llama import LlamaConfig, LlamaDecoder
from dynrules.models.pooling import POOLING_MODES, pool, pool_segments
from dynrules.models.templates import CHAT, TEMPLATE, ChatTemplate, format_text
from dynrules.models.tokenizer import TRUNCATIONS, TextTokenizer

HEAD_STD = 1e-3
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DEFAULT_POOLING = {"encoder": "mean", "decoder": "last"}
SEQUENCE_CLASSIFIERS = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What defines a model's function: backbone architecture, head size, pooling, text handling."""

    backbone: BertConfig | LlamaConfig
    num_outputs: int = 1
    pooling: str = ""  # "" = the backbone's default (DEFAULT_POOLING)
    max_length: int = 256
    template: str = TEMPLATE  # hh-v1, or "chat" (a decoder's own chat template)
    truncation: str = "left"  # how a text over max_length is cut (models.tokenizer.TRUNCATIONS)

    def __post_init__(self):
        if not self.pooling:  # the backbone's default
            object.__setattr__(self, "pooling", DEFAULT_POOLING[self.kind])
        if self.pooling not in POOLING_MODES:
            raise DynrulesError(f"unknown pooling {self.pooling!r}; choose one of {POOLING_MODES}")
        if self.kind == "decoder" and self.pooling != "last":
            raise DynrulesError(
                f"a decoder pools its last real token (pooling=last), not {self.pooling!r}: "
                "its other positions have not read the whole text"
            )
        if self.template not in (TEMPLATE, CHAT) or (
            self.kind == "encoder" and self.template == CHAT
        ):
            raise DynrulesError(f"text template {self.template!r} unknown for a {self.kind}")
        if self.truncation not in TRUNCATIONS:
            raise DynrulesError(f"truncation must be one of {TRUNCATIONS}, got {self.truncation!r}")

    @property
    def kind(self) -> str:
        """``encoder`` or ``decoder``."""
        return "decoder" if isinstance(self.backbone, LlamaConfig) else "encoder"

    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    def to_dict(self) -> dict:
        return {
            self.kind: dataclasses.asdict(self.backbone),
            "num_outputs": self.num_outputs,
            "pooling": self.pooling,
            "max_length": self.max_length,
            "template": self.template,
            "truncation": self.truncation,
        }

    @classmethod
    def from_dict(cls, raw: dict) -> ModelSpec:
        backbone = (
            LlamaConfig.from_dict(raw["decoder"])
            if "decoder" in raw
            else BertConfig.from_dict(raw["encoder"])
        )
        return cls(
            backbone=backbone,
            num_outputs=int(raw["num_outputs"]),
            pooling=raw["pooling"],
            max_length=int(raw["max_length"]),
            template=raw["template"],
            truncation=raw.get("truncation", "left"),  # specs saved before the key cut left
        )


def _unconstrained(x, logical_axes):
    return x


class Classifier(nnx.Module):
    """Backbone → pooled vector → ``num_outputs`` logits (float32).

    ``remat`` is a policy name of models.choices.REMAT (none | full | dots), for the encoder
    and the decoder alike. ``constrain`` pins activation shardings in the decoder
    (train.sharding supplies one). ``attention`` is an implementation of models.attention.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: str = "none",
        constrain=_unconstrained,
        attention: str = "auto",
        frozen_layers: int = 0,
        unroll_layers: bool = False,
    ):
        self.pooling = spec.pooling
        backbone = spec.backbone
        if not isinstance(backbone, LlamaConfig):  # spec.kind == "encoder"
            self.encoder = BertEncoder(
                backbone,
                rngs=rngs,
                dtype=dtype,
                remat=remat,
                attention=attention,
                constrain=constrain,
                frozen=frozen_layers,
                unroll=unroll_layers,
            )
        else:
            self.decoder = LlamaDecoder(
                backbone,
                rngs=rngs,
                dtype=dtype,
                param_dtype=param_dtype,
                remat=remat,
                constrain=constrain,
                attention=attention,
                frozen=frozen_layers,
                unroll=unroll_layers,
            )
        kernel = HEAD_STD * jax.random.normal(rngs.params(), (spec.hidden_size, spec.num_outputs))
        head_dtype = jnp.float32 if spec.kind == "encoder" else param_dtype
        self.head_kernel = nnx.Param(kernel.astype(head_dtype), logical_axes=("embed", "classes"))
        if spec.kind == "encoder":
            self.head_bias = nnx.Param(
                jnp.zeros((spec.num_outputs,), jnp.float32), logical_axes=("classes",)
            )

    def __call__(self, input_ids: jax.Array, lengths: jax.Array) -> jax.Array:
        """Logits [batch, outputs] of one text a row (right-padded to explicit lengths)."""
        backbone = self.encoder if hasattr(self, "encoder") else self.decoder
        return self._head(pool(backbone(input_ids, lengths), lengths, self.pooling))

    def packed(
        self, input_ids: jax.Array, segments: jax.Array, positions: jax.Array, slots: int
    ) -> jax.Array:
        """Logits [rows, slots, outputs] of packed rows (models.tokenizer.pack_batch): slot s of
        a row is its segment s + 1; each text scores as it does alone."""
        backbone = self.encoder if hasattr(self, "encoder") else self.decoder
        hidden = backbone(input_ids, segments=segments, positions=positions)
        return self._head(pool_segments(hidden, segments, positions, slots, self.pooling))

    def _head(self, pooled: jax.Array) -> jax.Array:
        logits = pooled @ self.head_kernel[...].astype(jnp.float32)
        if hasattr(self, "head_bias"):
            logits = logits + self.head_bias[...]
        return logits


def abstract_model(spec: ModelSpec, **options):
    """(graphdef, abstract nnx.State) without allocating any weights.

    ``options`` are :class:`Classifier`'s keywords (dtype, param_dtype, remat, constrain,
    attention, frozen_layers, unroll_layers).
    """
    model = nnx.eval_shape(lambda: Classifier(spec, rngs=nnx.Rngs(0), **options))
    return nnx.split(model)


def apply(graphdef, params: dict, input_ids: jax.Array, lengths: jax.Array) -> jax.Array:
    """Logits [batch, outputs] of the model ``graphdef`` with weights ``params`` (pure dict)."""
    return nnx.merge(graphdef, params)(input_ids, lengths)


def apply_packed(
    graphdef,
    params: dict,
    input_ids: jax.Array,
    segments: jax.Array,
    positions: jax.Array,
    slots: int,
) -> jax.Array:
    """Logits [rows, slots, outputs] of packed rows (:meth:`Classifier.packed`)."""
    return nnx.merge(graphdef, params).packed(input_ids, segments, positions, slots)


def initial_head(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    kernel = HEAD_STD * jax.random.normal(
        jax.random.key(seed), (spec.hidden_size, spec.num_outputs), jnp.float32
    )
    head = {"head_kernel": np.asarray(kernel)}
    if spec.kind == "encoder":
        head["head_bias"] = np.zeros((spec.num_outputs,), np.float32)
    return head


def text_renderer(spec: ModelSpec, chat: ChatTemplate | None) -> Callable[[str, str], str]:
    """(prompt, response) → the text the model reads: ``hh-v1`` or the model's chat template."""
    if spec.template == CHAT:
        if chat is None:
            raise DynrulesError("the model has no chat template but its spec asks for one")
        return chat.render
    return format_text


# --------------------------------------------------------------------------- pretrained backbones


@dataclasses.dataclass
class Pretrained:
    """A backbone read from disk with a fresh head: spec, weights (arrays or lazy views) and text handling."""

    source: Path  # the checkpoint directory or GGUF file
    spec: ModelSpec
    params: dict
    tokenizer: TextTokenizer
    chat: ChatTemplate | None

    @property
    def render(self) -> Callable[[str, str], str]:
        return text_renderer(self.spec, self.chat)


def pretrained(
    backbone: str,
    path: str | Path | None,
    *,
    num_outputs: int,
    pooling: str = "",
    max_length: int,
    seed: int,
    param_dtype: str = "float32",
    chat: bool = True,
    truncation: str = "left",
) -> Pretrained:
    """A backbone checkpoint plus a fresh head: what training starts from.

    ``backbone="encoder"``: a BERT directory (None/"" = the bundled all-MiniLM-L6-v2).
    ``backbone="decoder"``: a Hugging Face directory or a .gguf file (None/"" = the bundled
    SmolLM2-135M-Instruct); its weights stay lazy views until placed on a mesh, and it reads
    texts through its chat template when it has one and ``chat`` is true.
    ``pooling=""`` is the backbone's default; ``max_length`` is capped by the position limit;
    ``truncation`` says how longer texts are cut (:data:`~dynrules.models.tokenizer.TRUNCATIONS`).
    """
    if backbone not in DEFAULT_POOLING:
        raise DynrulesError(f"backbone must be encoder or decoder, got {backbone!r}")
    if backbone == "encoder":
        checkpoint = bert_ckpt.read_checkpoint(path or None)
        length = min(max_length, checkpoint.config.max_position_embeddings)
        spec = ModelSpec(checkpoint.config, num_outputs, pooling, length, truncation=truncation)
        checkpoint.tokenizer.truncation = truncation
        params = {"encoder": checkpoint.params, **initial_head(spec, seed)}
        return Pretrained(checkpoint.directory, spec, params, checkpoint.tokenizer, None)
    source = Path(path) if path else decoder_io.smollm2_gguf()
    dtype = np.dtype(jnp.dtype(COMPUTE_DTYPES[param_dtype]))
    loaded = decoder_io.read_decoder(source, dtype=dtype)
    config = loaded.config
    length = min(max_length, config.max_position_embeddings)
    if config.sliding_window and length > config.sliding_window:
        raise DynrulesError(
            f"{source}: max_length {length} exceeds the model's sliding attention window "
            f"({config.sliding_window}), which dynrules does not implement; lower max_length"
        )
    template = CHAT if chat and loaded.chat_template is not None else TEMPLATE
    spec = ModelSpec(config, num_outputs, pooling, length, template, truncation)
    loaded.tokenizer.add_special_tokens = template != CHAT  # a chat text carries its own
    loaded.tokenizer.truncation = truncation
    head = {k: v.astype(dtype) for k, v in initial_head(spec, seed).items()}
    params = {"decoder": loaded.params, **head}
    return Pretrained(source, spec, params, loaded.tokenizer, loaded.chat_template)


# --------------------------------------------------------------------------- model directories


@dataclasses.dataclass
class LoadedModel:
    """A model directory read from disk: its spec, host weights (or lazy views) and text handling."""

    directory: Path
    spec: ModelSpec
    params: dict
    tokenizer: TextTokenizer
    chat: ChatTemplate | None = None

    @property
    def render(self) -> Callable[[str, str], str]:
        return text_renderer(self.spec, self.chat)


def read_model(directory: str | Path) -> LoadedModel:
    """Read an exported model directory (see module doc); clear errors for foreign checkpoints."""
    directory = Path(directory)
    raw = bert_ckpt.read_config(directory)
    extra = raw.get("dynrules")
    if not isinstance(extra, dict):
        raise DynrulesError(
            f"{directory}: config.json has no 'dynrules' section: not a model exported by "
            "`dynrules train-rm` (a plain checkpoint goes in the `model` config key)"
        )
    decoder = raw.get("model_type", "bert") != "bert"
    try:
        fields = {
            "num_outputs": int(extra["num_outputs"]),
            "pooling": extra["pooling"],
            "max_length": int(extra["max_length"]),
            "template": extra["template"],
            "truncation": extra.get("truncation", "left"),  # exported before the key: left
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise DynrulesError(f"{directory}/config.json: bad 'dynrules' section ({exc})") from exc
    if decoder:
        return _read_decoder_model(directory, fields)
    return _read_encoder_model(directory, fields)


def _read_encoder_model(directory: Path, fields: dict) -> LoadedModel:
    from safetensors.numpy import load_file

    directory = bert_ckpt.resolve_checkpoint_dir(directory)
    backbone = BertConfig.from_dict(bert_ckpt.read_config(directory))
    spec = ModelSpec(backbone, **fields)
    tensors = load_file(str(directory / "model.safetensors"))
    params: dict[str, Any] = {
        "encoder": bert_ckpt.params_from_hf_tensors(
            tensors, backbone, directory / "model.safetensors"
        )
    }
    for key in ("classifier.weight", "classifier.bias"):
        if key not in tensors:
            raise DynrulesError(f"{directory}/model.safetensors: missing tensor {key!r}")
    kernel, bias = tensors["classifier.weight"].T, tensors["classifier.bias"]
    if kernel.shape != (spec.hidden_size, spec.num_outputs) or bias.shape != (spec.num_outputs,):
        raise DynrulesError(
            f"{directory}/model.safetensors: classifier shape {kernel.shape[::-1]} "
            f"does not match config ({spec.num_outputs} outputs)"
        )
    params["head_kernel"] = np.ascontiguousarray(kernel, np.float32)
    params["head_bias"] = np.asarray(bias, np.float32)
    tokenizer = TextTokenizer(directory / "tokenizer.json", truncation=spec.truncation)
    return LoadedModel(directory, spec, params, tokenizer)


def _read_decoder_model(directory: Path, fields: dict) -> LoadedModel:
    loaded = decoder_io.read_decoder(directory)
    spec = ModelSpec(loaded.config, **fields)
    key = "score.weight"
    if key not in loaded.source:
        raise DynrulesError(f"{loaded.source.where(key)}: missing tensor {key!r}")
    shape = loaded.source.shape(key)
    if shape != (spec.num_outputs, spec.hidden_size):
        raise DynrulesError(
            f"{loaded.source.where(key)}: {key} has shape {shape}, "
            f"expected {(spec.num_outputs, spec.hidden_size)}"
        )
    kernel = loaded.source.read(key, (slice(None), slice(None))).T
    params = {"decoder": loaded.params, "head_kernel": np.ascontiguousarray(kernel, np.float32)}
    loaded.tokenizer.add_special_tokens = spec.template != CHAT
    loaded.tokenizer.truncation = spec.truncation
    return LoadedModel(directory, spec, params, loaded.tokenizer, loaded.chat_template)


def export_model(
    host_params: dict,
    spec: ModelSpec,
    tokenizer: TextTokenizer,
    out_dir: Path,
    chat: ChatTemplate | None = None,
) -> None:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer files) atomically.

    An encoder uses Hugging Face ``BertForSequenceClassification`` key names; note that HF
    pools differently (pooler + [CLS]), so outside dynrules apply ``dynrules.pooling`` yourself.
    A decoder is a complete ``LlamaForSequenceClassification`` (or Qwen2/Mistral) checkpoint.
    """
    from safetensors.numpy import save_file

    section = {
        "num_outputs": spec.num_outputs,
        "pooling": spec.pooling,
        "max_length": spec.max_length,
        "template": spec.template,
        "truncation": spec.truncation,
    }
    kernel = np.asarray(host_params["head_kernel"], np.float32)
    backbone = spec.backbone
    if not isinstance(backbone, LlamaConfig):  # spec.kind == "encoder"
        tensors = bert_ckpt.hf_tensors_from_params(host_params["encoder"], prefix="bert.")
        tensors["classifier.weight"] = np.ascontiguousarray(kernel.T)
        tensors["classifier.bias"] = np.asarray(host_params["head_bias"])
        config = backbone.to_hf_dict() | {
            "architectures": ["BertForSequenceClassification"],
            "num_labels": spec.num_outputs,
            "dynrules": section,
        }
        extra_files = {}
    else:
        tensors = decoder_io.hf_tensors(host_params["decoder"], backbone)
        tensors["score.weight"] = np.ascontiguousarray(kernel.T)
        config = backbone.to_hf_dict() | {
            "architectures": [SEQUENCE_CLASSIFIERS[backbone.model_type]],
            "num_labels": spec.num_outputs,
            # HF pools the last token that is not pad_token_id; dynrules pools by length. They
            # agree unless a text ends in the pad token (chat templates end in a newline).
            "pad_token_id": tokenizer.pad_id,
            "torch_dtype": "float32",
            "dynrules": section,
        }
        extra_files = {"tokenizer_config.json": _tokenizer_config(tokenizer, chat, spec)}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(tmp / "tokenizer.json")
        for name, content in extra_files.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")


def _tokenizer_config(tokenizer: TextTokenizer, chat: ChatTemplate | None, spec: ModelSpec) -> dict:
    """tokenizer_config.json for transformers' PreTrainedTokenizerFast (and our reader)."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": spec.max_length,
        # Keep the end, where a pair's two texts differ. transformers has no middle truncation:
        # a `middle` model's config.json (dynrules.truncation) says to cut that way yourself.
        "truncation_side": "left",
        "padding_side": "right",
        "pad_token": tokenizer.id_to_token(tokenizer.pad_id),
    }
    if chat is not None:
        config |= {
            "chat_template": chat.source,
            "bos_token": chat.bos_token,
            "eos_token": chat.eos_token,
        }
    return config
