"""Plan a reward-model training run before renting the hardware (``dynrules plan``).

The step that ``train-rm`` runs (train.trainer.Trainable.train_step: forward, Bradley–Terry
loss, backward, gradient accumulation, AdamW) is lowered with abstract, sharded state and batch
(``jax.ShapeDtypeStruct``: nothing is allocated) and compiled ahead of time for a topology that
need not be here — the method of MaxText's train_compile. TPU topologies are libtpu's
compile-only devices (``jax.experimental.topologies``; ``pip install 'dynrules[tpu]'``), so
planning works on a CPU-only machine; ``cpu:N`` compiles for N host devices of this machine.

What the compiled executable tells:

- **memory per device** (``memory_analysis``): arguments + outputs − donated aliases +
  temporaries + code. The TPU compiler refuses a program that does not fit its HBM; its message
  states the bytes the program needs, reported as ``bytes_per_device`` with ``fits = false``.
- **FLOPs** (``cost_analysis``), from two probes: the same step for one pair on one host CPU
  device, with 0 and with 2 layers, give c0 and c2, and a step costs
  batch · (c0 + L · (c2 − c0)) over all devices (FSDP and tensor parallelism split it evenly;
  collectives add none). Why probes: XLA counts a loop body once whatever its trip count,
  which undercounts the scanned layers and the gradient-accumulation scan (c2 − c0 is exactly
  one layer's forward, recomputation and backward: two trips, each body counted once; a
  one-trip loop would be inlined and its recomputation merged away); and on a TPU mesh the
  compiler turns FSDP's all-gather + matmul into loops over weight shards (windowed einsum),
  undercounting again. Why a host device: its probe compiles without fitting anywhere. It
  counts the optimizer update ``batch`` times instead of once — ~15 FLOPs per parameter
  against ~12 · seq per parameter for each pair, well under 0.1% at seq 2048.
- **attention**: the implementation the step is compiled with (models.attention): by default
  what training would pick on the target, splash attention on a TPU (libtpu compiles its Mosaic
  kernel like any other op) and the Numba ``segment_cpu`` kernel on host devices. The FLOP
  probes always use XLA's attention and a loop over the layers (training writes them out on a
  host device): a Pallas kernel and the Numba kernel are custom calls, which the compiler
  counts no FLOPs for, and on a host device a Pallas kernel would run interpreted. So the count
  includes the score tiles splash skips under the causal mask (about half of the attention's).
- **step time at peak**: FLOPs per device / the chip's peak bf16 FLOP/s — a lower bound that
  ignores communication and memory bandwidth; divide by an MFU you believe (MaxText reports
  ~45% for Llama-3.1-8B on v6e-256) for an estimate.

``model_flops_per_step`` is the usual analytic count for MFU (3 × forward matmuls and
attention, recomputation not included), a cross-check of the compiler's figure.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import time
import typing
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from dynrules.errors import DynrulesError
from dynrules.platforms import quiet_compile_only_libtpu
from dynrules.settings import ConfigError, MeshText, option, section

if typing.TYPE_CHECKING:
    from dynrules.train.config import TrainConfig

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: what its devices are called and what one chip can hold and do."""

    name: str
    device_kind: str  # jax Device.device_kind
    hbm_bytes: int  # what the compiler lets one program use (see CHIPS)
    peak_bf16_flops: float  # per chip, per second
    dims: int  # 2-D torus (v5e, v6e) or 3-D (v4, v5p)
    cores_in_slice_name: int  # v4-8 and v5p-8 count TensorCores, two per chip: 4 chips


# Peak bf16 FLOP/s per chip: Google Cloud's TPU pages (cloud.google.com/tpu/docs/v4, /v5e,
# /v5p, /v6e): 275, 197, 459 and 918 TFLOP/s. HBM: the nameplate is 32 GiB (v4), 16 GB (v5e),
# 95 GB (v5p) and 32 GB (v6e); the figures here are what libtpu 0.0.42.1's compiler reports as
# available to a program when one does not fit ("exceeds available HBM (15.75G)"), which is
# what decides whether a step compiles. v4 and v5p run one device per chip (megacore).
CHIPS = {
    "v4": Chip("v4", "TPU v4", int(30.75 * GIB), 275e12, 3, 2),
    "v5e": Chip("v5e", "TPU v5 lite", int(15.75 * GIB), 197e12, 2, 1),
    "v5p": Chip("v5p", "TPU v5", int(95.74 * GIB), 459e12, 3, 2),
    "v6e": Chip("v6e", "TPU v6 lite", int(31.25 * GIB), 918e12, 2, 1),
}

