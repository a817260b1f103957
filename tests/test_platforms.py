"""A machine without a TPU starts JAX quietly although libtpu is installed (for `plan`)."""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from dynrules.platforms import ACCELERATOR_DEVICE_NODES

LIBTPU_NOISE = ("TPU_WORKER_HOSTNAMES", "libtpu", "TPU accelerator type")


def _stderr_of(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return done.stderr


@pytest.mark.skipif(
    any(glob.glob(n) for n in ACCELERATOR_DEVICE_NODES),
    reason="this machine has an accelerator device node",
)
def test_jax_through_dynrules_prints_nothing_of_libtpu():
    stderr = _stderr_of(
        "import dynrules.train.sharding as shd, jax; print(jax.devices(), shd.make_mesh(''))"
    )
    assert not [word for word in LIBTPU_NOISE if word in stderr], stderr
    if importlib.util.find_spec("libtpu") is not None:  # the noise this avoids is real here
        bare = _stderr_of("import jax; jax.devices()")
        assert any(word in bare for word in LIBTPU_NOISE), bare


@pytest.mark.skipif(
    any(glob.glob(n) for n in ACCELERATOR_DEVICE_NODES)
    or importlib.util.find_spec("libtpu") is None,
    reason="needs libtpu on a machine without an accelerator device node",
)
@pytest.mark.slow
def test_planning_for_a_tpu_topology_prints_nothing_of_libtpu():
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("JAX_PLATFORMS", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE")
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dynrules",
            "plan",
            "--model",
            "smollm2-135m",
            "--topology",
            "v5e:1x1",
            "--seq",
            "32",
            "--batch",
            "1",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"fits": true' in done.stdout
    assert not [word for word in LIBTPU_NOISE if word in done.stderr], done.stderr
