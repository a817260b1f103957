"""The rule adapter: predict each pair's critical rules from its text, so the judge rates k rules.

A multi-label classifier over the pool — the reward model's backbone with one logit per rule
(models.classifier, ``num_outputs = R``) — reads one text per pair, :func:`adapter_text`
(prompt, then response A, then response B; cut to length per the run's ``truncation``: left
by default, so the responses survive), and is trained with binary cross-entropy on the
oracle's selected set: the top-k rules of a selection policy over the fully rated pair.

It is a task of the shared trainer (:class:`AdapterTask`, train.trainer), so it honours the
TrainConfig keys the reward model does — checkpoints and resume, held-out evaluation, packing,
gradient accumulation, meshes and several processes — and refuses the reward model's objective
keys. The run directory is a trainer run plus ``adapter.json`` (:class:`AdapterSummary`),
written once training is complete.

At inference the adapter's k highest logits are the pair's plan (rule ids per pair); the judge
then rates only those rules (``dynrules rate --plan``), saving R − k judge calls per pair.

Metrics are per row, never flattened over all R cells (a flattened accuracy is trivially high
when k ≪ R): precision@k = |P ∩ O| / |P|, recall@k = |P ∩ O| / |O| for predicted set P and oracle
set O, and label agreement — does sign(Σ_{i∈P} d_i), using the full ratings, equal the oracle
label sign(Σ_{i∈O} d_i)?
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from dynrules.atomic import atomic_path
from dynrules.engine.select import SelectionConfig, select_chunk
from dynrules.engine.store import RatingStore
from dynrules.errors import DynrulesError, InputError
from dynrules.train import sharding as shd
from dynrules.train.config import TrainConfig, make_config
from dynrules.train.objective import MultiLabelBCE
from dynrules.train.trainer import Examples, HeldOut, split_held_out, train_task

ADAPTER_FILE = "adapter.json"


@dataclasses.dataclass(frozen=True)
class AdapterSummary:
    """A trained adapter, as ``train_adapter`` returns it and adapter.json records it."""

    pool: dict  # name, content hash and rule ids of the pool it predicts over
    selection: dict  # the oracle policy whose top-k sets were the targets
    steps: int
    config: dict
    train_pairs: int  # the store's pairs it was trained on
    final_loss: float  # the last logged training loss (mean over its log window)
    truncated: int  # training texts cut to max_length
    seconds: float  # this call's wall time
    # Added with the shared trainer; an adapter.json written before reads as the defaults.
    held_out_pairs: int = 0  # the store's pairs kept out for evaluation (eval_fraction)
    eval: dict | None = None  # the held-out report (AdapterTask)
    resumed_from: int | None = None  # the checkpoint step this call started from


@dataclasses.dataclass(frozen=True)
class PlanSummary:
    """What ``dynrules apply-adapter`` planned: judge calls with the plan and without it."""

    pairs: int
    k: int
    judge_calls: int
    judge_calls_full_pool: int
    judge_calls_saved: float


def adapter_text(prompt: str, response_a: str, response_b: str) -> str:
    """The adapter's input for one pair: the conversation, then both responses, labelled."""
    return (
        f"{prompt.strip()}\n\nResponse A: {response_a.strip()}\n\nResponse B: {response_b.strip()}"
    )


def oracle_selection(store: RatingStore, selection: SelectionConfig) -> np.ndarray:
    """The selection policy's rule indices [N, k] over a fully rated store."""
    selection = selection.resolved(store)
    if selection.policy != "adaptive":
        raise DynrulesError("the adapter learns an adaptive selection; use policy 'adaptive'")
    return np.concatenate(
        [select_chunk(chunk, selection, store.scale)[0] for chunk in store.iter_chunks()]
    )


def multi_hot(index: np.ndarray, n_rules: int) -> np.ndarray:
    targets = np.zeros((index.shape[0], n_rules), np.float32)
    np.put_along_axis(targets, index.astype(np.int64), 1.0, axis=1)
    return targets


