"""The main job at toy scale: every stage runs, report.json has the promised keys, and the
Markdown report shows the JSON's numbers."""

import json

import pytest

from dynrules.engine.datasets import pyrit_pairs
from dynrules.pipeline import PipelineConfig, run_pipeline
from dynrules.report import pipeline_markdown

from .conftest import write_jsonl


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    pairs = pyrit_pairs("train")[:24] + pyrit_pairs("heldout")[:16]
    path = write_jsonl(
        out / "pairs.jsonl",
        [{k: p[k] for k in ("id", "prompt", "response_a", "response_b", "truth")} for p in pairs],
    )
    config = PipelineConfig(
        rm_steps=2, adapter_steps=2, batch_size=4, max_length=48, ablate_ks=(1, 3)
    )
    run_pipeline(out / "report", path, config)
    return out / "report"


def test_report_json_has_the_promised_shape(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    assert {"policies", "adapter", "reward_model", "stages"} <= set(report)
    assert {"precision_at_k", "recall_at_k", "label_agreement", "judge_calls_saved"} <= set(
        report["adapter"]
    )
    assert {"accuracy", "length_baseline", "human_label_accuracy"} <= set(report["reward_model"])
    assert {r["policy"] for r in report["policies"]} == {
        "adaptive",
        "zscore",
        "greedy",
        "all",
        "random",
        "fixed",
    }
    for row in report["policies"]:
        assert {
            "policy",
            "criterion",
            "k",
            "agreement",
            "mi_bits",
            "ci_low",
            "ci_high",
            "ties",
        } <= set(row)
    assert report["adapter"]["judge_calls_saved"] == pytest.approx(0.95)
    for value in (report["reward_model"]["accuracy"], report["adapter"]["precision_at_k"]):
        assert 0.0 <= value <= 1.0
    expected_stages = {
        "rate_train",
        "rate_heldout",
        "select",
        "ablate",
        "train_adapter",
        "apply_adapter",
        "train_rm_rules",
        "eval_rm_rules",
        "train_rm_human",
        "eval_rm_human",
    }
    assert set(report["stages"]) == expected_stages


def test_markdown_and_html_carry_the_json_numbers(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    text = (report_dir / "report.md").read_text()
    assert text == pipeline_markdown(report)
    assert f"| {report['reward_model']['accuracy']:.3f} |" in text
    assert f"precision@k {report['adapter']['precision_at_k']:.3f}" in text
    assert "far weaker than a 70B LLM judge" in text
    assert (report_dir / "ablation" / "mi_vs_k.png").stat().st_size > 1000
    assert "<table>" in (report_dir / "report.html").read_text()


def test_rerun_keeps_finished_work(report_dir):
    first = json.loads((report_dir / "report.json").read_text())
    pairs = report_dir.parent / "pairs.jsonl"
    config = PipelineConfig(
        rm_steps=2, adapter_steps=2, batch_size=4, max_length=48, ablate_ks=(1, 3)
    )
    second = run_pipeline(report_dir, pairs, config)
    assert "train_adapter" not in second["stages"]  # the trained adapter was reused
    assert second["judge"]["rated_train"]["rated"] == 0  # every cell was already rated
    assert second["judge"]["rated_train"]["skipped_done"] == first["judge"]["rated_train"]["rated"]
    assert second["adapter"] == first["adapter"]
    assert second["reward_model"] == first["reward_model"]  # resumed at the last step: same model
