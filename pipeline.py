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
import time
from pathlib import Path

import numpy as np

from dynrules.engine.judges import JUDGES
from dynrules.engine.select import POLICIES
from dynrules.errors import DynrulesError
from dynrules.kernels.selection import CRITERIA
from dynrules.report import write_ablation_report, write_pipeline_report
from dynrules.train.config import BACKBONES


def _option(default, help: str, **extra):
    """A config field whose metadata carries its command-line help (and choices)."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass
class PipelineConfig:
    """The main job's settings; each field's metadata carries its command-line help."""

    k: int = _option(5, "Rules selected per pair.")
    policy: str = _option("adaptive", "Selection policy of the training labels.", choices=POLICIES)
    criterion: str | None = _option(None, "Adaptive criterion [default: additive with relevance, else absolute].",
                                    choices=tuple(CRITERIA))  # fmt: skip
    ablate_ks: tuple[int, ...] = _option((1, 3, 5, 10), "ks compared in the ablation.")
    judge: str = _option("embedded", "Offline embedded judge, or an LLM behind an OpenAI-compatible API.",
                         choices=JUDGES)  # fmt: skip
    judge_options: dict = dataclasses.field(default_factory=dict)  # base_url, model, api_key_env
    pool: str = _option("default", "Rule pool: 'default' or a file.")
    rm_steps: int = _option(60, "Reward-model training steps (each model).")
    adapter_steps: int = _option(60, "Rule-adapter training steps.")
    batch_size: int = _option(16, "Pairs per training step.")
    max_length: int = _option(192, "Tokens per text.")
    learning_rate: float = _option(5e-5, "Reward-model learning rate.")
    adapter_learning_rate: float = _option(3e-4, "Rule-adapter learning rate.")
    seed: int = _option(0, "Seed of data order, initialisation and sampling.")
    backbone: str = _option("encoder", "Backbone of the reward models and the rule adapter.",
                            choices=BACKBONES)  # fmt: skip
    rm_model: str = _option("", "Their checkpoint: a BERT directory (encoder), a Hugging Face "
                            "directory or .gguf (decoder) [default: the bundled one].")  # fmt: skip
    heldout_fraction: float = _option(0.4, "Share of prompts held out when splitting a pairs file.")


class _Stages:
    """Times each stage; the report shows seconds and throughput per stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.items: dict[str, int] = {}

    def run(self, name: str, fn, items: int | None = None):
        print(f"[pipeline] {name} …", flush=True)
        started = time.perf_counter()
        result = fn()
        self.seconds[name] = round(time.perf_counter() - started, 2)
        if items is not None:
            self.items[name] = items
        return result


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


