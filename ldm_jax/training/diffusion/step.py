"""Stage 2: the latent diffusion loss and update (pure functions; ``state.py`` jits them with shardings).

Per step, with ``rng_k = fold_in(rng, step)``: latents ``z0 = z * scale`` (drawn
from cached posterior moments, or encoded on the fly from images by the
frozen VAE), captions dropped to the empty prompt with probability
``caption_dropout`` (so classifier-free guidance has an unconditional model),
``t ~ U{0..T-1}`` (or logit-normal, ``t = floor(T * sigmoid(m + s * n))``
with ``n ~ N(0, 1)``, which trains the middle of the schedule more: Esser
et al. 2024), ``eps ~ N(0, I)``, ``z_t = add_noise(z0, eps, t)`` and the
loss ``mean_b w_b * mean |model(z_t, t, text) - target|^2`` with the target
eps, v or z0 per the schedule's prediction type and ``w_b`` 1 or the
min-SNR-gamma weight (Hang et al. 2023).
"""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ldm_jax.diffusion import schedule as sched
from ldm_jax.training.nonfinite import is_finite, keep_if_finite
from ldm_jax.training.train_state import TrainState, applied_update, ema_decay, ema_update, global_norm


@dataclasses.dataclass(frozen=True)
class DiffusionTask:
    """The static half of the diffusion step: modules and loss settings (hashable).

    ``train_text_encoder`` puts the text encoder's params among the trained
    ones (the LDM paper's choice) instead of the frozen ones (SD's).
    ``min_snr_gamma`` 0 means unweighted MSE. ``timestep_sampling`` is
    'uniform' or 'logit_normal' (with ``logit_mean`` and ``logit_std``; see
    ``sample_timesteps``). ``vae`` is only used when batches hold images
    rather than cached moments.
    """
    unet: nn.Module
    text_encoder: nn.Module
    vae: nn.Module | None
    scheduler: tuple[tuple[str, Any], ...]
    scale_factor: float
    caption_dropout: float = 0.1
    min_snr_gamma: float = 0.0
    train_text_encoder: bool = False
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    @property
    def schedule(self) -> sched.NoiseSchedule:
        """The training noise schedule (built inside the jitted step: constants of the program)."""
        return sched.NoiseSchedule.from_config(dict(self.scheduler))


def loss_weights(schedule: sched.NoiseSchedule, t: jax.Array, gamma: float) -> jax.Array:
    """Min-SNR-gamma weights [B] expressed for the schedule's prediction type (1 when ``gamma`` is 0).

    As x0-space weights these are ``min(snr, gamma)``: near zero at high
    noise, where the layout of an image is decided (with v-prediction on
    configs/base.py this kept position at chance: docs/experiments.md). At a
    zero terminal SNR (``rescale_betas_zero_snr``) the epsilon weight is its
    limit, 1, not 0 / 0.
    """
    if gamma <= 0:
        return jnp.ones(t.shape, jnp.float32)
    snr = sched.snr(schedule, t)
    clipped = jnp.minimum(snr, gamma)
    if schedule.prediction_type == "epsilon":
        return jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)
    if schedule.prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped


def task_from_settings(unet: nn.Module, text_encoder: nn.Module, scheduler: tuple[tuple[str, Any], ...],
                       scale_factor: float, settings: Mapping[str, Any]) -> DiffusionTask:
    """The stage-2 task of these modules under a run config's ``diffusion`` section (loss, EMA, timesteps)."""
    return DiffusionTask(unet=unet, text_encoder=text_encoder, vae=None, scheduler=scheduler,
                         scale_factor=scale_factor, caption_dropout=settings["caption_dropout"],
                         min_snr_gamma=settings["min_snr_gamma"], train_text_encoder=settings["train_text_encoder"],
                         ema_decay=settings["ema_decay"], ema_warmup=settings["ema_warmup"],
                         timestep_sampling=settings["timestep_sampling"], logit_mean=settings["timestep_logit_mean"],
                         logit_std=settings["timestep_logit_std"])