def top_k_rules(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits per row, largest first; equal logits: lower index first."""
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def store_texts(store: RatingStore) -> tuple[list[str], list[str]]:
    pairs = store.read_pairs(columns=["id", "prompt", "response_a", "response_b"]).to_pydict()
    texts = [
        adapter_text(p, a, b)
        for p, a, b in zip(pairs["prompt"], pairs["response_a"], pairs["response_b"], strict=True)
    ]
    return pairs["id"], texts


# The TrainConfig keys of the reward model's objective, which the adapter cannot honour.
BRADLEY_TERRY_KEYS = ("margin_scale", "label_confidence", "min_margin", "center_coef")


class AdapterTask:
    """The rule adapter as a task of the shared trainer (train.trainer).

    Examples are the store's pairs, one :func:`adapter_text` each, with the oracle's multi-hot
    top-k set as targets (train.objective.MultiLabelBCE). Held out: a seeded ``eval_fraction``
    of the store's pairs, or every pair of the rating store ``eval_data`` (rated on the same
    pool); the held-out report is :func:`adapter_metrics` plus the BCE loss. The reward model's
    objective keys (``margin_scale``, ``label_confidence``, ``min_margin``, ``center_coef``) are
    refused.
    """

    name = "rule-adapter"
    chat = False  # the adapter reads its own pair text, never a chat template

    def __init__(self, store: RatingStore, selection: SelectionConfig):
        self.store = store
        self.selection = selection.resolved(store)
        self.num_outputs = store.n_rules
        self.objective = MultiLabelBCE(self.selection.k)
        self.pairs = _RatedPairs.read(store, self.selection)

    def validate(self, config: TrainConfig) -> None:
        reward_keys = [k for k in BRADLEY_TERRY_KEYS if getattr(config, k)]
        if reward_keys:
            raise DynrulesError(
                "config: the rule adapter (binary cross-entropy) cannot honour keys of the reward "
                f"model's Bradley–Terry loss; set to 0: {', '.join(reward_keys)}"
            )

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        record = {
            "pool": self.store.manifest["pool"],
            "selection": _selection_record(self.selection),
        }
        digest.update(json.dumps(record, sort_keys=True).encode())
        for text in self.pairs.texts:
            digest.update(text.encode("utf-8", "surrogatepass") + b"\x00")
        digest.update(np.ascontiguousarray(self.pairs.oracle, np.int64).tobytes())
        return digest.hexdigest()[:16]

    def held_out_index(self, config: TrainConfig) -> list[int]:
        """The store's pairs kept out of training (none when ``eval_data`` is another store)."""
        if config.eval_data:
            return []
        return split_held_out(list(range(self.store.n_pairs)), config.eval_fraction, config.seed)[1]

    def split(self, config: TrainConfig, render) -> tuple[Examples, HeldOut | None]:
        held_index = self.held_out_index(config)
        train = self.pairs.subset(np.setdiff1d(np.arange(self.store.n_pairs), held_index))
        if config.eval_data:
            held = _RatedPairs.read(_eval_store(config.eval_data, self.store), self.selection)
        else:
            held = self.pairs.subset(held_index)
        examples = Examples(train.texts, {"targets": multi_hot(train.oracle, self.num_outputs)})
        return examples, held.evaluation(self.num_outputs) if len(held.texts) else None


@dataclasses.dataclass
class _RatedPairs:
    """Pairs of a fully rated store: adapter texts, oracle rule indices [n, k], full ratings."""

    texts: list[str]
    oracle: np.ndarray
    scores_a: np.ndarray
    scores_b: np.ndarray
    scale: float

    @classmethod
    def read(cls, store: RatingStore, selection: SelectionConfig) -> _RatedPairs:
        ratings = store.read()
        oracle = oracle_selection(store, selection)
        return cls(store_texts(store)[1], oracle, ratings.scores_a, ratings.scores_b, store.scale)

    def subset(self, index) -> _RatedPairs:
        return _RatedPairs(
            [self.texts[i] for i in index],
            self.oracle[index],
            self.scores_a[index],
            self.scores_b[index],
            self.scale,
        )

    def evaluation(self, n_rules: int) -> HeldOut:
        """BCE loss, precision@k, recall@k and label agreement of the adapter's top-k sets."""

        def report(logits: np.ndarray) -> dict:
            bce = np.logaddexp(0.0, logits) - logits * multi_hot(self.oracle, n_rules)
            predicted = top_k_rules(logits, self.oracle.shape[1])
            metrics = adapter_metrics(
                predicted, self.oracle, self.scores_a, self.scores_b, self.scale
            )
            return {
                "pairs": len(self.texts),
                "loss": float(np.mean(bce)),
                **{k: metrics[k] for k in ("precision_at_k", "recall_at_k", "label_agreement")},
            }

        return HeldOut(self.texts, report, lambda values: values["label_agreement"])


def _eval_store(path, store: RatingStore) -> RatingStore:
    """The held-out rating store ``eval_data``: it must be rated on the training store's pool."""
    try:
        held = RatingStore.open(path)
    except InputError as exc:
        raise DynrulesError(
            f"config: the rule adapter's eval_data is a rating store: {exc}"
        ) from None
    if held.manifest["pool"] != store.manifest["pool"]:
        raise DynrulesError(
            f"config: eval_data {path} is rated on another rule pool than {store.path}"
        )
    return held


