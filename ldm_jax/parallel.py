"""Device mesh, logical-axis rules and shardings: how arrays are laid out over devices.

The mesh has the axes ``('data', 'fsdp', 'tensor')``. Batches are split over
``('data', 'fsdp')``; parameters carry logical axis names (see
``ldm_jax.models.layers``) that ``LOGICAL_AXIS_RULES`` maps to mesh axes:
with ``fsdp > 1`` the large parameter dimensions are split over ``fsdp``,
with ``tensor > 1`` attention heads and MLP widths over ``tensor``.

The ``mesh`` section of a config::

    data, fsdp, tensor   axis sizes; one of them may be -1: the devices left over
"""

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
MESH_DEFAULTS = dict(data=-1, fsdp=1, tensor=1)

LOGICAL_AXIS_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_embed", None),
    ("conv_in", None),
    ("vocab", None),
    ("norm", None),
    ("height", None),
    ("width", None),
    ("channels", None),
    ("length", None),
    ("group", None),
)


def mesh_shape(mesh_config: Mapping[str, int], device_count: int) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) sizes of ``mesh_config`` for ``device_count`` devices (-1 filled in).

    Raises ValueError naming the sizes when they cannot tile the devices.
    """
    unknown = sorted(set(mesh_config) - set(AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; the mesh axes are {list(AXES)}")
    sizes = [int(mesh_config.get(axis, MESH_DEFAULTS[axis])) for axis in AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))}: each must be positive, at most one may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if device_count % known:
            raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))}: {device_count} devices are not divisible by "
                             f"the fixed axes' product {known}")
        sizes[sizes.index(-1)] = device_count // known
    if int(np.prod(sizes)) != device_count:
        raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))} make {int(np.prod(sizes))} devices, "
                         f"but there are {device_count}")
    return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int] | None = None, devices: list | None = None) -> Mesh:
    """A ``Mesh`` with axes ``AXES`` over ``devices`` (default: all), sized by ``mesh_config`` (default: all data)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(dict(mesh_config or {}), len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways a batch is split: the product of the batch axes' sizes."""
    return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh) -> None:
    """ValueError naming the numbers when ``batch_size`` does not split over the mesh's batch axes."""
    size = data_parallel_size(mesh)
    if batch_size % size:
        raise ValueError(f"batch size {batch_size} is not divisible by the data-parallel size {size} "
                         f"(mesh {dict(mesh.shape)})")


def host_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, stop) of host ``process_index``'s contiguous share of ``num_examples`` (sizes differ by <= 1)."""
    return num_examples * process_index // process_count, num_examples * (process_index + 1) // process_count


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays split over the batch axes, assembled from each process's local rows.

    Non-numeric entries (captions) are dropped.
    """
    sharding = batch_sharding(mesh)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in batch.items() if np.asarray(value).dtype.kind in "biuf"}


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """``NamedSharding`` for each leaf of a tree of logically partitioned (boxed) abstract values.

    Unboxed leaves (steps, optimizer counts) are replicated.
    """
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def sharded_init(init_fn: Any, mesh: Mesh, *args: Any, rules=LOGICAL_AXIS_RULES) -> tuple[Any, Any]:
    """Run ``init_fn(*args)`` (it returns logically partitioned values) so that its outputs are born sharded.

    ``jax.eval_shape`` gives the boxed abstract outputs, their logical names give
    the shardings, and ``jit(init, out_shardings=...)`` creates the unboxed
    arrays in place: nothing is gathered on one device. Returns
    ``(outputs, shardings)``, both unboxed trees.
    """
    shardings = logical_shardings(jax.eval_shape(init_fn, *args), mesh, rules)
    outputs = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return outputs, shardings


def initialize_distributed() -> bool:
    """Start JAX's distributed runtime when this process is one of several; returns whether it did.

    Recognized: ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` (any cluster),
    a multi-host Cloud TPU slice (``TPU_WORKER_HOSTNAMES`` lists several hosts; JAX finds the rest), or a
    SLURM job step with several tasks (``SLURM_NTASKS`` > 1; JAX reads SLURM's variables).
    """
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                                   int(env["JAX_PROCESS_ID"]))
        return True
    if len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1 or int(env.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
        return True
    return False