TIMESTEP_SAMPLING = ("uniform", "logit_normal")


def sample_timesteps(rng: jax.Array, size: int, num_timesteps: int, sampling: str = "uniform",
                     logit_mean: float = 0.0, logit_std: float = 1.0) -> jax.Array:
    """``size`` training timesteps (int32) in ``[0, num_timesteps)``: uniform, or logit-normal.

    Logit-normal draws ``t = floor(T * sigmoid(logit_mean + logit_std * n))``
    with ``n ~ N(0, 1)`` (SD3's timestep density, Esser et al. 2024): fewer
    steps at the ends of the schedule, more in the middle, where an image's
    shapes are resolved; ``logit_mean`` > 0 shifts them towards noise.
    """
    if sampling == "uniform":
        return jax.random.randint(rng, (size,), 0, num_timesteps)
    if sampling != "logit_normal":
        raise ValueError(f"unknown timestep sampling {sampling!r}; known: {list(TIMESTEP_SAMPLING)}")
    u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (size,), jnp.float32))
    return jnp.minimum(jnp.floor(u * num_timesteps).astype(jnp.int32), num_timesteps - 1)


def sample_latents(batch: Mapping[str, jax.Array], rng: jax.Array, scale_factor: float) -> jax.Array:
    """``(mean + exp(logvar / 2) * eps) * scale_factor`` for a batch of cached moments (float32).

    The latent cache (``ldm_jax.data.latents``) stores posterior moments, so each visit draws a fresh sample.
    """
    mean = batch["mean"].astype(jnp.float32)
    std = jnp.exp(0.5 * batch["logvar"].astype(jnp.float32))
    return (mean + std * jax.random.normal(rng, mean.shape, jnp.float32)) * scale_factor


def clean_latents(task: DiffusionTask, frozen: Mapping[str, Any], batch: Mapping[str, jax.Array],
                  rng: jax.Array) -> jax.Array:
    """Scaled latents ``z0``: a posterior sample of the cached moments, or of the VAE's encoding of the images."""
    if "mean" in batch:
        return sample_latents(batch, rng, task.scale_factor)
    posterior = task.vae.apply({"params": frozen["vae"]}, batch["image"], method="encode")
    return jax.lax.stop_gradient(posterior.sample(rng) * task.scale_factor)


def drop_captions(ids: jax.Array, empty_ids: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """``ids`` [B, L] with each row replaced by ``empty_ids`` ([L] or [B, L]) with probability ``rate``."""
    drop = jax.random.bernoulli(rng, rate, (ids.shape[0],))
    return jnp.where(drop[:, None], empty_ids, ids)


def noised_batch(task: DiffusionTask, frozen: Mapping[str, Any], batch: Mapping[str, jax.Array],
                 rng: jax.Array) -> dict[str, jax.Array]:
    """One batch noised for training: 'z_t', 't', the 'target', the loss 'weight' [B] and the token 'ids' to encode
    (after caption dropout)."""
    schedule = task.schedule
    latent_rng, drop_rng, t_rng, noise_rng = jax.random.split(rng, 4)
    z0 = clean_latents(task, frozen, batch, latent_rng)
    ids = drop_captions(batch["input_ids"], batch["empty_ids"], task.caption_dropout, drop_rng)
    t = sample_timesteps(t_rng, z0.shape[0], schedule.num_train_timesteps, task.timestep_sampling,
                         task.logit_mean, task.logit_std)
    noise = jax.random.normal(noise_rng, z0.shape, jnp.float32)
    return {"z_t": sched.add_noise(schedule, z0, noise, t), "t": t,
            "target": sched.training_target(schedule, z0, noise, t),
            "weight": loss_weights(schedule, t, task.min_snr_gamma), "ids": ids}


def encode_text(task: DiffusionTask, text_params: Mapping[str, Any], ids: jax.Array) -> jax.Array:
    """The text encoder's last hidden states for token ``ids`` [B, L]: the U-Net's cross-attention context."""
    return task.text_encoder.apply({"params": text_params}, ids)[0]


def unet_inputs(task: DiffusionTask, params: Mapping[str, Any], frozen: Mapping[str, Any],
                batch: Mapping[str, jax.Array], rng: jax.Array) -> dict[str, jax.Array]:
    """`noised_batch` with the encoded captions as 'context' (the trained text encoder's, or the frozen one's)."""
    noised = noised_batch(task, frozen, batch, rng)
    text_params = params["text_encoder"] if task.train_text_encoder else frozen["text_encoder"]
    return {**noised, "context": encode_text(task, text_params, noised["ids"])}


def example_mse(task: DiffusionTask, unet_params: Mapping[str, Any], z_t: jax.Array, t: jax.Array,
                context: jax.Array, target: jax.Array) -> jax.Array:
    """The U-Net's squared error against ``target``, averaged over each example [B] (float32)."""
    prediction = task.unet.apply({"params": unet_params}, z_t, t, context)
    return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target), axis=tuple(range(1, z_t.ndim)))