Task = Literal["train", "judge"]  # what `dynrules plan --task` compiles
TOPOLOGY_HELP = (
    "a TPU topology (v5e:2x4, v5p:4x4x4, v4:2x2x1, v6e:8x8), a slice name (v5e-8, v5p-128, "
    "v4-32, v6e-64) or cpu:N (N host devices of this machine)"
)
_TPU_TOPOLOGY = re.compile(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})")
_SLICE_NAME = re.compile(r"(v4|v5e|v5p|v6e)-(\d+)")
_CPU_TOPOLOGY = re.compile(r"cpu:(\d+)")
_OUT_OF_HBM = re.compile(
    r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM"
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}

# The train section's keys the plan compiles the step with (the judge: dtype and attention),
# and the plan's own defaults for them: a big model's step, in bfloat16 with full remat.
TRAIN_KEYS = ("dtype", "param_dtype", "remat", "attention")
TRAIN_DEFAULTS = {"dtype": "bfloat16", "remat": "full"}
_JUDGE = ("task", ("judge",))
_TRAIN = ("task", ("train",))


@section(frozen=True)
class PlanConfig:
    """What ``dynrules plan`` compiles, and for where: the ``plan`` section.

    The step's dtype, param_dtype, remat and attention are the train section's keys
    (:data:`TRAIN_KEYS`), at the plan's own defaults (:data:`TRAIN_DEFAULTS`)."""

    model: str = option(
        "",
        "Required: a named shape (llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, llama-3.1-70b, "
        "smollm2-135m) or a Hugging Face config.json (or its directory).",
    )
    topology: str = option("", f"Required: where to run: {TOPOLOGY_HELP}.")
    task: Task = option(
        "train",
        "train: the reward model's training step; judge: the in-process judge's one-pass "
        "forward (rows of a conversation and its rule questions).",
    )
    seq: Annotated[int, Field(ge=1)] = option(2048, "Tokens per text (judge: per row).")
    batch: Annotated[int, Field(ge=1)] = option(
        64, "Preference pairs per optimizer step, two texts each (judge: rows per step)."
    )
    grad_accum: Annotated[int, Field(ge=1)] = option(
        1, "Train: micro-batches per step (batch must be a multiple).", applies=_TRAIN
    )
    # Not train.mesh: its empty value puts every device on the data axis; a plan's, on fsdp.
    mesh: MeshText = option(
        "",
        'Axis sizes, e.g. fsdp=4,tensor=2; data takes the rest; "" = fsdp over every device.',
    )
    prefix_tokens: Annotated[int, Field(ge=1)] = option(
        512, "Judge: tokens of a conversation (the prefix its questions share).", applies=_JUDGE
    )
    question_tokens: Annotated[int, Field(ge=1)] = option(
        32, "Judge: tokens of one rule question after the conversation.", applies=_JUDGE
    )
    pairs: Annotated[int, Field(ge=1)] = option(
        1_000_000, "Judge: pairs to rate (both responses) for chips_needed.", applies=_JUDGE
    )
    rules: Annotated[int, Field(ge=1)] = option(
        100, "Judge: rules rated per response.", applies=_JUDGE
    )
    hours: Annotated[float, Field(gt=0)] = option(
        24.0, "Judge: time to rate them in.", applies=_JUDGE
    )
    mfu: Annotated[float, Field(gt=0, le=1)] = option(
        0.4, "Judge: share of the peak FLOP/s assumed for chips_needed.", applies=_JUDGE
    )


