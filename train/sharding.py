"""Device mesh, logical-axis rules and per-process batch assembly.

The mesh has three named axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism
with parameters and optimizer state sharded across it) and ``tensor`` (room for tensor
parallelism of the attention/MLP inner dimensions). Axis types are ``Auto``: the compiler
propagates shardings from the annotated inputs and outputs (``jax.make_mesh`` now defaults to
``Explicit``, which would demand sharding-aware code everywhere).

Parameters name their axes logically (``embed``, ``mlp``, ``vocab``, ``heads`` …, see
models.bert and models.llama); :data:`LOGICAL_AXIS_RULES` maps each logical name to mesh axes,
as MaxText does: FSDP shards the ``embed`` dimension of every weight, tensor parallelism the
attention heads, the MLP's inner dimension and the vocabulary (Megatron's split), and
activations ([batch, length, embed]) are split over the batch only (:class:`ActivationSharding`). A rule is skipped for a
dimension that the mesh axes do not divide, or whose mesh axis is already used by another
dimension of the same array, so any checkpoint shape works on any mesh (replicated at worst).
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dynrules.errors import DynrulesError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis → mesh axes, in order of preference.
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": (),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "qkv": ("tensor",),  # BERT's fused heads × head_dim
    "heads": ("tensor",),
    "kv_heads": ("tensor",),  # replicated when the KV heads do not divide (grouped-query)
    "head_dim": (),
    "mlp": ("tensor",),
    "classes": (),
    "layers": (),
}


def parse_mesh_spec(spec: str | dict | None, device_count: int) -> dict[str, int]:
    """``"data=4,fsdp=2"`` (or a dict) → sizes of all three axes, multiplying to ``device_count``.

    An empty spec puts every device on ``data``. When ``data`` is not given it takes whatever
    the other axes leave, so ``"fsdp=2"`` works on any even device count.
    """
    if isinstance(spec, dict):
        sizes = {str(k): v for k, v in spec.items()}
    else:
        sizes = {}
        for part in filter(None, (p.strip() for p in (spec or "").split(","))):
            name, sep, value = part.partition("=")
            if not sep or not value.strip().lstrip("-").isdigit():
                raise DynrulesError(
                    f"mesh: expected axis=size pairs like 'data=4,fsdp=2', got {spec!r}"
                )
            sizes[name.strip()] = int(value)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise DynrulesError(f"mesh: unknown axis {unknown[0]!r}; axes are {', '.join(MESH_AXES)}")
    if any(size < 1 for size in sizes.values()):
        raise DynrulesError(f"mesh: axis sizes must be positive, got {spec!r}")
    if "data" not in sizes:
        rest = math.prod(sizes.values())
        if device_count % rest:
            raise DynrulesError(f"mesh {spec!r} does not divide the {device_count} devices")
        sizes["data"] = device_count // rest
    full = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
    if math.prod(full.values()) != device_count:
        raise DynrulesError(
            f"mesh {spec!r} has {math.prod(full.values())} devices but {device_count} are available"
        )
    return full


def make_mesh(spec: str | dict | None = None, devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types over ``devices`` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    return jax.make_mesh(
        tuple(sizes[a] for a in MESH_AXES),
        MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def mesh_description(mesh: Mesh) -> str:
    return ",".join(f"{name}={size}" for name, size in mesh.shape.items())


def logical_to_spec(logical_axes, shape, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry ``logical_axes`` names (None = any)."""
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for name, size in zip(logical_axes, shape, strict=True):
        chosen: list[str] = []
        for axis in rules.get(name, ()) if name else ():
            width = mesh.shape[axis]
            if axis in used or width == 1:
                continue
            if size % (math.prod(mesh.shape[a] for a in chosen) * width) == 0:
                chosen.append(axis)
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return PartitionSpec(*spec)


