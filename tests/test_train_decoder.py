"""Reward models on a decoder: padding independence, train → eval → score → export → import.

Tiny random Llama- and Qwen2-shaped decoders with a byte-level tokenizer (tests.decoder_fixtures);
the kill -9 resume and the 8-device sharded step run with the encoder's machinery in
test_train_run.py and test_train_sharding.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from dynrules.cli import main
from dynrules.errors import DynrulesError

from . import decoder_fixtures as fx


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w") as handle:
        for i in range(32):
            record = {
                "prompt": f"Question {i}?",
                "margin": 1.0,
                "chosen": "I can't help with that. Stay safe."
                + " Really." * int(rng.integers(0, 3)),
                "rejected": "Sure, here is how to do it." + " Step." * int(rng.integers(0, 3)),
            }
            handle.write(json.dumps(record) + "\n")
    return path


def test_reward_alone_equals_reward_in_a_padded_batch(tmp_path):
    """A GGUF decoder's reward for a text does not depend on what else is in its batch."""
    from dynrules.models import classifier as mdl
    from dynrules.models import llama
    from dynrules.train import sharding as shd
    from dynrules.train.scoring import Scorer

    config = fx.tiny_config()
    fx.write_gguf_decoder(tmp_path / "tiny.gguf", config, llama.random_params(config, 4))
    model = mdl.pretrained("decoder", tmp_path / "tiny.gguf", num_outputs=1, max_length=128, seed=0)
    assert model.spec.template == "chat" and model.spec.pooling == "last"
    # A head large enough that rewards differ visibly between texts.
    params = model.params | {
        "head_kernel": np.random.default_rng(0).normal(size=(64, 1)).astype(np.float32)
    }
    mesh = shd.make_mesh("")
    graphdef, abstract = mdl.abstract_model(model.spec)
    placed = shd.place(params, shd.abstract_params(abstract, mesh))
    scorer = Scorer(graphdef, placed, model.tokenizer, mesh, max_length=128, batch_size=4)
    texts = [
        model.render("Hi?", "Hello there."),
        model.render("Why?", "Because " * 30),
        model.render("Tell me a story.", "Once upon a time " * 5),
        model.render("", "ok"),
    ]
    together = scorer.rewards(texts)
    alone = np.array([scorer.rewards([text])[0] for text in texts])
    np.testing.assert_allclose(together, alone, atol=1e-4)
    assert np.ptp(together) > 1e-2  # the rewards do differ, so equality means something


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_train_eval_score_then_export_and_import(tmp_path, pairs_file, model_type):
    from dynrules.train.data import load_preferences
    from dynrules.train.evaluate import evaluate
    from dynrules.train.trainer import split_held_out

    decoder = fx.tiny_hf_decoder(tmp_path / "decoder", model_type)
    run = tmp_path / "run"
    steps = 12 if model_type == "llama" else 3
    overrides = {
        "backbone": "decoder",
        "model": decoder,
        "steps": steps,
        "batch_size": 8,
        "grad_accum": 2,
        "max_length": 64,
        "learning_rate": 3e-3,
        "checkpoint_every": 6,
        "eval_every": 0,
        "log_every": 3,
        "eval_fraction": 0.25,
    }
    runner = CliRunner()
    done = runner.invoke(
        main,
        [
            "train-rm",
            str(pairs_file),
            "--out",
            str(run),
            "--json",
            *[f"{k}={v}" for k, v in overrides.items()],
        ],
    )
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output.strip().splitlines()[-1])
    if model_type == "llama":
        assert (
            summary["eval"]["accuracy"] == 1.0
        )  # the two kinds of response are easy to tell apart

    model_dir = run / "model"
    config = json.loads((model_dir / "config.json").read_text())
    architecture = {
        "llama": "LlamaForSequenceClassification",
        "qwen2": "Qwen2ForSequenceClassification",
    }
    assert config["architectures"] == [architecture[model_type]] and config["num_labels"] == 1
    assert config["pad_token_id"] == 257 and config["model_type"] == model_type
    tensors = load_file(str(model_dir / "model.safetensors"))
    assert tensors["score.weight"].shape == (1, 64) and "lm_head.weight" not in tensors
    assert tensors["model.layers.1.self_attn.q_proj.weight"].shape == (64, 64)
    assert ("model.layers.0.self_attn.q_proj.bias" in tensors) == (model_type == "qwen2")
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == fx.CHAT_TEMPLATE
    assert tokenizer_config["truncation_side"] == "left"

    # Import: the exported directory scores the held-out pairs exactly as the run's own
    # final evaluation did with the parameters still in memory.
    _, held_out = split_held_out(load_preferences(pairs_file), 0.25, 0)
    report = evaluate(run, held_out)
    for key in ("accuracy", "reward_mean", "reward_std"):
        assert getattr(report, key) == pytest.approx(summary["eval"][key], abs=1e-6), key

    scored = tmp_path / "scored.jsonl"
    records = [
        {"prompt": "Question 1?", "response": "I can't help with that. Stay safe."},
        {"prompt": "Question 1?", "response": "Sure, here is how to do it."},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    done = runner.invoke(
        main, ["score", str(run), str(tmp_path / "in.jsonl"), "--out", str(scored)]
    )
    assert done.exit_code == 0, done.output
    rewards = [json.loads(line)["reward"] for line in scored.read_text().splitlines()]
    if model_type == "llama":
        assert rewards[0] > rewards[1]


def test_decoder_config_errors_are_one_line(tmp_path, pairs_file):
    from dynrules.models import classifier as mdl

    decoder = fx.tiny_hf_decoder(tmp_path / "windowed", "mistral", sliding_window=32)
    with pytest.raises(DynrulesError, match="exceeds the model's sliding attention window"):
        mdl.pretrained("decoder", decoder, num_outputs=1, max_length=64, seed=0)
    runner = CliRunner()
    for override, message in [
        ("pooling=mean", "a decoder pools its last real token"),
        (f"model={tmp_path / 'missing'}", "neither a Hugging Face model directory"),
    ]:
        done = runner.invoke(
            main,
            [
                "train-rm",
                str(pairs_file),
                "--out",
                str(tmp_path / "run"),
                "backbone=decoder",
                override,
            ],
        )
        assert done.exit_code == 2 and message in done.output, done.output
        assert not (tmp_path / "run").exists()