def plan_with(config: PlanConfig, train: TrainConfig) -> TrainingPlan | JudgePlan:
    """The plan ``dynrules plan`` reports: ``config`` (the plan section) and the train section's
    :data:`TRAIN_KEYS` (at :data:`TRAIN_DEFAULTS` unless given)."""
    for key in ("model", "topology"):
        if not getattr(config, key):
            raise ConfigError(f"plan.{key} is required (--{key}, or plan.{key}=... / --config)")
    if config.task == "judge":
        defaults = {f.name: f.default for f in dataclasses.fields(train)} | TRAIN_DEFAULTS
        for key in ("param_dtype", "remat"):
            if getattr(train, key) != defaults[key]:
                raise ConfigError(f"train.{key} applies to plan.task train, not 'judge'")
        return plan_judge(
            config.model,
            config.topology,
            seq=config.seq,
            batch=config.batch,
            mesh=config.mesh,
            dtype=train.dtype,
            attention=train.attention,
            prefix_tokens=config.prefix_tokens,
            question_tokens=config.question_tokens,
            pairs=config.pairs,
            rules=config.rules,
            hours=config.hours,
            mfu=config.mfu,
        )
    return plan_training(
        config.model,
        config.topology,
        seq=config.seq,
        batch=config.batch,
        grad_accum=config.grad_accum,
        mesh=config.mesh,
        dtype=train.dtype,
        param_dtype=train.param_dtype,
        remat=train.remat,
        attention=train.attention,
    )


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """What ``dynrules plan`` reports; ``None`` where a figure could not be had (see ``note``)."""

    model: str
    topology: str
    chip: str  # v5e … or cpu
    devices: int
    mesh: dict  # axis → size
    params: int
    seq: int
    batch: int  # preference pairs per optimizer step (two texts each)
    grad_accum: int
    dtype: str
    param_dtype: str
    remat: str
    attention: str  # the implementation the compiled step uses (models.attention)
    state_bytes_per_device: int  # parameters + optimizer state, from their shardings
    bytes_per_device: int | None  # everything the step needs on one device (compiler)
    hbm_per_device: int
    fits: bool
    flops_per_device: float | None  # flops_per_step / devices
    flops_per_step: float | None  # compiler's count from the probes (module doc), all devices
    model_flops_per_step: float  # analytic 6·N·D-style count (no recomputation)
    peak_flops_per_device: float | None
    step_seconds_at_peak: float | None
    compile_seconds: float
    note: str = ""


# --------------------------------------------------------------------------- inputs


def model_config(model: str):
    """A named shape (models.presets) or a Hugging Face ``config.json`` (or its directory)."""
    from dynrules.models.llama import LlamaConfig
    from dynrules.models.presets import PRESETS, preset

    path = Path(model)
    if model.lower() in PRESETS or not (path.is_dir() or path.suffix == ".json"):
        return preset(model)  # an unknown name: the error lists the presets
    if path.is_dir():
        path = path / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DynrulesError(f"{path}: cannot read a JSON config ({exc})") from exc
    if not isinstance(raw, dict):
        raise DynrulesError(f"{path}: expected a JSON object")
    return LlamaConfig.from_hf_dict(raw, source=str(path))


def slice_shape(chip: Chip, count: int) -> tuple[int, ...]:
    """The default torus of a slice of ``count`` chips (MaxText's / Cloud TPU's shapes).

    2-D: 1x1, 2x2, 2x4, 4x4, 4x8 … ; 3-D: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4 …: from the smallest
    slice, double the smallest dimension (the last of equals) until the count is reached.
    """
    shape = [1] * chip.dims if count == 1 else [2, 2] + [1] * (chip.dims - 2)
    while math.prod(shape) < count:
        smallest = min(shape)
        last = max(i for i, size in enumerate(shape) if size == smallest)
        shape[last] *= 2
    if math.prod(shape) != count:
        raise DynrulesError(f"{chip.name} slices have 1 chip or a power of two ≥ 4, not {count}")
    return tuple(shape)


@dataclasses.dataclass(frozen=True)
class Target:
    """A resolved topology: its canonical name, devices, and what one device holds and does."""

    name: str
    chip: str
    devices: list
    hbm_per_device: int
    peak_flops_per_device: float | None
    out_of_memory_is_an_error: bool  # the TPU compiler refuses what does not fit


