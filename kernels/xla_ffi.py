"""The attention kernels as XLA FFI handlers: Numba C callbacks that XLA calls inside a step.

A ``jax.pure_callback`` leaves the compiled step for Python at every call (the GIL, a host
round trip between XLA's fused layers); an FFI custom call does not: XLA calls the handler's
address on its own thread with its own buffers. The handlers read XLA's call frame through the
C ABI of ``xla/ffi/api/c_api.h`` (the typed FFI, API version 0.3, shipped with jaxlib 0.10), so
nothing is compiled outside Numba. models.attention registers them (``jax.ffi``) and checks the
shapes when it traces a call; here they are only read.

Every handler runs its kernel's serial form on the calling XLA thread: Numba's threads beside
XLA's made the whole MiniLM step slower on a 2-core machine (docs/performance.md).

Call-frame layout (x86-64 and aarch64: 8-byte words):
- XLA_FFI_CallFrame: struct_size, extension_start, api, ctx, stage (int), then the args
  {struct_size, extension_start, size, types, args} at word 5 and the rets at word 10, ...
- XLA_FFI_Buffer: struct_size, extension_start, dtype (int), data, rank, dims.
- The handler returns an XLA_FFI_Error pointer: 0, success (the shapes were checked at trace
  time, and the kernels have no failure of their own).
- A call frame whose extension is the metadata one (type 1) asks for the handler's API version
  and traits instead: XLA does that once, when the handler is registered.
"""

from typing import Any

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from . import attention
from .config import EXACT

API_VERSION = (0, 3)  # the c_api.h the layout above was read from
_EXECUTE = 3  # XLA_FFI_ExecutionStage_EXECUTE; the other stages have nothing to do
_FRAME_WORDS = 15  # through the rets' buffer list
_ARGS, _RETS = 9, 14  # words holding the args' and rets' buffer-pointer lists
_API_VERSION_STRUCT_SIZE = 24  # XLA_FFI_Api_Version: struct_size, extension_start, major, minor
_METADATA_EXTENSION = 1  # XLA_FFI_Extension_Metadata


def _address_as_pointer(typingctx, address):
    """Typing and code of ``_pointer(address)``: the int64 ``address`` as a void pointer (for
    numba.carray)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.voidptr))

    return types.voidptr(types.int64), codegen


# Called from Numba code with the address only (Numba supplies the typing context); typed Any
# because the stubs describe the Python-level signature.
_pointer: Any = intrinsic(_address_as_pointer)


@numba.njit(inline="always")
def _words(address, count):
    return numba.carray(_pointer(address), (count,), np.int64)


@numba.njit(inline="always")
def _buffer(frame, which, index, shape, dtype):
    """Buffer ``index`` of the args (which = _ARGS) or rets (_RETS) as an array of ``shape``."""
    buffer = _words(_words(frame[which], index + 1)[index], 6)
    return numba.carray(_pointer(buffer[3]), shape, dtype)


@numba.njit(inline="always")
def _dims(frame, index):
    """The dims of argument ``index`` (a rank-4 buffer)."""
    buffer = _words(_words(frame[_ARGS], index + 1)[index], 6)
    dims = _words(buffer[5], 4)
    return dims[0], dims[1], dims[2], dims[3]


@numba.njit(inline="always")
def _asks_metadata(frame):
    """Whether the call frame's first extension {struct_size, type (int), next} is metadata."""
    return frame[1] != 0 and _words(frame[1], 2)[1] & 0xFFFFFFFF == _METADATA_EXTENSION


@numba.njit
def _report_metadata(extension):
    """Fill XLA_FFI_Metadata {struct_size, api_version {struct_size, extension_start, major,
    minor}, traits, state_type_id} behind the metadata extension {base (3 words), metadata}."""
    address = _words(extension, 4)[3]
    metadata = _words(address, 6)
    halves = numba.carray(_pointer(address), (12,), np.int32)
    metadata[1] = _API_VERSION_STRUCT_SIZE
    metadata[2] = 0  # no extensions
    halves[6] = API_VERSION[0]
    halves[7] = API_VERSION[1]
    halves[8] = 0  # no traits
    metadata[5] = 0  # XLA_FFI_UNKNOWN_TYPE_ID: a stateless handler


@numba.njit(inline="always")
def _executes(frame):
    """Whether the call is the execution (else answered here: the metadata, or a stage with
    nothing to do)."""
    if _asks_metadata(frame):
        _report_metadata(frame[1])
        return False
    return frame[4] & 0xFFFFFFFF == _EXECUTE


@numba.njit(inline="always")
def _attention_args(frame):
    """The arguments both handlers start with: q, k, v, segment ids, the causal flag; and the
    shapes of q and k."""
    q_shape, k_shape = _dims(frame, 0), _dims(frame, 1)
    return (
        _buffer(frame, _ARGS, 0, q_shape, np.float32),
        _buffer(frame, _ARGS, 1, k_shape, np.float32),
        _buffer(frame, _ARGS, 2, k_shape, np.float32),
        _buffer(frame, _ARGS, 3, q_shape[:2], np.int32),
        _buffer(frame, _ARGS, 4, (1,), np.int32)[0] != 0,
        q_shape,
        k_shape,
    )


@numba.cfunc(types.intp(types.voidptr), cache=EXACT["cache"])
def forward(call_frame):
    """Args (q, k, v, segment_ids, causal) → rets (out, lse): kernels.attention.forward.
    float32, int32 segment ids and a 0-d int32 causal flag; returns 0, XLA's null error."""
    frame = numba.carray(call_frame, (_FRAME_WORDS,), np.int64)
    if not _executes(frame):
        return 0
    q, k, v, segment_ids, causal, q_shape, _ = _attention_args(frame)
    out = _buffer(frame, _RETS, 0, q_shape, np.float32)
    lse = _buffer(frame, _RETS, 1, q_shape[:3], np.float32)
    attention.forward_serial(q, k, v, segment_ids, causal, out, lse)
    return 0


@numba.cfunc(types.intp(types.voidptr), cache=EXACT["cache"])
def backward(call_frame):
    """Args (q, k, v, segment_ids, causal, out, lse, dout) → rets (dq, dk, dv):
    kernels.attention.backward; as :func:`forward`."""
    frame = numba.carray(call_frame, (_FRAME_WORDS,), np.int64)
    if not _executes(frame):
        return 0
    q, k, v, segment_ids, causal, q_shape, k_shape = _attention_args(frame)
    attention.backward_serial(
        q,
        k,
        v,
        segment_ids,
        causal,
        _buffer(frame, _ARGS, 5, q_shape, np.float32),
        _buffer(frame, _ARGS, 6, q_shape[:3], np.float32),
        _buffer(frame, _ARGS, 7, q_shape, np.float32),
        _buffer(frame, _RETS, 0, q_shape, np.float32),
        _buffer(frame, _RETS, 1, k_shape, np.float32),
        _buffer(frame, _RETS, 2, k_shape, np.float32),
    )
    return 0
