"""Stage-1 autoencoder losses: LDM's ``LPIPSWithDiscriminator`` (taming's VQGAN recipe with a KL term).

With ``x`` the images, ``x_rec`` the reconstruction, ``D`` the PatchGAN
discriminator and ``f(step) = disc_factor if step >= disc_start else 0``:

* ``nll  = mean_b sum_{h,w,c} (|x - x_rec| + perceptual_weight * LPIPS_b(x, x_rec))``: per-example sums, as
  LDM (whose learned ``logvar`` is never optimized, so stays 0 and is left out);
* ``kl   = mean_b KL(q(z | x_b) || N(0, I))``, weighted by ``kl_weight`` (1e-6);
* ``g    = -mean D(x_rec)``, weighted by the adaptive ``lambda * f(step)`` where
  ``lambda = disc_weight * clip(|grad_W nll| / (|grad_W g| + 1e-4), 0, 1e4)``, W the decoder's ``conv_out``
  kernel, with no gradient through lambda;
* discriminator: ``f(step) * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))) / 2`` (hinge).

Everything is a pure function of ``(config, params, batch, rng, step)``, where
the :class:`AutoencoderLossConfig` is static (hashable: close over it or pass
it as a static argument of ``jax.jit``), ``params`` is ``{'vae': ...,
'discriminator': ..., 'lpips': ... or None}``, ``batch['image']`` holds NHWC
images in [-1, 1] and ``step`` is an int (traced or not).
"""

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.lpips import LPIPS
from ldm_jax.models.vae import AutoencoderKL, DiagonalGaussian

LAST_LAYER = ("decoder", "conv_out", "kernel")  # the layer whose gradients set the adaptive weight
MAX_ADAPTIVE_WEIGHT = 1e4
ADAPTIVE_EPS = 1e-4

Params = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class AutoencoderLossConfig:
    """The modules and weights of the autoencoder loss (LDM's ``kl-f8`` values by default).

    ``perceptual_weight`` only applies when ``params['lpips']`` is given (see
    :func:`perceptual_weight`). ``sample_posterior`` decodes a posterior sample
    (LDM's training) rather than its mean.
    """
    vae: AutoencoderKL
    discriminator: NLayerDiscriminator = NLayerDiscriminator()
    lpips: LPIPS = LPIPS()
    kl_weight: float = 1e-6
    perceptual_weight: float = 1.0
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_start: int = 50001
    sample_posterior: bool = True


def perceptual_weight(config: AutoencoderLossConfig, params: Params) -> float:
    """The LPIPS weight in effect: ``config.perceptual_weight``, or 0.0 when ``params['lpips']`` is None.

    Call it once when setting up training and log when it is 0 while the
    config asks for a perceptual term: the autoencoder then trains on L1 + KL + GAN only.
    """
    return 0.0 if params.get("lpips") is None else float(config.perceptual_weight)


def disc_factor(config: AutoencoderLossConfig, step: jax.Array | int) -> jax.Array:
    """The GAN terms' factor at ``step``: ``config.disc_factor`` from ``config.disc_start`` on, 0 before."""
    return jnp.where(jnp.asarray(step) >= config.disc_start, config.disc_factor, 0.0).astype(jnp.float32)


def l1_per_example(images: jax.Array, reconstructions: jax.Array) -> jax.Array:
    """sum |images - reconstructions| over each example: shape [B], float32."""
    diff = jnp.abs(images.astype(jnp.float32) - reconstructions.astype(jnp.float32))
    return jnp.sum(diff, axis=tuple(range(1, diff.ndim)))


def nll_loss(config: AutoencoderLossConfig, lpips_params: Params | None, images: jax.Array,
             reconstructions: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """LDM's reconstruction NLL (L1 plus LPIPS per pixel, summed per example, batch mean) and its parts.

    LPIPS is skipped when ``lpips_params`` is None; its params get no gradient.
    Returns ``(nll, {'l1_loss': mean |x - x_rec|, 'p_loss': mean LPIPS})``.
    """
    l1 = l1_per_example(images, reconstructions)
    pixels = images[0].size
    if lpips_params is None or config.perceptual_weight == 0:
        p_loss = jnp.zeros_like(l1)
    else:
        p_loss = config.lpips.apply({"params": jax.lax.stop_gradient(lpips_params)}, images, reconstructions)
    nll = jnp.mean(l1 + config.perceptual_weight * pixels * p_loss)
    return nll, {"l1_loss": jnp.mean(l1) / pixels, "p_loss": jnp.mean(p_loss)}


def kl_loss(posterior: DiagonalGaussian) -> jax.Array:
    """Batch mean of KL(q(z | x) || N(0, I)), each KL summed over the latent."""
    return jnp.mean(posterior.kl())


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """Discriminator hinge loss ``(mean relu(1 - real) + mean relu(1 + fake)) / 2``."""
    real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
    fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
    return 0.5 * (real + fake)


def generator_adversarial_loss(logits_fake: jax.Array) -> jax.Array:
    """The generator's adversarial loss ``-mean D(x_rec)``."""
    return -jnp.mean(logits_fake.astype(jnp.float32))


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array) -> jax.Array:
    """``clip(|nll_grad| / (|g_grad| + 1e-4), 0, 1e4)`` with no gradient (taming's ``calculate_adaptive_weight``
    before its ``disc_weight`` factor)."""
    ratio = jnp.linalg.norm(nll_grad.astype(jnp.float32)) / (jnp.linalg.norm(g_grad.astype(jnp.float32))
                                                             + ADAPTIVE_EPS)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, MAX_ADAPTIVE_WEIGHT))


