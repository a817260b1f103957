"""One trainer, pluggable tasks: data order, sharded train step, checkpoints, metrics, export.

A task is what is trained: the reward model (:class:`RewardModelTask`: Bradley–Terry on
preference pairs, ``dynrules train-rm``) or the rule adapter (train.adapter: the oracle's top-k
rules of a rating store, ``dynrules train-adapter``). A task supplies its training examples, its
held-out evaluation and its objective (train.objective: loss and metric sums from the model's
outputs); everything else is shared — setup, the loop (train.loop), checkpoints, resume,
evaluation, packing, gradient accumulation, several processes and export — so every task
honours every TrainConfig key, or refuses one it cannot (:meth:`Task.validate`).

A run directory holds::

    run.json        task, config, model spec, data fingerprint: what a resume must match
    checkpoints/    Orbax steps (params, optimizer state, step; meta with data position)
    metrics.jsonl   one record per log/eval point, written by process 0
    tensorboard/    the same records as TensorBoard scalars (train.metrics)
    model/          the final model (safetensors + config.json + tokenizer.json)
    summary.json    final train/eval metrics and truncation counts

Determinism: the data order is a function of (seed, step) only: epoch e is the permutation
``default_rng([seed, e])`` of the training examples and step s takes the next ``batch_size``
examples of that endless sequence. So a run resumed from the checkpoint at step s computes the
same steps s+1… as an uninterrupted one and reaches the same parameters.

The train step is one jitted function with explicit in/out shardings and the state donated:
the global batch [grad_accum, examples, texts, time] (a reward model's example is a pair: its
chosen and rejected texts; an adapter's is one text) is split over ('data', 'fsdp') on the
examples axis (an example's texts stay on one device), and gradient accumulation is a
``lax.scan`` over micro-batches inside it.

With ``packing`` (the default) a micro-batch's texts are packed into rows instead
(kernels.packing, first-fit decreasing): [grad_accum, rows, width] ids, segment ids and
positions, split over ('data', 'fsdp') on the rows axis, and each example's text slots
(replicated). The width is the length bucket of the step's longest text, so a step compiles
once per (bucket, row count), as an unpacked step does per bucket; a text's output does not
depend on what shares its row.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dynrules.atomic import atomic_path
from dynrules.errors import DynrulesError
from dynrules.kernels import packing
from dynrules.models import classifier as mdl
from dynrules.models import tokenizer as tok
from dynrules.settings import Tree, load
from dynrules.train import sharding as shd
from dynrules.train.checkpoint import Checkpointer
from dynrules.train.config import TrainConfig, make_config
from dynrules.train.data import Pair, keeps_margin, load_preferences, preferences_fingerprint
from dynrules.train.evaluate import pair_report, section_mean
from dynrules.train.loop import Every, StepOutput, run_steps
from dynrules.train.metrics import MetricsLog
from dynrules.train.objective import BradleyTerry, Objective, make_optimizer, make_schedule
from dynrules.train.tokens import SharedTokens

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
REWARD_MODEL = "reward-model"  # run.json's task; a run saved before tasks existed is this one


@dataclasses.dataclass
class RunResult:
    """What a finished (or already complete) run reports (``dynrules train-rm``; adapter.json).

    ``steps`` trained in all, ``resumed_from`` the checkpoint step this call started from (None:
    from scratch); ``train`` the last logged training metrics (loss, accuracy, pairs/s, …; an
    earlier call's when no step was left), ``eval`` the held-out report (None without held-out
    pairs), ``truncated`` the texts cut to max_length in the ``train`` and ``eval`` sets;
    ``config`` the run's config (the saved one when the call passed None); ``exported_step``
    the step whose parameters ``model_dir`` holds (``steps`` unless ``export=best``).
    """

    run_dir: Path
    model_dir: Path
    steps: int
    resumed_from: int | None
    train: dict
    eval: dict | None
    truncated: dict
    config: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    exported_step: int | None = None

    def to_json(self) -> dict:
        """The ``dynrules train-rm --json`` object."""
        return {
            "run": str(self.run_dir),
            "model": str(self.model_dir),
            "steps": self.steps,
            "exported_step": self.exported_step,
            "resumed_from": self.resumed_from,
            "train": self.train,
            "eval": self.eval,
            "truncated": self.truncated,
        }


# --------------------------------------------------------------------------- tasks


@dataclasses.dataclass
class Examples:
    """A task's training examples: ``texts_per_example`` texts each, in order, and their labels
    (arrays with one row per example, named as the objective's ``label_dims``)."""

    texts: list[str]
    labels: dict[str, np.ndarray]


@dataclasses.dataclass
class HeldOut:
    """Held-out texts, the report that their model outputs [texts, outputs] make, and the
    report's score (higher is better: what ``export=best`` picks by)."""

    texts: list[str]
    report: Callable[[np.ndarray], dict]
    score: Callable[[dict], float]


class Task(Protocol):
    """What the trainer trains: data, objective and evaluation of one kind of model."""

    name: str  # run.json's "task" (a run resumes only as the same task); the progress bar's label
    num_outputs: int  # the head's outputs
    chat: bool  # a decoder reads the texts through its chat template (when it has one)

    @property
    def objective(self) -> Objective:  # read-only here: a task may hold a narrower objective
        ...

    def validate(self, config: TrainConfig) -> None:
        """Raise DynrulesError for a config key this task cannot honour."""
        ...

    def fingerprint(self) -> str:
        """A hash of the task's data: a run resumes only on the same data."""
        ...

    def split(self, config: TrainConfig, render) -> tuple[Examples, HeldOut | None]:
        """Training examples and the held-out evaluation (None: nothing held out); ``render``
        is the backbone's (prompt, response) → text."""
        ...


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class TokenizedExamples:
    """Training examples' texts, tokenized across processes (example i: texts per·i … per·i +
    per − 1, per = ``texts_per_example``), and their labels."""

    texts: SharedTokens
    labels: dict[str, np.ndarray]
    texts_per_example: int

    @property
    def truncated(self) -> int:
        return self.texts.truncated

    def __len__(self) -> int:
        return len(self.texts) // self.texts_per_example

    def texts_of(self, examples: np.ndarray) -> np.ndarray:
        """Text indices of examples: each example's texts in turn."""
        per = self.texts_per_example
        return (per * np.asarray(examples)[:, None] + np.arange(per)).ravel()

    @classmethod
    def build(
        cls,
        examples: Examples,
        tokenizer: tok.TextTokenizer,
        max_length: int,
        texts_per_example: int,
    ) -> TokenizedExamples:
        """``examples`` tokenized (reward-model pairs: ``pair_examples(pairs, render)``, 2)."""
        return cls(
            SharedTokens(examples.texts, tokenizer, max_length), examples.labels, texts_per_example
        )


def pair_examples(pairs: list[Pair], render) -> Examples:
    """Each pair's chosen and rejected texts, labelled with its rule margin."""
    texts = [text for pair in pairs for text in pair.texts(render)]
    return Examples(texts, {"margins": np.array([p.margin for p in pairs], np.float32)})


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """How packed batches are laid out: at most ``slots`` texts a row, a row count that is a
    multiple of ``multiple`` (the batch shards), and ``local(rows)``, the rows of a batch of
    ``rows`` rows that this process supplies (:meth:`Trainable.row_layout`)."""

    slots: int
    multiple: int = 1
    local: Callable[[int], np.ndarray] = np.arange


class ExampleBatches:
    """The batch of any step as a pure function of (seed, step) — this process's rows of it.

    The global batch of a step is the same whatever the process count; ``rows`` are the example
    positions of each micro-batch this process supplies (:meth:`Trainable.local_rows`; default
    all). Its padded width comes from every example's length, so all processes agree on it.
    With ``packing`` a micro-batch's texts are packed into rows of that width instead; every
    process plans the same rows from the lengths and fills its own (``packing.local``).
    """

    def __init__(
        self,
        tokens: TokenizedExamples,
        *,
        seed: int,
        batch_size: int,
        grad_accum: int,
        max_length: int,
        pad_id: int,
        rows: np.ndarray | None = None,
        packing: RowLayout | None = None,
    ):
        self.tokens, self.seed = tokens, seed
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.micro = batch_size // grad_accum
        self.rows = np.arange(self.micro) if rows is None else np.asarray(rows)
        self.packing = packing
        self.buckets = tok.length_buckets(max_length)
        self.pad_id = pad_id
        self._epochs: dict[int, np.ndarray] = {}

    def _epoch(self, epoch: int) -> np.ndarray:
        if epoch not in self._epochs:
            self._epochs = {
                epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.tokens))
            }
        return self._epochs[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Example indices of the step's global batch."""
        n = len(self.tokens)
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return np.array([self._epoch(p // n)[p % n] for p in positions])

    def tokens_in(self, step: int) -> int:
        """Real tokens in the step's global batch (every text of every example)."""
        return int(self.tokens.texts.lengths[self.tokens.texts_of(self.indices(step))].sum())

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Arrays shaped [grad_accum, rows, texts, time], lengths and the labels [grad_accum,
        rows, …]: this process's rows (packed: :meth:`packed_batch`)."""
        everything = self.indices(step)
        texts_of = self.tokens.texts_of
        longest = int(self.tokens.texts.lengths[texts_of(everything)].max())
        width = tok.bucket_for(longest, self.buckets)  # the same on every process
        if self.packing is not None:
            return self.packed_batch(everything, width)
        index = everything.reshape(self.grad_accum, self.micro)[:, self.rows].ravel()
        seqs = self.tokens.texts.ids(texts_of(index).tolist())
        ids, lengths = tok.pad_batch(seqs, width, len(seqs), self.pad_id)
        shape = (self.grad_accum, len(self.rows), self.tokens.texts_per_example)
        labels = {
            key: values[index].reshape(*shape[:2], *values.shape[1:])
            for key, values in self.tokens.labels.items()
        }
        return {"ids": ids.reshape(*shape, width), "lengths": lengths.reshape(shape)} | labels

    def packed_batch(self, everything: np.ndarray, width: int) -> dict[str, np.ndarray]:
        """Packed rows of the step's examples ``everything``: [grad_accum, rows, width] ``ids``,
        ``segments`` and ``positions`` (this process's rows), each example's text ``slots``
        (row · slots + segment − 1) [grad_accum, examples, texts] and labels [grad_accum,
        examples, …] (every example), and ``rows``, the global row count: the most any
        micro-batch needs, rounded up to the layout's multiple (spare rows are all padding)."""
        layout = self.packing
        assert layout is not None, "packed_batch needs the packing layout"
        lengths = self.tokens.texts.lengths
        texts_of = self.tokens.texts_of
        micro_examples = everything.reshape(self.grad_accum, self.micro)
        plans = [
            packing.pack(lengths[texts_of(examples)], width, layout.slots)
            for examples in micro_examples
        ]
        rows = -(-max(plan.rows for plan in plans) // layout.multiple) * layout.multiple
        local = np.asarray(layout.local(rows))
        arrays, slot_rows = [], []
        for examples, plan in zip(micro_examples, plans, strict=True):
            mine = np.flatnonzero(np.isin(plan.row, local))
            seqs = self.tokens.texts.ids(texts_of(examples)[mine].tolist())
            arrays.append(
                tok.pack_batch(
                    seqs,
                    np.searchsorted(local, plan.row[mine]),
                    plan.offset[mine],
                    plan.segment[mine],
                    (len(local), width),
                    self.pad_id,
                )
            )
            slot_rows.append((plan.row * layout.slots + plan.segment - 1).astype(np.int32))
        batch = {key: np.stack([a[key] for a in arrays]) for key in arrays[0]}
        labels = {key: values[micro_examples] for key, values in self.tokens.labels.items()}
        slots = np.stack(slot_rows).reshape(self.grad_accum, self.micro, -1)
        return batch | {"slots": slots} | labels | {"rows": rows}


PACKED_ROWS = ("ids", "segments", "positions")  # a packed batch's arrays split by row


def split_held_out(pairs: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded random ``fraction`` of the pairs, at least one left to train."""
    count = min(int(round(len(pairs) * fraction)), len(pairs) - 1)
    if count <= 0:
        return pairs, []
    order = np.random.default_rng([seed, 1_000_003]).permutation(len(pairs))
    held = set(order[:count].tolist())
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)]


# --------------------------------------------------------------------------- state and step


@dataclasses.dataclass
class Trainable:
    """Everything needed to run steps on one mesh: model structure, optimizer, layouts."""

    graphdef: object
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: jax.sharding.Mesh
    state_shardings: dict
    abstract_state: dict
    packed: bool = False  # batches of packed rows (config.packing)
    slots: int = 1  # texts a packed row holds at most
    objective: Objective = dataclasses.field(default_factory=BradleyTerry)

    @classmethod
    def build(
        cls,
        spec: mdl.ModelSpec,
        config: TrainConfig,
        mesh,
        objective: Objective | None = None,
        *,
        unroll_layers: bool | None = None,
    ) -> Trainable:
        """Structure, optimizer and the abstract sharded state for ``spec`` on ``mesh``, with
        ``objective``'s loss (default: the reward model's Bradley–Terry). ``unroll_layers``
        (models.layers; None: on a mesh of CPUs, where a loop stacking the layers' saved
        activations costs more than the longer compile of straight-line layers).

        Nothing is allocated: ``abstract_state`` holds ``ShapeDtypeStruct``s with shardings,
        enough to restore a checkpoint into, or to lower and compile :meth:`train_step`
        ahead of time for a mesh of devices that are not here.
        """
        objective = objective or BradleyTerry()
        if unroll_layers is None:
            unroll_layers = mesh.devices.flat[0].platform == "cpu"
        graphdef, abstract = mdl.abstract_model(
            spec,
            dtype=mdl.COMPUTE_DTYPES[config.dtype],
            param_dtype=mdl.COMPUTE_DTYPES[config.param_dtype],
            remat=config.remat,
            constrain=shd.ActivationSharding(mesh),
            attention=config.attention,
            frozen_layers=config.frozen_layers,
            unroll_layers=unroll_layers,
        )
        abstract_params = shd.abstract_params(abstract, mesh)
        param_shardings = jax.tree.map(lambda a: a.sharding, abstract_params)
        schedule = make_schedule(
            learning_rate=config.learning_rate, steps=config.steps, warmup_ratio=config.warmup_ratio
        )
        tx = make_optimizer(
            schedule,
            weight_decay=config.weight_decay,
            clip_norm=config.clip_norm,
            head_scale=config.head_learning_rate / config.learning_rate
            if config.head_learning_rate
            else 1.0,
            frozen_layers=config.frozen_layers,
        )
        abstract_opt = jax.eval_shape(tx.init, abstract_params)
        replicated = shd.replicated(mesh)
        opt_shardings = optax.tree_map_params(
            tx,
            lambda _, s: s,
            abstract_opt,
            param_shardings,
            transform_non_params=lambda _: replicated,
        )
        shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated}
        abstract_state = {
            "params": abstract_params,
            "opt_state": jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                abstract_opt,
                opt_shardings,
            ),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        }
        micro = config.batch_size // config.grad_accum
        slots = min(tok.ROW_SEGMENTS, objective.texts_per_example * micro)
        return cls(
            graphdef,
            tx,
            schedule,
            mesh,
            shardings,
            abstract_state,
            config.packing,
            slots,
            objective,
        )

    def initial_state(self, host_params: dict) -> dict:
        """Params placed shard by shard from host arrays or lazy checkpoint views; optimizer
        state created sharded."""
        params = shd.place(host_params, self.abstract_state["params"])
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings["step"])
        return {"params": params, "opt_state": opt_state, "step": step}

    def batch_shardings(self) -> dict:
        label_dims = self.objective.label_dims
        if self.packed:  # rows split over the batch shards; slots and labels everywhere
            rows, everywhere = shd.batch_sharding(self.mesh, 3, 1), shd.replicated(self.mesh)
            shardings = {"ids": rows, "segments": rows, "positions": rows, "slots": everywhere}
            return shardings | {key: everywhere for key in label_dims}
        return {
            "ids": shd.batch_sharding(self.mesh, 4, 1),
            "lengths": shd.batch_sharding(self.mesh, 3, 1),
        } | {key: shd.batch_sharding(self.mesh, 2 + dims, 1) for key, dims in label_dims.items()}

    def local_rows(self, micro: int) -> np.ndarray:
        """Example positions of a ``micro``-example micro-batch that this process supplies."""
        return shd.local_rows(shd.batch_sharding(self.mesh, 2, 1), (1, micro), dim=1)

    def row_layout(self) -> RowLayout:
        """The packed rows' layout for :class:`ExampleBatches` on this mesh."""
        rows_sharding = self.batch_shardings()["ids"]
        return RowLayout(
            self.slots,
            shd.batch_shards(self.mesh),
            lambda rows: shd.local_rows(rows_sharding, (1, rows, 1), dim=1),
        )

    def global_batch(
        self, batch: dict[str, np.ndarray], micro: int | None = None
    ) -> dict[str, jax.Array]:
        """This process's rows (:meth:`local_rows`) → global arrays of ``micro`` examples a
        micro-batch (default: the rows are all of them, as on one process). A packed batch
        names its global row count (``rows``); its slots and labels are whole everywhere."""
        sharding = self.batch_shardings()
        if self.packed:
            rows = int(batch["rows"])
            return {
                k: shd.global_batch(
                    v, sharding[k], rows if k in PACKED_ROWS else v.shape[1], batch_dim=1
                )
                for k, v in batch.items()
                if k != "rows"
            }
        micro = batch["ids"].shape[1] if micro is None else micro
        return {k: shd.global_batch(v, sharding[k], micro, batch_dim=1) for k, v in batch.items()}

    def micro_loss(self, config: TrainConfig):
        """loss(params, micro-batch) → (the objective's mean loss, metric sums)."""
        graphdef, slots, objective = self.graphdef, self.slots, self.objective

        def outputs_packed(params, micro):
            logits = mdl.apply_packed(
                graphdef, params, micro["ids"], micro["segments"], micro["positions"], slots
            )
            # Slot (row, s) is at row · slots + s.
            by_output = jnp.moveaxis(logits, -1, 0).reshape(logits.shape[-1], -1)
            return by_output[:, micro["slots"]]

        def outputs_unpacked(params, micro):
            examples, texts, width = micro["ids"].shape
            logits = mdl.apply(
                graphdef,
                params,
                micro["ids"].reshape(examples * texts, width),
                micro["lengths"].reshape(examples * texts),
            )
            return jnp.moveaxis(logits, -1, 0).reshape(-1, examples, texts)

        outputs_of = outputs_packed if self.packed else outputs_unpacked

        # Outputs first, [outputs, examples, texts]: a reward model reads its rewards as one
        # [examples, texts] slice, the graph its step always had, so its updates stay bit-exact.
        def loss(params, micro):
            labels = {key: micro[key] for key in objective.label_dims}
            return objective.loss(outputs_of(params, micro), labels, config)

        return loss

    def train_step(self, config: TrainConfig):
        """jit(step)(state, batch) → (state, metric sums); the state argument is donated."""
        tx = self.tx
        micro_loss = self.micro_loss(config)

        def step(state, batch):
            params = state["params"]

            def accumulate(total, micro):
                (_, sums), grads = jax.value_and_grad(micro_loss, has_aux=True)(params, micro)
                return jax.tree.map(jnp.add, total, grads), sums

            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, sums = jax.lax.scan(accumulate, zeros, batch)
            grads = jax.tree.map(lambda g: g / batch["ids"].shape[0], grads)
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            sums = jax.tree.map(lambda x: x.sum(), sums)
            sums["grad_norm"] = optax.tree.norm(grads)
            new_state = {
                "params": optax.apply_updates(params, updates),
                "opt_state": opt_state,
                "step": state["step"] + 1,
            }
            return new_state, sums

        return jax.jit(
            step,
            in_shardings=(self.state_shardings, self.batch_shardings()),
            out_shardings=(self.state_shardings, shd.replicated(self.mesh)),
            donate_argnums=0,
        )


# --------------------------------------------------------------------------- run directory


def _read_run(run_dir: Path) -> dict | None:
    path = run_dir / RUN_FILE
    if not path.is_file():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise DynrulesError(
                f"{run_dir} exists and is not a dynrules run; refusing to write into it"
            )
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DynrulesError(f"cannot read {path}: {exc}") from exc


def resolve_config(
    run_dir: str | Path, tree: Tree, config_file: str | Path | None = None, overrides=()
) -> dict[str, Any]:
    """A training command's sections (``tree``: the command's, e.g. ``TRAIN_RM.tree``): the
    ``train`` section starts from the run's saved config when resuming, then the file, then
    overrides (the flags last, as ``(key, value, origin)`` items)."""
    saved = _read_run(Path(run_dir))
    return load(
        tree,
        path=config_file,
        overrides=overrides,
        base={"train": saved["config"]} if saved else None,
    )


def _check_resume(
    saved: dict,
    config: TrainConfig,
    spec: mdl.ModelSpec,
    data_hash: str,
    run_dir: Path,
    task: str,
):
    saved_task = saved.get("task", REWARD_MODEL)
    if saved_task != task:
        raise DynrulesError(f"{run_dir} is a {saved_task} run, not a {task} run; use a new --out")
    # Read back through ModelSpec: a spec saved before a key was added takes its old default.
    if mdl.ModelSpec.from_dict(saved["model"]).to_dict() != spec.to_dict():
        raise DynrulesError(
            f"{run_dir}: its checkpoints are from another model ({saved.get('checkpoint')})"
        )
    # Keys added since the run was saved take their defaults, which keep the old behaviour.
    before = make_config(saved["config"]).to_dict()
    changed = sorted(
        key
        for key, value in config.to_dict().items()
        if key not in TrainConfig.RESUMABLE_CHANGES and before[key] != value
    )
    if changed:
        details = ", ".join(f"{k}: {before[k]!r} → {getattr(config, k)!r}" for k in changed)
        raise DynrulesError(
            f"{run_dir}: cannot resume with a different config ({details}); use a new --out"
        )
    if saved["data"] != data_hash:
        raise DynrulesError(
            f"{run_dir}: cannot resume on different pairs (data fingerprint changed); use a new --out"
        )


def _write_json(path: Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def _last_record(run_dir: Path, split: str, step: int | None = None) -> dict:
    """The last ``split`` record of metrics.jsonl (of ``step``, when given), without its split
    and step ({}: none)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    last: dict = next(
        (
            r
            for r in reversed(records)
            if r["split"] == split and (step is None or r["step"] == step)
        ),
        {},
    )
    return {k: v for k, v in last.items() if k not in ("split", "step")}


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class _Run:
    """Everything set up for a run: what the loop and the finish phase work on."""

    run_dir: Path
    task: Task
    config: TrainConfig
    spec: mdl.ModelSpec
    data_hash: str
    trainable: Trainable
    checkpointer: Checkpointer
    state: dict
    resumed_from: int | None
    backbone: mdl.Pretrained  # tokenizer, chat template and text rendering
    train_tokens: TokenizedExamples
    held_out: HeldOut | None
    is_writer: bool
    metrics: MetricsLog = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.metrics = MetricsLog(
            self.run_dir, is_writer=self.is_writer, resumed_from=self.resumed_from
        )

    def record(self, split: str, step: int, values: dict) -> None:
        """One record of metrics.jsonl and TensorBoard (train.metrics; process 0 only)."""
        self.metrics.record(split, step, values)

    def meta(self, step: int) -> dict:
        return _meta(step, self.config, self.spec, self.data_hash)


def train_task(
    task: Task, out_dir: str | Path, config: TrainConfig | dict | None = None, *, progress=True
) -> RunResult:
    """Train (or resume) ``task`` in the run directory ``out_dir``: setup → loop → finish.

    If ``out_dir`` holds a run of the task already, training resumes from its latest
    checkpoint; the config must then match except for the keys in
    ``TrainConfig.RESUMABLE_CHANGES`` (and ``config=None`` reuses the saved one).
    ``progress`` shows a tqdm progress bar (process 0 only).
    """
    run = _setup(task, Path(out_dir), config)
    evaluator = _Evaluator(run)
    train_metrics = _loop(run, evaluator, progress=progress)
    return _finish(run, evaluator, train_metrics)


def _setup(task: Task, run_dir: Path, config: TrainConfig | dict | None) -> _Run:
    """Config, data, model, mesh and state — restored from the last checkpoint when resuming."""
    saved = _read_run(run_dir)
    if config is None:
        config = make_config(saved["config"]) if saved else TrainConfig()
    elif isinstance(config, dict):
        config = make_config(config)
    task.validate(config)
    shd.join_job(config.distributed)

    data_hash = task.fingerprint()
    loaded = mdl.pretrained(
        config.backbone,
        config.model,
        num_outputs=task.num_outputs,
        pooling=config.pooling,
        max_length=config.max_length,
        seed=config.seed,
        param_dtype=config.param_dtype,
        chat=task.chat,
        truncation=config.truncation,
    )
    spec = loaded.spec
    if saved is not None:
        _check_resume(saved, config, spec, data_hash, run_dir, task.name)
    shd.barrier("dynrules-run-read")  # every process has read the run before process 0 writes

    examples, held_out = task.split(config, loaded.render)

    mesh = shd.make_mesh(config.mesh)
    micro = config.batch_size // config.grad_accum
    shards = shd.batch_shards(mesh)
    if micro % shards:
        raise DynrulesError(
            f"config: batch_size/grad_accum = {micro} pairs must be a multiple of the "
            f"{shards} batch shards of mesh {shd.mesh_description(mesh)}"
        )
    trainable = Trainable.build(spec, config, mesh, task.objective)
    checkpointer = Checkpointer(
        run_dir / "checkpoints", every=config.checkpoint_every, keep=config.keep_checkpoints
    )
    is_writer = shd.is_writer()
    if saved is None and is_writer:
        _write_json(
            run_dir / RUN_FILE,
            {
                "task": task.name,
                "config": config.to_dict(),
                "model": spec.to_dict(),
                "data": data_hash,
                "checkpoint": str(loaded.source),
            },
        )

    resumed_from = checkpointer.latest_step()
    if shd.agree(-1 if resumed_from is None else resumed_from, "the last checkpoint") < 0:
        resumed_from = None
    if resumed_from is None:
        state = trainable.initial_state(loaded.params)
    else:
        meta = checkpointer.read_meta(resumed_from)
        if meta.get("model") != spec.to_dict():
            raise DynrulesError(
                f"{checkpointer.directory}: checkpoint {resumed_from} is from another model"
            )
        state, _ = checkpointer.restore(trainable.abstract_state, resumed_from)
        if resumed_from > config.steps:
            raise DynrulesError(
                f"{run_dir}: already at step {resumed_from}, beyond steps={config.steps}"
            )
    train_tokens = TokenizedExamples.build(
        examples, loaded.tokenizer, spec.max_length, task.objective.texts_per_example
    )
    return _Run(
        run_dir,
        task,
        config,
        spec,
        data_hash,
        trainable,
        checkpointer,
        state,
        resumed_from,
        loaded,
        train_tokens,
        held_out,
        is_writer,
    )


class _Evaluator:
    """The held-out report with the current parameters (None without held-out examples)."""

    def __init__(self, run: _Run):
        from dynrules.train.scoring import Scorer

        self.run = run
        self.best = _BestModel(run) if run.config.export == "best" else None
        micro = run.config.batch_size // run.config.grad_accum
        self.scorer = Scorer(
            run.trainable.graphdef,
            run.state["params"],
            run.backbone.tokenizer,
            run.trainable.mesh,
            max_length=run.spec.max_length,
            batch_size=max(micro * run.task.objective.texts_per_example, 16),
            packing=run.config.packing,
        )

    def __call__(self, step: int, params) -> dict | None:
        held_out = self.run.held_out
        if held_out is None:
            return None
        self.scorer.params = params
        self.scorer.truncated = 0
        report = held_out.report(self.scorer(held_out.texts))
        report["truncated"] = self.scorer.truncated
        self.run.record("eval", step, report)
        if self.best is not None:
            self.best.offer(step, held_out.score(report), params)
        return report


class _BestModel:
    """``export=best``: the best-scoring evaluation so far, in ``best/``: its exported model
    (``best/model``) and ``best/best.json`` (step and score), replaced together atomically.

    A resumed run keeps it if it is from a step at or before the checkpoint resumed from; a
    later one is dropped, since those steps run again.
    """

    def __init__(self, run: _Run):
        self.run = run
        self.directory = run.run_dir / "best"
        self.model_dir = self.directory / "model"
        self.step, self.score = -1, -np.inf
        record = self.directory / "best.json"
        if record.exists():
            saved = json.loads(record.read_text(encoding="utf-8"))
            if saved["step"] <= int(run.resumed_from or 0):
                self.step, self.score = saved["step"], saved["score"]

    def offer(self, step: int, score: float, params) -> None:
        """Export ``params`` if they beat the best so far (a tie keeps the earlier step)."""
        if not score > self.score:
            return
        self.step, self.score = step, score
        host_params = shd.gather(params)  # collective: every process takes part
        if self.run.is_writer:
            with atomic_path(self.directory) as tmp:
                _export(self.run, host_params, tmp / "model")
                _write_json(tmp / "best.json", {"step": step, "score": score})


def _loop(run: _Run, evaluate: _Evaluator, *, progress: bool) -> dict:
    """Steps from the resumed position to ``config.steps``; returns the last logged train metrics
    (those of an earlier call when no step is left)."""
    config, trainable, objective = run.config, run.trainable, run.task.objective
    start = int(run.resumed_from or 0)
    if start >= config.steps:
        return _last_record(run.run_dir, "train")
    micro = config.batch_size // config.grad_accum
    batches = ExampleBatches(
        run.train_tokens,
        seed=config.seed,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        max_length=run.spec.max_length,
        pad_id=run.backbone.tokenizer.pad_id,
        rows=trainable.local_rows(micro),
        packing=trainable.row_layout() if trainable.packed else None,
    )
    window: dict[str, Any] = {"sums": [], "tokens": 0, "clock": time.perf_counter()}
    logged: dict = {}

    def checkpoint(out: StepOutput) -> None:
        run.checkpointer.save(out.step, out.state, run.meta(out.step))

    def accumulate(out: StepOutput) -> None:
        window["sums"].append(out.metrics)
        window["tokens"] += batches.tokens_in(out.step - 1)

    def log(out: StepOutput) -> dict:
        sums = window["sums"]
        totals = jax.tree.map(lambda *xs: float(np.sum(xs)), *jax.device_get(sums))
        elapsed = time.perf_counter() - window["clock"]
        logged.clear()
        logged.update(
            objective.summarize(totals)
            | {
                "grad_norm": totals["grad_norm"] / len(sums),
                "learning_rate": float(trainable.schedule(out.step - 1)),
                "tokens_per_s": window["tokens"] / elapsed,
                "pairs_per_s": len(sums) * config.batch_size / elapsed,
            }
        )
        run.record("train", out.step, logged)
        window.update(sums=[], tokens=0, clock=time.perf_counter())
        return {key: f"{logged[key]:.4f}" for key in ("loss", objective.headline)}

    hooks = (
        Every(1, checkpoint),
        Every(1, accumulate),
        Every(config.log_every, log),
        Every(config.eval_every, lambda out: evaluate(out.step, out.state["params"]), at_end=False),
    )
    run.state = run_steps(
        run.state,
        trainable.train_step(config),
        batches.batch,
        lambda batch: trainable.global_batch(batch, micro),
        start=start,
        stop=config.steps,
        hooks=hooks,
        desc=run.task.name,
        progress=progress and run.is_writer,
    )
    run.checkpointer.save(
        config.steps,
        run.state,
        run.meta(config.steps),
        force=config.steps not in run.checkpointer.all_steps(),
    )
    return dict(logged)


def _finish(run: _Run, evaluate: _Evaluator, train_metrics: dict) -> RunResult:
    """The last checkpoint written, held-out evaluation, the exported model and summary.json."""
    run.checkpointer.wait()
    run.checkpointer.close()
    step = max(int(run.resumed_from or 0), run.config.steps)
    eval_metrics = None
    if run.held_out is not None and int(run.resumed_from or 0) >= run.config.steps:
        # A finished run called again (a pipeline rerun): its final evaluation is on record in
        # metrics.jsonl; evaluating again would append a duplicate record. Every process reads
        # the same run directory (as run.json), so all take the same branch.
        eval_metrics = _last_record(run.run_dir, "eval", step) or None
    if eval_metrics is None:
        eval_metrics = evaluate(step, run.state["params"])
    run.metrics.close()
    model_dir = run.run_dir / "model"
    best = evaluate.best
    if best is not None and best.step not in (-1, step):
        exported_step = best.step
        if run.is_writer:
            with atomic_path(model_dir) as tmp:
                shutil.copytree(best.model_dir, tmp)
    else:
        exported_step = step
        params = shd.gather(run.state["params"])  # collective: every process takes part
        if run.is_writer:
            _export(run, params, model_dir)
    truncated = {
        "train": run.train_tokens.truncated,
        "eval": eval_metrics["truncated"] if eval_metrics else 0,
    }
    result = RunResult(
        run.run_dir,
        model_dir,
        step,
        run.resumed_from,
        train_metrics,
        eval_metrics,
        truncated,
        run.config,
        exported_step,
    )
    if run.is_writer:
        _write_json(
            run.run_dir / "summary.json",
            {
                "steps": step,
                "exported_step": exported_step,
                "resumed_from": run.resumed_from,
                "train": train_metrics,
                "eval": eval_metrics,
                "truncated": truncated,
                "mesh": shd.mesh_description(run.trainable.mesh),
            },
        )
    return result


def _export(run: _Run, host_params: dict, model_dir: Path) -> None:
    chat = run.backbone.chat if run.task.chat else None
    mdl.export_model(host_params, run.spec, run.backbone.tokenizer, model_dir, chat)


def _meta(step: int, config: TrainConfig, spec: mdl.ModelSpec, data_hash: str) -> dict:
    """The JSON part of a checkpoint: step and data position, and what must match on restore."""
    return {
        "step": step,
        "pairs_seen": step
        * config.batch_size,  # data position: next pair = this index of the order
        "seed": config.seed,
        "model": spec.to_dict(),
        "data": data_hash,
    }


# --------------------------------------------------------------------------- the reward model


class RewardModelTask:
    """The reward model: Bradley–Terry on preference pairs, held-out pairwise accuracy.

    Held out: the pairs file ``eval_data``, or a seeded ``eval_fraction`` of the pairs.
    """

    name = REWARD_MODEL
    num_outputs = 1
    chat = True

    def __init__(self, pairs: str | Path | list[dict] | list[Pair]):
        self.objective = BradleyTerry()
        self.pairs = load_preferences(pairs)  # Pairs pass through as they are

    def validate(self, config: TrainConfig) -> None:
        """Every key applies to a reward model."""

    def fingerprint(self) -> str:
        return preferences_fingerprint(self.pairs)

    def split(self, config: TrainConfig, render) -> tuple[Examples, HeldOut | None]:
        if config.eval_data:
            train, held = self.pairs, load_preferences(config.eval_data)
        else:
            train, held = split_held_out(self.pairs, config.eval_fraction, config.seed)
        if config.min_margin:
            kept = [p for p in train if keeps_margin(p.margin, config.min_margin)]
            if not kept:
                raise DynrulesError(
                    f"config: min_margin={config.min_margin} leaves none of the "
                    f"{len(train)} training pairs"
                )
            log.info(
                "min_margin=%g keeps %d of %d training pairs",
                config.min_margin,
                len(kept),
                len(train),
            )
            train = kept
        return pair_examples(train, render), _pair_evaluation(held, render) if held else None


def _pair_evaluation(pairs: list[Pair], render) -> HeldOut:
    """Pairwise accuracy (ties wrong) per subset and section, length baseline, mean loss."""

    def report(outputs: np.ndarray) -> dict:
        chosen, rejected = outputs[0::2, 0], outputs[1::2, 0]
        values = dataclasses.asdict(pair_report(pairs, chosen, rejected))
        values["loss"] = float(np.logaddexp(0.0, -(chosen - rejected)).mean())
        return values

    def score(report: dict) -> float:
        """The section mean; the accuracy when the pairs have no sections."""
        mean = section_mean({k: v["accuracy"] for k, v in report["sections"].items()})
        return report["accuracy"] if mean is None else mean

    return HeldOut(pair_examples(pairs, render).texts, report, score)


def train_reward_model(
    pairs: str | Path | list[dict] | list[Pair],
    out_dir: str | Path,
    config: TrainConfig | dict | None = None,
    *,
    progress: bool = True,
) -> RunResult:
    """Train (or resume) a Bradley–Terry reward model on preference pairs.

    Args:
        pairs: a pairs file (JSONL/JSONL.gz/Parquet; see train.data) or the records/Pairs.
        out_dir: the run directory. If it holds a run already, training resumes from its
            latest checkpoint; the config must then match except for the keys in
            ``TrainConfig.RESUMABLE_CHANGES`` (and ``config=None`` reuses the saved one).
        config: a TrainConfig, a dict of config keys, or None (defaults / saved config).
        progress: show a tqdm progress bar (process 0 only).

    Returns:
        RunResult with the exported model directory (``out_dir/model``) and final metrics.
    """
    return train_task(RewardModelTask(pairs), out_dir, config, progress=progress)
