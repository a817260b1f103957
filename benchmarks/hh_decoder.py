"""Decoder against encoder reward model on HH harmless, at the same step budget.

Benchmark data only (../shared/data): Anthropic HH-RLHF harmless-base test split, the first
1,200 pairs to train on (human labels: chosen ≻ rejected), the last 500 held out. Both reward
models train for the same number of steps on the same batches of pairs — all-MiniLM-L6-v2
(22M, mean pooling) and SmolLM2-135M-Instruct (last-token pooling, its chat template) — and
are scored on the held-out pairs beside the length-only baseline.

Run: ``python -m benchmarks.hh_decoder [--steps 150] [--max-length 192] [--out DIR]``; a summary
lands in benchmarks/results/hh_decoder.json after each model; a rerun with the same settings
skips the models already there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.hh_pipeline import HH_TEST
from dynrules.atomic import atomic_path
from dynrules.train.data import load_preferences
from dynrules.train.evaluate import evaluate
from dynrules.train.trainer import train_reward_model

TRAIN, HELD_OUT = 1200, 500
RESULTS = Path(__file__).resolve().parent / "results" / "hh_decoder.json"
# The backbone at its usual full fine-tuning rate, the fresh head at the main job's own rate
# (dynrules.pipeline.PipelineConfig: Adam moves a weight by about the rate a step).
RECIPES = {
    "encoder": {"learning_rate": 1e-4, "head_learning_rate": 3e-3},
    "decoder": {"learning_rate": 1e-5, "head_learning_rate": 3e-3},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/hh-decoder")
    parser.add_argument("--steps", type=int, default=150)  # one pass over the 1,200 pairs
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--backbones", default="encoder,decoder")
    parser.add_argument("--data", default=str(HH_TEST), help="the HH harmless-base test file")
    args = parser.parse_args()
    pairs = load_preferences(args.data)
    train, held_out = pairs[:TRAIN], pairs[-HELD_OUT:]
    summary = {
        "data": {"train": len(train), "held_out": len(held_out), "source": Path(args.data).name},
        "config": {k: v for k, v in vars(args).items() if k != "backbones"},
        "models": {},
    }
    if RESULTS.exists():  # resume: keep what a run of the same settings already measured
        saved = json.loads(RESULTS.read_text())
        if (saved["data"], saved["config"]) == (summary["data"], summary["config"]):
            summary["models"] = saved["models"]
    for backbone in args.backbones.split(","):
        if backbone in summary["models"]:
            continue
        config = {
            "backbone": backbone,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            **RECIPES[backbone],
            "eval_fraction": 0.0,
            "eval_every": 0,
            "checkpoint_every": args.steps,
            "log_every": max(1, args.steps // 10),
        }
        started = time.perf_counter()
        run = train_reward_model(train, Path(args.out) / backbone, config)
        trained = time.perf_counter() - started
        report = evaluate(run.run_dir, held_out, batch_size=32)
        summary["models"][backbone] = {
            "held_out_accuracy": report.accuracy,
            "length_baseline": report.length_baseline,
            "truncated_texts": report.truncated,
            "train_loss_last": run.train.get("loss"),
            "train_seconds": round(trained, 1),
            "eval_seconds": round(time.perf_counter() - started - trained, 1),
            **RECIPES[backbone],
        }
        print(json.dumps({backbone: summary["models"][backbone]}), flush=True)
        with atomic_path(RESULTS) as tmp:  # after each model: a killed run keeps what it finished
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
