"""Which JAX backends to start: libtpu only where an accelerator may be.

The default install carries libtpu so that `dynrules plan` can compile for TPU topologies on
any machine. Left alone, JAX starts libtpu's backend at its first device query on every
machine, and on one without a TPU libtpu prints an INVALID_ARGUMENT trace about
TPU_WORKER_HOSTNAMES to stderr. So on a machine with no accelerator device node at all (TPU,
NVIDIA or AMD) where the user has not chosen (``JAX_PLATFORMS``), JAX starts its CPU backend
only. Ahead-of-time compilation for a TPU topology loads libtpu by itself and is not affected.
"""

from __future__ import annotations

import glob
import os

ACCELERATOR_DEVICE_NODES = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")


def skip_absent_tpu() -> None:
    """Set ``JAX_PLATFORMS=cpu`` on a machine without accelerators (call before JAX starts)."""
    if "JAX_PLATFORMS" in os.environ or any(glob.glob(n) for n in ACCELERATOR_DEVICE_NODES):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
