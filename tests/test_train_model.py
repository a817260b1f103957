"""Reward model pieces: padding independence, the BT loss, the template, config and input errors."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynrules.errors import DynrulesError, InputError
from dynrules.models import bert
from dynrules.models import classifier as mdl
from dynrules.models import tokenizer as tok
from dynrules.models.templates import format_text
from dynrules.train.config import TrainConfig, load_config
from dynrules.train.data import load_preferences
from dynrules.train.objective import bradley_terry, summarize

TINY = bert.BertConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=128,
)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_score_alone_equals_score_inside_a_padded_batch(pooling):
    spec = mdl.ModelSpec(TINY, pooling=pooling, max_length=64)
    graphdef, _ = mdl.abstract_model(spec)
    params = {"encoder": bert.random_params(TINY, seed=1), **mdl.initial_head(spec, 0)}
    params["head_kernel"] = params["head_kernel"] * 1000  # make scores big enough to compare
    forward = jax.jit(lambda p, ids, lengths: mdl.apply(graphdef, p, ids, lengths))
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1000, 2000, size=n).astype(np.int32) for n in (5, 17, 9, 30)]
    alone = [float(forward(params, *tok.pad_batch([s], len(s), 1, 0))[0, 0]) for s in seqs]
    batched = forward(params, *tok.pad_batch(seqs, 64, 8, 0))[: len(seqs), 0]
    np.testing.assert_allclose(np.asarray(batched), alone, rtol=1e-5, atol=1e-5)
    assert np.std(alone) > 1e-3  # the texts do score differently


def test_untrained_head_scores_near_zero_so_first_loss_is_log2():
    spec = mdl.ModelSpec(TINY)
    graphdef, _ = mdl.abstract_model(spec)
    params = {"encoder": bert.random_params(TINY), **mdl.initial_head(spec, 0)}
    ids, lengths = tok.pad_batch([np.arange(100, 110, dtype=np.int32)] * 4, 16, 4, 0)
    rewards = mdl.apply(graphdef, params, jnp.asarray(ids), jnp.asarray(lengths))
    assert float(jnp.abs(rewards).max()) < 0.05
    loss, _ = bradley_terry(rewards[:2, 0], rewards[2:, 0], jnp.zeros(2))
    assert abs(float(loss) - math.log(2)) < 0.01


def test_bradley_terry_loss_margin_centering_and_ties():
    chosen, rejected = jnp.array([2.0, 0.5, 1.0]), jnp.array([1.0, 1.5, 1.0])
    loss, sums = bradley_terry(chosen, rejected, jnp.zeros(3))
    expected = np.mean(np.logaddexp(0, -(np.array([2.0, 0.5, 1.0]) - np.array([1.0, 1.5, 1.0]))))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    metrics = summarize(jax.device_get(sums))
    assert metrics["accuracy"] == pytest.approx(1 / 3)  # the tie counts as wrong
    assert metrics["margin"] == pytest.approx(0.0)
    assert metrics["reward_mean"] == pytest.approx(7 / 6)
    margin_loss, _ = bradley_terry(chosen, rejected, jnp.full(3, 0.5), margin_scale=1.0)
    assert float(margin_loss) > float(loss)  # a required margin makes the same rewards worse
    centred, _ = bradley_terry(chosen, rejected, jnp.zeros(3), center_coef=0.01)
    assert float(centred) == pytest.approx(expected + 0.01 * np.mean([9.0, 4.0, 4.0]), rel=1e-6)


def test_soft_labels_from_rule_margins():
    """A pair with rule margin m is the soft label p = σ(β·|m|), whose loss is least where the
    reward difference equals the posterior log-odds β·|m|; a pair without a margin stays hard."""
    beta, margins = 0.75, np.array([2.0, -0.4, 0.0])
    difference = np.array([0.3, -1.0, 0.8])
    loss, _ = bradley_terry(
        jnp.asarray(difference), jnp.zeros(3), jnp.asarray(margins), label_confidence=beta
    )
    p = np.where(margins == 0, 1.0, 1 / (1 + np.exp(-beta * np.abs(margins))))
    expected = np.mean(p * np.logaddexp(0, -difference) + (1 - p) * np.logaddexp(0, difference))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    hard, _ = bradley_terry(jnp.asarray(difference), jnp.zeros(3), jnp.asarray(margins))
    assert float(hard) == pytest.approx(np.mean(np.logaddexp(0, -difference)), rel=1e-6)

    def one_pair(d):
        return bradley_terry(d[None], jnp.zeros(1), jnp.array([2.0]), label_confidence=beta)[0]

    gradient = jax.grad(one_pair)
    assert abs(float(gradient(jnp.float32(beta * 2.0)))) < 1e-6
    assert float(gradient(jnp.float32(beta * 2.0 + 1))) > 0 > float(gradient(jnp.float32(0.0)))


def test_min_margin_leaves_out_the_near_chance_rule_labels_only():
    """Training keeps pairs with |m| ≥ min_margin and those without a margin (certain labels);
    the held-out pairs are never filtered; a filter that leaves nothing is an error."""
    from dynrules.train.trainer import RewardModelTask

    margins = [0.0, 0.25, -0.5, 1.0, -3.0, 0.75]  # exact in float32
    pairs = [
        {"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}", "margin": m}
        for i, m in enumerate(margins)
    ]
    task = RewardModelTask(pairs)
    render = mdl.pretrained("encoder", "", num_outputs=1, max_length=32, seed=0).render

    def kept(**config):
        examples, held = task.split(TrainConfig(eval_fraction=0.0, **config), render)
        return examples.labels["margins"].tolist()

    assert kept() == margins
    assert kept(min_margin=1.0) == [0.0, 1.0, -3.0]
    with pytest.raises(DynrulesError, match="min_margin=5.0 leaves none of the 5"):
        RewardModelTask(pairs[1:]).split(TrainConfig(eval_fraction=0.0, min_margin=5.0), render)


def test_head_learning_rate_scales_only_the_head_updates():
    from dynrules.train.objective import make_optimizer

    params = {"encoder": {"w_kernel": jnp.ones(3)}, "head_kernel": jnp.ones(3)}
    grads = jax.tree.map(lambda x: 0.1 * x, params)
    updates = {}
    for scale in (1.0, 30.0):
        tx = make_optimizer(lambda _: 1e-3, weight_decay=0.0, clip_norm=1e9, head_scale=scale)
        updates[scale], _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(
        updates[30.0]["encoder"]["w_kernel"], updates[1.0]["encoder"]["w_kernel"]
    )
    np.testing.assert_allclose(
        updates[30.0]["head_kernel"], 30 * updates[1.0]["head_kernel"], rtol=1e-6
    )


def test_template_handles_plain_prompts_transcripts_and_hh_pairs():
    assert format_text("Hi?", "Hello.") == "\n\nHuman: Hi?\n\nAssistant: Hello."
    transcript = "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: And?"
    assert format_text(transcript, "More.") == transcript + "\n\nAssistant: More."
    assert (
        format_text("\n\nHuman: Hi?\n\nAssistant:", "Yes.") == "\n\nHuman: Hi?\n\nAssistant: Yes."
    )
    assert format_text("", "\n\nHuman: x\n\nAssistant: y") == "\n\nHuman: x\n\nAssistant: y"


def test_config_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "rm.yaml"
    path.write_text("steps: 50\nlearning_rate: 1.0e-4\nmesh: {data: 4, fsdp: 2}\n")
    config = load_config(path, ["batch_size=16", "remat=true", "learning_rate=3e-5"])
    assert (config.steps, config.batch_size, config.remat, config.learning_rate) == (
        50,
        16,
        "full",  # a boolean remat means full recomputation
        3e-5,
    )
    assert load_config(None, ["remat=dots"]).remat == "dots"
    with pytest.raises(DynrulesError, match="remat must be one of none, full, dots"):
        load_config(None, ["remat=some"])
    with pytest.raises(DynrulesError, match="backbone must be one of encoder, decoder"):
        load_config(None, ["backbone=rnn"])
    assert config.mesh == "data=4,fsdp=2"
    assert TrainConfig().steps == 1000
    with pytest.raises(DynrulesError, match="unknown key 'stpes'"):
        load_config(None, ["stpes=3"])
    with pytest.raises(DynrulesError, match="rm.yaml"):
        path.write_text("bogus: 1\n")
        load_config(path)
    with pytest.raises(DynrulesError, match="steps must be int"):
        load_config(None, ["steps=many"])
    with pytest.raises(DynrulesError, match="multiple of grad_accum"):
        load_config(None, ["batch_size=10", "grad_accum=4"])


def test_pair_files_errors_name_file_line_and_field(tmp_path):
    good = {
        "prompt": "p",
        "chosen": "a",
        "rejected": "b",
        "margin": 0.5,
        "rule_ids": ["r1"],
        "subset": "s",
    }
    hh = {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: z"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(hh) + "\n")
    pairs = load_preferences(path)
    assert [p.margin for p in pairs] == [0.5, 0.0] and pairs[0].subset == "s"
    assert pairs[1].texts() == (hh["chosen"], hh["rejected"])
    cases = {
        "": "empty file",
        json.dumps(good) + "\n{not json\n": "line 2.*malformed JSON",
        json.dumps({"prompt": "p", "chosen": "a"}) + "\n": "line 1, field 'rejected': missing",
        json.dumps(good | {"margin": "big"}) + "\n": "field 'margin'",
        "[1, 2]\n": "must be a JSON object",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(InputError, match=message):
            load_preferences(path)