def state_shardings(abstract_state, mesh: Mesh):
    """NamedShardings for an ``nnx.State`` of abstract Params, as a pure dict.

    Each Param's ``logical_axes`` metadata goes through :func:`logical_to_spec`; a variable
    without that metadata is replicated.
    """
    from flax import nnx

    def sharding(variable):
        axes = variable.get_metadata().get("logical_axes")
        shape = variable.get_value().shape
        spec = logical_to_spec(axes, shape, mesh) if axes else PartitionSpec()
        return NamedSharding(mesh, spec)

    return nnx.to_pure_dict(
        jax.tree.map(
            lambda v: v.replace(sharding(v)),
            abstract_state,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
    """Shard dimension ``batch_dim`` over ('data', 'fsdp'); everything else replicated."""
    spec: list[tuple[str, ...] | None] = [None] * ndim
    spec[batch_dim] = LOGICAL_AXIS_RULES["batch"]
    return NamedSharding(mesh, PartitionSpec(*spec))


def batch_shards(mesh: Mesh) -> int:
    """How many ways a batch dimension is split: global batches must be a multiple of it."""
    return math.prod(mesh.shape[a] for a in LOGICAL_AXIS_RULES["batch"])


def local_rows(sharding: NamedSharding, shape: tuple[int, ...], dim: int = 0) -> np.ndarray:
    """Indices along ``dim`` of a global array of ``shape`` that this process's devices hold.

    Ascending: ``make_array_from_process_local_data`` maps a process's local rows onto its
    devices' slices in this order. On one process that is every row; on several it is this
    process's part of the batch, whatever order the mesh gives the hosts' devices (on a TPU pod
    a host's rows need not be one contiguous block).
    """
    held: set[int] = set()
    for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
        assert index is not None  # typed optional, but every device of a sharding has an index
        held.update(range(*index[dim].indices(shape[dim])))
    return np.array(sorted(held), np.int64)


def global_batch(
    local: np.ndarray, sharding: NamedSharding, global_rows: int, batch_dim: int = 0
) -> jax.Array:
    """One global array of ``global_rows`` rows from this process's rows (:func:`local_rows`).

    Single-process this is a sharded device_put; multi-process every host passes only its
    own rows and the result is one logical array spanning all hosts.
    """
    global_shape = list(local.shape)
    global_shape[batch_dim] = global_rows
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))


def join_job(requested: bool = False) -> bool:
    """Join a multi-process job when ``requested`` (``--distributed``) or when the environment
    names one (``JAX_NUM_PROCESSES``, as `dynrules launch` sets); True if this process is in one.

    ``jax.distributed.initialize()`` finds the cluster itself on a TPU pod, under SLURM and
    Open MPI; ``JAX_COORDINATOR_ADDRESS`` (read by JAX), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` name it anywhere else. CPU processes exchange collectives through gloo. Must run before anything else touches JAX's
    devices; calling it again is harmless.
    """
    if jax.distributed.is_initialized():
        return True
    if not requested and "JAX_NUM_PROCESSES" not in os.environ:
        return False
    collectives = jax.config.jax_cpu_collectives_implementation  # type: ignore[attr-defined]  # jax.config's options are dynamic attributes its stubs omit
    if collectives in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    named: dict[str, int | None] = {}
    for variable in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        named[variable] = None
        if variable in os.environ:
            try:
                named[variable] = int(os.environ[variable])
            except ValueError:
                raise DynrulesError(
                    f"{variable} must be an integer, got {os.environ[variable]!r}"
                ) from None
    try:
        jax.distributed.initialize(
            num_processes=named["JAX_NUM_PROCESSES"], process_id=named["JAX_PROCESS_ID"]
        )
    except (RuntimeError, ValueError) as exc:
        raise DynrulesError(f"cannot join the distributed job: {exc}") from exc
    return True


def is_writer() -> bool:
    """Process 0 writes what a job writes once (run metadata, metrics, exports, outputs)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process of the job gets here (nothing to wait for on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _everywhere(value: int) -> list[int]:
    """An integer from every process, in process order."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.int32(value))).ravel().tolist()