def resolve_topology(name: str) -> Target:
    """``v5e:2x4``, ``v5e-8`` or ``cpu:8`` → devices to compile for (see TOPOLOGY_HELP)."""
    text = name.strip().lower()
    if match := _CPU_TOPOLOGY.fullmatch(text):
        return _host_target(int(match.group(1)))
    if match := _SLICE_NAME.fullmatch(text):
        chip = CHIPS[match.group(1)]
        cores = int(match.group(2))
        if cores % chip.cores_in_slice_name:
            raise DynrulesError(
                f"{name}: {chip.name} slice names count {chip.cores_in_slice_name} "
                "cores per chip; use an even number"
            )
        try:
            shape = slice_shape(chip, cores // chip.cores_in_slice_name)
        except DynrulesError as exc:
            raise DynrulesError(f"{name}: {exc}") from None
    elif match := _TPU_TOPOLOGY.fullmatch(text):
        chip = CHIPS[match.group(1)]
        shape = tuple(int(x) for x in match.group(2).split("x"))
        if len(shape) != chip.dims:
            raise DynrulesError(
                f"{name}: a {chip.name} topology has {chip.dims} dimensions, e.g. "
                f"{chip.name}:{'x'.join(map(str, slice_shape(chip, 8)))}"
            )
        if min(shape) < 1:
            raise DynrulesError(f"{name}: every dimension needs at least one chip")
    else:
        raise DynrulesError(f"unknown topology {name!r}; use {TOPOLOGY_HELP}")
    canonical = f"{chip.name}:{'x'.join(map(str, shape))}"
    return Target(
        canonical,
        chip.name,
        _tpu_devices(chip, shape, canonical),
        chip.hbm_bytes,
        chip.peak_bf16_flops,
        True,
    )


def _tpu_devices(chip: Chip, shape: tuple[int, ...], canonical: str) -> list:
    if importlib.util.find_spec("libtpu") is None:
        raise DynrulesError(
            "TPU topologies compile through libtpu, which is not installed: "
            "pip install 'dynrules[tpu]' (or plan on cpu:N)"
        )
    # Compiling needs no TPU, so no exclusive hold on one: libtpu otherwise refuses to load
    # beside another process that has it loaded (its /tmp/libtpu_lockfile).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    quiet_compile_only_libtpu()
    import jax
    from jax.experimental import topologies

    options: dict[str, object] = {
        "chips_per_host_bounds": tuple(min(size, 2) for size in shape[:2]) + (1,)
    }
    if chip.dims == 3:
        options["chip_config_name"] = "megacore"  # one device per chip, as jax runs v4 / v5p
    try:
        devices: list[jax.Device] = topologies.get_topology_desc(
            canonical, platform="tpu", **options
        ).devices
    except (jax.errors.JaxRuntimeError, RuntimeError) as exc:
        raise DynrulesError(f"topology {canonical}: {_first_line(exc)}") from exc
    kinds = {device.device_kind for device in devices}
    if kinds != {chip.device_kind}:
        raise DynrulesError(
            f"topology {canonical}: libtpu made {sorted(kinds)} devices, "
            f"expected {chip.device_kind!r}"
        )
    return list(devices)


def _host_target(count: int) -> Target:
    """``count`` host devices: set before JAX starts its CPU backend, else what it already has."""
    import jax

    if count < 1:
        raise DynrulesError("cpu:N needs N ≥ 1")
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        pass  # the backend is up already (a library caller): use its devices if there are enough
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise DynrulesError(
            f"cpu:{count} needs {count} host devices but JAX started with {len(devices)}; plan in "
            f"a fresh process, or set XLA_FLAGS=--xla_force_host_platform_device_count={count}"
        )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Target(f"cpu:{count}", "cpu", devices[:count], memory // count, None, False)


# --------------------------------------------------------------------------- the plan


def plan_training(
    model: str,
    topology: str,
    *,
    seq: int = 2048,
    batch: int = 64,
    grad_accum: int = 1,
    mesh: str = "",
    dtype: str = "bfloat16",
    param_dtype: str = "float32",
    remat: str = "full",
    attention: str = "auto",
) -> TrainingPlan:
    """Compile the reward-model training step for ``topology`` and report what it needs.

    ``model``: a preset (models.presets) or a config.json. ``batch``: preference pairs per optimizer
    step (2 × batch texts of ``seq`` tokens), split into ``grad_accum`` micro-batches.
    ``mesh``: axis sizes like ``fsdp=4,tensor=2`` (``data`` takes what is left); default: FSDP
    over every device. ``dtype`` / ``param_dtype`` / ``remat`` / ``attention`` as in the
    training config (``auto``: splash on a TPU topology, xla on host devices).
    """
    from dynrules.models.attention import resolve
    from dynrules.models.classifier import COMPUTE_DTYPES

    target = resolve_topology(topology)
    config = model_config(model)
    attention = resolve(
        attention,
        packed=False,  # the plan's rows are full-length, one text each
        dtype=COMPUTE_DTYPES[dtype],
        platform=target.devices[0].platform,
    )
    if seq > config.max_position_embeddings:
        raise DynrulesError(
            f"seq {seq} exceeds the model's {config.max_position_embeddings} positions"
        )
    devices = len(target.devices)
    mesh_spec = mesh or f"fsdp={devices}"
    options = {
        "seq": seq,
        "batch": batch,
        "grad_accum": grad_accum,
        "mesh": mesh_spec,
        "dtype": dtype,
        "param_dtype": param_dtype,
        "remat": remat,
        "attention": attention,
    }

    started = time.perf_counter()
    full = _compile_step(config, target, **options)
    probe = options | {
        "batch": 1,
        "grad_accum": 1,
        "mesh": "",
        "attention": "xla",
        "unroll_layers": False,  # a loop, whose body XLA counts once (module doc)
    }
    flops_per_step, probe_note = _step_flops(_compile_step, config, batch, probe)
    flops_per_device = None if flops_per_step is None else flops_per_step / devices
    note = full.note or probe_note
    seconds = time.perf_counter() - started

    peak = target.peak_flops_per_device
    fits = full.bytes is not None and full.bytes <= target.hbm_per_device
    return TrainingPlan(
        model=model,
        topology=target.name,
        chip=target.chip,
        devices=devices,
        mesh=full.mesh,
        params=full.params,
        seq=seq,
        batch=batch,
        grad_accum=grad_accum,
        dtype=dtype,
        param_dtype=param_dtype,
        remat=remat,
        attention=attention,
        state_bytes_per_device=full.state_bytes,
        bytes_per_device=full.bytes,
        hbm_per_device=target.hbm_per_device,
        fits=fits,
        flops_per_device=flops_per_device,
        flops_per_step=flops_per_step,
        model_flops_per_step=model_flops(config, seq=seq, batch=batch),
        peak_flops_per_device=peak,
        step_seconds_at_peak=(
            flops_per_device / peak if flops_per_device is not None and peak else None
        ),
        compile_seconds=round(seconds, 1),
        note=note,
    )


@dataclasses.dataclass
class _Compiled:
    mesh: dict
    params: int
    state_bytes: int
    bytes: int | None  # None: the compiler failed without saying how much it needed
    flops: float | None
    note: str


def _compile_step(
    config,
    target: Target,
    *,
    seq,
    batch,
    grad_accum,
    mesh,
    dtype,
    param_dtype,
    remat,
    attention,
    unroll_layers=None,
) -> _Compiled:
    """Lower and compile train-rm's step for ``config`` on the target's devices (the layers
    unrolled as training would, unless ``unroll_layers`` says otherwise)."""
    import jax
    import jax.numpy as jnp

    from dynrules.models.classifier import ModelSpec
    from dynrules.train import sharding as shd
    from dynrules.train.config import make_config
    from dynrules.train.trainer import Trainable

    train_config = make_config(
        {
            "batch_size": batch,
            "grad_accum": grad_accum,
            "max_length": seq,
            "dtype": dtype,
            "param_dtype": param_dtype,
            "remat": remat,
            "attention": attention,
            "backbone": "decoder",
            "mesh": mesh,
            "packing": False,
        },
        source="plan",
    )  # full-length rows, one text each
    device_mesh = shd.make_mesh(mesh, devices=target.devices)
    micro = batch // grad_accum
    shards = shd.batch_shards(device_mesh)
    if micro % shards:
        raise DynrulesError(
            f"a micro-batch of {micro} pairs does not split over the {shards} batch shards of mesh "
            f"{shd.mesh_description(device_mesh)}; raise --batch or put devices on tensor (--mesh)"
        )
    spec = ModelSpec(config, num_outputs=1, pooling="last", max_length=seq)
    trainable = Trainable.build(spec, train_config, device_mesh, unroll_layers=unroll_layers)
    state = trainable.abstract_state
    shardings = trainable.batch_shardings()
    shapes = {
        "ids": ((grad_accum, micro, 2, seq), jnp.int32),
        "lengths": ((grad_accum, micro, 2), jnp.int32),
        "margins": ((grad_accum, micro), jnp.float32),
    }
    abstract_batch = {
        key: jax.ShapeDtypeStruct(shape, dtype_, sharding=shardings[key])
        for key, (shape, dtype_) in shapes.items()
    }
    params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state["params"]))
    state_bytes = sum(_shard_bytes(leaf) for leaf in jax.tree.leaves(state))
    mesh_sizes = {name: int(size) for name, size in device_mesh.shape.items()}
    lowered = trainable.train_step(train_config).lower(state, abstract_batch)
    return _compiled(lowered, target, mesh_sizes, params, state_bytes)


