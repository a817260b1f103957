"""Partial fine-tuning (``frozen_layers``): the bottom layers and the embeddings stay as they
were, the layers above learn exactly as they do in full fine-tuning, encoder and decoder."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner
from flax import nnx

from dynrules.cli import main
from dynrules.errors import DynrulesError
from dynrules.models import bert, llama
from dynrules.models import classifier as mdl
from dynrules.models.layers import scan_layers
from dynrules.train import sharding as shd
from dynrules.train.config import TrainConfig
from dynrules.train.trainer import Trainable

from . import decoder_fixtures as fx

TINY_BERT = bert.BertConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)


def _backbone(kind: str, frozen: int, unroll: bool = False):
    options = {"rngs": nnx.Rngs(0), "frozen": frozen, "unroll": unroll}
    if kind == "encoder":
        return bert.BertEncoder(TINY_BERT, **options)
    return llama.LlamaDecoder(fx.tiny_config(num_hidden_layers=4), **options)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_frozen_layers_get_no_gradient_and_the_rest_the_full_models(kind):
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 60, (2, 12)), jnp.int32)
    lengths = jnp.array([12, 7], jnp.int32)

    def grads(frozen):
        graphdef, state = nnx.split(_backbone(kind, frozen))

        def loss(params):
            return jnp.sum(jnp.tanh(nnx.merge(graphdef, params)(ids, lengths)))

        return nnx.to_pure_dict(jax.grad(loss)(state))

    full, partial = grads(0), grads(2)
    for name, value in partial["layers"].items():
        np.testing.assert_array_equal(value[:2], 0.0)
        np.testing.assert_allclose(value[2:], full["layers"][name][2:], rtol=1e-5, atol=1e-7)
        assert np.abs(value[2:]).max() > 0  # the trained layers do learn
    for name, value in partial.items():
        if name != "layers" and name != "final_norm":  # the embeddings, below every layer
            np.testing.assert_array_equal(value, 0.0)


def test_frozen_layers_leave_the_bottom_unchanged_after_training(tmp_path):
    from dynrules.models import classifier as mdl

    decoder = fx.tiny_hf_decoder(tmp_path / "decoder")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": f"Q{i}?", "chosen": "No, sorry.", "rejected": "Sure: step."})
            + "\n"
            for i in range(8)
        )
    )
    keys = dict(backbone="decoder", model=decoder, steps=3, batch_size=4, max_length=32)
    keys |= dict(learning_rate=1e-2, eval_fraction=0.0, frozen_layers=1)
    done = CliRunner().invoke(
        main,
        ["train-rm", str(pairs), "--out", str(tmp_path / "run")]
        + [f"{k}={v}" for k, v in keys.items()],
    )
    assert done.exit_code == 0, done.output

    def read(params):  # lazy checkpoint views → arrays
        return jax.tree.map(lambda view: np.asarray(view[...]), params["decoder"])

    before = read(mdl.pretrained("decoder", decoder, num_outputs=1, max_length=32, seed=0).params)
    after = read(mdl.read_model(tmp_path / "run" / "model").params)
    for name, value in after["layers"].items():
        np.testing.assert_array_equal(value[0], before["layers"][name][0])
        assert not np.array_equal(value[1], before["layers"][name][1]), name
    np.testing.assert_array_equal(after["embed"], before["embed"])

    keys["frozen_layers"] = 2  # the tiny decoder has two layers: nothing would train
    done = CliRunner().invoke(
        main,
        ["train-rm", str(pairs), "--out", str(tmp_path / "run2")]
        + [f"{k}={v}" for k, v in keys.items()],
    )
    assert done.exit_code != 0
    assert "frozen_layers must be at least 0 and leave at least one of the model's 2" in done.output
    assert not (tmp_path / "run2" / "model").exists()


def test_scan_layers_without_freezing_is_one_scan():
    def step(hidden, params):
        return hidden * params["w"], None

    layer_params = {"w": jnp.arange(1.0, 5.0)}
    assert float(scan_layers(step, jnp.float32(1.0), layer_params)) == 24.0
    assert float(scan_layers(step, jnp.float32(1.0), layer_params, frozen=3)) == 24.0
    with pytest.raises(DynrulesError, match="frozen_layers"):
        llama.LlamaDecoder(fx.tiny_config(), rngs=nnx.Rngs(0), frozen=-1)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_unrolled_layers_are_straight_line_code_that_computes_what_the_loop_does(kind):
    """``unroll`` writes the trained layers out (no loop stacking their activations); frozen
    ones stay a loop. Unrolled and looped give the same values and gradients."""
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 60, (2, 12)), jnp.int32)
    lengths = jnp.array([12, 9], jnp.int32)

    def run(frozen, unroll):
        graphdef, state = nnx.split(_backbone(kind, frozen, unroll=unroll))

        def loss(params):
            return jnp.sum(jnp.tanh(nnx.merge(graphdef, params)(ids, lengths)))

        whiles = jax.jit(jax.grad(loss)).lower(state).as_text().count("stablehlo.while")
        value, grads = jax.value_and_grad(loss)(state)
        return whiles, float(value), nnx.to_pure_dict(grads)["layers"]

    for frozen in (0, 1):
        (loop_whiles, loop_value, loop_grads), (whiles, value, grads) = (
            run(frozen, unroll) for unroll in (False, True)
        )
        assert loop_whiles >= 1 and whiles == (1 if frozen else 0)  # the frozen loop has no grad
        np.testing.assert_allclose(value, loop_value, rtol=1e-6)
        for name, grad in grads.items():
            np.testing.assert_allclose(grad, loop_grads[name], rtol=1e-4, atol=1e-6)


def test_the_trainer_unrolls_on_a_cpu_only():
    spec = mdl.ModelSpec(TINY_BERT, max_length=32)
    config = TrainConfig(steps=2, batch_size=2, max_length=32)
    trainable = Trainable.build(spec, config, shd.make_mesh("", jax.devices()[:1]))
    model = nnx.merge(trainable.graphdef, trainable.abstract_state["params"])
    assert model.encoder.unroll  # this machine's devices are CPUs
    scorer_model = nnx.merge(*mdl.abstract_model(spec))
    assert not scorer_model.encoder.unroll  # a forward alone stacks nothing: the loop
