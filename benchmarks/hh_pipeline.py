"""The whole pipeline on Anthropic's HH-RLHF harmless-base test split, split in halves by prompt.

Benchmark data only (../shared/data; the project never needs it at run time). The human label
of each pair is known (chosen vs rejected), so the report measures label agreement per policy,
the adapter, and the reward model trained on rule labels against one trained on the human
labels. Run: ``python -m benchmarks.hh_pipeline [--out DIR] [--rm-steps N]``; the report lands
in DIR and a summary in benchmarks/results/hh_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dynrules.pipeline import PipelineConfig, run_pipeline

HH_TEST = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "hh-rlhf-harmless-base-test.jsonl.gz"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/hh-pipeline")
    parser.add_argument("--rm-steps", type=int, default=120)
    parser.add_argument("--adapter-steps", type=int, default=100)
    args = parser.parse_args()
    config = PipelineConfig(
        heldout_fraction=0.5, rm_steps=args.rm_steps, adapter_steps=args.adapter_steps
    )
    report = run_pipeline(args.out, HH_TEST, config).to_json()
    summary = {
        "data": report["data"],
        "policies_k5": [r for r in report["policies"] if r["k"] == 5],
        "adapter": report["adapter"],
        "reward_model": report["reward_model"],
        "stages": report["stages"],
        "config": {
            "rm_steps": args.rm_steps,
            "adapter_steps": args.adapter_steps,
            "batch_size": config.batch_size,
            "max_length": config.max_length,
        },
    }
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / "hh_pipeline.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["reward_model"], indent=2))


if __name__ == "__main__":
    main()
