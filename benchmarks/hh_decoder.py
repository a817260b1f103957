"""Decoder against encoder reward model on HH harmless, at the same step budget.

Benchmark data only (:data:`dynrules.benchmarks.paths.HH_TEST`): Anthropic HH-RLHF harmless-base
test split, the first
1,200 pairs to train on (human labels: chosen ≻ rejected), the last 500 held out. Both reward
models train for the same number of steps on the same batches of pairs — all-MiniLM-L6-v2
(22M, mean pooling) and SmolLM2-135M-Instruct (last-token pooling, its chat template, the top
10 of its 30 layers trained) — and
are scored on the held-out pairs beside the length-only baseline. The recipe is the main job's
(dynrules.pipeline.PipelineConfig): its truncation, and a validation split of its share of the
training pairs, evaluated six times, whose best step each model keeps (``export=best``).

Run: ``dynrules bench hh-decoder [--steps 150] [--max-length 192] [--out DIR]``; a summary
lands in benchmarks/results/hh_decoder.json after each model; a rerun with the same settings
skips the models already there.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from dynrules.atomic import atomic_path
from dynrules.benchmarks.paths import RESULTS as RESULTS_DIR
from dynrules.benchmarks.paths import hh_test
from dynrules.pipeline import PipelineConfig
from dynrules.train.data import load_preferences
from dynrules.train.evaluate import evaluate
from dynrules.train.trainer import train_reward_model

log = logging.getLogger(__name__)

TRAIN, HELD_OUT = 1200, 500
RESULTS = RESULTS_DIR / "hh_decoder.json"
# The backbone at its usual fine-tuning rate, the fresh head at the main job's own rate
# (dynrules.pipeline.PipelineConfig: Adam moves a weight by about the rate a step). SmolLM2
# trains its top 10 of 30 layers: half the step time, so 150 steps fit in 30 CPU-minutes.
RECIPES = {
    "encoder": {"learning_rate": 1e-4, "head_learning_rate": 3e-3},
    "decoder": {"learning_rate": 2e-5, "head_learning_rate": 3e-3, "frozen_layers": 20},
}


def bench_hh_decoder(
    out: str | Path = "out/hh-decoder",
    *,
    steps: int = 150,  # one pass over the 1,200 pairs
    batch_size: int = 8,
    max_length: int = 192,
    backbones: tuple[str, ...] = ("encoder", "decoder"),
    data: str | Path | None = None,
) -> dict:
    """Train and score each backbone (skipping those a run of the same settings already saved);
    the summary, also in benchmarks/results/hh_decoder.json, which is rewritten after each model.
    Progress: one JSON line per model on stderr."""
    path = hh_test(data)
    main_job = PipelineConfig()
    settings = {
        "out": str(out),
        "steps": steps,
        "batch_size": batch_size,
        "max_length": max_length,
        "data": str(path),
        "truncation": main_job.truncation,
        "validation_fraction": main_job.validation_fraction,
        "export": main_job.rm_export,
    }
    pairs = load_preferences(path)
    train, held_out = pairs[:TRAIN], pairs[-HELD_OUT:]
    summary = {
        "data": {"train": len(train), "held_out": len(held_out), "source": path.name},
        "config": settings,
        "models": {},
    }
    if RESULTS.exists():  # resume: keep what a run of the same settings already measured
        saved = json.loads(RESULTS.read_text())
        if (saved["data"], saved["config"]) == (summary["data"], summary["config"]):
            summary["models"] = saved["models"]
    for backbone in backbones:
        if backbone in summary["models"]:
            continue
        config = {
            "backbone": backbone,
            "steps": steps,
            "batch_size": batch_size,
            "max_length": max_length,
            **RECIPES[backbone],
            "truncation": settings["truncation"],
            "eval_fraction": settings["validation_fraction"],
            "eval_every": max(1, steps // 6),
            "export": settings["export"],
            "checkpoint_every": steps,
            "log_every": max(1, steps // 10),
        }
        started = time.perf_counter()
        run = train_reward_model(train, Path(out) / backbone, config)
        trained = time.perf_counter() - started
        report = evaluate(run.run_dir, held_out, batch_size=32)
        summary["models"][backbone] = {
            "held_out_accuracy": report.accuracy,
            "length_baseline": report.length_baseline,
            "truncated_texts": report.truncated,
            "train_loss_last": run.train.get("loss"),
            "validation_pairs": run.eval["pairs"] if run.eval else 0,
            "exported_step": run.exported_step,
            "train_seconds": round(trained, 1),
            "eval_seconds": round(time.perf_counter() - started - trained, 1),
            **RECIPES[backbone],
        }
        log.info("%s", json.dumps({backbone: summary["models"][backbone]}))
        with atomic_path(RESULTS) as tmp:  # after each model: a killed run keeps what it finished
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return summary
