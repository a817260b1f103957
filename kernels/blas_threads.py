"""One BLAS thread for the kernels' matrix products on the thread that calls them.

Numba's ``np.dot`` calls scipy's BLAS. When XLA runs a kernel inside a compiled step (see
kernels.xla_ffi), OpenBLAS would wake its own threads for each product while XLA's other
threads run the step's other operations: on the 2-core VM that contention made the attention
kernels 3–4 × slower inside the MiniLM training step than alone (docs/performance.md). OpenBLAS
≥ 0.3.27 sets a thread count for the calling thread only (``openblas_set_num_threads_local``,
which returns the count before); :data:`set_local_threads` calls it, or does nothing where the
BLAS has no such function (another BLAS, or an older OpenBLAS).

The function is bound by symbol name, registered with LLVM when this module is imported, so
the kernels that call it stay in Numba's on-disk cache (an address baked into the code would
not survive a new process).
"""

import ctypes
import ctypes.util
from typing import Any

import numba
from llvmlite import binding as llvm  # type: ignore[import-untyped]
from numba import types
from numba.extending import get_cython_function_address

from .config import EXACT

SYMBOL = "dynrules_blas_set_num_threads_local"
OPENBLAS_SETTER = "openblas_set_num_threads_local"

# (threads) → the calling thread's count before; called from Numba code, hence typed Any.
set_local_threads: Any = types.ExternalFunction(SYMBOL, types.int32(types.int32))


@numba.cfunc(types.int32(types.int32), cache=EXACT["cache"])
def _no_thread_control(threads):
    return 0


_NO_OP = int(_no_thread_control.address or 0)  # a compiled cfunc always has one


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def blas_library() -> str | None:
    """The shared library whose sgemm Numba's ``np.dot`` calls (None if unknown); looking a
    symbol up in it searches the libraries it loads too (scipy's wrapper → its OpenBLAS)."""
    sgemm = get_cython_function_address("scipy.linalg.cython_blas", "sgemm")
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    info = _DlInfo()
    if not libc.dladdr(ctypes.c_void_p(sgemm), ctypes.byref(info)) or not info.dli_fname:
        return None
    return info.dli_fname.decode()


def _setter_address() -> int:
    """Address of the BLAS library's thread-local setter, or of a no-op without one."""
    path = blas_library()
    setter = getattr(ctypes.CDLL(path), OPENBLAS_SETTER, None) if path is not None else None
    address = ctypes.cast(setter, ctypes.c_void_p).value if setter is not None else None
    return address if address else _NO_OP


_SETTER = _setter_address()
llvm.add_symbol(SYMBOL, _SETTER)


def controls_threads() -> bool:
    """Whether :data:`set_local_threads` reaches the BLAS (False: it does nothing)."""
    return _SETTER != _NO_OP
