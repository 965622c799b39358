"""Stage 1: the autoencoder's train and eval steps (pure functions; ``state`` jits them with shardings).

One train step updates the autoencoder on the generator loss, then the
discriminator on the hinge loss of the updated autoencoder's reconstructions,
as LDM's two-optimizer training does. Both losses come from
``ldm_jax.training.autoencoder.losses``; randomness is ``fold_in(rng, step)``.
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from ldm_jax.training.autoencoder import losses
from ldm_jax.training.nonfinite import is_finite, keep_if_finite
from ldm_jax.training.train_state import TrainState, global_norm


def train_step(loss_config: losses.AutoencoderLossConfig, optimizers: Mapping[str, optax.GradientTransformation],
               state: TrainState, batch: Mapping[str, jax.Array], lpips_params: Any,
               rng: jax.Array, *, adversarial: bool) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update of the autoencoder and then of the discriminator; returns the new state and float32 metrics.

    ``adversarial`` (static) is whether the step is at or after
    ``disc_start``: ``state`` jits one step for each side and the loop picks on
    the host. Before ``disc_start`` the adversarial terms are weighted zero,
    so the step leaves the discriminator out rather than computing them:
    the autoencoder's loss is L1 (+ LPIPS) + KL with g_loss and d_weight 0,
    the discriminator is not updated (its metrics read 0) and its Adam step
    count starts at ``disc_start``. (Deciding inside the step with ``lax.cond``
    cost XLA:CPU 1.9x the time of a GAN step of configs/base.py's VAE.)
    ``lpips_params`` is None when the perceptual term is off.
    When a loss or gradient is NaN or Inf, both models keep their params and
    optimizer states (metric ``nonfinite`` is 1; see ``ldm_jax.training.nonfinite``).
    """
    gen_rng, disc_rng = jax.random.split(jax.random.fold_in(rng, state.step))
    params = dict(state.params)

    def generator(vae_params):
        return losses.generator_loss(loss_config, {**params, "vae": vae_params, "lpips": lpips_params},
                                     batch, gen_rng, state.step, adversarial=adversarial)

    (_, gen_metrics), vae_grads = jax.value_and_grad(generator, has_aux=True)(params["vae"])
    updates, vae_opt = optimizers["vae"].update(vae_grads, state.opt_state["vae"], params["vae"])
    params["vae"] = optax.apply_updates(params["vae"], updates)

    def discriminator(disc_params):
        return losses.discriminator_loss(loss_config, {**params, "discriminator": disc_params}, batch, disc_rng,
                                         state.step)

    def update_discriminator(disc_params, disc_opt):
        (_, metrics), grads = jax.value_and_grad(discriminator, has_aux=True)(disc_params)
        updates, disc_opt = optimizers["discriminator"].update(grads, disc_opt, disc_params)
        return optax.apply_updates(disc_params, updates), disc_opt, {**metrics, "disc_grad_norm": global_norm(grads)}

    def skip_discriminator(disc_params, disc_opt):  # before disc_start its loss and gradients are zero
        _, _, metrics = jax.eval_shape(update_discriminator, disc_params, disc_opt)
        return disc_params, disc_opt, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics)

    params["discriminator"], disc_opt, disc_metrics = (update_discriminator if adversarial else skip_discriminator)(
        params["discriminator"], state.opt_state["discriminator"])
    vae_grad_norm = global_norm(vae_grads)
    finite = is_finite(gen_metrics["total_loss"], vae_grad_norm, disc_metrics["disc_loss"],
                       disc_metrics["disc_grad_norm"])
    params, opt_state = keep_if_finite(finite, (params, {"vae": vae_opt, "discriminator": disc_opt}),
                                       (state.params, state.opt_state))
    metrics = {**gen_metrics, **disc_metrics, "vae_grad_norm": vae_grad_norm,
               "nonfinite": 1.0 - finite.astype(jnp.float32)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def psnr(images: jax.Array, reconstructions: jax.Array) -> jax.Array:
    """Per-example PSNR in dB of reconstructions clipped to [-1, 1], both mapped to [0, 1]."""
    x = (images.astype(jnp.float32) + 1.0) / 2.0
    y = (jnp.clip(reconstructions.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0
    mse = jnp.mean(jnp.square(x - y), axis=tuple(range(1, x.ndim)))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def eval_step(loss_config: losses.AutoencoderLossConfig, vae_params: Any,
              batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-example reconstruction PSNR and L1 (decoding the posterior mode, as at inference)."""
    images = batch["image"]
    reconstructions, _ = loss_config.vae.apply({"params": vae_params}, images)
    l1 = jnp.mean(jnp.abs(images.astype(jnp.float32) - reconstructions.astype(jnp.float32)), axis=(1, 2, 3))
    return {"psnr": psnr(images, reconstructions), "l1": l1}


def latent_std(vae: Any, vae_params: Any, images: jax.Array, rng: jax.Array) -> jax.Array:
    """Standard deviation of posterior samples of ``images`` over all elements (LDM's ``scale_by_std``)."""
    z = vae.apply({"params": vae_params}, images, method="encode").sample(rng)
    return jnp.std(z.astype(jnp.float32))