def _step_flops(compile_step, config, batch: int, probe: dict) -> tuple[float | None, str]:
    """FLOPs of a whole step (all devices) from ``compile_step``'s one-row probes (``probe``
    options) on a host device (module doc)."""
    import jax

    try:
        host = [jax.devices("cpu")[0]]
    except RuntimeError as exc:  # JAX_PLATFORMS without cpu
        return None, f"no FLOP count: no host device for the probes ({_first_line(exc)})"
    probe_target = Target("cpu:1", "cpu", host, 0, None, False)
    c0, c2 = (
        compile_step(
            dataclasses.replace(config, num_hidden_layers=layers), probe_target, **probe
        ).flops
        for layers in (0, 2)
    )
    if c0 is None or c2 is None:
        return None, "no FLOP count: the compiler gave none for the probes"
    return batch * (c0 + config.num_hidden_layers * (c2 - c0)), ""


# --------------------------------------------------------------------------- the judge's plan


@dataclasses.dataclass(frozen=True)
class JudgePlan:
    """What ``dynrules plan --task judge`` reports: the training plan's keys where they apply
    (a forward pass has no optimizer, accumulation or recomputation) and the rating rates."""

    task: str
    model: str
    topology: str
    chip: str
    devices: int
    mesh: dict
    params: int
    seq: int  # tokens a row: one conversation and the questions that fit
    batch: int  # rows a forward pass
    dtype: str
    attention: str  # the conversations' implementation (the questions' is always XLA's)
    state_bytes_per_device: int  # the weights, from their shardings
    bytes_per_device: int | None
    hbm_per_device: int
    fits: bool
    flops_per_device: float | None
    flops_per_step: float | None
    model_flops_per_step: float
    peak_flops_per_device: float | None
    step_seconds_at_peak: float | None
    compile_seconds: float
    prefix_tokens: int  # a conversation (the shared prefix)
    question_tokens: int  # one rule's question after it
    questions_per_row: int
    ratings_per_step: int
    ratings_per_s_at_peak: float | None
    pairs: int
    rules: int
    hours: float
    mfu: float
    chips_needed: int | None  # to rate pairs × rules × 2 responses in ``hours`` at ``mfu``
    note: str = ""


