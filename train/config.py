"""The reward model's and the adapter's training configuration: the ``train`` section of the tree.

A section (:mod:`dynrules.settings`): each key declared once with its type, default and help;
choices are ``Literal`` types over the library's constants. ``load_config`` reads YAML and
``key=value`` overrides through :func:`dynrules.settings.load` (unknown keys are errors: a typo
must not silently train with a default). The keys stay flat — a run's saved ``run.json``
holds them as they are — and are grouped for reading into the model, optimisation and run keys
of :data:`GROUPS`; a group name is also accepted as a prefix (``optim.learning_rate=3e-5``).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Annotated, Literal

import pydantic
from pydantic import Field

from dynrules.errors import DynrulesError
from dynrules.models.choices import Attention, Dtype, Pooling, Remat
from dynrules.models.tokenizer import Truncation
from dynrules.settings import MeshText, Tree, load, option, section

Backbone = Literal["encoder", "decoder"]
PoolingChoice = Literal["", Pooling]  # "" = the backbone's default
SCORE_BATCH_SIZE = 64  # texts per scoring batch (score, eval)
MESH_HELP = "Device mesh, e.g. data=4,fsdp=2 [default: every device on the data axis]."
DISTRIBUTED_HELP = (
    "Join a multi-process job (TPU pod, SLURM, MPI; `dynrules launch` sets it up locally)."
)


@section
class TrainConfig:
    """Everything a reward-model (or adapter) run depends on; each key's help says what it does."""

    # Field order is the saved order of run.json; GROUPS sorts the keys for reading.
    steps: int = option(1000, "Optimizer updates.")
    batch_size: int = option(32, "Preference pairs per optimizer update (global, all devices).")
    grad_accum: int = option(1, "Micro-batches per update (batch_size must be a multiple).")
    max_length: int = option(256, "Tokens per prompt+response text; longer texts keep their end.")
    truncation: Truncation = option(
        "left",
        "How a text over max_length is cut: left keeps its end; middle keeps its first and "
        "last halves (the request and the response's opening survive).",
    )
    learning_rate: float = option(2e-5, "Peak rate of the backbone.")
    head_learning_rate: float = option(0.0, "Peak rate of the reward head; 0 = learning_rate.")
    frozen_layers: Annotated[int, Field(ge=0)] = option(
        0,
        "Train only the layers above the first frozen_layers (and the head): the embeddings "
        "and the bottom layers stay pretrained and get no backward pass, so a step costs "
        "less; 0 = train all.",
    )
    warmup_ratio: float = option(
        0.05, "Fraction of steps with linear warmup, then cosine decay to 0."
    )
    weight_decay: float = option(0.01, "AdamW decoupled weight decay (not on biases / LayerNorm).")
    clip_norm: float = option(1.0, "Global gradient-norm clipping.")
    seed: int = option(0, "Head init and data order.")
    pooling: PoolingChoice = option(
        "", 'mean | last | cls (models.pooling); "" = mean (encoder), last (decoder).'
    )
    margin_scale: float = option(
        0.0, "m = margin_scale · pair margin in −log σ(r_c − r_r − m); 0 = off."
    )
    label_confidence: float = option(
        0.0, "β: a pair with rule margin m is a soft label σ(β·|m|); 0 = hard."
    )
    min_margin: float = option(
        0.0,
        "Leave out of training the pairs whose rule margin m is 0 < |m| < min_margin: labels "
        "that near chance (pairs without a margin are kept); 0 = keep all.",
    )
    center_coef: float = option(
        0.0, "Reward centering weight, e.g. 0.01·mean((r_c + r_r)²); 0 = off."
    )
    dtype: Dtype = option("float32", "Compute dtype.")
    param_dtype: Dtype = option("float32", "Storage of parameters and optimizer state.")
    remat: Remat = option(
        "none",
        "Recompute activations in the backward pass: none, full (whole layers) or dots (keep "
        "matmul outputs); true/false mean full/none.",
    )
    packing: bool = option(
        True, "Pack several texts a row (no padding compute); false: one text a row."
    )
    attention: Attention = option(
        "auto",
        "Attention implementation (models.attention): auto = splash on TPU, Pallas or cuDNN on "
        "a GPU under bf16, segment_cpu (a Numba kernel) on a CPU, xla otherwise.",
    )
    backbone: Backbone = option("encoder", "encoder (BERT) | decoder (Llama family).")
    model: str = option(
        "",
        "Checkpoint: a BERT directory (encoder), a HF directory or .gguf (decoder); "
        '"" = the bundled all-MiniLM-L6-v2 / SmolLM2-135M-Instruct.',
    )
    checkpoint_every: int = option(200, "Steps between (async) checkpoints.")
    keep_checkpoints: int = option(3, "How many recent checkpoints to keep.")
    eval_every: int = option(200, "Steps between held-out evaluations; 0 = only at the end.")
    eval_fraction: float = option(0.05, "Share of pairs held out when eval_data is not given.")
    eval_data: str = option("", "Separate held-out pairs file (then eval_fraction is ignored).")
    export: Literal["last", "best"] = option(
        "last",
        "The exported model: last = the final step's parameters; best = those of the held-out "
        "evaluation that scored highest (reward model: section mean, else accuracy; adapter: "
        "label agreement), the earliest on a tie. best needs held-out data.",
    )
    log_every: int = option(10, "Steps between metrics records.")
    mesh: MeshText = option("", MESH_HELP)
    distributed: bool = option(False, DISTRIBUTED_HELP)

    # Keys that may differ when a run is resumed: they change how long or how visibly it
    # runs, or how its batches are laid out on devices, never which pairs a step sees or what
    # it computes (beyond float rounding). So a run saved before packing existed resumes too.
    RESUMABLE_CHANGES: typing.ClassVar[frozenset] = frozenset(
        {
            "packing",
            "attention",
            "steps",
            "checkpoint_every",
            "keep_checkpoints",
            "eval_every",
            "log_every",
            "mesh",
            "distributed",
        }
    )

    @pydantic.field_validator("remat", mode="before")
    @classmethod
    def _remat_words(cls, value):
        """Boolean spellings (YAML true/false): true recomputes everything, false nothing."""
        text = str(value).lower()
        return _REMAT_WORDS.get(text, text)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """The checks between keys and of ranges (types and choices are the fields' own)."""
        positive = (
            "steps",
            "batch_size",
            "grad_accum",
            "max_length",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise DynrulesError(f"config: {name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise DynrulesError(
                f"config: batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}"
            )
        if not 0.0 <= self.eval_fraction < 1.0:
            raise DynrulesError(
                f"config: eval_fraction must be in [0, 1), got {self.eval_fraction}"
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise DynrulesError(f"config: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.eval_every < 0:
            raise DynrulesError(f"config: eval_every must be ≥ 0, got {self.eval_every}")
        if self.export == "best" and not (self.eval_data or self.eval_fraction):
            raise DynrulesError(
                "config: export=best picks the best held-out evaluation: give eval_data or "
                "eval_fraction > 0"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **changes) -> TrainConfig:
        return make_config(self.to_dict() | changes)


@section(frozen=True)
class ScoringConfig:
    """Scoring texts with a trained reward model: the ``scoring`` section (score, eval)."""

    batch_size: Annotated[int, Field(ge=1)] = option(
        SCORE_BATCH_SIZE, "Texts per scoring batch (long texts: fewer, by a token budget)."
    )
    mesh: MeshText = option("", MESH_HELP)
    distributed: bool = option(False, DISTRIBUTED_HELP)


# Boolean spellings of remat: true recomputes everything, false nothing.
_REMAT_WORDS = {
    "true": "full",
    "1": "full",
    "yes": "full",
    "on": "full",
    "false": "none",
    "0": "none",
    "no": "none",
    "off": "none",
    "": "none",
}

# The keys by what they set: the model, its optimisation, the run around it. A group name may
# prefix a key (``optim.learning_rate=3e-5``, or a YAML mapping ``optim: {...}``) as well as
# ``train.``; run.json keeps the keys flat.
GROUPS = {
    "model": (
        "backbone",
        "model",
        "pooling",
        "max_length",
        "truncation",
        "dtype",
        "param_dtype",
        "remat",
        "packing",
        "attention",
    ),
    "optim": (
        "steps",
        "batch_size",
        "grad_accum",
        "learning_rate",
        "head_learning_rate",
        "frozen_layers",
        "warmup_ratio",
        "weight_decay",
        "clip_norm",
        "seed",
        "margin_scale",
        "label_confidence",
        "min_margin",
        "center_coef",
    ),
    "run": (
        "checkpoint_every",
        "keep_checkpoints",
        "eval_every",
        "eval_fraction",
        "eval_data",
        "export",
        "log_every",
        "mesh",
        "distributed",
    ),
}
ALIASES = {f"{group}.{key}": f"train.{key}" for group, keys in GROUPS.items() for key in keys}


def train_tree(command: str = "train-rm", **sections) -> Tree:
    """The tree of a training command: the ``train`` section (bare keys are its own), and others."""
    return Tree(
        sections={"train": TrainConfig, **sections},
        primary="train",
        command=f"`dynrules {command}`",
        aliases=ALIASES,
    )


def make_config(values: dict | None = None, *, source: str = "config") -> TrainConfig:
    """A TrainConfig from a mapping, rejecting unknown keys and wrongly typed values."""
    given = [(key, value, source) for key, value in (values or {}).items()]
    return load(train_tree(), overrides=given)["train"]


def load_config(
    path: str | Path | None = None,
    overrides: list | tuple = (),
    *,
    base: dict | None = None,
) -> TrainConfig:
    """``base`` values (e.g. a run's saved config), then the YAML file, then ``key=value``
    overrides (or ``(key, value, origin)`` items: the command's flags, last)."""
    return load(train_tree(), path=path, overrides=overrides, base={"train": base or {}})["train"]
