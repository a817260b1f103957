"""The whole pipeline on Anthropic's HH-RLHF harmless-base test split, split in halves by prompt.

Benchmark data only (:data:`dynrules.benchmarks.paths.HH_TEST`; the project never needs it at
run time). The human label of each pair is known (chosen vs rejected), so the report measures
label agreement per policy, the adapter, and the reward model trained on rule labels against one
trained on the human labels. Run: ``dynrules bench hh-pipeline [--out DIR] [--rm-steps N]``; the
report lands in DIR and a summary in benchmarks/results/hh_pipeline.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from dynrules.benchmarks.paths import hh_test, results_file
from dynrules.pipeline import PipelineConfig, run_pipeline


def bench_hh_pipeline(
    out: str | Path = "out/hh-pipeline",
    *,
    rm_steps: int = 120,
    adapter_steps: int = 100,
    data: str | Path | None = None,
) -> dict:
    """Run the pipeline on the HH pairs into ``out``; the summary, also written to
    benchmarks/results/hh_pipeline.json."""
    config = PipelineConfig(heldout_fraction=0.5, rm_steps=rm_steps, adapter_steps=adapter_steps)
    report = run_pipeline(out, hh_test(data), config).to_json()
    summary = {
        "data": report["data"],
        "policies_k5": [r for r in report["policies"] if r["k"] == 5],
        "adapter": report["adapter"],
        "reward_model": report["reward_model"],
        "stages": report["stages"],
        "config": {
            "rm_steps": rm_steps,
            "adapter_steps": adapter_steps,
            "batch_size": config.batch_size,
            "max_length": config.max_length,
        },
    }
    results_file("hh_pipeline.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
