"""Train state, optimizers and the EMA of parameters.

An ``optimizer`` config section::

    learning_rate   peak learning rate
    schedule        'constant' or 'cosine' (to ``end_factor * learning_rate`` at ``steps``), after warmup
    warmup_steps    linear warmup from 0
    b1, b2, eps     Adam moments
    weight_decay    decoupled (AdamW); 0 gives plain Adam
    grad_clip       global-norm clipping (0: off)
    accumulate      gradient accumulation: one update per this many calls (optax.MultiSteps)
    end_factor      final learning rate of the cosine schedule, as a fraction of the peak
"""

from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

# Memory layouts of a train state (the run config's diffusion.state_layout; ldm_jax/training/diffusion/state.py).
STATE_LAYOUTS = ("auto", "default")

OPTIMIZER_DEFAULTS = dict(learning_rate=1e-4, schedule="constant", warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
                          weight_decay=0.0, grad_clip=0.0, accumulate=1, end_factor=0.0)
SCHEDULES = ("constant", "cosine")


def check_state_layout(state_layout: str) -> None:
    """ValueError naming ``diffusion.state_layout`` unless ``state_layout`` is one of :data:`STATE_LAYOUTS`."""
    if state_layout not in STATE_LAYOUTS:
        raise ValueError(f"diffusion.state_layout must be one of {list(STATE_LAYOUTS)}, got {state_layout!r}")


class TrainState(flax.struct.PyTreeNode):
    """Everything a train step changes: the step, params and optimizer state by model, and EMA params.

    ``params`` and ``opt_state`` are dicts keyed by model name ('vae',
    'discriminator', 'unet', ...); ``ema`` holds EMA copies of some of the
    params ({} when unused).
    """
    step: jax.Array
    params: dict[str, Any]
    opt_state: dict[str, Any]
    ema: dict[str, Any] = flax.struct.field(default_factory=dict)


def learning_rate_schedule(config: Mapping[str, Any], steps: int) -> optax.Schedule:
    """The learning rate as a function of the update count: linear warmup, then constant or cosine decay."""
    if config["schedule"] not in SCHEDULES:
        raise ValueError(f"optimizer.schedule must be one of {SCHEDULES}, got {config['schedule']!r}")
    peak, warmup = config["learning_rate"], config["warmup_steps"]
    if config["schedule"] == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1),
                                                  end_value=peak * config["end_factor"])
    if warmup == 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])


def make_optimizer(config: Mapping[str, Any], steps: int) -> optax.GradientTransformation:
    """Adam(W) with the section's schedule, clipping and accumulation; ``steps`` is the run's length.

    ``steps`` and ``warmup_steps`` count trainer steps (calls of the step), also when ``accumulate`` k makes one
    update of every k of them.

    Raises KeyError naming unknown keys of the section.
    """
    unknown = sorted(set(config) - set(OPTIMIZER_DEFAULTS))
    if unknown:
        raise KeyError(f"unknown optimizer config key(s) {unknown}; known keys: {sorted(OPTIMIZER_DEFAULTS)}")
    config = {**OPTIMIZER_DEFAULTS, **config}
    if config["accumulate"] < 1:
        raise ValueError(f"optimizer.accumulate must be >= 1, got {config['accumulate']}")
    schedule = learning_rate_schedule(config, steps)
    if config["accumulate"] > 1:
        # optax counts updates, the config counts trainer steps (k per update): update u is at trainer step u * k,
        # so accumulating k batches of B follows the schedule of a run of steps / k with batches of k * B.
        by_step, every = schedule, config["accumulate"]
        schedule = lambda update: by_step(update * every)
    parts = [optax.clip_by_global_norm(config["grad_clip"])] if config["grad_clip"] > 0 else []
    parts.append(optax.adamw(schedule, b1=config["b1"], b2=config["b2"], eps=config["eps"],
                             weight_decay=config["weight_decay"]))
    tx = optax.chain(*parts)
    if config["accumulate"] > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config["accumulate"])
    return tx


def ema_decay(step: jax.Array, max_decay: float, warmup: bool = True) -> jax.Array:
    """EMA decay at ``step``: ``min(max_decay, (1 + step) / (10 + step))`` with warmup, else ``max_decay``."""
    if not warmup:
        return jnp.asarray(max_decay, jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(max_decay, (1.0 + step) / (10.0 + step))


def applied_update(old_opt_state: Any, new_opt_state: Any, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Whether the optimizer update from ``old_opt_state`` to ``new_opt_state`` changed the params, and the index
    of that update: with ``accumulate`` k only every k-th call does (the EMA follows updates, as on one k times
    larger batch); without, every call does and its index is the trainer ``step``."""
    if isinstance(new_opt_state, optax.MultiStepsState):
        return new_opt_state.gradient_step > old_opt_state.gradient_step, old_opt_state.gradient_step
    return jnp.bool_(True), step


def ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
    """``decay * ema + (1 - decay) * params``, leaf by leaf, in each EMA leaf's dtype."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(jnp.float32)).astype(e.dtype), ema, params)


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all leaves of ``tree`` together (float32)."""
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
