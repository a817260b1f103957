"""Mesh, logical-axis rules, sharded train step and checkpoint restore onto other meshes.

The multi-device checks need 8 devices, which on CPU means XLA_FLAGS=
--xla_force_host_platform_device_count=8 set before JAX starts. So they run in a
subprocess (this file executed as a script), leaving every other test with the default
single device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import PartitionSpec

from dynrules.errors import DynrulesError
from dynrules.train import sharding as shd

FAKE_MESH = types.SimpleNamespace(shape={"data": 4, "fsdp": 2, "tensor": 1})


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A 2-layer, 32-wide random BERT with the real MiniLM tokenizer."""
    from dynrules.models import bert
    from dynrules.models import bert_checkpoint as bert_ckpt

    config = bert.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    directory = tmp_path_factory.mktemp("tiny") / "encoder"
    bert_ckpt.write_checkpoint(
        directory,
        config,
        bert.random_params(config),
        bert_ckpt.default_checkpoint_dir() / "tokenizer.json",
    )
    return directory


def test_mesh_spec_parsing_fills_data_and_rejects_bad_specs():
    assert shd.parse_mesh_spec("", 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert shd.parse_mesh_spec("fsdp=2", 8) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert shd.parse_mesh_spec("data=4,fsdp=2", 8) == {"data": 4, "fsdp": 2, "tensor": 1}
    for bad in ("data=3", "model=2", "data", "fsdp=3", "data=0,fsdp=8"):
        with pytest.raises(DynrulesError):
            shd.parse_mesh_spec(bad, 8)


def test_logical_rules_respect_divisibility_and_axis_reuse():
    # embed → fsdp when divisible; vocab → tensor is size 1 here so it stays unsharded.
    assert shd.logical_to_spec(("vocab", "embed"), (30522, 32), FAKE_MESH) == PartitionSpec(
        None, "fsdp"
    )
    # A dimension the mesh axis does not divide is replicated rather than failing.
    assert shd.logical_to_spec(("embed",), (33,), FAKE_MESH) == PartitionSpec(None)
    # The batch uses both data axes; a second dimension cannot reuse fsdp.
    assert shd.logical_to_spec(("batch", "embed"), (16, 32), FAKE_MESH) == PartitionSpec(
        ("data", "fsdp"), None
    )
    # 6 rows do not split 4 ways over data, but do split 2 ways over fsdp.
    assert shd.logical_to_spec(("batch",), (6,), FAKE_MESH) == PartitionSpec("fsdp")


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    from . import decoder_fixtures as fx

    return fx.tiny_hf_decoder(tmp_path_factory.mktemp("tiny") / "decoder")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_eight_device_mesh_matches_single_device_and_restores_across_meshes(
    tmp_path, tiny_encoder, tiny_decoder
):
    env = os.environ | {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    done = subprocess.run(
        [sys.executable, __file__, str(tmp_path), str(tiny_encoder), str(tiny_decoder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    assert report["embed_spec"] == [None, "fsdp", None]  # [layers, embed, mlp]: FSDP-sharded
    assert report["max_step_difference"] < 2e-5, report
    # Packed rows split over the mesh give the single-device gradients (rows padded to 8).
    assert report["packed_grad_difference"] < 1e-5, report
    assert report["decoder_packed_grad_difference"] < 1e-5, report
    assert report["loss_difference"] < 1e-5, report
    for target in ("8x1", "1"):
        assert report[f"restore_{target}_difference"] == 0.0, report
        assert report[f"restore_{target}_devices"] == (8 if target == "8x1" else 1)
    # The decoder on fsdp=4 × tensor=2: heads split over tensor, embed over fsdp.
    assert report["decoder_q_spec"] == [
        None,
        "fsdp",
        "tensor",
        None,
    ]  # [layers, embed, heads, head_dim]
    assert report["decoder_mlp_spec"] == [None, "fsdp", "tensor"]  # [layers, embed, mlp]
    assert report["decoder_max_step_difference"] < 2e-5, report
    assert report["decoder_loss_difference"] < 1e-5, report
    # Two micro-batches of 8 pairs accumulated = one batch of 16.
    assert report["grad_accum_difference"] < 2e-5, report
    # frozen_layers=1 on fsdp × tensor: the single-device step, the bottom layer as pretrained.
    assert report["decoder_frozen_step_difference"] < 2e-5, report
    assert report["decoder_frozen_bottom_change"] == 0.0, report
    assert report["decoder_frozen_top_change"] > 1e-4, report
    assert report["decoder_restore_difference"] == 0.0 and report["decoder_restore_devices"] == 1


def _decoder_checks(out: Path, decoder_dir: str) -> dict:
    """fsdp × tensor step == single-device step; grad_accum=2 == one full batch; a checkpoint
    saved on fsdp × tensor restores onto one device."""
    import jax

    from dynrules.models import classifier as mdl
    from dynrules.train.checkpoint import Checkpointer
    from dynrules.train.config import TrainConfig
    from dynrules.train.data import Pair
    from dynrules.train.trainer import ExampleBatches, TokenizedExamples, Trainable, pair_examples

    config = TrainConfig(
        steps=4,
        batch_size=16,
        max_length=48,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        backbone="decoder",
        model=decoder_dir,
        packing=False,
    )
    model = mdl.pretrained("decoder", decoder_dir, num_outputs=1, max_length=48, seed=0)
    pairs = [
        Pair(chosen=f"a safe answer {i} " * (1 + i % 3), rejected=f"harmful {i}", prompt=f"q{i}")
        for i in range(32)
    ]
    tokens = TokenizedExamples.build(pair_examples(pairs, model.render), model.tokenizer, 48, 2)

    def run(mesh_spec, devices, grad_accum=1, frozen_layers=0):
        cfg = config.replace(grad_accum=grad_accum, frozen_layers=frozen_layers)
        batches = ExampleBatches(
            tokens,
            seed=0,
            batch_size=16,
            grad_accum=grad_accum,
            max_length=48,
            pad_id=model.tokenizer.pad_id,
        )
        trainable = Trainable.build(model.spec, cfg, shd.make_mesh(mesh_spec, devices))
        state = trainable.initial_state(model.params)
        step = trainable.train_step(cfg)
        losses = []
        for index in range(2):
            state, sums = step(state, trainable.global_batch(batches.batch(index)))
            losses.append(float(sums["loss"]) / float(sums["pairs"]))
        return trainable, state, losses

    def difference(a, b):
        return max(
            float(np.abs(x - y).max())
            for x, y in zip(
                jax.tree.leaves(shd.gather(a["params"])),
                jax.tree.leaves(shd.gather(b["params"])),
                strict=True,
            )
        )

    _, sharded, sharded_losses = run("fsdp=4,tensor=2", jax.devices())
    single_trainable, single, single_losses = run("", jax.devices()[:1])
    _, accumulated, _ = run("", jax.devices()[:1], grad_accum=2)
    # Partial fine-tuning sharded: the same step as on one device, the bottom layer untouched.
    _, frozen_sharded, _ = run("fsdp=4,tensor=2", jax.devices(), frozen_layers=1)
    _, frozen_single, _ = run("", jax.devices()[:1], frozen_layers=1)
    trained = shd.gather(frozen_sharded["params"])["decoder"]["layers"]
    pretrained = model.params["decoder"]["layers"]
    layers = sharded["params"]["decoder"]["layers"]
    checkpoints = Checkpointer(out / "decoder-ckpt", every=1, keep=1)
    checkpoints.save(2, sharded, {"step": 2})
    checkpoints.wait()
    restored, _ = checkpoints.restore(single_trainable.abstract_state, 2)
    checkpoints.close()
    return {
        "decoder_q_spec": list(layers["q_kernel"].sharding.spec),
        "decoder_mlp_spec": list(layers["gate_kernel"].sharding.spec),
        "decoder_max_step_difference": difference(sharded, single),
        "decoder_loss_difference": max(
            abs(a - b) for a, b in zip(sharded_losses, single_losses, strict=True)
        ),
        "grad_accum_difference": difference(accumulated, single),
        "decoder_frozen_step_difference": difference(frozen_sharded, frozen_single),
        "decoder_frozen_bottom_change": max(
            float(np.abs(trained[name][0] - np.asarray(pretrained[name][...])[0]).max())
            for name in trained
        ),
        "decoder_frozen_top_change": max(
            float(np.abs(trained[name][1] - np.asarray(pretrained[name][...])[1]).max())
            for name in trained
        ),
        "decoder_restore_difference": difference(restored, sharded),
        "decoder_restore_devices": len(restored["params"]["head_kernel"].sharding.device_set),
        "decoder_packed_grad_difference": _packed_grad_difference(
            model.spec, config, model.params, tokens, "fsdp=4,tensor=2", model.tokenizer.pad_id
        ),
    }


def _packed_grad_difference(spec, config, host, tokens, mesh_spec: str, pad_id: int) -> float:
    """Largest gradient difference of the packed loss on ``mesh_spec`` (all devices) against one
    device, relative to the largest gradient. Gradients, not parameters after a step: AdamW
    turns the float noise of a gradient that is zero in exact arithmetic (the encoder head's
    bias: it cancels in r_c − r_r) into a full-size update of either sign."""
    import jax

    from dynrules.train.trainer import ExampleBatches, Trainable

    config = config.replace(packing=True)
    grads = []
    for devices in (jax.devices(), jax.devices()[:1]):
        trainable = Trainable.build(
            spec, config, shd.make_mesh(mesh_spec if len(devices) > 1 else "", devices)
        )
        batches = ExampleBatches(
            tokens,
            seed=0,
            batch_size=config.batch_size,
            grad_accum=1,
            max_length=config.max_length,
            pad_id=pad_id,
            packing=trainable.row_layout(),
        )
        micro = jax.tree.map(lambda x: x[0], trainable.global_batch(batches.batch(0)))
        loss = trainable.micro_loss(config)
        params = trainable.initial_state(host)["params"]
        grads.append(
            jax.tree.leaves(shd.gather(jax.jit(jax.grad(loss, has_aux=True))(params, micro)[0]))
        )
    scale = max(float(np.abs(g).max()) for g in grads[1])
    return max(float(np.abs(a - b).max()) for a, b in zip(*grads, strict=True)) / scale


def _multi_device_main(out: Path, encoder_dir: str, decoder_dir: str) -> None:
    """Runs inside the 8-device subprocess; prints one JSON report line."""
    import jax

    from dynrules.models import bert_checkpoint as bert_ckpt
    from dynrules.models import classifier as mdl
    from dynrules.models.templates import format_text
    from dynrules.train.checkpoint import Checkpointer
    from dynrules.train.config import TrainConfig
    from dynrules.train.data import Pair
    from dynrules.train.trainer import ExampleBatches, TokenizedExamples, Trainable, pair_examples

    loaded = bert_ckpt.read_checkpoint(encoder_dir)
    config = TrainConfig(
        steps=4, batch_size=16, max_length=32, learning_rate=1e-3, warmup_ratio=0.0, packing=False
    )
    spec = mdl.ModelSpec(loaded.config, pooling=config.pooling, max_length=config.max_length)
    host = {"encoder": loaded.params, **mdl.initial_head(spec, 0)}
    pairs = [
        Pair(
            chosen=f"safe answer {i} " * (1 + i % 3), rejected=f"harmful answer {i}", prompt=f"q{i}"
        )
        for i in range(32)
    ]
    tokens = TokenizedExamples.build(
        pair_examples(pairs, format_text), loaded.tokenizer, config.max_length, 2
    )
    batches = ExampleBatches(tokens, seed=0, batch_size=16, grad_accum=1, max_length=32, pad_id=0)

    def run(mesh_spec, devices):
        trainable = Trainable.build(spec, config, shd.make_mesh(mesh_spec, devices))
        state = trainable.initial_state(host)
        step = trainable.train_step(config)
        losses = []
        for index in range(2):
            state, sums = step(state, trainable.global_batch(batches.batch(index)))
            losses.append(float(sums["loss"]) / float(sums["pairs"]))
        return trainable, state, losses

    sharded_trainable, sharded, sharded_losses = run("data=4,fsdp=2", jax.devices())
    _, single, single_losses = run("", jax.devices()[:1])
    gathered = shd.gather(sharded["params"])
    reference = shd.gather(single["params"])
    difference = max(
        float(np.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(gathered), jax.tree.leaves(reference), strict=True)
    )
    embed = sharded["params"]["encoder"]["layers"]["mlp_in_kernel"].sharding.spec

    checkpoints = Checkpointer(out / "ckpt", every=1, keep=2)
    checkpoints.save(2, sharded, {"step": 2})
    checkpoints.wait()
    report = {
        "devices": jax.device_count(),
        "embed_spec": list(embed),
        "max_step_difference": difference,
        "loss_difference": max(
            abs(a - b) for a, b in zip(sharded_losses, single_losses, strict=True)
        ),
    }
    saved = jax.tree.leaves(shd.gather(sharded["params"]))
    for name, (mesh_spec, devices) in {
        "8x1": ("data=8", jax.devices()),
        "1": ("", jax.devices()[:1]),
    }.items():
        target = Trainable.build(spec, config, shd.make_mesh(mesh_spec, devices)).abstract_state
        restored, meta = checkpoints.restore(target, 2)
        assert meta["step"] == 2
        leaves = jax.tree.leaves(shd.gather(restored["params"]))
        report[f"restore_{name}_difference"] = max(
            float(np.abs(a - b).max()) for a, b in zip(saved, leaves, strict=True)
        )
        report[f"restore_{name}_devices"] = len(
            restored["params"]["head_kernel"].sharding.device_set
        )
        assert int(restored["step"]) == 2
    checkpoints.close()
    report["packed_grad_difference"] = _packed_grad_difference(
        spec, config, host, tokens, "data=4,fsdp=2", 0
    )
    report |= _decoder_checks(out, decoder_dir)
    print(json.dumps(report))


if __name__ == "__main__":
    _multi_device_main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
