"""Compilation options shared by every kernel, in one place.

No kernel reassociates or contracts floating-point arithmetic: a fused multiply-add or a
reordered sum would change which rule wins a near-tie and whether a margin is exactly zero, and
the kernels must agree bit for bit with their NumPy twins and across thread counts. The flags we
do allow only promise finite inputs (the store rejects NaN and infinities at ingest), which lets
LLVM vectorise comparisons without changing any result.
"""

import os
from typing import Literal, TypedDict

FINITE_ONLY = {"nnan", "ninf", "nsz"}


class JitOptions(TypedDict, total=False):
    """The keyword arguments of ``numba.njit`` that the kernels set."""

    nogil: bool
    cache: bool
    error_model: Literal["python", "numpy"]
    fastmath: set[str]
    parallel: bool


def _cache_writable() -> bool:
    """cache=True needs a writable cache directory; without one, compile per process instead."""
    directory = os.environ.get("NUMBA_CACHE_DIR")
    if not directory:
        return os.access(os.path.dirname(__file__), os.W_OK)  # Numba's default: beside the module
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


_CACHE = _cache_writable()

# Idle OpenMP workers sleep rather than spin. Streaming selection alternates short kernel calls
# with TensorStore's read threads on the same cores; a spinning worker takes them from the reads
# (it cost a third more CPU per pair). Read when the OpenMP runtime loads, at the first kernel.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

EXACT: JitOptions = dict(nogil=True, cache=_CACHE, error_model="numpy", fastmath=FINITE_ONLY)
PARALLEL_EXACT: JitOptions = {**EXACT, "parallel": True}
# Only for the roofline read pass, whose sum is a sink for loads, not a result anyone reads.
PARALLEL_REASSOC: JitOptions = {
    **PARALLEL_EXACT,
    "fastmath": FINITE_ONLY | {"reassoc", "contract", "arcp"},
}

# Rows per parallel work item: large enough to amortise scheduling and per-block scratch buffers,
# small enough to balance across threads.
ROW_BLOCK = 2048
# Bytes the vectoriser handles per unrolled loop step (4 AVX-512 registers): key rows padded to a
# multiple of it run without a scalar remainder loop.
VECTOR_BYTES = 256
