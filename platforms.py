"""Which JAX backends to start: libtpu only where an accelerator may be.

The default install carries libtpu so that `dynrules plan` can compile for TPU topologies on
any machine. Left alone, JAX starts libtpu's backend at its first device query on every
machine, and on one without a TPU libtpu prints an INVALID_ARGUMENT trace about
TPU_WORKER_HOSTNAMES to stderr. So on a machine with no accelerator device node at all (TPU,
NVIDIA or AMD) where the user has not chosen (``JAX_PLATFORMS``), JAX starts its CPU backend
only. Ahead-of-time compilation for a TPU topology loads libtpu by itself; on such a machine
:func:`quiet_compile_only_libtpu` gives libtpu the worker and accelerator settings it would
otherwise complain about (a trace on stderr), which compile-only topologies do not use.
"""

from __future__ import annotations

import glob
import os

ACCELERATOR_DEVICE_NODES = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")


def _has_accelerator() -> bool:
    return any(glob.glob(n) for n in ACCELERATOR_DEVICE_NODES)


def skip_absent_tpu() -> None:
    """Set ``JAX_PLATFORMS=cpu`` on a machine without accelerators (call before JAX starts)."""
    if "JAX_PLATFORMS" in os.environ or _has_accelerator():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


def quiet_compile_only_libtpu() -> None:
    """Before libtpu loads for compile-only TPU topologies on a machine without accelerators:
    a local worker and an accelerator type, unless set, so libtpu prints no start-up trace. On
    a TPU host nothing is changed (its own settings must reach libtpu)."""
    if _has_accelerator():
        return
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
