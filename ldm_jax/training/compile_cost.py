"""Lower and compile a config's stage-2 train step on abstract arrays and read XLA's cost and memory analyses.

Used by ``python -m ldm_jax.compile_check``. Nothing is allocated: the
state, frozen params and batch are ``jax.ShapeDtypeStruct``s on their
shardings (``ldm_jax.training.diffusion.state.abstract_state``).
"""

import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from ldm_jax import parallel
from ldm_jax.diffusion.sample_fn import Models
from ldm_jax.models.vae import scaling_factor
from ldm_jax.pipeline import build_modules
from ldm_jax.training.diffusion import state as diffusion_state
from ldm_jax.training.diffusion.step import DiffusionTask, resolve_batch_slices, task_from_settings
from ldm_jax.training.run_config import DIFFUSION_DEFAULTS
from ldm_jax.training.train_state import OPTIMIZER_DEFAULTS, make_optimizer

MODELS = ("unet", "vae", "text_encoder", "scheduler")


def _settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The stage-2 settings: a run config's ``diffusion`` section, or the trainer's defaults."""
    section = config.get("diffusion")
    settings = {**DIFFUSION_DEFAULTS, **(section.to_dict() if hasattr(section, "to_dict") else section or {})}
    settings["optimizer"] = {**OPTIMIZER_DEFAULTS, **settings["optimizer"]}
    return settings


def build_task(config: Mapping[str, Any], dtype: str,
               device_batch: int = 1) -> tuple[DiffusionTask, dict[str, dict], dict[str, Any]]:
    """The stage-2 task of ``config``'s models in compute ``dtype`` for steps whose devices each hold
    ``device_batch`` examples, their config dicts and the stage-2 settings."""
    configs = {name: config[name].to_dict() if hasattr(config[name], "to_dict") else dict(config[name])
               for name in MODELS}
    settings = _settings(config)
    modules = build_modules(configs, jnp.dtype(dtype))
    scheduler = Models.create(modules["unet"], modules["vae"], modules["text_encoder"], configs["scheduler"],
                              1.0).scheduler
    task = task_from_settings(modules["unet"], modules["text_encoder"], scheduler, scaling_factor(configs["vae"]),
                              settings, resolve_batch_slices(settings["batch_slices"], device_batch))
    return task, configs, settings


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


def compile_train_step(config: Mapping[str, Any], mesh_config: Mapping[str, Any], batch: int,
                       dtype: str | None = None) -> dict[str, Any]:
    """Compile ``config``'s stage-2 step for ``mesh_config`` over all devices and global ``batch``.

    Checks the mesh against the devices, the batch against the data-parallel
    size and the parameters against the mesh first (ValueErrors naming the
    numbers). Returns the mesh, parameter counts, seconds to lower and
    compile, per-device FLOPs and per-device memory in bytes ('argument',
    'output', 'temp', 'alias').
    """
    mesh = parallel.make_mesh(mesh_config)
    parallel.check_batch(batch, mesh)
    dtype = dtype or _settings(config)["dtype"]
    frozen_layout = dict(mesh_config).get("frozen", parallel.MESH_DEFAULTS["frozen"])
    task, configs, settings = build_task(config, dtype, batch // parallel.data_parallel_size(mesh))
    optimizer = make_optimizer(settings["optimizer"], settings["steps"])
    state, frozen = diffusion_state.abstract_state(task, configs, optimizer, mesh, frozen_layout,
                                                   parallel.axis_rules(mesh_config))
    shardings = jax.tree.map(lambda x: x.sharding, (state, frozen))
    step = diffusion_state.jit_train_step(task, optimizer, mesh, shardings, settings["state_layout"])
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parallel.replicated(mesh))
    started = time.time()
    lowered = step.lower(state, abstract_batch(configs, batch, mesh), frozen, rng)
    lowered_at = time.time()
    compiled = lowered.compile()
    compiled_at = time.time()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    memory = compiled.memory_analysis()
    trained = diffusion_state.trained_names(task)
    params = {f"{name} ({'trained' if name in trained else 'frozen'})":
              _count(state.params[name] if name in trained else frozen[name]) for name in ("unet", "text_encoder")}
    return {"mesh": mesh, "batch": batch, "dtype": dtype, "frozen": frozen_layout, "params": params,
            "lower_seconds": lowered_at - started, "compile_seconds": compiled_at - lowered_at,
            "flops_per_device": float(cost["flops"]),
            "memory": {"argument": memory.argument_size_in_bytes, "output": memory.output_size_in_bytes,
                       "temp": memory.temp_size_in_bytes, "alias": memory.alias_size_in_bytes}}
