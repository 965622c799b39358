"""Lower and compile a config's stage-2 train step on abstract arrays and read XLA's cost and memory analyses.

Used by ``python -m ldm_jax.compile_check``. Nothing is allocated: the
state, frozen params and batch are ``jax.ShapeDtypeStruct``s on their
shardings (``ldm_jax.training.diffusion.state.Stage2.abstract``).
"""

import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from ldm_jax import parallel
from ldm_jax.models.vae import scaling_factor
from ldm_jax.pipeline import model_configs
from ldm_jax.training.diffusion import state as diffusion_state
from ldm_jax.training.run_config import DIFFUSION_DEFAULTS
from ldm_jax.training.train_state import OPTIMIZER_DEFAULTS

def _settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The stage-2 settings: a run config's ``diffusion`` section, or the trainer's defaults."""
    section = config.get("diffusion")
    settings = {**DIFFUSION_DEFAULTS, **(section.to_dict() if hasattr(section, "to_dict") else section or {})}
    settings["optimizer"] = {**OPTIMIZER_DEFAULTS, **settings["optimizer"]}
    return settings


def build_stage2(config: Mapping[str, Any], mesh_config: Mapping[str, Any], batch: int,
                 dtype: str | None = None) -> diffusion_state.Stage2:
    """``config``'s stage 2 (`diffusion_state.build`) over a mesh of all devices for global ``batch``, in compute
    ``dtype`` (default: the settings' own)."""
    mesh = parallel.make_mesh(mesh_config)
    parallel.check_batch(batch, mesh)
    settings = _settings(config)
    if dtype:
        settings["dtype"] = dtype
    configs = model_configs(config)
    return diffusion_state.build(configs, settings, mesh, batch, scaling_factor(configs["vae"]),
                                 frozen_layout=dict(mesh_config).get("frozen", parallel.MESH_DEFAULTS["frozen"]),
                                 rules=parallel.axis_rules(mesh_config))


def abstract_batch(configs: Mapping[str, dict], batch: int, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """A batch of cached latent moments and token ids as ``ShapeDtypeStruct``s split over the batch axes."""
    vae, text = configs["vae"], configs["text_encoder"]
    size = configs["unet"]["sample_size"]
    latent = (batch, size, size, vae.get("latent_channels", 4))
    tokens = (batch, text["max_position_embeddings"])
    sharding = parallel.batch_sharding(mesh)
    return {"mean": jax.ShapeDtypeStruct(latent, jnp.float32, sharding=sharding),
            "logvar": jax.ShapeDtypeStruct(latent, jnp.float32, sharding=sharding),
            "input_ids": jax.ShapeDtypeStruct(tokens, jnp.int32, sharding=sharding),
            "empty_ids": jax.ShapeDtypeStruct(tokens, jnp.int32, sharding=sharding)}


def _count(tree: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def program_cost(compiled: jax.stages.Compiled) -> dict[str, float | int]:
    """XLA's cost and memory analyses of one compiled program, per device.

    ``flops`` and ``bytes_accessed`` (0 where XLA's cost analysis gives none,
    e.g. a GPU program's cuBLAS and cuDNN custom calls are not counted);
    ``argument_bytes``, ``output_bytes``, ``alias_bytes`` (outputs that reuse
    donated arguments) and ``temp_bytes``; and ``memory_bytes`` = argument +
    output - alias + temp: the buffers live at the program's peak.
    """
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}  # a list of one dict on older jax
    memory = compiled.memory_analysis()  # None where the backend has none
    sizes = {field: int(getattr(memory, f"{field}_size_in_bytes", 0)) for field in ("argument", "output", "alias",
                                                                                      "temp")}
    return dict(flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
                memory_bytes=sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"],
                **{f"{field}_bytes": size for field, size in sizes.items()})


def step_cost(step: Any) -> dict[str, float]:
    """XLA's cost and memory analyses of a compiled train step (``diffusion_state.JittedStep`` or
    ``cpu_step.ConcurrentSliceStep``), summed over the programs one step runs (``step.calls``): 'flops' and
    the 'argument', 'output', 'temp' and 'alias' bytes (for several programs, as if all were resident at once)."""
    totals = dict.fromkeys(("flops", "argument", "output", "temp", "alias"), 0.0)
    for name, compiled in step.programs.items():
        cost, calls = program_cost(compiled), step.calls[name]
        totals["flops"] += calls * cost["flops"]
        for key in ("argument", "output", "temp", "alias"):
            totals[key] += calls * cost[f"{key}_bytes"]
    return totals


def compile_train_step(config: Mapping[str, Any], mesh_config: Mapping[str, Any], batch: int,
                       dtype: str | None = None) -> dict[str, Any]:
    """Compile ``config``'s stage-2 step for ``mesh_config`` over all devices and global ``batch``.

    Checks the mesh against the devices, the batch against the data-parallel
    size and the parameters against the mesh first (ValueErrors naming the
    numbers). Returns the mesh, parameter counts, seconds to lower and
    compile it, per-device FLOPs and per-device memory in bytes ('argument',
    'output', 'temp', 'alias'; `step_cost`).
    """
    stage = build_stage2(config, mesh_config, batch, dtype)
    state, frozen = stage.abstract()
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parallel.replicated(stage.mesh))
    started = time.time()
    step, _ = stage.step.compile(state, abstract_batch(stage.configs, batch, stage.mesh), frozen, rng)
    compile_seconds = time.time() - started
    cost = step_cost(step)
    trained = diffusion_state.trained_names(stage.task)
    params = {f"{name} ({'trained' if name in trained else 'frozen'})":
              _count(state.params[name] if name in trained else frozen[name]) for name in ("unet", "text_encoder")}
    return {"mesh": stage.mesh, "batch": batch, "dtype": jnp.dtype(stage.task.unet.dtype).name,
            "frozen": stage.frozen_layout, "params": params, "compile_seconds": compile_seconds,
            "flops_per_device": cost["flops"],
            "memory": {key: int(cost[key]) for key in ("argument", "output", "temp", "alias")}}
