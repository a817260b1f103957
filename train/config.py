"""Typed training configuration: a dataclass read from YAML, then ``key=value`` overrides.

Unknown keys are errors (a typo must not silently train with a default). Values given on
the command line are parsed by the field's type.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from dynrules.errors import DynrulesError

BACKBONES = ("encoder", "decoder")
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass
class TrainConfig:
    """Everything a reward-model run depends on. Field comments say what each key does."""

    steps: int = 1000  # optimizer updates
    batch_size: int = 32  # preference pairs per optimizer update (global, all devices)
    grad_accum: int = 1  # micro-batches per update (batch_size must be a multiple)
    max_length: int = 256  # tokens per prompt+response text; longer texts keep their end
    learning_rate: float = 2e-5  # peak rate of the backbone
    head_learning_rate: float = 0.0  # peak rate of the reward head; 0 = learning_rate
    warmup_ratio: float = 0.05  # fraction of steps with linear warmup, then cosine decay to 0
    weight_decay: float = 0.01  # AdamW decoupled weight decay (not on biases / LayerNorm)
    clip_norm: float = 1.0  # global gradient-norm clipping
    seed: int = 0  # head init and data order
    pooling: str = ""  # mean | last | cls (models.pooling); "" = mean (encoder), last (decoder)
    margin_scale: float = 0.0  # m = margin_scale · pair margin in −log σ(r_c − r_r − m); 0 = off
    label_confidence: float = 0.0  # β: a pair with rule margin m is a soft label σ(β·|m|); 0 = hard
    center_coef: float = 0.0  # reward centering weight, e.g. 0.01·mean((r_c + r_r)²); 0 = off
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"  # storage of parameters and optimizer state: float32 | bfloat16
    remat: str = "none"  # recompute activations in the backward pass: none | full | dots
    packing: bool = True  # pack several texts a row (no padding compute); false: one text a row
    backbone: str = "encoder"  # encoder (BERT) | decoder (Llama family)
    model: str = ""  # checkpoint: a BERT directory (encoder), a HF directory or .gguf (decoder);
    #                  "" = the bundled all-MiniLM-L6-v2 / SmolLM2-135M-Instruct
    checkpoint_every: int = 200  # steps between (async) checkpoints
    keep_checkpoints: int = 3  # how many recent checkpoints to keep
    eval_every: int = 200  # steps between held-out evaluations; 0 = only at the end
    eval_fraction: float = 0.05  # share of pairs held out when eval_data is not given
    eval_data: str = ""  # separate held-out pairs file (then eval_fraction is ignored)
    log_every: int = 10  # steps between metrics records
    mesh: str = ""  # e.g. "data=4,fsdp=2"; "" = every device on the data axis
    distributed: bool = False  # call jax.distributed.initialize() first (multi-host)

    # Keys that may differ when a run is resumed: they change how long or how visibly it
    # runs, or how its batches are laid out on devices, never which pairs a step sees or what
    # it computes (beyond float rounding). So a run saved before packing existed resumes too.
    RESUMABLE_CHANGES: typing.ClassVar[frozenset] = frozenset(
        {
            "packing",
            "steps",
            "checkpoint_every",
            "keep_checkpoints",
            "eval_every",
            "log_every",
            "mesh",
            "distributed",
        }
    )

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
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
        if self.pooling not in ("", "mean", "last", "cls"):
            raise DynrulesError(f"config: pooling must be mean, last or cls, got {self.pooling!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise DynrulesError(
                    f"config: {name} must be float32 or bfloat16, got {getattr(self, name)!r}"
                )
        self.remat = _REMAT_WORDS.get(str(self.remat).lower(), str(self.remat).lower())
        if self.remat not in REMAT_POLICIES:
            raise DynrulesError(
                f"config: remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}"
            )
        if self.backbone not in BACKBONES:
            raise DynrulesError(
                f"config: backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}"
            )
        if not 0.0 <= self.eval_fraction < 1.0:
            raise DynrulesError(
                f"config: eval_fraction must be in [0, 1), got {self.eval_fraction}"
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise DynrulesError(f"config: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.eval_every < 0:
            raise DynrulesError(f"config: eval_every must be ≥ 0, got {self.eval_every}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **changes) -> TrainConfig:
        return make_config(self.to_dict() | changes)


# Boolean spellings of remat (YAML true/false): true recomputes everything, false nothing.
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


def make_config(values: dict | None = None, *, source: str = "config") -> TrainConfig:
    """A TrainConfig from a mapping, rejecting unknown keys and wrongly typed values."""
    values = dict(values or {})
    known = set(TrainConfig.keys())
    unknown = sorted(set(values) - known)
    if unknown:
        raise DynrulesError(
            f"{source}: unknown key {unknown[0]!r}; valid keys: {', '.join(TrainConfig.keys())}"
        )
    hints = typing.get_type_hints(TrainConfig)
    typed = {key: _coerce(key, value, hints[key], source) for key, value in values.items()}
    return TrainConfig(**typed)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    base: dict | None = None,
) -> TrainConfig:
    """``base`` values (e.g. a run's saved config), then the YAML file, then ``key=value`` overrides."""
    values: dict = dict(base or {})
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise DynrulesError(f"cannot read config {path}: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise DynrulesError(
                f"{path}: expected a mapping of config keys, got {type(loaded).__name__}"
            )
        make_config(loaded, source=str(path))  # name the file in errors about its own keys
        values.update(loaded or {})
    values.update(parse_overrides(overrides))
    return make_config(values, source=str(path) if path else "config")


def parse_overrides(overrides) -> dict[str, str]:
    parsed = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DynrulesError(f"override {item!r}: expected key=value")
        parsed[key.strip()] = value.strip()
    return parsed


def _coerce(key: str, value, hint, source: str):
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return (
                int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
            )
        if hint is float:
            return float(value)
        if hint is str:
            if isinstance(value, dict):  # YAML mesh: {data: 4, fsdp: 2}
                return ",".join(f"{k}={v}" for k, v in value.items())
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        raise DynrulesError(f"{source}: {key} must be {hint.__name__}, got {value!r}") from None
    raise DynrulesError(f"{source}: {key}: unsupported type {hint}")