def diffusion_loss(task: DiffusionTask, params: Mapping[str, Any], frozen: Mapping[str, Any],
                   batch: Mapping[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted denoising loss of one batch and its metrics (loss, mse, mean weight)."""
    inputs = unet_inputs(task, params, frozen, batch, rng)
    mse = example_mse(task, params["unet"], inputs["z_t"], inputs["t"], inputs["context"], inputs["target"])
    loss = jnp.mean(inputs["weight"] * mse)
    return loss, {"loss": loss, "mse": jnp.mean(mse), "weight": jnp.mean(inputs["weight"])}


def train_step(task: DiffusionTask, optimizer: optax.GradientTransformation, state: TrainState,
               batch: Mapping[str, jax.Array], frozen: Mapping[str, Any],
               rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update of the trained params (U-Net, and text encoder if trained) plus the U-Net EMA.

    ``batch`` holds 'input_ids', 'empty_ids' (the empty prompt's ids, [L] or
    [B, L]) and either cached 'mean'/'logvar' or 'image'; ``frozen`` holds the
    params of the frozen models. Returns the new state and float32 metrics
    (loss, mse, weight, grad_norm, and nonfinite: 1 when the loss or the
    gradient was NaN or Inf, in which case params, optimizer state and EMA are
    returned unchanged and only the step advances; see
    ``ldm_jax.training.nonfinite``).
    """
    step_rng = jax.random.fold_in(rng, state.step)
    (_, metrics), grads = jax.value_and_grad(diffusion_loss, argnums=1, has_aux=True)(
        task, state.params, frozen, batch, step_rng)
    return apply_gradients(task, optimizer, state, grads, metrics)


def apply_gradients(task: DiffusionTask, optimizer: optax.GradientTransformation, state: TrainState,
                    grads: Mapping[str, Any], metrics: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    """The update of `train_step`: the optimizer applies ``grads`` (a tree like ``state.params``), the EMA follows,
    and the non-finite guard on ``metrics['loss']`` and the gradient norm keeps the old state on NaN / Inf;
    returns the new state and ``metrics`` with 'grad_norm' and 'nonfinite' added."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema:
        applied, update = applied_update(state.opt_state, opt_state, state.step)
        decay = jnp.where(applied, ema_decay(update, task.ema_decay, task.ema_warmup), 1.0)
        ema = {**ema, "unet": ema_update(ema["unet"], params["unet"], decay)}
    grad_norm = global_norm(grads)
    finite = is_finite(metrics["loss"], grad_norm)
    params, opt_state, ema = keep_if_finite(finite, (params, opt_state, ema),
                                            (state.params, state.opt_state, state.ema))
    metrics = {**metrics, "grad_norm": grad_norm, "nonfinite": 1.0 - finite.astype(jnp.float32)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics
