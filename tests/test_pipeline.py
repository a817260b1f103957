"""The main job at toy scale: every stage runs, report.json has the promised keys, and the
Markdown report shows the JSON's numbers."""

import json

import numpy as np
import pytest

from dynrules.engine.datasets import safety_mix
from dynrules.pipeline import PipelineConfig, run_pipeline
from dynrules.report import pipeline_markdown

from .conftest import write_jsonl

pytestmark = pytest.mark.slow  # multi-second jobs; `make test-fast` leaves them out


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    pairs = []
    for split, per_subset in (("train", 6), ("heldout", 4)):
        mix = safety_mix(split)
        for subset in ("harm", "refusal_vs_answer", "answer_vs_refusal", "answer_vs_off_topic"):
            pairs += [p for p in mix if p["subset"] == subset][:per_subset]
    path = write_jsonl(out / "pairs.jsonl", pairs)
    config = PipelineConfig(
        rm_steps=2, adapter_steps=2, batch_size=4, max_length=48, ablate_ks=(1, 3), eval_every=1
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


def test_report_has_sections_over_refusal_and_judge_agreement(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    rm = report["reward_model"]
    for model in ("rules", "human"):
        sections = rm[model]["sections"]
        assert set(sections) == {"should_refuse", "should_respond"}
        assert sum(g["pairs"] for g in sections.values()) == rm["heldout_pairs"] == 16
        weighted = sum(g["accuracy"] * g["pairs"] for g in sections.values()) / 16
        assert rm[model]["accuracy"] == pytest.approx(weighted)
        assert rm[model]["section_mean"] == pytest.approx(
            (sections["should_refuse"]["accuracy"] + sections["should_respond"]["accuracy"]) / 2
        )
        over = rm[model]["over_refusal"]
        assert over["pairs"] == 4
        assert over["rate"] == pytest.approx(
            1 - rm[model]["subsets"]["answer_vs_refusal"]["accuracy"]
        )
    assert rm["subset_sections"]["answer_vs_refusal"] == "should_respond"
    agreement = report["label_agreement"]
    assert agreement["train"]["all"]["pairs"] == 24 and agreement["heldout"]["all"]["pairs"] == 16
    assert agreement["heldout"]["section:should_respond"]["pairs"] == 8
    assert agreement["train"]["subset:answer_vs_refusal"]["pairs"] == 6


def test_markdown_and_html_carry_the_json_numbers(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    text = (report_dir / "report.md").read_text()
    assert text == pipeline_markdown(report)
    assert f"| {report['reward_model']['accuracy']:.3f} |" in text
    assert f"precision@k {report['adapter']['precision_at_k']:.3f}" in text
    assert "far weaker than a 70B LLM judge" in text
    rules = report["reward_model"]["rules"]
    refuse, over = rules["sections"]["should_refuse"], rules["over_refusal"]
    assert f"| trained on rule labels | {refuse['accuracy']:.3f} ({refuse['pairs']}) |" in text
    assert f"{over['rate']:.3f} ({over['pairs']}) |" in text
    assert "Target for the rule-label model: every section ≥ 0.80" in text
    assert "| section:should respond |" in text
    assert (report_dir / "ablation" / "mi_vs_k.png").stat().st_size > 1000
    assert "<table>" in (report_dir / "report.html").read_text()


def test_validation_split_and_training_curves(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    rm = report["reward_model"]
    validation = [json.loads(line) for line in open(report_dir / "validation.jsonl")]
    assert rm["validation_pairs"] == len(validation) > 0
    held = {p["prompt"] for p in validation}
    for run in ("rm-rules", "rm-human"):
        config = json.loads((report_dir / run / "run.json").read_text())["config"]
        assert config["eval_data"] == str(report_dir / "validation.jsonl")
    trained = json.loads((report_dir / "rm-rules" / "summary.json").read_text())["eval"]
    assert trained["pairs"] == len(validation)  # evaluated on the validation split, not held-out
    rule_pairs = [json.loads(line) for line in open(report_dir / "labelled-train.jsonl")]
    kept = [p for p in rule_pairs if p["prompt"] not in held]
    assert 0 < len(kept) < len(rule_pairs)  # validation prompts are kept out of training
    # rule_margin_keep=0.5: the half of them with the largest |margin|, the median's included
    assert rm["min_margin"] == pytest.approx(np.median([abs(p["margin"]) for p in kept]))
    confident = [p for p in kept if abs(p["margin"]) >= rm["min_margin"]]
    assert len(kept) / 2 <= len(confident) < len(kept)
    assert rm["trained_on"] == (
        f"the {len(confident)} of {len(kept)} rule-labelled train pairs "
        f"whose rule margin is at least {rm['min_margin']:.2f} either way"
    )
    config = json.loads((report_dir / "rm-rules" / "run.json").read_text())["config"]
    assert config["min_margin"] == rm["min_margin"]
    for name in ("rules", "human"):
        curve = rm["curves"][name]
        assert [r["step"] for r in curve["train"]] == [1, 2]
        assert [r["step"] for r in curve["validation"]] == [1, 2]
        best = max(curve["validation"], key=lambda r: r["section_mean"])
        assert curve["best_step"] == best["step"]
        assert curve["exported_step"] == best["step"]  # rm_export=best keeps that evaluation's
    text = (report_dir / "report.md").read_text()
    assert "### Training curves" in text and "![training curves](reward_models.png)" in text
    assert (report_dir / "reward_models.png").stat().st_size > 1000


def test_rerun_keeps_finished_work(report_dir):
    first = json.loads((report_dir / "report.json").read_text())
    pairs = report_dir.parent / "pairs.jsonl"
    config = PipelineConfig(
        rm_steps=2, adapter_steps=2, batch_size=4, max_length=48, ablate_ks=(1, 3), eval_every=1
    )
    second = run_pipeline(report_dir, pairs, config)
    assert "train_adapter" not in second.stages  # the trained adapter was reused
    assert second.judge.rated_train.rated == 0  # every cell was already rated
    assert second.judge.rated_train.skipped_done == first["judge"]["rated_train"]["rated"]
    again = second.to_json()
    assert again["adapter"] == first["adapter"]
    assert again["reward_model"] == first["reward_model"]  # resumed at the last step: same model
