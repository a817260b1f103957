"""Reward-model training: data order, sharded train step, checkpoints, metrics, export.

A run directory holds::

    run.json        config, model spec, data fingerprint: what a resume must match
    checkpoints/    Orbax steps (params, optimizer state, step; meta with data position)
    metrics.jsonl   one record per log/eval point, written by process 0
    model/          the final model (safetensors + config.json + tokenizer.json)
    summary.json    final train/eval metrics and truncation counts

Determinism: the data order is a function of (seed, step) only: epoch e is the permutation
``default_rng([seed, e])`` of the training pairs and step s takes the next ``batch_size``
pairs of that endless sequence. So a run resumed from the checkpoint at step s computes the
same steps s+1… as an uninterrupted one and reaches the same parameters.

The train step is one jitted function with explicit in/out shardings and the state donated:
the global batch [grad_accum, pairs, 2, time] is split over ('data', 'fsdp') on the pairs
axis (each pair's chosen and rejected texts stay on one device), and gradient accumulation
is a ``lax.scan`` over micro-batches inside it.

With ``packing`` (the default) a micro-batch's texts are packed into rows instead
(kernels.packing, first-fit decreasing): [grad_accum, rows, width] ids, segment ids and
positions, split over ('data', 'fsdp') on the rows axis, and each pair's chosen and rejected
slot (replicated). The width is the length bucket of the step's longest text, so a step
compiles once per (bucket, row count), as an unpacked step does per bucket; a text's reward
does not depend on what shares its row.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dynrules.errors import DynrulesError
from dynrules.kernels import packing
from dynrules.models import classifier as mdl
from dynrules.models import tokenizer as tok
from dynrules.models.templates import format_text
from dynrules.train import sharding as shd
from dynrules.train.checkpoint import Checkpointer
from dynrules.train.config import TrainConfig, load_config, make_config
from dynrules.train.data import Pair, load_preferences, preferences_fingerprint
from dynrules.train.evaluate import pair_report
from dynrules.train.loop import Every, StepOutput, run_steps
from dynrules.train.objective import bradley_terry, make_optimizer, make_schedule, summarize
from dynrules.train.tokens import SharedTokens

RUN_FILE = "run.json"


@dataclasses.dataclass
class RunResult:
    """What a finished (or already complete) run reports (``dynrules train-rm``).

    ``steps`` trained in all, ``resumed_from`` the checkpoint step this call started from (None:
    from scratch); ``train`` the last logged training metrics (loss, accuracy, pairs/s, …),
    ``eval`` the held-out report (None without held-out pairs), ``truncated`` the texts cut to
    max_length in the ``train`` and ``eval`` sets.
    """

    run_dir: Path
    model_dir: Path
    steps: int
    resumed_from: int | None
    train: dict
    eval: dict | None
    truncated: dict

    def to_json(self) -> dict:
        """The ``dynrules train-rm --json`` object."""
        return {
            "run": str(self.run_dir),
            "model": str(self.model_dir),
            "steps": self.steps,
            "resumed_from": self.resumed_from,
            "train": self.train,
            "eval": self.eval,
            "truncated": self.truncated,
        }


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class TokenizedPairs:
    """The pairs' texts (pair i: text 2i chosen, 2i + 1 rejected), tokenized across processes."""

    texts: SharedTokens
    margins: np.ndarray

    @classmethod
    def build(
        cls, pairs: list[Pair], tokenizer: tok.TextTokenizer, max_length: int, render=format_text
    ) -> TokenizedPairs:
        texts = [text for pair in pairs for text in pair.texts(render)]
        margins = np.array([p.margin for p in pairs], np.float32)
        return cls(SharedTokens(texts, tokenizer, max_length), margins)

    @property
    def truncated(self) -> int:
        return self.texts.truncated

    def __len__(self) -> int:
        return len(self.margins)


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """How packed batches are laid out: at most ``slots`` texts a row, a row count that is a
    multiple of ``multiple`` (the batch shards), and ``local(rows)``, the rows of a batch of
    ``rows`` rows that this process supplies (:meth:`Trainable.row_layout`)."""

    slots: int
    multiple: int = 1
    local: Callable[[int], np.ndarray] = np.arange