def _replace(tree: Params, path: tuple[str, ...], value: jax.Array) -> Params:
    if not path:
        return value
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}


def reconstruct(config: AutoencoderLossConfig, vae_params: Params, images: jax.Array,
                rng: jax.Array) -> tuple[jax.Array, DiagonalGaussian, Callable[[jax.Array], jax.Array]]:
    """Run the autoencoder; also return the pullback to the decoder's ``conv_out`` kernel.

    Returns ``(reconstructions, posterior, last_layer_grad)``:
    ``last_layer_grad(dL/d reconstructions)`` is ``dL/d kernel`` for any loss
    L of the reconstructions. The forward pass is the one that differentiating
    the caller's loss goes through (no second forward); the pullback only
    touches the last conv.
    """
    vae_params = nn.meta.unbox(vae_params)

    def run(kernel):
        variables = {"params": _replace(vae_params, LAST_LAYER, kernel)}
        return config.vae.apply(variables, images, rng, sample_posterior=config.sample_posterior)

    kernel = vae_params[LAST_LAYER[0]][LAST_LAYER[1]][LAST_LAYER[2]]
    reconstructions, pullback, posterior = jax.vjp(run, kernel, has_aux=True)
    return reconstructions, posterior, lambda cotangent: pullback(cotangent)[0]


def _discriminate(config: AutoencoderLossConfig, disc_params: Params, images: jax.Array) -> jax.Array:
    return config.discriminator.apply({"params": disc_params}, images)


def generator_loss(config: AutoencoderLossConfig, params: Params, batch: Mapping[str, jax.Array],
                   rng: jax.Array, step: jax.Array | int,
                   adversarial: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The autoencoder's loss ``nll + kl_weight * kl + lambda * f(step) * g`` and its metrics.

    Differentiate it with respect to ``params['vae']``; discriminator and LPIPS
    params get no gradient. ``rng`` draws the posterior sample. Metrics
    (float32 scalars): total_loss, nll_loss, l1_loss, p_loss, kl_loss,
    g_loss, d_weight (lambda), disc_factor. ``adversarial=False`` (static)
    leaves the discriminator out: the loss of a step before ``disc_start``
    (where ``f(step)`` is 0) without its cost, with g_loss and d_weight 0.
    """
    images = batch["image"]
    reconstructions, posterior, last_layer_grad = reconstruct(config, params["vae"], images, rng)
    disc_params = jax.lax.stop_gradient(params["discriminator"])
    lpips_params = params.get("lpips")
    nll, parts = nll_loss(config, lpips_params, images, reconstructions)
    zero = jnp.zeros((), jnp.float32)
    g_loss = generator_adversarial_loss(_discriminate(config, disc_params, reconstructions)) if adversarial else zero
    if adversarial and config.disc_factor > 0:
        fixed = jax.lax.stop_gradient(reconstructions)
        nll_cotangent = jax.grad(lambda r: nll_loss(config, lpips_params, images, r)[0])(fixed)
        g_cotangent = jax.grad(lambda r: generator_adversarial_loss(_discriminate(config, disc_params, r)))(fixed)
        d_weight = config.disc_weight * adaptive_weight(last_layer_grad(nll_cotangent), last_layer_grad(g_cotangent))
    else:
        d_weight = zero
    factor = disc_factor(config, step)
    kl = kl_loss(posterior)
    total = nll + config.kl_weight * kl + d_weight * factor * g_loss
    metrics = dict(total_loss=total, nll_loss=nll, kl_loss=kl, g_loss=g_loss, d_weight=d_weight,
                   disc_factor=factor, **parts)
    return total, metrics


def discriminator_loss(config: AutoencoderLossConfig, params: Params, batch: Mapping[str, jax.Array],
                       rng: jax.Array, step: jax.Array | int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The discriminator's loss ``f(step) * hinge(D(x), D(x_rec))`` and its metrics.

    Differentiate it with respect to ``params['discriminator']``; the
    reconstruction (drawn with ``rng``, recomputed here as LDM does) gets no
    gradient. Real and fake batches go through D separately, as in taming.
    Metrics: disc_loss, logits_real, logits_fake (means), disc_factor.
    """
    images = batch["image"]
    reconstructions, _ = config.vae.apply({"params": jax.lax.stop_gradient(params["vae"])}, images, rng,
                                          sample_posterior=config.sample_posterior)
    logits_real = _discriminate(config, params["discriminator"], images)
    logits_fake = _discriminate(config, params["discriminator"], jax.lax.stop_gradient(reconstructions))
    factor = disc_factor(config, step)
    loss = factor * hinge_d_loss(logits_real, logits_fake)
    metrics = dict(disc_loss=loss, logits_real=jnp.mean(logits_real.astype(jnp.float32)),
                   logits_fake=jnp.mean(logits_fake.astype(jnp.float32)), disc_factor=factor)
    return loss, metrics