def plan_judge(
    model: str,
    topology: str,
    *,
    seq: int = 2048,
    batch: int = 64,
    mesh: str = "",
    dtype: str = "bfloat16",
    attention: str = "auto",
    prefix_tokens: int = 512,
    question_tokens: int = 32,
    pairs: int = 1_000_000,
    rules: int = 100,
    hours: float = 24.0,
    mfu: float = 0.4,
) -> JudgePlan:
    """Compile the in-process judge's one-pass forward (engine.judges.jaxlm) for ``topology``.

    A step is ``batch`` rows of ``seq`` tokens, each a conversation of ``prefix_tokens`` (encoded
    once) and as many questions of ``question_tokens`` as fit that continue it, answered at their
    last token through the LM head. Weights are sharded by the training rules (FSDP over every device by default), so a
    judge too big for one chip spreads over the slice. ``chips_needed`` rates ``pairs`` ×
    ``rules`` × 2 responses in ``hours`` at ``mfu`` of the peak (a lower bound, as the step
    time at peak is; MaxText-class inference reaches 30–50% MFU on prefill). ``attention``:
    the conversations' implementation, as in :func:`plan_training` (the questions, masked
    by their conversation, always run through XLA's).
    """
    from dynrules.models.attention import resolve
    from dynrules.models.classifier import COMPUTE_DTYPES

    target = resolve_topology(topology)
    config = model_config(model)
    attention = resolve(
        attention,
        packed=False,  # a conversation a row of prefix_ids
        dtype=COMPUTE_DTYPES[dtype],
        platform=target.devices[0].platform,
    )
    if seq > config.max_position_embeddings:
        raise DynrulesError(
            f"seq {seq} exceeds the model's {config.max_position_embeddings} positions"
        )
    if prefix_tokens + question_tokens > seq:
        raise DynrulesError(
            f"a row of {seq} tokens does not hold a conversation of "
            f"{prefix_tokens} and one question of {question_tokens}"
        )
    questions = (seq - prefix_tokens) // question_tokens
    devices = len(target.devices)
    options = {
        "seq": seq,
        "batch": batch,
        "mesh": mesh or f"fsdp={devices}",
        "dtype": dtype,
        "questions": questions,
        "prefix_tokens": prefix_tokens,
        "attention": attention,
    }
    started = time.perf_counter()
    full = _compile_judge(config, target, **options)
    probe = options | {"batch": 1, "mesh": "", "attention": "xla"}
    flops_per_step, probe_note = _step_flops(_compile_judge, config, batch, probe)
    seconds = time.perf_counter() - started
    flops_per_device = None if flops_per_step is None else flops_per_step / devices
    peak = target.peak_flops_per_device
    step_at_peak = flops_per_device / peak if flops_per_device is not None and peak else None
    ratings_per_step = batch * questions
    rate = None if step_at_peak is None else ratings_per_step / step_at_peak
    needed = None
    if rate is not None:
        per_chip = rate / devices * mfu
        needed = math.ceil(2 * pairs * rules / (per_chip * hours * 3600))
    return JudgePlan(
        task="judge",
        model=model,
        topology=target.name,
        chip=target.chip,
        devices=devices,
        mesh=full.mesh,
        params=full.params,
        seq=seq,
        batch=batch,
        dtype=dtype,
        attention=attention,
        state_bytes_per_device=full.state_bytes,
        bytes_per_device=full.bytes,
        hbm_per_device=target.hbm_per_device,
        fits=full.bytes is not None and full.bytes <= target.hbm_per_device,
        flops_per_device=flops_per_device,
        flops_per_step=flops_per_step,
        model_flops_per_step=batch * seq * _forward_flops_per_token(config, seq)
        + 2.0 * batch * questions * config.hidden_size * config.vocab_size,
        peak_flops_per_device=peak,
        step_seconds_at_peak=step_at_peak,
        compile_seconds=round(seconds, 1),
        prefix_tokens=prefix_tokens,
        question_tokens=question_tokens,
        questions_per_row=questions,
        ratings_per_step=ratings_per_step,
        ratings_per_s_at_peak=rate,
        pairs=pairs,
        rules=rules,
        hours=hours,
        mfu=mfu,
        chips_needed=needed,
        note=full.note or probe_note,
    )