def run_pipeline(out_dir, pairs_path=None, config: PipelineConfig | None = None) -> dict:
    """Run the main job; returns report.json's content. Each stage's output is kept in out_dir.

    Started again on the same ``out_dir`` after a kill, it keeps what was finished: rating skips
    rated cells, a trained adapter is reused, reward models resume from their checkpoints.
    """
    from dynrules.engine import ablate as abl
    from dynrules.engine.judges import make_judge
    from dynrules.engine.judges.runner import rate_pairs
    from dynrules.engine.pool import load_pool
    from dynrules.engine.select import SelectionConfig, run_selection
    from dynrules.engine.store import RatingStore
    from dynrules.train import adapter as adp
    from dynrules.train.evaluate import evaluate
    from dynrules.train.trainer import train_reward_model

    config = config or PipelineConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages()
    train, heldout, source = load_data(pairs_path, config)
    has_truth = all("truth" in r for r in train + heldout)
    pool = load_pool(config.pool)

    with make_judge(config.judge, pool, **config.judge_options) as judge:
        judge_name = judge.identity["judge"]
        rated = {}
        for split, records in (("train", train), ("heldout", heldout)):
            rated[split] = stages.run(
                f"rate_{split}",
                lambda r=records, s=split: rate_pairs(
                    r, out / f"store-{s}", pool=pool, judge=judge
                ),
                items=len(records) * len(pool),
            )
    stores = {s: RatingStore.open(out / f"store-{s}", pool=pool) for s in ("train", "heldout")}

    selection = SelectionConfig(policy=config.policy, k=config.k, criterion=config.criterion)
    selected = stages.run(
        "select",
        lambda: run_selection(
            stores["train"], selection, out / "labelled-train.jsonl", progress=False
        ),
        items=len(train),
    )
    policies = []
    if has_truth:
        ablation = stages.run(
            "ablate",
            lambda: abl.ablate(stores["train"], "truth", config.ablate_ks, seed=config.seed),
            items=len(train),
        )
        write_ablation_report(ablation, out / "ablation")
        policies = ablation["rows"]

    adapter_config = {
        "steps": config.adapter_steps,
        "batch_size": config.batch_size,
        "max_length": config.max_length,
        "learning_rate": config.adapter_learning_rate,
        "seed": config.seed,
        "backbone": config.backbone,
        "model": config.rm_model,
    }
    if not adp.is_trained(out / "adapter", stores["train"], adapter_config, selection):
        stages.run(
            "train_adapter",
            lambda: adp.train_adapter(
                stores["train"], out / "adapter", adapter_config, selection=selection
            ),
            items=config.adapter_steps * config.batch_size,
        )
    adapter = stages.run(
        "apply_adapter",
        lambda: _adapter_report(out / "adapter", stores["heldout"], selection, has_truth),
        items=len(heldout),
    )

    rm_config = {
        "steps": config.rm_steps,
        "batch_size": config.batch_size,
        "max_length": config.max_length,
        "learning_rate": config.learning_rate,
        "seed": config.seed,
        "backbone": config.backbone,
        "model": config.rm_model,
        "eval_every": 0,
        # A killed pipeline started again resumes each reward model from its last checkpoint.
        "checkpoint_every": max(1, config.rm_steps // 4),
        "eval_fraction": 0.0,
    }
    with open(out / "labelled-train.jsonl", encoding="utf-8") as handle:
        rule_pairs = [json.loads(line) for line in handle]
    stages.run(
        "train_rm_rules",
        lambda: train_reward_model(rule_pairs, out / "rm-rules", rm_config),
        items=config.rm_steps * config.batch_size,
    )
    reward_model = {"trained_on": f"{len(rule_pairs)} rule-labelled train pairs"}
    if has_truth:
        heldout_human = human_pairs(heldout)
        result = stages.run(
            "eval_rm_rules", lambda: evaluate(out / "rm-rules", heldout_human), items=len(heldout)
        )
        stages.run(
            "train_rm_human",
            lambda: train_reward_model(human_pairs(train), out / "rm-human", rm_config),
            items=config.rm_steps * config.batch_size,
        )
        human = stages.run(
            "eval_rm_human", lambda: evaluate(out / "rm-human", heldout_human), items=len(heldout)
        )
        reward_model.update(
            accuracy=result["accuracy"],
            length_baseline=result["length_baseline"],
            human_label_accuracy=human["accuracy"],
            heldout_pairs=result["pairs"],
            rules=_sectioned(result),
            human=_sectioned(human),
            subset_sections={r["subset"]: r["section"] for r in heldout if r.get("section")},
        )

    report = {
        "data": {
            "source": source,
            "train_pairs": len(train),
            "heldout_pairs": len(heldout),
            "human_truth": has_truth,
        },
        "judge": {
            "kind": config.judge,
            "name": judge_name,
            "rated_train": rated["train"],
            "rated_heldout": rated["heldout"],
        },
        "selection": {
            "policy": config.policy,
            "k": config.k,
            "criterion": selection.resolved(stores["train"]).criterion,
            "labelled": selected["labelled"],
            "ties": selected["ties"],
        },
        "policies": policies,
        "label_agreement": _label_agreement(stores, selection) if has_truth else {},
        "adapter": adapter,
        "reward_model": reward_model,
        "stages": stages.seconds,
        "throughput": {
            name: round(stages.items[name] / s, 2)
            for name, s in stages.seconds.items()
            if name in stages.items and s > 0
        },
    }
    write_pipeline_report(report, out)
    return report


def _sectioned(result: dict) -> dict:
    """A held-out evaluation's sections, subsets, section mean and over-refusal rate."""
    from dynrules.engine.datasets import OVER_REFUSAL_SUBSET

    sections = {k: v for k, v in result["sections"].items() if k != "all"}
    out = {
        "accuracy": result["accuracy"],
        "sections": result["sections"],
        "subsets": result["subsets"],
        # RewardBench's overall score: sections count equally, whatever their sizes.
        "section_mean": float(np.mean([v["accuracy"] for v in sections.values()]))
        if sections
        else None,
    }
    if OVER_REFUSAL_SUBSET in result["subsets"]:
        group = result["subsets"][OVER_REFUSAL_SUBSET]
        # Ties count as the refusal winning (RewardBench: a tie is wrong).
        out["over_refusal"] = {"pairs": group["pairs"], "rate": 1.0 - group["accuracy"]}
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