def agree(value: int, what: str) -> int:
    """``value``, checked to be the same on every process (a shared directory seen differently
    by two hosts would otherwise desynchronise the job)."""
    values = set(_everywhere(value))
    if len(values) > 1:
        raise DynrulesError(
            f"processes disagree on {what}: {sorted(values)} "
            "(is the run directory on a file system every host sees the same?)"
        )
    return value


def total(value: int) -> int:
    """The sum of an integer over all processes."""
    return int(sum(_everywhere(value)))


def gather_blocks(block: np.ndarray, items: int) -> np.ndarray:
    """Every process's ``block`` (process p holds :func:`block_range` (items, p)), concatenated."""
    if jax.process_count() == 1:
        return block
    from jax.experimental import multihost_utils

    count = jax.process_count()
    width = -(-items // count)
    padded = np.zeros((width, *block.shape[1:]), block.dtype)
    padded[: len(block)] = block
    everywhere = np.asarray(multihost_utils.process_allgather(padded))  # [processes, width, ...]
    return np.concatenate(
        [everywhere[p, : len(range(*block_range(items, p, count)))] for p in range(count)]
    )


def block_range(items: int, index: int | None = None, count: int | None = None) -> tuple[int, int]:
    """[start, stop) of process ``index``'s contiguous share of ``items`` (default: this one's)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return items * index // count, items * (index + 1) // count


def place(host_params: dict, targets: dict) -> dict:
    """Host values → global arrays laid out as ``targets`` (``ShapeDtypeStruct`` with shardings).

    Each device gets only its shard, read with ``make_array_from_callback`` (which also works
    when the mesh spans several hosts). A value may be an array or a lazy view that reads
    just the slice asked for (models.decoder_io.ParamView): then no host ever holds more of a
    checkpoint than its own devices' shards.
    """

    def put(value, target):
        if isinstance(value, jax.Array):  # already on devices: lay it out there
            return jax.device_put(value.astype(target.dtype), target.sharding)
        if not hasattr(value, "shape"):
            value = np.asarray(value)
        if tuple(value.shape) != tuple(target.shape):
            raise DynrulesError(
                f"a parameter has shape {value.shape}, the model expects {target.shape}"
            )
        return jax.make_array_from_callback(
            target.shape, target.sharding, lambda index: np.asarray(value[index], target.dtype)
        )

    return jax.tree.map(put, host_params, targets)


def abstract_params(abstract_state, mesh: Mesh) -> dict:
    """``ShapeDtypeStruct``s with their shardings for an ``nnx.State`` of abstract Params."""
    from flax import nnx

    return jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(abstract_state),
        state_shardings(abstract_state, mesh),
    )


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
    """``constrain(x, logical_axes)`` for models: pins an activation's layout on ``mesh``.

    Hashable and compared by mesh, so it can sit in a model's static structure.
    """

    mesh: Mesh

    def __call__(self, x: jax.Array, logical_axes: tuple) -> jax.Array:
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(self.mesh, self.spec(logical_axes, x.shape))
        )

    def spec(self, logical_axes: tuple, shape: tuple) -> PartitionSpec:
        """The layout of an activation of ``shape`` (models.attention's kernels run per shard
        of it)."""
        return logical_to_spec(logical_axes, shape, self.mesh)


@dataclasses.dataclass(frozen=True)
class MeshLayout:
    """How an inference-only model spreads over ``mesh`` (the in-process judge): activations by
    :class:`ActivationSharding`, weights by their logical axes, each device reading its shard."""

    mesh: Mesh

    @property
    def constrain(self) -> ActivationSharding:
        return ActivationSharding(self.mesh)

    def place(self, host_params: dict, abstract_state) -> dict:
        return place(host_params, abstract_params(abstract_state, self.mesh))


def gather(params: dict) -> dict:
    """Global arrays → host NumPy arrays (all-gathered across processes when needed)."""
    from jax.experimental import multihost_utils

    def fetch(x):
        if x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(fetch, params)
