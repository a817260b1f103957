"""The attention kernels as XLA FFI handlers: Numba C callbacks that XLA calls inside a step.

A ``jax.pure_callback`` leaves the compiled step for Python at every call (the GIL, a host
round trip between XLA's fused layers); an FFI custom call does not: XLA calls the handler's
address on its own thread with its own buffers. The handlers read XLA's call frame through the
C ABI of ``xla/ffi/api/c_api.h`` (the typed FFI, API version 0.3, shipped with jaxlib 0.10), so
nothing is compiled outside Numba. models.attention registers them (``jax.ffi``) and checks the
shapes when it traces a call; here they are only read.

Each handler deals its kernel's work chunks to XLA's own intra-op threads (see "sharing work
with XLA's pool" below). Numba's threads beside XLA's made the whole MiniLM step slower on a
2-core machine, and the kernel run on the calling thread alone left XLA's other thread idle for
a quarter of the step (docs/performance.md).

Call-frame layout (x86-64 and aarch64: 8-byte words):
- XLA_FFI_CallFrame: struct_size, extension_start, api, ctx, stage (int), then the args
  {struct_size, extension_start, size, types, args} at word 5 and the rets at word 10, ...
- XLA_FFI_Buffer: struct_size, extension_start, dtype (int), data, rank, dims.
- XLA_FFI_Api (the frame's ``api``): struct_size, extension_start, api_version (3 words),
  internal_api, then one function pointer a word from XLA_FFI_Error_Create (word 6) on.
- The handler returns an XLA_FFI_Error pointer: 0, success (the shapes were checked at trace
  time, and the kernels have no failure of their own).
- A call frame whose extension is the metadata one (type 1) asks for the handler's API version
  and traits instead: XLA does that once, when the handler is registered.
"""

from typing import Any

import numba
import numpy as np
from llvmlite import binding as llvm  # type: ignore[import-untyped]
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import attention
from .config import EXACT

API_VERSION = (0, 3)  # the c_api.h the layout above was read from
_EXECUTE = 3  # XLA_FFI_ExecutionStage_EXECUTE; the other stages have nothing to do
_FRAME_WORDS = 15  # through the rets' buffer list
_ARGS, _RETS = 9, 14  # words holding the args' and rets' buffer-pointer lists
_ARG_COUNT, _RET_COUNT = 7, 12  # words holding how many args and rets there are
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
def _buffer_address(frame, which, index):
    """Data address of buffer ``index`` of the args (which = _ARGS) or rets (_RETS)."""
    return _words(_words(frame[which], index + 1)[index], 6)[3]


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


# --------------------------------------------------------------- sharing work with XLA's pool
#
# A handler hands its kernel's work chunks to XLA's own intra-op threads
# (XLA_FFI_ThreadPool_Schedule), not to Numba's: no second pool competes with XLA's for the
# cores. Every participant (the handler's thread and each scheduled task) claims chunks from a
# shared counter until none is left; the handler then waits for the claimed chunks to finish,
# never for a task to start, so a pool whose threads are all busy (another device's handler,
# say) cannot deadlock it: the handler does every chunk itself. The shared state is malloc'd
# with a count of its holders, because a task may start after its handler has returned: it then
# claims nothing, and frees the state if it is the last holder.

_I64 = ir.IntType(64)
_API_ERROR_DESTROY, _API_SCHEDULE, _API_NUM_THREADS = 8, 17, 18  # XLA_FFI_Api words
_ERROR_DESTROY_ARGS_SIZE, _NUM_THREADS_ARGS_SIZE, _SCHEDULE_ARGS_SIZE = 24, 32, 40

# The shared state's int64 words: claim counters and holders; the kernel's arguments.
_NEXT, _DONE, _HOLDERS, _CHUNKS, _CAUSAL, _Q_SHAPE, _KV_HEADS, _BUFFERS = 0, 1, 2, 3, 4, 5, 9, 10
_STATE_WORDS = _BUFFERS + 10  # q, k, v, segment ids and, at most, the backward's six others


def _call_function(typingctx, function, argument):
    """Typing and code of ``_call(function, argument)``: the C function at address ``function``
    called with one pointer; its pointer result as an int (an XLA_FFI_Error*: 0 is success)."""

    def codegen(context, builder, signature, args):
        pointer = ir.IntType(8).as_pointer()
        callee = builder.inttoptr(args[0], ir.FunctionType(pointer, [pointer]).as_pointer())
        return builder.ptrtoint(builder.call(callee, [builder.inttoptr(args[1], pointer)]), _I64)

    return types.int64(types.int64, types.int64), codegen


def _atomic_add(typingctx, address, value):
    """Typing and code of ``_fetch_add(address, value)``: add to the int64 at ``address``
    atomically; the value before."""

    def codegen(context, builder, signature, args):
        word = builder.inttoptr(args[0], _I64.as_pointer())
        return builder.atomic_rmw("add", word, args[1], "seq_cst")

    return types.int64(types.int64, types.int64), codegen


