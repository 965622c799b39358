"""Device mesh, logical-axis rules and shardings: how arrays are laid out over devices.

The mesh has the axes ``('data', 'fsdp', 'tensor')``. Batches are split over
``('data', 'fsdp')``; parameters carry logical axis names (see
``ldm_jax.models.layers``) that ``LOGICAL_AXIS_RULES`` maps to mesh axes:
with ``fsdp > 1`` the large parameter dimensions are split over ``fsdp``,
with ``tensor > 1`` attention heads and MLP widths over ``tensor``.

The ``mesh`` section of a config::

    data, fsdp, tensor   axis sizes within a slice (one ICI-connected group of TPU chips, or with dcn sizes
                         above 1 on GPUs, one process); one of them may be -1: the slice's devices left over
    dcn_data, dcn_fsdp   axis sizes across slices (over the data-center network); their product must be the
                         number of TPU slices (the devices' ``slice_index``) or, when all devices are in one
                         slice (GPU nodes), of processes. The mesh's 'data' axis then has ``data * dcn_data``
                         devices and 'fsdp' ``fsdp * dcn_fsdp``, built by ``create_hybrid_device_mesh`` so
                         that only the across-slice part of each axis crosses the slow network. There is
                         no ``dcn_tensor``: tensor parallelism's per-layer collectives need the fast links.
    frozen               'shard': the params of frozen models (the VAE; the text encoder when not trained)
                         are laid out by the same rules as trained ones (less memory, an all-gather per
                         use); 'replicate': a whole copy on every device (no collectives for them)

Parameter shardings are checked against the parameters' shapes before
anything is compiled (`logical_shardings`): a dimension that its mesh axes do
not divide is an error naming the parameter and the sizes, with one
exception: a parameter of at most ``FSDP_WHOLE_BYTES`` whose dimension
mapped to 'fsdp' alone does not divide (the 3- or 4-channel convolutions at a
model's ends) stays whole on every device, since fsdp only chooses where
bytes live and these few bytes do not matter (big_vision's fsdp keeps small
parameters whole for the same reason).
"""

import math
import os
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DCN_KEYS = {"dcn_data": "data", "dcn_fsdp": "fsdp"}
FROZEN_LAYOUTS = ("shard", "replicate")
MESH_DEFAULTS = dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, frozen="shard")

LOGICAL_AXIS_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_embed", "fsdp"),
    ("conv_in", None),
    ("vocab", None),
    ("norm", None),
    ("height", None),
    ("width", None),
    ("channels", None),
    ("length", None),
    ("group", None),
)
MAX_LISTED = 8  # offending parameters named in one error
FSDP_WHOLE_BYTES = 2**20  # a parameter up to this size whose fsdp dimension does not divide stays whole


