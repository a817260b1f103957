"""End to end: train-rm, eval, score through the CLI; resume after kill -9; bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from dynrules.cli import main
from dynrules.errors import DynrulesError

TRAIN_KEYS = {"loss", "accuracy", "margin", "reward_mean", "reward_std", "tokens_per_s"}
EVAL_KEYS = [
    "pairs",
    "accuracy",
    "length_baseline",
    "reward_mean",
    "reward_std",
    "subsets",
    "sections",
]


def _tiny_encoder(directory: Path, seed: int = 0, hidden: int = 32) -> Path:
    from dynrules.models import bert
    from dynrules.models import bert_checkpoint as bert_ckpt

    config = bert.BertConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    bert_ckpt.write_checkpoint(
        directory,
        config,
        bert.random_params(config, seed),
        bert_ckpt.default_checkpoint_dir() / "tokenizer.json",
    )
    return directory


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    with open(root / "pairs.jsonl", "w") as handle:
        for i in range(48):
            safe = "I can't help with that, but here is a safer alternative." + " Stay safe." * int(
                rng.integers(0, 3)
            )
            harmful = "Sure, here is exactly how to do the harmful thing." + " Step." * int(
                rng.integers(0, 3)
            )
            record = {
                "id": f"p{i}",
                "prompt": f"Question number {i}?",
                "chosen": safe,
                "rejected": harmful,
                "margin": 1.0,
                "rule_ids": ["r1"],
                "subset": "odd" if i % 2 else "even",
                "section": "safety",
            }
            handle.write(json.dumps(record) + "\n")
    return root, _tiny_encoder(root / "encoder")


def _overrides(encoder: Path, **extra) -> list[str]:
    values = {
        "model": str(encoder),
        "steps": 12,
        "batch_size": 8,
        "max_length": 48,
        "learning_rate": 2e-3,
        "checkpoint_every": 4,
        "eval_every": 6,
        "log_every": 3,
        "eval_fraction": 0.25,
    } | extra
    return [f"{k}={v}" for k, v in values.items()]


@pytest.mark.slow
def test_train_eval_score_commands(workspace):
    root, encoder = workspace
    runner = CliRunner()
    run = root / "cli-run"
    done = runner.invoke(
        main,
        ["train-rm", str(root / "pairs.jsonl"), "--out", str(run), "--json", *_overrides(encoder)],
    )
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output.strip().splitlines()[-1])
    assert summary["steps"] == 12 and summary["eval"]["accuracy"] > 0.5
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [3, 6, 9, 12] and TRAIN_KEYS <= set(train[-1])
    assert train[-1]["loss"] < train[0]["loss"]
    assert [r["step"] for r in records if r["split"] == "eval"] == [6, 12]
    assert (
        sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
        == [4, 8, 12][-3:]
    )

    done = runner.invoke(main, ["eval", str(run), str(root / "pairs.jsonl"), "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert list(report) == EVAL_KEYS
    assert (
        report["pairs"] == 48
        and set(report["subsets"]) == {"odd", "even"}
        and set(report["sections"]) == {"safety"}
    )
    assert report["accuracy"] > 0.9 and 0 <= report["length_baseline"] <= 1

    inputs = root / "to-score.jsonl"
    pair = json.loads((root / "pairs.jsonl").read_text().splitlines()[0])
    inputs.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"id": "a", "prompt": pair["prompt"], "response": pair["chosen"]},
                {
                    "id": "b",
                    "prompt": pair["prompt"],
                    "response": pair["rejected"],
                    "extra": [1, 2],
                },
                {"id": "c", "text": "\n\nHuman: hi\n\nAssistant: hello"},
            ]
        )
        + "\n"
    )
    out = root / "scored.jsonl"
    done = runner.invoke(
        main, ["score", str(run), str(inputs), "--out", str(out), "--batch-size", "2"]
    )
    assert done.exit_code == 0, done.output
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in scored] == ["a", "b", "c"] and scored[1]["extra"] == [1, 2]
    assert scored[0]["reward"] > scored[1]["reward"]

    from dynrules.train.evaluate import evaluate

    direct = evaluate(
        run / "model",
        [{"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"]}],
    )
    assert direct.reward_mean == pytest.approx(
        (scored[0]["reward"] + scored[1]["reward"]) / 2, abs=1e-5
    )

    exported = load_file(str(run / "model" / "model.safetensors"))
    assert "bert.encoder.layer.1.output.dense.weight" in exported and exported[
        "classifier.weight"
    ].shape == (1, 32)

    # Running again with the same --out and steps resumes at the end: nothing to redo, and the
    # final evaluation is read back, not run and recorded again (metrics.jsonl is unchanged).
    logged = (run / "metrics.jsonl").read_text()
    done = runner.invoke(main, ["train-rm", str(root / "pairs.jsonl"), "--out", str(run), "--json"])
    assert done.exit_code == 0, done.output
    again = json.loads(done.output.strip().splitlines()[-1])
    assert again["resumed_from"] == 12 and again["eval"] == summary["eval"]
    assert (run / "metrics.jsonl").read_text() == logged


def test_bad_input_fails_clearly_and_overwrites_nothing(workspace, tmp_path):
    root, encoder = workspace
    runner = CliRunner()
    run = tmp_path / "run"
    done = runner.invoke(
        main,
        [
            "train-rm",
            str(root / "pairs.jsonl"),
            "--out",
            str(run),
            *_overrides(encoder, steps=2, eval_fraction=0),
        ],
    )
    assert done.exit_code == 0, done.output
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "chosen": "a"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "judge.yaml").write_text("judge:\n  kind: openai\n")
    other = _tiny_encoder(tmp_path / "other-encoder", seed=1, hidden=16)
    cases = [
        (["train-rm", str(tmp_path / "bad.jsonl"), "--out", str(run)], "line 1, field 'rejected'"),
        (["train-rm", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "new")], "empty file"),
        (
            ["train-rm", str(root / "pairs.jsonl"), "--out", str(run), "stepz=3"],
            "unknown key 'stepz'",
        ),
        (
            ["train-rm", str(root / "pairs.jsonl"), "--out", str(run), f"model={other}"],
            "another model",
        ),
        (["train-rm", str(root / "pairs.jsonl"), "--out", str(run), "seed=7"], "different config"),
        (
            ["train-rm", str(root / "pairs.jsonl"), "--out", str(run)]
            + ["--config", str(tmp_path / "judge.yaml")],
            "key 'judge.kind' is not used by `dynrules train-rm`",
        ),
        (["eval", str(run), str(tmp_path / "empty.jsonl")], "empty file"),
        (["eval", str(encoder), str(root / "pairs.jsonl")], "no 'dynrules' section"),
        (
            [
                "score",
                str(run),
                str(tmp_path / "bad.jsonl"),
                "--out",
                str(run / "model" / "config.json"),
            ],
            "field 'response'",
        ),
    ]
    for args, message in cases:
        done = runner.invoke(main, args)
        assert done.exit_code == 2, (args, done.output)
        assert message in done.output, (args, done.output)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot
    assert not (tmp_path / "new").exists()


# One weight per backbone that training must have moved: (exported key, key in the checkpoint).
MOVED_WEIGHT = {
    "encoder": ("bert.encoder.layer.0.output.dense.weight", "encoder.layer.0.output.dense.weight"),
    "decoder": ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight"),
}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("backbone", ["encoder", "decoder"])
def test_resume_after_kill_9_matches_uninterrupted_run(workspace, tmp_path, backbone):
    from dynrules.models import classifier as mdl
    from dynrules.train import sharding as shd
    from dynrules.train.checkpoint import Checkpointer
    from dynrules.train.config import load_config
    from dynrules.train.trainer import Trainable, train_reward_model

    root, checkpoint = workspace
    if backbone == "decoder":
        from . import decoder_fixtures as fx  # not at the top: this file also runs as a script

        checkpoint = fx.tiny_hf_decoder(tmp_path / "decoder")
    overrides = _overrides(
        checkpoint,
        steps=40,
        checkpoint_every=1,
        keep_checkpoints=2,
        eval_every=0,
        log_every=40,
        backbone=backbone,
    )
    killed = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, __file__, str(root / "pairs.jsonl"), str(killed), *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    checkpoints = killed / "checkpoints"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and child.poll() is None:
        steps = (
            [int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()]
            if checkpoints.exists()
            else []
        )
        if steps and max(steps) >= 6:
            break
        time.sleep(0.01)
    time.sleep(float(np.random.default_rng().uniform(0, 0.05)))  # land anywhere, saves included
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-3000:]

    # The newest complete checkpoint loads even if a save was cut in half.
    config = load_config(None, overrides)
    survivor = Checkpointer(checkpoints, every=1, keep=2)
    step = survivor.latest_step()
    assert step is not None and 6 <= step < 40
    spec = mdl.pretrained(backbone, checkpoint, num_outputs=1, max_length=48, seed=0).spec
    state, meta = survivor.restore(Trainable.build(spec, config, shd.make_mesh("")).abstract_state)
    assert int(state["step"]) == step == meta["step"] and meta["pairs_seen"] == step * 8
    survivor.close()

    resumed = train_reward_model(root / "pairs.jsonl", killed, config, progress=False)
    assert resumed.resumed_from == step
    straight = train_reward_model(
        root / "pairs.jsonl",
        tmp_path / "straight",
        config.replace(checkpoint_every=40),
        progress=False,
    )
    a, b = (load_file(str(r.model_dir / "model.safetensors")) for r in (resumed, straight))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=key)
    initial = load_file(str(checkpoint / "model.safetensors"))
    exported_key, initial_key = MOVED_WEIGHT[backbone]
    assert np.abs(a[exported_key] - initial[initial_key]).max() > 1e-3


@pytest.mark.slow
def test_tensorboard_holds_every_metrics_record_across_a_resume(workspace, tmp_path):
    """Every number of every metrics.jsonl record is a TensorBoard scalar at its step, tagged
    split/key (nested keys joined with /); a resumed run adds an event file."""
    from dynrules.train.metrics import scalars
    from dynrules.train.trainer import train_reward_model

    from .conftest import tensorboard_scalars

    root, encoder = workspace
    config = {
        "model": str(encoder),
        "steps": 2,
        "batch_size": 8,
        "max_length": 32,
        "checkpoint_every": 2,
        "eval_every": 1,
        "log_every": 1,
        "eval_fraction": 0.25,
    }
    train_reward_model(root / "pairs.jsonl", tmp_path, config, progress=False)
    train_reward_model(root / "pairs.jsonl", tmp_path, config | {"steps": 3}, progress=False)

    expected = []
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        split, step = record.pop("split"), record.pop("step")
        expected += [(tag, step, float(np.float32(v))) for tag, v in scalars(split, record)]
    points = tensorboard_scalars(tmp_path / "tensorboard")
    assert sorted(points) == sorted(expected)
    tags = {tag for tag, _, _ in points}
    assert {"train/loss", "train/accuracy", "eval/accuracy", "eval/loss"} <= tags
    assert {"eval/sections/safety/accuracy", "eval/subsets/odd/accuracy"} <= tags
    assert sorted({step for tag, step, _ in points if tag == "train/loss"}) == [1, 2, 3]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_run_directory_that_is_not_a_run_is_refused(tmp_path, workspace):
    from dynrules.train.trainer import train_reward_model

    root, encoder = workspace
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(DynrulesError, match="not a dynrules run"):
        train_reward_model(root / "pairs.jsonl", tmp_path, {"model": str(encoder), "steps": 1})
    assert (tmp_path / "precious.txt").read_text() == "keep me"


if __name__ == "__main__":  # the child process of the kill -9 test
    from dynrules.train.config import load_config
    from dynrules.train.trainer import train_reward_model

    train_reward_model(sys.argv[1], sys.argv[2], load_config(None, sys.argv[3:]), progress=False)


def test_a_run_saved_before_packing_existed_resumes_with_packing(tmp_path):
    """packing lays batches out differently but computes the same steps: not a config change."""
    from dynrules.models import bert
    from dynrules.models import classifier as mdl
    from dynrules.train.config import TrainConfig
    from dynrules.train.trainer import REWARD_MODEL, _check_resume

    spec = mdl.ModelSpec(
        bert.BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        ),
        max_length=16,
    )
    config = TrainConfig(steps=4)
    old = {k: v for k, v in config.to_dict().items() if k != "packing"}
    # A spec saved before `truncation` existed reads as the left cut it used.
    old_spec = {k: v for k, v in spec.to_dict().items() if k != "truncation"}
    saved = {"model": old_spec, "config": old, "data": "d"}
    _check_resume(saved, config, spec, "d", tmp_path, REWARD_MODEL)  # no error
    _check_resume(
        saved | {"config": old | {"packing": False}}, config, spec, "d", tmp_path, REWARD_MODEL
    )
    with pytest.raises(DynrulesError, match="different config"):
        _check_resume(
            saved | {"config": old | {"seed": 7}}, config, spec, "d", tmp_path, REWARD_MODEL
        )
    middle = dataclasses.replace(spec, truncation="middle")
    with pytest.raises(DynrulesError, match="another model"):
        _check_resume(saved, config, middle, "d", tmp_path, REWARD_MODEL)


@pytest.mark.parametrize("backbone", ["encoder", "decoder"])
def test_export_best_exports_the_best_evaluation_and_keeps_it_across_a_resume(
    workspace, tmp_path, backbone
):
    """export=best: the model holds the parameters of the first evaluation with the highest
    section mean (its rewards reproduce that evaluation's record), also after a resume."""
    from dynrules.train.evaluate import evaluate
    from dynrules.train.trainer import train_reward_model

    root, checkpoint = workspace
    if backbone == "decoder":
        from . import decoder_fixtures as fx

        checkpoint = fx.tiny_hf_decoder(tmp_path / "decoder")
    pairs = [json.loads(line) for line in (root / "pairs.jsonl").read_text().splitlines()]
    for i, pair in enumerate(pairs[:12]):  # a held-out set the tiny model gets partly wrong
        if i % 3 == 0:
            pair["chosen"], pair["rejected"] = pair["rejected"], pair["chosen"]
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(p) + "\n" for p in pairs[:12]))
    config = {
        "backbone": backbone,
        "model": str(checkpoint),
        "steps": 3,
        "batch_size": 8,
        "max_length": 32,
        "learning_rate": 2e-3,
        "checkpoint_every": 3,
        "eval_every": 1,
        "eval_data": str(held),
        "export": "best",
    }
    run = tmp_path / "run"
    train_reward_model(pairs[12:], run, config, progress=False)
    result = train_reward_model(pairs[12:], run, config | {"steps": 6}, progress=False)

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2, 3, 4, 5, 6]
    scores = [r["sections"]["safety"]["accuracy"] for r in evals]
    best = evals[int(np.argmax(scores))]
    assert result.exported_step == best["step"]
    assert json.loads((run / "summary.json").read_text())["exported_step"] == best["step"]
    again = evaluate(result.model_dir, held)
    assert again.accuracy == best["accuracy"]
    assert again.reward_mean == pytest.approx(best["reward_mean"], abs=1e-6)
    rewards = {round(r["reward_mean"], 6) for r in evals}
    assert len(rewards) == len(evals)  # each step's rewards differ, so the match names the step


def test_export_best_needs_held_out_data():
    from dynrules.train.config import make_config

    with pytest.raises(DynrulesError, match="export=best"):
        make_config({"export": "best", "eval_fraction": 0.0})
