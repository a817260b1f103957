"""The rule adapter as a task of the shared trainer: resume after kill -9, gradient accumulation,
and the config keys it refuses (the reward model's are in test_train_run and test_train_sharding).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from dynrules.errors import DynrulesError

K = 3  # the oracle's selected set: the adapter's targets


def _overrides(encoder, **extra) -> list[str]:
    values = {
        "model": str(encoder),
        "batch_size": 4,
        "max_length": 32,
        "learning_rate": 2e-3,
        "eval_every": 0,
    } | extra
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def adapter_data(tmp_path, small_pool):
    """(rated store, tiny encoder directory)."""
    from .test_adapter import rated_store
    from .test_train_run import _tiny_encoder

    return rated_store(tmp_path / "store", small_pool, 24), _tiny_encoder(tmp_path / "encoder")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_adapter_resumes_after_kill_9_to_the_uninterrupted_weights(
    tmp_path, adapter_data, small_pool
):
    from dynrules.train import adapter as adp
    from dynrules.train.config import load_config

    from .test_adapter import rated_store

    store, encoder = adapter_data
    heldout = rated_store(tmp_path / "heldout", small_pool, 6, seed=1)
    overrides = _overrides(
        encoder,
        steps=40,
        checkpoint_every=1,
        keep_checkpoints=2,
        log_every=40,
        eval_data=heldout.path,
    )
    killed = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, __file__, str(store.path), str(killed), *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    checkpoints = killed / "checkpoints"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and child.poll() is None:
        steps = [int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()]
        if steps and max(steps) >= 4:
            break
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-3000:]
    assert not (killed / adp.ADAPTER_FILE).exists()  # written only once training is complete

    config = load_config(None, overrides)
    selection = adp.SelectionConfig(k=K)
    resumed = adp.train_adapter(store, killed, config, selection=selection, progress=False)
    assert resumed.resumed_from is not None and 4 <= resumed.resumed_from < 40
    straight = adp.train_adapter(
        store,
        tmp_path / "straight",
        config.replace(checkpoint_every=40),
        selection=selection,
        progress=False,
    )
    assert straight.resumed_from is None and resumed.steps == straight.steps == 40
    # Held out: every pair of the store eval_data; the same report after either run.
    assert resumed.held_out_pairs == 0 and resumed.train_pairs == 24
    assert resumed.eval["pairs"] == 6
    for key in ("loss", "precision_at_k", "recall_at_k", "label_agreement"):
        assert resumed.eval[key] == pytest.approx(straight.eval[key], abs=1e-6), key
    a, b = (
        load_file(str(run / "model" / "model.safetensors"))
        for run in (killed, tmp_path / "straight")
    )
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=key)
    initial = load_file(str(encoder / "model.safetensors"))
    moved = "encoder.layer.0.output.dense.weight"
    assert np.abs(a[f"bert.{moved}"] - initial[moved]).max() > 1e-3


@pytest.mark.slow
def test_adapter_grad_accum_gives_the_update_of_one_batch(tmp_path, adapter_data):
    from dynrules.train import adapter as adp
    from dynrules.train.config import load_config

    store, encoder = adapter_data
    selection = adp.SelectionConfig(k=K)
    runs = {}
    for grad_accum in (1, 2):
        config = load_config(
            None,
            _overrides(
                encoder,
                steps=2,
                batch_size=8,
                grad_accum=grad_accum,
                warmup_ratio=0,
                eval_fraction=0,
                log_every=1,
            ),
        )
        run = tmp_path / f"accum-{grad_accum}"
        runs[grad_accum] = adp.train_adapter(
            store, run, config, selection=selection, progress=False
        )
    one, two = (
        load_file(str(tmp_path / f"accum-{a}" / "model" / "model.safetensors")) for a in (1, 2)
    )
    for key in one:
        np.testing.assert_allclose(one[key], two[key], atol=1e-5, err_msg=key)
    assert runs[2].final_loss == pytest.approx(runs[1].final_loss, abs=1e-6)
    assert runs[1].eval is None and runs[1].held_out_pairs == 0 and runs[1].train_pairs == 24

    # Run again: nothing left to train; adapter.json keeps the last logged loss.
    again = adp.train_adapter(
        store,
        tmp_path / "accum-1",
        config.replace(grad_accum=1),
        selection=selection,
        progress=False,
    )
    assert again.resumed_from == 2 and again.final_loss == runs[1].final_loss


def test_adapter_refuses_what_it_cannot_honour_and_writes_nothing(tmp_path, adapter_data):
    from dynrules.engine.pool import Rule, RulePool
    from dynrules.train import adapter as adp

    from .conftest import write_jsonl
    from .test_adapter import rated_store

    store, encoder = adapter_data
    other_pool = RulePool("other", (Rule("x", "test", "another rule"),))
    cases = [
        ({"margin_scale": 0.5}, "Bradley–Terry loss; set to 0: margin_scale$"),
        ({"label_confidence": 2.0}, "Bradley–Terry loss; set to 0: label_confidence$"),
        ({"center_coef": 0.01}, "Bradley–Terry loss; set to 0: center_coef$"),
        (
            {"eval_data": str(write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p"}]))},
            "eval_data is a rating store",
        ),
        (
            {"eval_data": str(rated_store(tmp_path / "other", other_pool, 2).path)},
            "another rule pool",
        ),
    ]
    for values, message in cases:
        with pytest.raises(DynrulesError, match=message):
            adp.train_adapter(
                store,
                tmp_path / "run",
                {"model": str(encoder), "max_length": 32} | values,
                selection=adp.SelectionConfig(k=K),
                progress=False,
            )
    assert not (tmp_path / "run").exists()


def test_a_run_resumes_only_as_its_own_task(tmp_path):
    """A run saved before tasks existed is a reward model's; an adapter may not resume it."""
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
    saved = {"model": spec.to_dict(), "config": config.to_dict(), "data": "d"}
    _check_resume(saved, config, spec, "d", tmp_path, REWARD_MODEL)  # no error
    with pytest.raises(DynrulesError, match="is a reward-model run, not a rule-adapter run"):
        _check_resume(saved, config, spec, "d", tmp_path, "rule-adapter")


if __name__ == "__main__":  # the child process of the kill -9 test
    from dynrules.train import adapter as adp
    from dynrules.train.config import load_config

    adp.train_adapter(
        sys.argv[1],
        sys.argv[2],
        load_config(None, sys.argv[3:]),
        selection=adp.SelectionConfig(k=K),
        progress=False,
    )