def check_mesh_config(mesh_config: Mapping[str, Any]) -> None:
    """ValueError naming unknown keys of a ``mesh`` section or a ``frozen`` layout that is not one of FROZEN_LAYOUTS."""
    unknown = sorted(set(mesh_config) - set(MESH_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; the mesh keys are {list(MESH_DEFAULTS)}")
    frozen = mesh_config.get("frozen", MESH_DEFAULTS["frozen"])
    if frozen not in FROZEN_LAYOUTS:
        raise ValueError(f"mesh.frozen must be one of {FROZEN_LAYOUTS}, got {frozen!r}")


def slice_shapes(mesh_config: Mapping[str, Any], device_count: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The within-slice and across-slice (data, fsdp, tensor) sizes for ``device_count`` devices (-1 filled in).

    Raises ValueError naming the sizes when they cannot tile the devices.
    """
    check_mesh_config(mesh_config)
    dcn = [int(mesh_config.get(f"dcn_{axis}", 1)) if f"dcn_{axis}" in DCN_KEYS else 1 for axis in AXES]
    if any(s < 1 for s in dcn):
        raise ValueError(f"mesh sizes {dict(zip(DCN_KEYS, dcn[:2]))}: across-slice sizes must be positive")
    slices = math.prod(dcn)
    if device_count % slices:
        raise ValueError(f"{device_count} devices do not split into dcn_data * dcn_fsdp = {dcn[0]} * {dcn[1]} "
                         f"= {slices} equal slices")
    per_slice = device_count // slices
    where = f"the {per_slice} devices of each of {slices} slices" if slices > 1 else f"{device_count} devices"
    sizes = [int(mesh_config.get(axis, MESH_DEFAULTS[axis])) for axis in AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))}: each must be positive, at most one may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if per_slice % known:
            raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))}: {where} are not divisible by "
                             f"the fixed axes' product {known}")
        sizes[sizes.index(-1)] = per_slice // known
    if math.prod(sizes) != per_slice:
        raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))} make {math.prod(sizes)} devices, "
                         f"but there are {where}")
    return tuple(sizes), tuple(dcn)


def mesh_shape(mesh_config: Mapping[str, Any], device_count: int) -> tuple[int, int, int]:
    """The whole mesh's (data, fsdp, tensor) sizes: within-slice times across-slice sizes."""
    ici, dcn = slice_shapes(mesh_config, device_count)
    return tuple(a * b for a, b in zip(ici, dcn))


def _distinct(devices: Sequence[Any], attribute: str) -> int:
    return len({getattr(d, attribute) for d in devices}) if hasattr(devices[0], attribute) else 1


def device_grid(mesh_config: Mapping[str, Any], devices: Sequence[Any]) -> np.ndarray:
    """The devices arranged as the mesh's (data, fsdp, tensor) array.

    Across-slice sizes of 1 give one plain (topology-aware) mesh; larger ones
    a hybrid mesh over the slices (``slice_index``) or, when the devices are
    all in one slice, over the processes. ValueError naming the counts when they differ
    from ``dcn_data * dcn_fsdp``.
    """
    ici, dcn = slice_shapes(mesh_config, len(devices))
    slices, processes = _distinct(devices, "slice_index"), _distinct(devices, "process_index")
    if math.prod(dcn) == 1:
        if slices > 1:
            raise ValueError(f"the devices span {slices} slices but mesh.dcn_data * mesh.dcn_fsdp = 1: set the "
                             f"across-slice sizes (e.g. mesh.dcn_data={slices})")
        return mesh_utils.create_device_mesh(ici, devices)
    granules = slices if slices > 1 else processes
    if granules != math.prod(dcn):
        raise ValueError(f"mesh.dcn_data * mesh.dcn_fsdp = {dcn[0]} * {dcn[1]} = {math.prod(dcn)}, but the devices "
                         f"span {slices} slice(s) and {processes} process(es)")
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=slices == 1)


def parse_mesh(text: str) -> dict[str, int]:
    """'data=1,fsdp=8' -> {'data': 1, 'fsdp': 8}; ValueError naming a malformed item."""
    sizes = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"(\w+)=(-?\d+)", item)
        if not match:
            raise ValueError(f"mesh item {item!r} is not NAME=SIZE (e.g. data=2,fsdp=4)")
        sizes[match.group(1)] = int(match.group(2))
    return sizes


def make_mesh(mesh_config: Mapping[str, Any] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``Mesh`` with axes ``AXES`` over ``devices`` (default: all), sized by ``mesh_config`` (default: all data)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(device_grid(dict(mesh_config or {}), devices), AXES)


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


def _is_boxed(x: Any) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def _resolve(path: str, leaf: Any, mesh: Mesh, rules: Any, problems: list[str],
             whole: list[str]) -> NamedSharding:
    """One leaf's sharding; a dimension its mesh axes do not divide is kept whole (fsdp, small) or reported."""
    if not _is_boxed(leaf):
        return NamedSharding(mesh, P())
    shape = leaf.value.shape
    nbytes = math.prod(shape) * np.dtype(leaf.value.dtype).itemsize
    spec = list(nn.logical_to_mesh_axes(leaf.names, rules))
    for dim, (size, axes, logical) in enumerate(zip(shape, spec, leaf.names)):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        ways = math.prod(mesh.shape[a] for a in names)
        if size % ways == 0:
            continue
        if names == ("fsdp",) and nbytes <= FSDP_WHOLE_BYTES:
            spec[dim] = None
            whole.append(path)
            continue
        problems.append(f"{path} {tuple(shape)}: dimension {dim} ({logical!r} -> mesh "
                        f"{'x'.join(f'{a}={mesh.shape[a]}' for a in names)}) has size {size}, "
                        f"not divisible by {ways}")
    return NamedSharding(mesh, P(*spec))


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES, *, what: str = "parameters") -> Any:
    """``NamedSharding`` for each leaf of a tree of logically partitioned (boxed) abstract values.

    The tree is unboxed in the result; unboxed leaves (steps, optimizer
    counts) are replicated. Each parameter's dimensions are checked against
    their mesh axes (module docstring): ValueError naming every parameter
    whose shape does not fit, its shape and the axis sizes.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_tree, is_leaf=_is_boxed)
    problems, whole = [], []
    shardings = [_resolve(jax.tree_util.keystr(path, simple=True, separator="/"), leaf, mesh, rules, problems,
                          whole) for path, leaf in flat]
    if problems:
        listed = "; ".join(problems[:MAX_LISTED]) + (f"; and {len(problems) - MAX_LISTED} more"
                                                      if len(problems) > MAX_LISTED else "")
        raise ValueError(f"{len(problems)} of the {what} do not fit the mesh {dict(mesh.shape)}: {listed}")
    if whole:
        logging.info("%d small %s have a dimension that fsdp=%d does not divide and stay whole on every device, "
                     "e.g. %s", len(whole), what, mesh.shape["fsdp"], whole[0])
    return jax.tree_util.tree_unflatten(treedef, shardings)


def frozen_shardings(abstract_tree: Any, mesh: Mesh, layout: str, rules=LOGICAL_AXIS_RULES) -> Any:
    """Shardings of a frozen model's (boxed) params: by the logical rules ('shard') or whole on every device."""
    if layout not in FROZEN_LAYOUTS:
        raise ValueError(f"mesh.frozen must be one of {FROZEN_LAYOUTS}, got {layout!r}")
    if layout == "shard":
        return logical_shardings(abstract_tree, mesh, rules, what="frozen parameters")
    return jax.tree.map(lambda _: replicated(mesh), abstract_tree, is_leaf=_is_boxed)


def sharded_init(init_fn: Any, mesh: Mesh, *args: Any, rules=LOGICAL_AXIS_RULES,
                 shardings: Any = None) -> tuple[Any, Any]:
    """Run ``init_fn(*args)`` (it returns logically partitioned values) so that its outputs are born sharded.

    ``jax.eval_shape`` gives the boxed abstract outputs, their logical names give
    the (checked) shardings unless ``shardings`` are given, and
    ``jit(init, out_shardings=...)`` creates the unboxed arrays in place:
    nothing is gathered on one device. Returns ``(outputs, shardings)``, both unboxed trees.
    """
    if shardings is None:
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