def _pointer_as_address(typingctx, pointer):
    """Typing and code of ``_address(pointer)``: a void pointer as an int64."""

    def codegen(context, builder, signature, args):
        return builder.ptrtoint(args[0], _I64)

    return types.int64(types.voidptr), codegen


def _function_address(symbol: str) -> Any:
    """An intrinsic ``() → address`` of the C function ``symbol``, resolved when the code is
    loaded (so the code stays in Numba's cache, as in kernels.blas_threads)."""

    def typer(typingctx):
        def codegen(context, builder, signature, args):
            task = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()])
            return builder.ptrtoint(
                cgutils.get_or_insert_function(builder.module, task, symbol), _I64
            )

        return types.int64(), codegen

    return intrinsic(typer)


_call: Any = intrinsic(_call_function)
_fetch_add: Any = intrinsic(_atomic_add)
_address: Any = intrinsic(_pointer_as_address)
_malloc: Any = types.ExternalFunction("malloc", types.int64(types.intp))
_free: Any = types.ExternalFunction("free", types.void(types.int64))


@numba.njit(inline="always")
def _word(address, index):
    return address + 8 * index


@numba.njit
def _api_call(frame, entry, args):
    """XLA_FFI_Api entry ``entry`` called with ``args`` (int64 words, struct_size first):
    whether it succeeded. An error is destroyed here: every caller has a fallback."""
    api = frame[2]
    error = _call(_words(api, entry + 1)[entry], args.ctypes.data)
    if error == 0:
        return True
    destroy = np.empty(3, np.int64)
    destroy[0], destroy[1], destroy[2] = _ERROR_DESTROY_ARGS_SIZE, 0, error
    _call(_words(api, _API_ERROR_DESTROY + 1)[_API_ERROR_DESTROY], destroy.ctypes.data)
    return False


@numba.njit
def _pool_threads(frame):
    """Threads of XLA's pool for this call (1 where XLA offers none, or its API predates the
    pool's functions)."""
    if _words(frame[2], 1)[0] < 8 * (_API_NUM_THREADS + 1):  # the Api struct's own size
        return 1
    count = np.zeros(1, np.int64)
    args = np.empty(4, np.int64)
    args[0], args[1], args[2], args[3] = _NUM_THREADS_ARGS_SIZE, 0, frame[3], count.ctypes.data
    return max(1, count[0]) if _api_call(frame, _API_NUM_THREADS, args) else 1


@numba.njit
def _release(state):
    if _fetch_add(_word(state, _HOLDERS), -1) == 1:
        _free(state)


@numba.njit
def _start(frame, task):
    """Shared state (address) for this call: q, k, v, segment ids, then the other args (the
    causal flag, argument 4, goes in a word of its own) and the rets; ``task`` scheduled on
    XLA's pool for every other thread that could take a chunk."""
    threads = _pool_threads(frame)
    q_shape, k_shape = _dims(frame, 0), _dims(frame, 1)
    state = _malloc(8 * _STATE_WORDS)
    words = _words(state, _STATE_WORDS)
    words[_NEXT], words[_DONE], words[_HOLDERS] = 0, 0, 1
    words[_CHUNKS] = attention.CHUNKS_PER_THREAD * threads
    words[_CAUSAL] = numba.carray(_pointer(_buffer_address(frame, _ARGS, 4)), (1,), np.int32)[0]
    for i in range(4):
        words[_Q_SHAPE + i] = q_shape[i]
    words[_KV_HEADS] = k_shape[2]
    slot = _BUFFERS
    for which, count in ((_ARGS, frame[_ARG_COUNT]), (_RETS, frame[_RET_COUNT])):
        for index in range(count):
            if which != _ARGS or index != 4:
                words[slot] = _buffer_address(frame, which, index)
                slot += 1
    helpers = min(threads, q_shape[0] * k_shape[2]) - 1  # work items: (row, kv head)
    args = np.empty(5, np.int64)
    for _ in range(helpers):
        _fetch_add(_word(state, _HOLDERS), 1)
        args[0], args[1], args[2], args[3], args[4] = _SCHEDULE_ARGS_SIZE, 0, frame[3], task, state
        if not _api_call(frame, _API_SCHEDULE, args):  # no pool after all
            _release(state)
            break
    return state


@numba.njit
def _finish(state, chunks):
    """Wait until all ``chunks`` are done (claimed ones may still run elsewhere); let go."""
    while _fetch_add(_word(state, _DONE), 0) < chunks:
        pass
    _release(state)