class PairBatches:
    """The batch of any step as a pure function of (seed, step) — this process's rows of it.

    The global batch of a step is the same whatever the process count; ``rows`` are the pair
    positions of each micro-batch this process supplies (:meth:`Trainable.local_rows`; default
    all). Its padded width comes from every pair's length, so all processes agree on it. With
    ``packing`` a micro-batch's texts are packed into rows of that width instead; every process
    plans the same rows from the lengths and fills its own (``packing.local``).
    """

    def __init__(
        self,
        tokens: TokenizedPairs,
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
        """Pair indices of the step's global batch."""
        n = len(self.tokens)
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        return np.array([self._epoch(p // n)[p % n] for p in positions])

    def tokens_in(self, step: int) -> int:
        """Real tokens in the step's global batch (chosen and rejected)."""
        return int(self.tokens.texts.lengths[_texts_of(self.indices(step))].sum())

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Arrays shaped [grad_accum, rows, 2, time], lengths and margins: this process's rows
        (packed: :meth:`packed_batch`)."""
        everything = self.indices(step)
        longest = int(self.tokens.texts.lengths[_texts_of(everything)].max())
        width = tok.bucket_for(longest, self.buckets)  # the same on every process
        if self.packing is not None:
            return self.packed_batch(everything, width)
        index = everything.reshape(self.grad_accum, self.micro)[:, self.rows].ravel()
        seqs = self.tokens.texts.ids(_texts_of(index).tolist())
        ids, lengths = tok.pad_batch(seqs, width, len(seqs), self.pad_id)
        rows = len(self.rows)
        return {
            "ids": ids.reshape(self.grad_accum, rows, 2, width),
            "lengths": lengths.reshape(self.grad_accum, rows, 2),
            "margins": self.tokens.margins[index].reshape(self.grad_accum, rows),
        }

    def packed_batch(self, everything: np.ndarray, width: int) -> dict[str, np.ndarray]:
        """Packed rows of the step's pairs ``everything``: [grad_accum, rows, width] ``ids``,
        ``segments`` and ``positions`` (this process's rows), each pair's ``chosen`` and
        ``rejected`` slot (row · slots + segment − 1) and ``margins`` [grad_accum, pairs] (every
        pair), and ``rows``, the global row count: the most any micro-batch needs, rounded up
        to the layout's multiple (spare rows are all padding)."""
        layout = self.packing
        lengths = self.tokens.texts.lengths
        micro_pairs = everything.reshape(self.grad_accum, self.micro)
        plans = [
            packing.pack(lengths[_texts_of(pairs)], width, layout.slots) for pairs in micro_pairs
        ]
        rows = -(-max(plan.rows for plan in plans) // layout.multiple) * layout.multiple
        local = np.asarray(layout.local(rows))
        arrays, slots = [], []
        for pairs, plan in zip(micro_pairs, plans, strict=True):
            mine = np.flatnonzero(np.isin(plan.row, local))
            seqs = self.tokens.texts.ids(_texts_of(pairs)[mine].tolist())
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
            slots.append((plan.row * layout.slots + plan.segment - 1).astype(np.int32))
        slots = np.stack(slots)
        batch = {key: np.stack([a[key] for a in arrays]) for key in arrays[0]}
        return batch | {
            "chosen": slots[:, 0::2],
            "rejected": slots[:, 1::2],
            "margins": self.tokens.margins[micro_pairs],
            "rows": rows,
        }


def _texts_of(pairs: np.ndarray) -> np.ndarray:
    """Text indices of pairs: chosen and rejected of each pair in turn."""
    return np.stack([2 * pairs, 2 * pairs + 1], axis=1).ravel()


PACKED_ROWS = ("ids", "segments", "positions")  # a packed batch's arrays split by row


def split_held_out(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
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

    @classmethod
    def build(cls, spec: mdl.ModelSpec, config: TrainConfig, mesh) -> Trainable:
        """Structure, optimizer and the abstract sharded state for ``spec`` on ``mesh``.

        Nothing is allocated: ``abstract_state`` holds ``ShapeDtypeStruct``s with shardings,
        enough to restore a checkpoint into, or to lower and compile :meth:`train_step`
        ahead of time for a mesh of devices that are not here.
        """
        graphdef, abstract = mdl.abstract_model(
            spec,
            dtype=mdl.COMPUTE_DTYPES[config.dtype],
            param_dtype=mdl.COMPUTE_DTYPES[config.param_dtype],
            remat=config.remat,
            constrain=shd.ActivationSharding(mesh),
            attention=config.attention,
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
        slots = min(tok.ROW_SEGMENTS, 2 * (config.batch_size // config.grad_accum))
        return cls(graphdef, tx, schedule, mesh, shardings, abstract_state, config.packing, slots)

    def initial_state(self, host_params: dict) -> dict:
        """Params placed shard by shard from host arrays or lazy checkpoint views; optimizer
        state created sharded."""
        params = shd.place(host_params, self.abstract_state["params"])
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings["step"])
        return {"params": params, "opt_state": opt_state, "step": step}

    def batch_shardings(self) -> dict:
        pairs = shd.LOGICAL_AXIS_RULES["batch"]
        spec = jax.sharding.PartitionSpec
        named = jax.sharding.NamedSharding
        if self.packed:  # rows split over the batch shards; the pairs' slots everywhere
            rows, everywhere = named(self.mesh, spec(None, pairs, None)), shd.replicated(self.mesh)
            return {
                "ids": rows,
                "segments": rows,
                "positions": rows,
                "chosen": everywhere,
                "rejected": everywhere,
                "margins": everywhere,
            }
        return {
            "ids": named(self.mesh, spec(None, pairs, None, None)),
            "lengths": named(self.mesh, spec(None, pairs, None)),
            "margins": named(self.mesh, spec(None, pairs)),
        }

    def local_rows(self, micro: int) -> np.ndarray:
        """Pair positions of a ``micro``-pair micro-batch that this process supplies."""
        return shd.local_rows(self.batch_shardings()["margins"], (1, micro), dim=1)

    def row_layout(self) -> RowLayout:
        """The packed rows' layout for :class:`PairBatches` on this mesh."""
        rows_sharding = self.batch_shardings()["ids"]
        return RowLayout(
            self.slots,
            shd.batch_shards(self.mesh),
            lambda rows: shd.local_rows(rows_sharding, (1, rows, 1), dim=1),
        )

    def global_batch(
        self, batch: dict[str, np.ndarray], micro: int | None = None
    ) -> dict[str, jax.Array]:
        """This process's rows (:meth:`local_rows`) → global arrays of ``micro`` pairs a
        micro-batch (default: the rows are all of them, as on one process). A packed batch
        names its global row count (``rows``); its slots and margins are whole everywhere."""
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
        micro = batch["margins"].shape[1] if micro is None else micro
        return {k: shd.global_batch(v, sharding[k], micro, batch_dim=1) for k, v in batch.items()}

    def micro_loss(self, config: TrainConfig):
        """loss(params, micro-batch) → (mean Bradley–Terry loss, metric sums)."""
        graphdef, slots = self.graphdef, self.slots

        def rewards_packed(params, micro):
            logits = mdl.apply_packed(
                graphdef, params, micro["ids"], micro["segments"], micro["positions"], slots
            )
            rewards = logits[..., 0].reshape(-1)  # slot (row, s) at row · slots + s
            return rewards[micro["chosen"]], rewards[micro["rejected"]]

        def rewards_unpacked(params, micro):
            pairs, _, width = micro["ids"].shape
            rewards = mdl.apply(
                graphdef,
                params,
                micro["ids"].reshape(pairs * 2, width),
                micro["lengths"].reshape(pairs * 2),
            )[:, 0].reshape(pairs, 2)
            return rewards[:, 0], rewards[:, 1]

        rewards_of = rewards_packed if self.packed else rewards_unpacked

        def loss(params, micro):
            chosen, rejected = rewards_of(params, micro)
            return bradley_terry(
                chosen,
                rejected,
                micro["margins"],
                margin_scale=config.margin_scale,
                label_confidence=config.label_confidence,
                center_coef=config.center_coef,
            )

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
    run_dir: str | Path, config_file: str | Path | None = None, overrides=()
) -> TrainConfig:
    """The CLI's config: the run's saved config when resuming, then the file, then overrides."""
    saved = _read_run(Path(run_dir))
    return load_config(config_file, overrides, base=saved["config"] if saved else None)


def _check_resume(
    saved: dict, config: TrainConfig, spec: mdl.ModelSpec, data_hash: str, run_dir: Path
):
    if saved["model"] != spec.to_dict():
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
    from dynrules.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class _RewardRun:
    """Everything set up for a run: what the loop and the finish phase work on."""

    run_dir: Path
    config: TrainConfig
    spec: mdl.ModelSpec
    data_hash: str
    trainable: Trainable
    checkpointer: Checkpointer
    state: dict
    resumed_from: int | None
    backbone: mdl.Pretrained  # tokenizer, chat template and text rendering
    train_tokens: TokenizedPairs
    held_out: list[Pair]
    is_writer: bool

    def record(self, split: str, step: int, values: dict) -> None:
        """One line of metrics.jsonl (process 0 only)."""
        if self.is_writer:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"split": split, "step": step, **values}) + "\n")

    def meta(self, step: int) -> dict:
        return _meta(step, self.config, self.spec, self.data_hash)


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
    run = _setup(pairs, Path(out_dir), config)
    evaluator = _Evaluator(run)
    train_metrics = _loop(run, evaluator, progress=progress)
    return _finish(run, evaluator, train_metrics)


def _setup(pairs, run_dir: Path, config: TrainConfig | dict | None) -> _RewardRun:
    """Config, data, model, mesh and state — restored from the last checkpoint when resuming."""
    saved = _read_run(run_dir)
    if config is None:
        config = make_config(saved["config"]) if saved else TrainConfig()
    elif isinstance(config, dict):
        config = make_config(config)
    shd.join_job(config.distributed)

    pairs = (
        pairs
        if isinstance(pairs, list) and pairs and isinstance(pairs[0], Pair)
        else load_preferences(pairs)
    )
    data_hash = preferences_fingerprint(pairs)
    loaded = mdl.pretrained(
        config.backbone,
        config.model,
        num_outputs=1,
        pooling=config.pooling,
        max_length=config.max_length,
        seed=config.seed,
        param_dtype=config.param_dtype,
    )
    spec = loaded.spec
    if saved is not None:
        _check_resume(saved, config, spec, data_hash, run_dir)
    shd.barrier("dynrules-run-read")  # every process has read the run before process 0 writes

    if config.eval_data:
        train_pairs, held_out = pairs, load_preferences(config.eval_data)
    else:
        train_pairs, held_out = split_held_out(pairs, config.eval_fraction, config.seed)

    mesh = shd.make_mesh(config.mesh)
    micro = config.batch_size // config.grad_accum
    shards = shd.batch_shards(mesh)
    if micro % shards:
        raise DynrulesError(
            f"config: batch_size/grad_accum = {micro} pairs must be a multiple of the "
            f"{shards} batch shards of mesh {shd.mesh_description(mesh)}"
        )
    trainable = Trainable.build(spec, config, mesh)
    checkpointer = Checkpointer(
        run_dir / "checkpoints", every=config.checkpoint_every, keep=config.keep_checkpoints
    )
    is_writer = shd.is_writer()
    if saved is None and is_writer:
        _write_json(
            run_dir / RUN_FILE,
            {
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
    train_tokens = TokenizedPairs.build(
        train_pairs, loaded.tokenizer, spec.max_length, loaded.render
    )
    return _RewardRun(
        run_dir,
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
    """Held-out pairwise accuracy and loss with the current parameters (None without held-out)."""

    def __init__(self, run: _RewardRun):
        from dynrules.train.scoring import Scorer

        self.run = run
        micro = run.config.batch_size // run.config.grad_accum
        self.scorer = Scorer(
            run.trainable.graphdef,
            run.state["params"],
            run.backbone.tokenizer,
            run.trainable.mesh,
            max_length=run.spec.max_length,
            batch_size=max(micro * 2, 16),
            packing=run.config.packing,
        )
        render = run.backbone.render
        self.texts = [text for pair in run.held_out for text in pair.texts(render)]

    def __call__(self, step: int, params) -> dict | None:
        if not self.run.held_out:
            return None
        self.scorer.params = params
        self.scorer.truncated = 0
        rewards = self.scorer.rewards(self.texts)
        report = dataclasses.asdict(pair_report(self.run.held_out, rewards[0::2], rewards[1::2]))
        report["loss"] = float(np.logaddexp(0.0, -(rewards[0::2] - rewards[1::2])).mean())
        report["truncated"] = self.scorer.truncated
        self.run.record("eval", step, report)
        return report


def _loop(run: _RewardRun, evaluate: _Evaluator, *, progress: bool) -> dict:
    """Steps from the resumed position to ``config.steps``; returns the last logged train metrics."""
    config, trainable = run.config, run.trainable
    start = int(run.resumed_from or 0)
    if start >= config.steps:
        return {}
    micro = config.batch_size // config.grad_accum
    batches = PairBatches(
        run.train_tokens,
        seed=config.seed,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        max_length=run.spec.max_length,
        pad_id=run.backbone.tokenizer.pad_id,
        rows=trainable.local_rows(micro),
        packing=trainable.row_layout() if trainable.packed else None,
    )
    window = {"sums": [], "tokens": 0, "clock": time.perf_counter()}
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
            summarize(totals)
            | {
                "grad_norm": totals["grad_norm"] / len(sums),
                "learning_rate": float(trainable.schedule(out.step - 1)),
                "tokens_per_s": window["tokens"] / elapsed,
                "pairs_per_s": len(sums) * config.batch_size / elapsed,
            }
        )
        run.record("train", out.step, logged)
        window.update(sums=[], tokens=0, clock=time.perf_counter())
        return {"loss": f"{logged['loss']:.4f}", "acc": f"{logged['accuracy']:.3f}"}

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
        desc="train-rm",
        progress=progress and run.is_writer,
    )
    run.checkpointer.save(
        config.steps,
        run.state,
        run.meta(config.steps),
        force=config.steps not in run.checkpointer.all_steps(),
    )
    return dict(logged)


def _finish(run: _RewardRun, evaluate: _Evaluator, train_metrics: dict) -> RunResult:
    """The last checkpoint written, held-out evaluation, the exported model and summary.json."""
    run.checkpointer.wait()
    run.checkpointer.close()
    step = max(int(run.resumed_from or 0), run.config.steps)
    eval_metrics = evaluate(step, run.state["params"])
    model_dir = run.run_dir / "model"
    params = shd.gather(run.state["params"])  # collective: every process takes part
    if run.is_writer:
        mdl.export_model(params, run.spec, run.backbone.tokenizer, model_dir, run.backbone.chat)
    truncated = {
        "train": run.train_tokens.truncated,
        "eval": eval_metrics["truncated"] if eval_metrics else 0,
    }
    result = RunResult(
        run.run_dir, model_dir, step, run.resumed_from, train_metrics, eval_metrics, truncated
    )
    if run.is_writer:
        _write_json(
            run.run_dir / "summary.json",
            {
                "steps": step,
                "resumed_from": run.resumed_from,
                "train": train_metrics,
                "eval": eval_metrics,
                "truncated": truncated,
                "mesh": shd.mesh_description(run.trainable.mesh),
            },
        )
    return result


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
