"""Noise schedules of the discrete-time (DDPM) diffusion process, and conversions between model outputs.

The forward process is ``z_t = alpha_t * z0 + sigma_t * eps`` with
``alpha_t = sqrt(alphas_cumprod[t])``, ``sigma_t = sqrt(1 - alphas_cumprod[t])``
and ``t`` an integer in ``[0, num_train_timesteps)``. A model predicts one of
``epsilon`` (the noise), ``v_prediction`` (``v = alpha_t * eps - sigma_t * z0``,
Salimans & Ho 2022) or ``sample`` (``z0`` itself).

Betas and timestep spacings follow diffusers' schedulers (the numerical
reference); betas are computed in float64 and stored in ``NoiseSchedule`` as
float32, as the original LDM code does.
"""

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def betas(schedule: str, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
          beta_end: float = 0.012) -> np.ndarray:
    """Betas [num_train_timesteps] (float64) of a named schedule.

    ``linear``: evenly spaced from ``beta_start`` to ``beta_end``;
    ``scaled_linear`` (Stable Diffusion): the squares of evenly spaced values
    from ``sqrt(beta_start)`` to ``sqrt(beta_end)``; ``squaredcos_cap_v2``: the
    cosine schedule of Nichol & Dhariwal 2021 (``beta_start``/``beta_end``
    unused), betas capped at 0.999. Raises ValueError for any other name.
    """
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(s):
            """The cumulative signal fraction at continuous time ``s`` in [0, 1]."""
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        steps = [(i / num_train_timesteps, (i + 1) / num_train_timesteps) for i in range(num_train_timesteps)]
        return np.array([min(1.0 - alpha_bar(s1) / alpha_bar(s0), 0.999) for s0, s1 in steps])
    raise ValueError(f"unknown beta schedule {schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas rescaled so the last timestep has zero SNR (Lin et al. 2023, Algorithm 1).

    ``sqrt(alphas_cumprod)`` is shifted so its last value is 0 and scaled so its
    first value is unchanged; the betas are recovered from the result. A model
    trained on these needs ``v_prediction`` (an epsilon model cannot recover
    ``z0`` from pure noise).
    """
    sqrt_ac = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    ac = sqrt_ac**2
    return 1.0 - np.concatenate([ac[:1], ac[1:] / ac[:-1]])


def betas_from_config(scheduler_config: Mapping[str, Any]) -> np.ndarray:
    """Betas (float64) of a diffusers scheduler config.

    Reads ``trained_betas`` (used as is when given), ``beta_schedule``,
    ``num_train_timesteps``, ``beta_start``, ``beta_end`` and
    ``rescale_betas_zero_snr``, with diffusers' defaults (linear,
    1000, 0.0001, 0.02, False) for missing keys; other keys are ignored.
    """
    cfg = scheduler_config
    if cfg.get("trained_betas") is not None:
        out = np.asarray(cfg["trained_betas"], np.float64)
    else:
        out = betas(cfg.get("beta_schedule", "linear"), int(cfg.get("num_train_timesteps", 1000)),
                    float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02)))
    return rescale_zero_terminal_snr(out) if cfg.get("rescale_betas_zero_snr", False) else out


@struct.dataclass
class NoiseSchedule:
    """The training noise schedule: a pytree of float32 arrays [T] plus the static prediction type.

    ``betas[t]`` and ``alphas_cumprod[t] = prod_{s<=t} (1 - betas[s])`` for
    ``t`` in ``[0, T)``; ``prediction_type`` (static) is what the model predicts.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of training timesteps."""
        return self.betas.shape[0]

    @classmethod
    def from_config(cls, scheduler_config: Mapping[str, Any]) -> "NoiseSchedule":
        """The schedule of a diffusers scheduler config dict (``scheduler/scheduler_config.json``).

        Uses the keys read by ``betas_from_config`` and ``prediction_type``
        (default ``epsilon``); the other keys (``_class_name``, timestep spacing,
        sampler settings ...) belong to samplers and are ignored here. Raises
        ValueError for an unknown beta schedule or prediction type.
        """
        prediction_type = scheduler_config.get("prediction_type") or "epsilon"
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
        b = betas_from_config(scheduler_config)
        return cls(betas=jnp.asarray(b, jnp.float32), alphas_cumprod=jnp.asarray(np.cumprod(1.0 - b), jnp.float32),
                   prediction_type=prediction_type)


def _per_example(values: jax.Array, ndim: int) -> jax.Array:
    """``values`` [B] reshaped to [B, 1, ...] to broadcast against an array of rank ``ndim``."""
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def _alpha_sigma(schedule: NoiseSchedule, t: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
    """``(alpha_t, sigma_t)`` at integer timesteps ``t`` [B], shaped to broadcast over rank ``ndim``."""
    ac = _per_example(jnp.take(schedule.alphas_cumprod, jnp.asarray(t)), ndim)
    return jnp.sqrt(ac), jnp.sqrt(1.0 - ac)


def add_noise(schedule: NoiseSchedule, z0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """``z_t = alpha_t * z0 + sigma_t * eps`` for integer timesteps ``t`` [B]; keeps ``z0``'s dtype."""
    alpha, sigma = _alpha_sigma(schedule, t, z0.ndim)
    return (alpha * z0 + sigma * eps).astype(z0.dtype)


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio ``alpha_t**2 / sigma_t**2`` [B] at integer timesteps ``t`` [B]."""
    ac = jnp.take(schedule.alphas_cumprod, jnp.asarray(t))
    return ac / (1.0 - ac)


def split_prediction(z_t: jax.Array, alpha: jax.Array, sigma: jax.Array, model_out: jax.Array,
                     prediction_type: str) -> tuple[jax.Array, jax.Array]:
    """``(x0, eps)`` implied by a model output at ``z_t = alpha * x0 + sigma * eps`` (``alpha**2 + sigma**2 = 1``).

    ``alpha`` and ``sigma`` broadcast against ``z_t``. Raises ValueError for an
    unknown ``prediction_type``.
    """
    if prediction_type == "epsilon":
        return (z_t - sigma * model_out) / alpha, model_out
    if prediction_type == "v_prediction":
        return alpha * z_t - sigma * model_out, alpha * model_out + sigma * z_t
    if prediction_type == "sample":
        return model_out, (z_t - alpha * model_out) / sigma
    raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")


def predict_x0(schedule: NoiseSchedule, z_t: jax.Array, t: jax.Array, model_out: jax.Array,
               prediction_type: str | None = None) -> jax.Array:
    """The clean sample ``z0`` implied by ``model_out`` at ``z_t``, timesteps ``t`` [B].

    ``prediction_type`` defaults to the schedule's.
    """
    alpha, sigma = _alpha_sigma(schedule, t, z_t.ndim)
    return split_prediction(z_t, alpha, sigma, model_out, prediction_type or schedule.prediction_type)[0]


def predict_eps(schedule: NoiseSchedule, z_t: jax.Array, t: jax.Array, model_out: jax.Array,
                prediction_type: str | None = None) -> jax.Array:
    """The noise ``eps`` implied by ``model_out`` at ``z_t``, timesteps ``t`` [B].

    ``prediction_type`` defaults to the schedule's.
    """
    alpha, sigma = _alpha_sigma(schedule, t, z_t.ndim)
    return split_prediction(z_t, alpha, sigma, model_out, prediction_type or schedule.prediction_type)[1]


def velocity_target(schedule: NoiseSchedule, z0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """``v = alpha_t * eps - sigma_t * z0`` at timesteps ``t`` [B] (diffusers' ``get_velocity``)."""
    alpha, sigma = _alpha_sigma(schedule, t, z0.ndim)
    return alpha * eps - sigma * z0


def training_target(schedule: NoiseSchedule, z0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """What the model should output for ``add_noise(schedule, z0, eps, t)``: eps, v or z0 per the prediction type."""
    if schedule.prediction_type == "epsilon":
        return eps
    if schedule.prediction_type == "v_prediction":
        return velocity_target(schedule, z0, eps, t)
    return z0


def timesteps(num_inference_steps: int, num_train_timesteps: int = 1000, spacing: str = "leading",
              steps_offset: int = 0) -> np.ndarray:
    """The descending integer timesteps [num_inference_steps] (int64) of an inference schedule, as diffusers.

    With ``N`` steps and ``T`` training timesteps: ``leading`` is
    ``k * (T // N) + steps_offset``; ``trailing`` is ``round(T - k * T / N) - 1``
    (always starts at ``T - 1``; diffusers returns a spurious extra timestep -1
    for some ``N``, e.g. 61 of 1000, which we leave out); ``linspace`` is
    ``round(linspace(0, T - 1, N))``.
    ``steps_offset`` only applies to ``leading``. Raises ValueError for an
    unknown spacing or ``N`` outside ``[1, T]``.
    """
    n, T = int(num_inference_steps), int(num_train_timesteps)
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be in [1, {T}], got {num_inference_steps}")
    if spacing == "leading":
        out = np.arange(n)[::-1] * (T // n) + steps_offset
    elif spacing == "trailing":
        # np.arange's float steps as diffusers; it can yield a spurious (N+1)-th value near 0: drop it.
        out = np.round(np.arange(T, 0, -T / n)[:n]) - 1
    elif spacing == "linspace":
        out = np.round(np.linspace(0, T - 1, n))[::-1]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(TIMESTEP_SPACINGS)}")
    return out.astype(np.int64)