def train_adapter(
    store,
    out_dir,
    config: TrainConfig | dict | None = None,
    *,
    selection: SelectionConfig | None = None,
    progress: bool = True,
) -> AdapterSummary:
    """Train (or resume) the adapter on a fully rated store in the run directory ``out_dir``.

    The shared trainer (train.trainer) runs it: checkpoints, resume (running again with the
    same ``out_dir`` and config continues from the last checkpoint; ``config=None`` reuses the
    run's saved config), held-out evaluation,
    packing, gradient accumulation, several processes. Writes out_dir/model, and
    out_dir/adapter.json once training is complete. ``selection`` is the oracle policy whose
    top-k sets are the targets (default: adaptive, k=5).
    """
    started = time.perf_counter()
    store = store if isinstance(store, RatingStore) else RatingStore.open(store)
    task = AdapterTask(store, selection or SelectionConfig())
    # None: the run's saved config when resuming, else the defaults (train_task resolves it).
    result = train_task(task, out_dir, config, progress=progress)
    config = result.config
    held_out = len(task.held_out_index(config))
    info = AdapterSummary(
        pool=store.manifest["pool"],
        selection=_selection_record(task.selection),
        steps=result.steps,
        config=config.to_dict(),
        train_pairs=store.n_pairs - held_out,
        final_loss=result.train.get("loss", float("nan")),
        truncated=result.truncated["train"],
        seconds=round(time.perf_counter() - started, 2),
        held_out_pairs=held_out,
        eval=result.eval,
        resumed_from=result.resumed_from,
    )
    if shd.is_writer():
        with atomic_path(Path(out_dir) / ADAPTER_FILE) as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(info), indent=2) + "\n")
    return info


def is_trained(
    run_dir, store: RatingStore, config: TrainConfig | dict, selection: SelectionConfig
) -> bool:
    """Whether ``run_dir`` already holds this adapter (same pool, pairs, selection and config),
    so that a rerun of a killed pipeline does not train it again."""
    path = Path(run_dir) / ADAPTER_FILE
    if not path.is_file():
        return False
    info = read_adapter(run_dir)
    config = make_config(config) if isinstance(config, dict) else config
    return (
        info.pool == store.manifest["pool"]
        and info.train_pairs + info.held_out_pairs == store.n_pairs
        and info.config == config.to_dict()
        and info.selection == _selection_record(selection.resolved(store))
    )


def _selection_record(selection: SelectionConfig) -> dict:
    """The oracle selection as adapter.json records it."""
    return {
        "policy": selection.policy,
        "k": selection.k,
        "criterion": selection.criterion,
        "alpha": selection.alpha,
    }


def read_adapter(run_dir) -> AdapterSummary:
    path = Path(run_dir) / ADAPTER_FILE
    if not path.is_file():
        raise DynrulesError(
            f"{run_dir}: not a rule-adapter run (no {ADAPTER_FILE}); train one with "
            f"`dynrules train-adapter STORE --out {run_dir}`"
        )
    try:
        return AdapterSummary(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise DynrulesError(f"{path}: not a readable adapter summary ({exc})") from None


def predict_rules(run_dir, texts: list[str], k: int, *, batch_size: int = 64) -> np.ndarray:
    """The adapter's top-k rule indices [n, k] for adapter texts."""
    from dynrules.train.scoring import Scorer

    info = read_adapter(run_dir)
    n_rules = len(info.pool["ids"])
    if not 1 <= k <= n_rules:
        raise DynrulesError(f"k must be between 1 and R = {n_rules}, got {k}")
    scorer = Scorer.from_model_dir(Path(run_dir) / "model", batch_size=batch_size)
    return top_k_rules(scorer(texts), k)


def write_plan(run_dir, pairs: list[dict], k: int, out) -> PlanSummary:
    """A rating plan: one JSONL record {"id", "rule_ids"} per pair, for `dynrules rate --plan`."""
    info = read_adapter(run_dir)
    ids = np.asarray(info.pool["ids"], dtype=object)
    index = predict_rules(
        run_dir, [adapter_text(p["prompt"], p["response_a"], p["response_b"]) for p in pairs], k
    )
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for pair, row in zip(pairs, index, strict=True):
            handle.write(json.dumps({"id": pair["id"], "rule_ids": ids[row].tolist()}) + "\n")
    n_rules = len(ids)
    return PlanSummary(
        pairs=len(pairs),
        k=k,
        judge_calls=len(pairs) * k,
        judge_calls_full_pool=len(pairs) * n_rules,
        judge_calls_saved=1.0 - k / n_rules,
    )


def adapter_metrics(
    predicted: np.ndarray,
    oracle: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    scale: float = 1.0,
) -> dict:
    """Per-row precision@k, recall@k and label agreement of predicted vs oracle rule sets.

    ``scores_a``/``scores_b`` are the full ratings [n, R] (stored units, times ``scale``).
    """
    from dynrules.kernels.selection import labels_of_margins, margins_of_rows

    n = predicted.shape[0]
    hits = np.array(
        [len(set(p) & set(o)) for p, o in zip(predicted.tolist(), oracle.tolist(), strict=True)]
    )
    labels = []
    for index in (predicted, oracle):
        margin, label = np.empty(n), np.empty(n, np.int8)
        margins_of_rows(
            scores_a, scores_b, np.ascontiguousarray(index, dtype=np.int64), scale, margin
        )
        labels_of_margins(margin, label)
        labels.append(label)
    return {
        "precision_at_k": float(np.mean(hits / predicted.shape[1])),
        "recall_at_k": float(np.mean(hits / oracle.shape[1])),
        "label_agreement": float(np.mean(labels[0] == labels[1])),
        "labels": labels[0],
        "oracle_labels": labels[1],
    }