def _compile_judge(
    config, target: Target, *, seq, batch, mesh, dtype, questions, prefix_tokens, attention
) -> _Compiled:
    """Lower and compile the judge's shared-prefix forward for ``config`` on the target."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dynrules.models.answers import ANSWERS, shared_prefix_forward
    from dynrules.models.classifier import COMPUTE_DTYPES
    from dynrules.models.llama import LlamaDecoder
    from dynrules.train import sharding as shd

    device_mesh = shd.make_mesh(mesh, devices=target.devices)
    shards = shd.batch_shards(device_mesh)
    if batch % shards:
        raise DynrulesError(
            f"a batch of {batch} rows does not split over the {shards} batch "
            f"shards of mesh {shd.mesh_description(device_mesh)}; raise --batch "
            "or put devices on tensor (--mesh)"
        )
    compute = COMPUTE_DTYPES[dtype]
    abstract = nnx.eval_shape(
        lambda: LlamaDecoder(
            config,
            rngs=nnx.Rngs(0),
            dtype=compute,
            param_dtype=compute,
            lm_head=True,
            constrain=shd.ActivationSharding(device_mesh),
            attention=attention,
        )
    )
    graphdef, state = nnx.split(abstract)
    params = shd.abstract_params(state, device_mesh)
    rows = shd.batch_sharding(device_mesh, 2)
    span = seq - prefix_tokens  # a row: one conversation, then its questions
    shapes = {
        "prefix_ids": (batch, prefix_tokens),
        "prefix_lengths": (batch,),
        "ids": (batch, span),
        "segments": (batch, span),
        "positions": (batch, span),
        "prefix_of_row": (batch,),
        "answer_at": (batch, questions),
    }
    abstract_batch = {
        key: jax.ShapeDtypeStruct(
            shape, jnp.int32, sharding=shd.batch_sharding(device_mesh, len(shape))
        )
        for key, shape in shapes.items()
    }
    classes = jax.ShapeDtypeStruct(
        (config.vocab_size, ANSWERS), jnp.float32, sharding=shd.replicated(device_mesh)
    )

    def forward(params, batch, classes):
        return shared_prefix_forward(nnx.merge(graphdef, params), batch, classes)

    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
    state_bytes = sum(_shard_bytes(leaf) for leaf in jax.tree.leaves(params))
    mesh_sizes = {name: int(size) for name, size in device_mesh.shape.items()}
    lowered = jax.jit(forward, out_shardings=rows).lower(params, abstract_batch, classes)
    return _compiled(lowered, target, mesh_sizes, count, state_bytes)


def _compiled(
    lowered, target: Target, mesh_sizes: dict, params: int, state_bytes: int
) -> _Compiled:
    """Compile ``lowered``; what it needs per device, or how much the TPU compiler said it would."""
    import jax

    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as exc:
        needed = _bytes_needed(str(exc))
        if not (target.out_of_memory_is_an_error and "RESOURCE_EXHAUSTED" in str(exc)):
            raise DynrulesError(f"compiling for {target.name}: {_first_line(exc)}") from exc
        return _Compiled(
            mesh_sizes, params, state_bytes, needed, None, f"does not fit: {_first_line(exc)}"
        )
    memory = compiled.memory_analysis()
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.generated_code_size_in_bytes
    )
    return _Compiled(mesh_sizes, params, state_bytes, int(total), _flops(compiled), "")


def _forward_flops_per_token(config, seq: int) -> float:
    """Forward FLOPs per token: 2 per matmul weight, and the attention scores and values over
    ``seq`` positions (what :func:`model_flops` counts three times for a training step)."""
    d, f = config.hidden_size, config.intermediate_size
    h, kv, e = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    weights = d * h * e + 2 * d * kv * e + h * e * d + 3 * d * f
    return config.num_hidden_layers * (2.0 * weights + 4.0 * seq * h * e)


def model_flops(config, *, seq: int, batch: int) -> float:
    """Analytic training FLOPs of one step: 3 × (forward matmuls + attention scores), both texts.

    Per token and layer the forward pass multiplies by the Q, K, V, O and three MLP matrices
    (2 FLOPs per weight) and computes QKᵀ and the attention-weighted V over all ``seq``
    positions (4 · seq · heads · head_dim; the causal mask does not skip work in XLA's
    attention); the backward pass costs twice the forward. Recomputation is not counted.
    """
    per_token = _forward_flops_per_token(config, seq) + 2 * config.hidden_size  # + score head
    return 3.0 * per_token * 2 * batch * seq


def _flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


def _shard_bytes(leaf) -> int:
    """Bytes of the largest shard of an abstract array on its sharding."""
    shape = leaf.sharding.shard_shape(leaf.shape)
    return math.prod(shape) * leaf.dtype.itemsize


def _bytes_needed(message: str) -> int | None:
    """The bytes libtpu's out-of-memory message says the program needs (None if it does not)."""
    match = _OUT_OF_HBM.search(message)
    return int(float(match.group(1)) * _UNITS[match.group(2)]) if match else None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# --------------------------------------------------------------------------- output


