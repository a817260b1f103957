"""The main job, `dynrules pipeline`: the whole method on one data set, into a report directory.

    rate (embedded judge by default) → select (policy, k) → ablation against human truth
    → train the rule adapter → train the reward model on rule labels → evaluate on held-out
    pairs → report (report.json, report.md, report.html, PNG plots)

Data: by default the PyRIT safety mix (engine.datasets.safety_mix: real LLM responses with human
harm and refusal scores; harmful requests where the safer response wins and benign requests where
the answer beats a real refusal, split by prompt into train and held-out); or any pairs file,
split by prompt with the same hash. Pairs need a human ``truth`` field for the ablation and the
human-label reference model; without one those parts are skipped and the report says so. Pairs
with ``section``/``subset`` fields are evaluated per section (RewardBench style), and the judge's
labels are compared with ``truth`` per section too.

The reference points of the reward-model evaluation, all on the same held-out pairs against
human preferences: the model trained on rule labels (the method), the same model trained on the
human labels of the same training pairs (the upper reference), and a length-only baseline; per
section, plus the over-refusal rate on the held-out answer-vs-refusal pairs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from dynrules.atomic import atomic_path
from dynrules.engine.judges.config import JudgeConfig
from dynrules.engine.judges.runner import RatingSummary
from dynrules.engine.mi import PolicyLabel
from dynrules.engine.pool import RulePool
from dynrules.engine.select import SelectionConfig
from dynrules.errors import DynrulesError
from dynrules.models.tokenizer import Truncation
from dynrules.report import write_ablation_report, write_pipeline_report
from dynrules.settings import option, section
from dynrules.train.config import Backbone
from dynrules.train.data import keeps_margin
from dynrules.train.evaluate import Evaluation, section_mean

log = logging.getLogger(__name__)


@section
class PipelineConfig:
    """The main job's settings: the ``pipeline`` section of the configuration tree, with the
    ``judge`` and ``selection`` sections it reads (filled from the tree's own sections)."""

    judge: JudgeConfig = option(default_factory=JudgeConfig)
    selection: SelectionConfig = option(default_factory=SelectionConfig)
    ablate_ks: tuple[int, ...] = option((1, 3, 5, 10), "ks compared in the ablation.")
    pool: str = option("default", "Rule pool: 'default' or a file.")
    rm_steps: int = option(60, "Reward-model training steps (each model).")
    adapter_steps: int = option(60, "Rule-adapter training steps.")
    batch_size: int = option(16, "Pairs per training step.")
    max_length: int = option(192, "Tokens per text.")
    truncation: Truncation = option(
        "middle",
        "How the reward models cut a text over max_length: middle keeps its first and last "
        "halves, so a long answer still shows the request and its own opening (chosen on the "
        "validation split: benchmarks/results/rm_recipe.json).",
    )
    learning_rate: float = option(1e-4, "Reward-model learning rate of the backbone.")
    head_learning_rate: float = option(3e-3, "Reward-model learning rate of the reward head.")
    label_confidence: float = option(
        0.75,
        "β of the soft rule labels: a pair with rule margin m "
        "is preferred with probability σ(β·m); 0 = hard labels.",
    )
    rule_margin_keep: Annotated[float, Field(gt=0.0, le=1.0)] = option(
        0.5,
        "Share of the rule-labelled train pairs the rule-label reward model trains on: those "
        "with the largest |margin| (train.min_margin is set to that quantile); the rest agree "
        "with human labels near chance. 1 = all.",
    )
    rm_export: Literal["last", "best"] = option(
        "best",
        "The parameters each reward model keeps: best = those of its validation evaluation "
        "(every eval_every steps) with the highest section mean; last = the final step's. "
        "Without truth there is no validation split: last.",
    )
    validation_fraction: float = option(
        0.15,
        "Share of train prompts kept out of reward-model "
        "training to draw its validation curves (needs truth).",
    )
    eval_every: int = option(10, "Reward-model steps between validation evaluations.")
    adapter_learning_rate: float = option(3e-4, "Rule-adapter learning rate.")
    seed: int = option(0, "Seed of data order, initialisation and sampling.")
    backbone: Backbone = option("encoder", "Backbone of the reward models and the rule adapter.")
    rm_model: str = option(
        "",
        "Their checkpoint: a BERT directory (encoder), a Hugging Face "
        "directory or .gguf (decoder) [default: the bundled one].",
    )
    heldout_fraction: float = option(0.4, "Share of prompts held out when splitting a pairs file.")


def load_data(pairs_path, config: PipelineConfig) -> tuple[list[dict], list[dict], str]:
    """(train, held-out, description): the PyRIT safety mix by default, else a file split by prompt."""
    from dynrules.engine.datasets import prompt_split, safety_mix

    if pairs_path is None:
        return (
            safety_mix("train", config.seed),
            safety_mix("heldout", config.seed),
            "PyRIT scorer-evaluation data (real LLM responses with human harm and refusal "
            "scores): harmful requests where the safer response wins and benign requests where "
            "the answer beats a real refusal, split by prompt",
        )
    from dynrules.engine.pairs import load_pairs

    pairs = load_pairs(pairs_path)
    split = [prompt_split(p["prompt"], config.seed, config.heldout_fraction) for p in pairs]
    train = [p for p, s in zip(pairs, split, strict=True) if s == "train"]
    heldout = [p for p, s in zip(pairs, split, strict=True) if s == "heldout"]
    if not train or not heldout:
        raise DynrulesError(
            f"{pairs_path}: too few distinct prompts to split into train and held-out"
        )
    return (
        train,
        heldout,
        f"{pairs_path}, split by prompt ({len(train)} train / {len(heldout)} held-out pairs)",
    )


def human_pairs(records: list[dict]) -> list[dict]:
    """chosen/rejected by the human ``truth`` (1: A preferred)."""
    out = []
    for r in records:
        a_first = int(r["truth"]) == 1
        out.append(
            {
                "id": r["id"],
                "prompt": r["prompt"],
                "subset": r.get("subset"),
                "section": r.get("section"),
                "chosen": r["response_a"] if a_first else r["response_b"],
                "rejected": r["response_b"] if a_first else r["response_a"],
            }
        )
    return out


class _Stages:
    """Times each stage; the report shows seconds and throughput per stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.items: dict[str, int] = {}

    def run(self, name: str, fn, items: int | None = None):
        log.info("stage %s …", name)
        started = time.perf_counter()
        result = fn()
        self.seconds[name] = round(time.perf_counter() - started, 2)
        if items is not None:
            self.items[name] = items
        return result

    def throughput(self) -> dict[str, float]:
        """Items per second of each timed stage that counts items."""
        return {
            name: round(self.items[name] / s, 2)
            for name, s in self.seconds.items()
            if name in self.items and s > 0
        }


@dataclasses.dataclass(frozen=True)
class DataSummary:
    """The data: its ``source`` in words, pair counts of the two splits, and whether every pair
    has a human ``truth`` (without it the ablation and the human-label model are skipped)."""

    source: str
    train_pairs: int
    heldout_pairs: int
    human_truth: bool


@dataclasses.dataclass(frozen=True)
class JudgeSummary:
    """The judge (``kind`` as configured, ``name`` as it identifies itself) and what rating each
    split did (cells rated now, skipped as already done, failed)."""

    kind: str
    name: str
    rated_train: RatingSummary
    rated_heldout: RatingSummary


@dataclasses.dataclass(frozen=True)
class TrainingLabels:
    """The rule labels of the train pairs: selection ``policy``, ``k`` rules per pair, the
    resolved ``criterion``; ``labelled`` pairs written, ``ties`` (exact zero margins) left out."""

    policy: str
    k: int
    criterion: str | None
    labelled: int
    ties: int


@dataclasses.dataclass(frozen=True)
class PipelineReport:
    """What `dynrules pipeline` found; ``to_json()`` is report.json.

    ``policies`` are the ablation's rows (empty without truth); ``label_agreement`` is the
    judge's selected labels against the truth per split and group ({} without truth);
    ``adapter`` the rule adapter on the held-out pairs (precision and recall at k, label
    agreement with the oracle, the share of judge calls saved); ``reward_model`` the reward
    models on the held-out pairs (accuracies are shares of pairs, ties wrong); ``stages`` each
    stage's wall seconds and ``throughput`` its items (cells, pairs or training examples) per s.
    """

    data: DataSummary
    judge: JudgeSummary
    selection: TrainingLabels
    policies: list[PolicyLabel]
    label_agreement: dict
    adapter: dict
    reward_model: dict
    stages: dict[str, float]
    throughput: dict[str, float]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Job:
    """One pipeline run: its settings, directory, data, pool and stage timer."""

    config: PipelineConfig
    out: Path
    train: list[dict]
    heldout: list[dict]
    source: str
    has_truth: bool
    pool: RulePool
    stages: _Stages

    @classmethod
    def start(cls, out_dir, pairs_path, config: PipelineConfig) -> _Job:
        from dynrules.engine.pool import load_pool

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        train, heldout, source = load_data(pairs_path, config)
        has_truth = all("truth" in r for r in train + heldout)
        return cls(
            config, out, train, heldout, source, has_truth, load_pool(config.pool), _Stages()
        )

    def store(self, split: str) -> Path:
        return self.out / f"store-{split}"

    def splits(self) -> tuple[tuple[str, list[dict]], ...]:
        return ("train", self.train), ("heldout", self.heldout)


def run_pipeline(out_dir, pairs_path=None, config: PipelineConfig | None = None) -> PipelineReport:
    """Run the main job and write its report; each stage's output is kept in out_dir.

    Started again on the same ``out_dir`` after a kill, it keeps what was finished: rating skips
    rated cells, a trained adapter is reused, reward models resume from their checkpoints.
    """
    from dynrules.engine.store import RatingStore

    job = _Job.start(out_dir, pairs_path, config or PipelineConfig())
    config = job.config
    judge = _rate(job)
    stores = {split: RatingStore.open(job.store(split), pool=job.pool) for split, _ in job.splits()}
    selection = config.selection
    labels = _select(job, stores["train"], selection)
    policies = _ablate(job, stores["train"]) if job.has_truth else []
    adapter = _adapter(job, stores, selection)
    reward_model = _reward_models(job)
    report = PipelineReport(
        data=DataSummary(job.source, len(job.train), len(job.heldout), job.has_truth),
        judge=judge,
        selection=labels,
        policies=policies,
        label_agreement=_label_agreement(stores, selection) if job.has_truth else {},
        adapter=adapter,
        reward_model=reward_model,
        stages=job.stages.seconds,
        throughput=job.stages.throughput(),
    )
    write_pipeline_report(report.to_json(), job.out)
    return report


def open_judge(config: JudgeConfig, pool: RulePool):
    """The judge ``config`` describes, over ``pool``; a jax judge with a ``mesh`` is spread over
    the devices by the reward model's sharding rules (train.sharding)."""
    from dynrules.engine.judges import make_judge

    options = config.judge_options()
    if config.kind == "jax" and config.mesh:
        from dynrules.train import sharding as shd

        options["layout"] = shd.MeshLayout(shd.make_mesh(config.mesh))
    return make_judge(config.kind, pool, **options)


def _rate(job: _Job) -> JudgeSummary:
    """Both splits rated into their stores (only the cells not yet rated)."""
    from dynrules.engine.judges.runner import rate_pairs

    rated = {}
    with open_judge(job.config.judge, job.pool) as judge:
        for split, records in job.splits():
            rated[split] = job.stages.run(
                f"rate_{split}",
                lambda r=records, s=split: rate_pairs(r, job.store(s), pool=job.pool, judge=judge),
                items=len(records) * len(job.pool),
            )
    return JudgeSummary(
        job.config.judge.kind, judge.identity["judge"], rated["train"], rated["heldout"]
    )


def _select(job: _Job, store, selection) -> TrainingLabels:
    """The train pairs labelled by the rules into labelled-train.jsonl."""
    from dynrules.engine.select import run_selection

    selected = job.stages.run(
        "select",
        lambda: run_selection(store, selection, job.out / "labelled-train.jsonl", progress=False),
        items=len(job.train),
    )
    return TrainingLabels(
        selection.policy,
        selection.k,
        selection.resolved(store).criterion,
        selected.labelled,
        selected.ties,
    )


def _ablate(job: _Job, store) -> list[PolicyLabel]:
    """The policy ablation on the train store against the truth, reported in ablation/."""
    from dynrules.engine.ablate import ablate

    ablation = job.stages.run(
        "ablate",
        lambda: ablate(
            store,
            "truth",
            job.config.ablate_ks,
            alpha=job.config.selection.alpha,
            seed=job.config.seed,
        ),
        items=len(job.train),
    )
    write_ablation_report(ablation, job.out / "ablation")
    return ablation.rows


def _adapter(job: _Job, stores: dict, selection) -> dict:
    """The rule adapter trained on the train store (unless already trained), applied to the
    held-out store."""
    from dynrules.train import adapter as adp

    config = job.config
    adapter_config = {
        "steps": config.adapter_steps,
        "batch_size": config.batch_size,
        "max_length": config.max_length,
        "learning_rate": config.adapter_learning_rate,
        "seed": config.seed,
        "backbone": config.backbone,
        "model": config.rm_model,
        "eval_fraction": 0.0,  # held-out pairs measure it (apply_adapter); train on every pair
        # A killed pipeline started again resumes the adapter from its last checkpoint.
        "checkpoint_every": max(1, config.adapter_steps // 4),
    }
    if not adp.is_trained(job.out / "adapter", stores["train"], adapter_config, selection):
        job.stages.run(
            "train_adapter",
            lambda: adp.train_adapter(
                stores["train"], job.out / "adapter", adapter_config, selection=selection
            ),
            items=config.adapter_steps * config.batch_size,
        )
    return job.stages.run(
        "apply_adapter",
        lambda: _adapter_report(job.out / "adapter", stores["heldout"], selection, job.has_truth),
        items=len(job.heldout),
    )


def _reward_models(job: _Job) -> dict:
    """The reward model trained on rule labels and, with truth, the one trained on human labels,
    both evaluated on the held-out pairs against human preferences.

    With truth, a validation split of the train prompts is kept out of both models' training;
    their curves on it (human labels) go in the report, which says when each stopped improving.
    """
    from dynrules.train.evaluate import evaluate
    from dynrules.train.trainer import train_reward_model

    config, out, stages = job.config, job.out, job.stages
    with open(out / "labelled-train.jsonl", encoding="utf-8") as handle:
        rule_pairs = [json.loads(line) for line in handle]
    human_train = human_pairs(job.train) if job.has_truth else []
    validation = _validation_prompts(job) if job.has_truth else set()
    rm_config = {
        "steps": config.rm_steps,
        "batch_size": config.batch_size,
        "max_length": config.max_length,
        "truncation": config.truncation,
        "learning_rate": config.learning_rate,
        "head_learning_rate": config.head_learning_rate,
        "label_confidence": config.label_confidence,
        "seed": config.seed,
        "backbone": config.backbone,
        "model": config.rm_model,
        "eval_every": config.eval_every if validation else 0,
        "log_every": max(1, config.eval_every // 2),
        # A killed pipeline started again resumes each reward model from its last checkpoint.
        "checkpoint_every": max(1, config.rm_steps // 4),
        "eval_fraction": 0.0,
        "export": config.rm_export if validation else "last",
    }
    if validation:
        validation_file = out / "validation.jsonl"
        with atomic_path(validation_file) as tmp:
            tmp.write_text(
                "".join(json.dumps(p) + "\n" for p in human_train if p["prompt"] in validation)
            )
        rm_config["eval_data"] = str(validation_file)
    rule_pairs = [p for p in rule_pairs if p["prompt"] not in validation]
    min_margin = _margin_quantile(rule_pairs, 1.0 - config.rule_margin_keep)
    kept = sum(keeps_margin(p["margin"], min_margin) for p in rule_pairs)
    training_items = config.rm_steps * config.batch_size
    stages.run(
        "train_rm_rules",
        lambda: train_reward_model(
            rule_pairs, out / "rm-rules", rm_config | {"min_margin": min_margin}
        ),
        items=training_items,
    )
    share = f"the {kept} of {len(rule_pairs)} " if kept < len(rule_pairs) else f"{kept} "
    cut = f" whose rule margin is at least {min_margin:.2f} either way" if min_margin else ""
    reward_model = {
        "trained_on": f"{share}rule-labelled train pairs{cut}",
        "rule_pairs": len(rule_pairs),
        "min_margin": min_margin,
    }
    if not job.has_truth:
        return reward_model
    heldout_human = human_pairs(job.heldout)
    rules = stages.run(
        "eval_rm_rules", lambda: evaluate(out / "rm-rules", heldout_human), items=len(job.heldout)
    )
    human_train = [p for p in human_train if p["prompt"] not in validation]
    stages.run(
        "train_rm_human",
        lambda: train_reward_model(human_train, out / "rm-human", rm_config),
        items=training_items,
    )
    human = stages.run(
        "eval_rm_human", lambda: evaluate(out / "rm-human", heldout_human), items=len(job.heldout)
    )
    return reward_model | {
        "accuracy": rules.accuracy,
        "length_baseline": rules.length_baseline,
        "human_label_accuracy": human.accuracy,
        "heldout_pairs": rules.pairs,
        "rules": _sectioned(rules),
        "human": _sectioned(human),
        "subset_sections": {r["subset"]: r["section"] for r in job.heldout if r.get("section")},
        "validation_pairs": len(job.train) - len(human_train),
        "curves": {
            name: training_curves(out / run)
            for name, run in (("rules", "rm-rules"), ("human", "rm-human"))
        },
    }


def _margin_quantile(pairs: list[dict], share: float) -> float:
    """The |margin| below which ``share`` of ``pairs`` fall (0.0: keep every pair)."""
    if share <= 0 or not pairs:
        return 0.0
    return float(np.quantile([abs(p["margin"]) for p in pairs], share))


def _validation_prompts(job: _Job) -> set[str]:
    """Train prompts kept out of reward-model training (split independently of held-out)."""
    from dynrules.engine.datasets import prompt_split

    fraction = job.config.validation_fraction
    return {
        r["prompt"]
        for r in job.train
        if prompt_split(r["prompt"], f"validation-{job.config.seed}", fraction) == "heldout"
    }


def training_curves(run_dir: Path) -> dict:
    """A reward-model run's curves from its metrics.jsonl: training loss by step, validation
    accuracy by step and section, ``best_step``: the first step at which the validation
    section mean was highest (the model stopped improving after it), and ``exported_step``:
    the step whose parameters the exported model holds."""
    train, validation = [], []
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record["split"] == "train":
                train.append({"step": record["step"], "loss": record["loss"]})
            else:
                sections = {k: v["accuracy"] for k, v in record["sections"].items() if k != "all"}
                mean = section_mean(sections)
                validation.append(
                    {
                        "step": record["step"],
                        "accuracy": record["accuracy"],
                        "sections": sections,
                        "section_mean": record["accuracy"] if mean is None else mean,
                    }
                )
    # A resumed run logs its replayed steps again: keep each step's last record.
    train = list({r["step"]: r for r in train}.values())
    validation = list({r["step"]: r for r in validation}.values())
    best = max(validation, key=lambda r: r["section_mean"], default=None)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return {
        "train": train,
        "validation": validation,
        "best_step": best["step"] if best else None,
        "exported_step": summary["exported_step"],
    }


def _sectioned(result: Evaluation) -> dict:
    """A held-out evaluation's sections, subsets, section mean and over-refusal rate."""
    from dynrules.engine.datasets import OVER_REFUSAL_SUBSET

    out = {
        "accuracy": result.accuracy,
        "sections": result.sections,
        "subsets": result.subsets,
        "section_mean": section_mean({k: v.accuracy for k, v in result.sections.items()}),
    }
    if OVER_REFUSAL_SUBSET in result.subsets:
        group = result.subsets[OVER_REFUSAL_SUBSET]
        # Ties count as the refusal winning (RewardBench: a tie is wrong).
        out["over_refusal"] = {"pairs": group.pairs, "rate": 1.0 - group.accuracy}
    return out


def _label_agreement(stores: dict, selection) -> dict:
    """The judge's selected labels against the human/source labels, per split, section, subset.

    A tie counts as a disagreement; ``ties`` says how many there were.
    """
    from dynrules.engine.select import select_chunk

    out = {}
    for split, store in stores.items():
        resolved = selection.resolved(store)
        fixed = (
            np.asarray([store.rule_ids.index(r) for r in resolved.rules], np.int64)
            if resolved.policy == "fixed"
            else None
        )
        labels = np.concatenate(
            [select_chunk(c, resolved, store.scale, fixed)[2] for c in store.iter_chunks()]
        )
        agree = labels == np.where(store.read_field("truth").astype(np.int64) == 1, 1, -1)
        groups = {"all": np.ones(len(labels), bool)}
        for field in ("section", "subset"):
            if field in store.pair_columns():
                values = store.read_field(field).astype(str)
                groups |= {f"{field}:{v}": values == v for v in sorted(set(values))}
        out[split] = {
            name: {
                "pairs": int(rows.sum()),
                "agreement": float(agree[rows].mean()),
                "ties": int((labels[rows] == 0).sum()),
            }
            for name, rows in groups.items()
        }
    return out


def _adapter_report(adapter_dir: Path, store, selection, has_truth: bool) -> dict:
    """The adapter against the oracle selection on the held-out store (and both against truth)."""
    from dynrules.engine.mi import label_summary
    from dynrules.kernels.contingency import label_counts
    from dynrules.train import adapter as adp

    _, texts = adp.store_texts(store)
    predicted = adp.predict_rules(adapter_dir, texts, selection.k)
    oracle = adp.oracle_selection(store, selection)
    chunk = store.read()
    metrics = adp.adapter_metrics(predicted, oracle, chunk.scores_a, chunk.scores_b, store.scale)
    report = {key: metrics[key] for key in ("precision_at_k", "recall_at_k", "label_agreement")}
    report["judge_calls_saved"] = 1.0 - selection.k / store.n_rules
    report["heldout_pairs"] = store.n_pairs
    if has_truth:
        truth = store.read_field("truth").astype(np.int64)
        for name, labels in (
            ("adapter_label", metrics["labels"]),
            ("oracle_label", metrics["oracle_labels"]),
        ):
            counts = np.zeros((3, 2), np.int64)
            label_counts(labels, truth, counts)
            report[name] = label_summary(counts)
    return report