@numba.njit(inline="always")
def _shared_args(state):
    """q, k, v, segment ids, the causal flag, the kernel's work split, the buffer addresses
    and the shapes of q and k."""
    words = _words(state, _STATE_WORDS)
    q_shape = (words[_Q_SHAPE], words[_Q_SHAPE + 1], words[_Q_SHAPE + 2], words[_Q_SHAPE + 3])
    k_shape = (q_shape[0], q_shape[1], words[_KV_HEADS], q_shape[3])
    buffers = words[_BUFFERS:]
    q = numba.carray(_pointer(buffers[0]), q_shape, np.float32)
    k = numba.carray(_pointer(buffers[1]), k_shape, np.float32)
    v = numba.carray(_pointer(buffers[2]), k_shape, np.float32)
    segment_ids = numba.carray(_pointer(buffers[3]), q_shape[:2], np.int32)
    work = attention.work_split(q, k, segment_ids, words[_CHUNKS])
    return q, k, v, segment_ids, words[_CAUSAL] != 0, work, buffers, q_shape, k_shape


@numba.njit(inline="always")
def _claim(state, chunks):
    """The next unclaimed chunk; ``chunks`` when none is left."""
    return min(_fetch_add(_word(state, _NEXT), 1), chunks)


@numba.njit
def _forward_chunks(state):
    """Claim and run forward chunks until none is left; the chunk count."""
    q, k, v, segment_ids, causal, work, buffers, q_shape, _ = _shared_args(state)
    out = numba.carray(_pointer(buffers[4]), q_shape, np.float32)
    lse = numba.carray(_pointer(buffers[5]), q_shape[:3], np.float32)
    chunk = _claim(state, work[4])
    while chunk < work[4]:
        attention.forward_chunk(q, k, v, segment_ids, causal, out, lse, work, chunk)
        _fetch_add(_word(state, _DONE), 1)
        chunk = _claim(state, work[4])
    return work[4]


@numba.njit
def _backward_chunks(state):
    """Claim and run backward chunks until none is left; the chunk count."""
    q, k, v, segment_ids, causal, work, buffers, q_shape, k_shape = _shared_args(state)
    out = numba.carray(_pointer(buffers[4]), q_shape, np.float32)
    lse = numba.carray(_pointer(buffers[5]), q_shape[:3], np.float32)
    dout = numba.carray(_pointer(buffers[6]), q_shape, np.float32)
    dq = numba.carray(_pointer(buffers[7]), q_shape, np.float32)
    dk = numba.carray(_pointer(buffers[8]), k_shape, np.float32)
    dv = numba.carray(_pointer(buffers[9]), k_shape, np.float32)
    chunk = _claim(state, work[4])
    while chunk < work[4]:
        attention.backward_chunk(
            q, k, v, segment_ids, causal, out, lse, dout, dq, dk, dv, work, chunk
        )
        _fetch_add(_word(state, _DONE), 1)
        chunk = _claim(state, work[4])
    return work[4]


@numba.cfunc(types.void(types.voidptr), cache=EXACT["cache"])
def _forward_task(state):
    """A pool thread's share of a forward call (an XLA_FFI_Task)."""
    address = _address(state)
    _forward_chunks(address)
    _release(address)


@numba.cfunc(types.void(types.voidptr), cache=EXACT["cache"])
def _backward_task(state):
    """A pool thread's share of a backward call (an XLA_FFI_Task)."""
    address = _address(state)
    _backward_chunks(address)
    _release(address)


_TASK_SYMBOLS = ("dynrules_attention_forward_task", "dynrules_attention_backward_task")
for _symbol, _task in zip(_TASK_SYMBOLS, (_forward_task, _backward_task), strict=True):
    llvm.add_symbol(_symbol, _task.address)
_forward_task_address = _function_address(_TASK_SYMBOLS[0])
_backward_task_address = _function_address(_TASK_SYMBOLS[1])


@numba.cfunc(types.intp(types.voidptr), cache=EXACT["cache"])
def forward(call_frame):
    """Args (q, k, v, segment_ids, causal) → rets (out, lse): kernels.attention.forward.
    float32, int32 segment ids and a 0-d int32 causal flag; returns 0, XLA's null error."""
    frame = numba.carray(call_frame, (_FRAME_WORDS,), np.int64)
    if not _executes(frame):
        return 0
    state = _start(frame, _forward_task_address())
    _finish(state, _forward_chunks(state))
    return 0


@numba.cfunc(types.intp(types.voidptr), cache=EXACT["cache"])
def backward(call_frame):
    """Args (q, k, v, segment_ids, causal, out, lse, dout) → rets (dq, dk, dv):
    kernels.attention.backward; as :func:`forward`."""
    frame = numba.carray(call_frame, (_FRAME_WORDS,), np.int64)
    if not _executes(frame):
        return 0
    state = _start(frame, _backward_task_address())
    _finish(state, _backward_chunks(state))
    return 0