def _size(count: float | None, unit: str = "B") -> str:
    if count is None:
        return "unknown"
    if unit == "B":
        return f"{count / GIB:.2f} GiB"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if count >= scale:
            return f"{count / scale:.2f} {prefix}{unit}"
    return f"{count:.0f} {unit}"


def render_plan(plan: TrainingPlan | JudgePlan) -> str:
    """The plan as aligned ``name  value`` lines for a terminal."""
    mesh = ",".join(f"{axis}={size}" for axis, size in plan.mesh.items())
    seconds = plan.step_seconds_at_peak
    if isinstance(plan, JudgePlan):
        step = [
            (
                "step",
                f"{plan.batch} rows × {plan.seq} tokens: a conversation of "
                f"{plan.prefix_tokens} and {plan.questions_per_row} questions of "
                f"{plan.question_tokens}; {plan.dtype}, {plan.attention} attention",
            ),
            ("weights", f"{_size(plan.state_bytes_per_device)} per device"),
        ]
    else:
        step = [
            (
                "step",
                f"{plan.batch} pairs × 2 texts × {plan.seq} tokens, {plan.grad_accum} "
                f"micro-batch(es); {plan.dtype} compute, {plan.param_dtype} params, "
                f"remat {plan.remat}, {plan.attention} attention",
            ),
            ("params+optimizer", f"{_size(plan.state_bytes_per_device)} per device"),
        ]
    rows = [
        ("model", f"{plan.model} ({plan.params / 1e9:.2f} B parameters)"),
        ("topology", f"{plan.topology} ({plan.devices} devices, {plan.chip})"),
        ("mesh", mesh),
        *step,
        ("memory", f"{_size(plan.bytes_per_device)} per device of {_size(plan.hbm_per_device)}"),
        ("fits", "yes" if plan.fits else "NO"),
        (
            "FLOPs per step",
            f"{_size(plan.flops_per_step, 'FLOP')} (compiler), "
            f"{_size(plan.model_flops_per_step, 'FLOP')} (model)",
        ),
        (
            "step at peak",
            "unknown (no peak FLOP/s for this chip)"
            if seconds is None
            else f"{seconds:.3g} s ({_size(plan.peak_flops_per_device, 'FLOP/s')} per device)",
        ),
        ("compile", f"{plan.compile_seconds} s"),
    ]
    if isinstance(plan, JudgePlan) and plan.ratings_per_s_at_peak is not None:
        rows.append(("ratings at peak", f"{plan.ratings_per_s_at_peak:,.0f} /s"))
        rows.append(
            (
                "chips needed",
                f"{plan.chips_needed} to rate {plan.pairs:,} pairs × "
                f"{plan.rules} rules × 2 in {plan.hours:g} h at "
                f"{plan.mfu:.0%} MFU",
            )
        )
    if plan.note:
        rows.append(("note", plan.note))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
