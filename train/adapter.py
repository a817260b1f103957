"""The rule adapter: predict each pair's critical rules from its text, so the judge rates k rules.

A multi-label classifier over the pool — the reward model's encoder with one logit per rule
(train.model.EncoderClassifier, ``num_outputs = R``) — reads one text per pair,
:func:`adapter_text` (prompt, then response A, then response B; truncated from the start so the
responses survive), and is trained with binary cross-entropy on the oracle's selected set: the
top-k rules of a selection policy over the fully rated pair.

At inference the adapter's k highest logits are the pair's plan (rule ids per pair); the judge
then rates only those rules (``dynrules rate --plan``), saving R − k judge calls per pair.

Metrics are per row, never flattened over all R cells (a flattened accuracy is trivially high
when k ≪ R): precision@k = |P ∩ O| / |P|, recall@k = |P ∩ O| / |O| for predicted set P and oracle
set O, and label agreement — does sign(Σ_{i∈P} d_i), using the full ratings, equal the oracle
label sign(Σ_{i∈O} d_i)?
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dynrules.atomic import atomic_path
from dynrules.engine.select import SelectionConfig, select_chunk
from dynrules.engine.store import RatingStore
from dynrules.errors import DynrulesError
from dynrules.models import classifier as mdl
from dynrules.models import tokenizer as tok
from dynrules.train import sharding as shd
from dynrules.train.config import TrainConfig, make_config
from dynrules.train.loop import Every, run_steps
from dynrules.train.trainer import Trainable

ADAPTER_FILE = "adapter.json"


@dataclasses.dataclass(frozen=True)
class AdapterSummary:
    """A trained adapter, as ``train_adapter`` returns it and adapter.json records it."""

    pool: dict  # name, content hash and rule ids of the pool it predicts over
    selection: dict  # the oracle policy whose top-k sets were the targets
    steps: int
    config: dict
    train_pairs: int
    final_loss: float
    truncated: int
    seconds: float


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


def train_adapter(
    store,
    out_dir,
    config: TrainConfig | dict | None = None,
    *,
    selection: SelectionConfig | None = None,
    progress: bool = True,
) -> dict:
    """Train the adapter on a fully rated store; writes out_dir/model and out_dir/adapter.json.

    ``selection`` is the oracle policy whose top-k sets are the targets (default: adaptive, k=5).
    """
    store = store if isinstance(store, RatingStore) else RatingStore.open(store)
    config = make_config(config) if isinstance(config, dict) or config is None else config
    selection = (selection or SelectionConfig()).resolved(store)
    started = time.perf_counter()
    targets = multi_hot(oracle_selection(store, selection), store.n_rules)
    _, texts = store_texts(store)

    # The adapter reads its own pair text (adapter_text), never a chat template.
    loaded = mdl.pretrained(
        config.backbone,
        config.model,
        num_outputs=store.n_rules,
        pooling=config.pooling,
        max_length=config.max_length,
        seed=config.seed,
        param_dtype=config.param_dtype,
        chat=False,
    )
    spec, max_length = loaded.spec, loaded.spec.max_length
    mesh = shd.make_mesh(config.mesh)
    if config.batch_size % shd.batch_shards(mesh):
        raise DynrulesError(
            f"config: batch_size {config.batch_size} must be a multiple of the mesh's batch shards"
        )
    trainable = Trainable.build(spec, config, mesh)
    state = trainable.initial_state(loaded.params)
    step_fn = _train_step(trainable)
    tokens = loaded.tokenizer.encode(texts, max_length)
    buckets = tok.length_buckets(max_length)
    rows_sharding, lengths_sharding = shd.batch_sharding(mesh, 2), shd.batch_sharding(mesh, 1)
    rng = np.random.default_rng(config.seed)
    order = np.concatenate(
        [
            rng.permutation(len(texts))
            for _ in range(-(-config.steps * config.batch_size // len(texts)))
        ]
    )
    pad_id = loaded.tokenizer.pad_id

    def batch_at(step: int) -> dict:
        chosen = order[step * config.batch_size : (step + 1) * config.batch_size]
        width = tok.bucket_for(max(len(tokens.ids[i]) for i in chosen), buckets)
        ids, lengths = tok.pad_batch(
            [tokens.ids[i] for i in chosen], width, config.batch_size, pad_id
        )
        return {"ids": ids, "lengths": lengths, "targets": targets[chosen]}

    rows = shd.local_rows(lengths_sharding, (config.batch_size,))

    def feed(batch: dict) -> dict:
        return {
            "ids": shd.global_batch(batch["ids"][rows], rows_sharding, config.batch_size),
            "lengths": shd.global_batch(
                batch["lengths"][rows], lengths_sharding, config.batch_size
            ),
            "targets": shd.global_batch(batch["targets"][rows], rows_sharding, config.batch_size),
        }

    losses = []
    state = run_steps(
        state,
        step_fn,
        batch_at,
        feed,
        start=0,
        stop=config.steps,
        hooks=(Every(1, lambda out: losses.append(out.metrics)),),
        desc="train-adapter",
        progress=progress,
    )
    final_loss = float(np.mean(jax.device_get(losses[-10:]))) if losses else float("nan")
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        mdl.export_model(shd.gather(state["params"]), spec, loaded.tokenizer, tmp / "model")
        info = AdapterSummary(
            pool=store.manifest["pool"],
            selection=_selection_record(selection),
            steps=config.steps,
            config=config.to_dict(),
            train_pairs=len(texts),
            final_loss=final_loss,
            truncated=tokens.truncated,
            seconds=round(time.perf_counter() - started, 2),
        )
        (tmp / ADAPTER_FILE).write_text(json.dumps(dataclasses.asdict(info), indent=2) + "\n")
    return info


def _train_step(trainable: Trainable):
    graphdef, tx = trainable.graphdef, trainable.tx

    def step(state, batch):
        def loss_fn(params):
            logits = mdl.apply(graphdef, params, batch["ids"], batch["lengths"]).astype(jnp.float32)
            return optax.sigmoid_binary_cross_entropy(logits, batch["targets"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }, loss

    return jax.jit(
        step,
        in_shardings=(trainable.state_shardings, None),
        out_shardings=(trainable.state_shardings, shd.replicated(trainable.mesh)),
        donate_argnums=0,
    )


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
        and info.train_pairs == store.n_pairs
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
    return AdapterSummary(**json.loads(path.read_text()))


def predict_rules(run_dir, texts: list[str], k: int, *, batch_size: int = 64) -> np.ndarray:
    """The adapter's top-k rule indices [n, k] for adapter texts."""
    from dynrules.train.scoring import Scorer

    info = read_adapter(run_dir)
    n_rules = len(info.pool["ids"])
    if not 1 <= k <= n_rules:
        raise DynrulesError(f"k must be between 1 and R = {n_rules}, got {k}")
    scorer = Scorer.from_model_dir(Path(run_dir) / "model", batch_size=batch_size)
    return top_k_rules(scorer(texts), k)


def write_plan(run_dir, pairs: list[dict], k: int, out) -> dict:
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
