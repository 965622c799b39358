"""`sample_fn`: text to images in one jitted, pure function.

tokens -> CLIP -> classifier-free-guided sampler loop over latents
(``lax.scan``) -> VAE decode -> images. Everything that changes the compiled
program (the modules, the sampler, step count, guidance scale, image size) is
static; params, token ids, the rng key and optional starting latents / images
are traced, so a new prompt or seed reuses the compiled code.
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.diffusion import samplers


def _frozen(value: Any) -> Any:
    """Lists (from JSON configs) to tuples, so a config can be part of a static argument."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class Models:
    """The static half of `sample_fn`: the three Flax modules, the scheduler config and the latent scale.

    Hashable, so it is a static argument of the jitted function; build it with
    ``Pipeline.models`` or :meth:`create`.
    """
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    scheduler: tuple[tuple[str, Any], ...]
    scale_factor: float

    @classmethod
    def create(cls, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, scheduler_config: Mapping[str, Any],
               scale_factor: float) -> "Models":
        """Bundle modules with a diffusers scheduler config dict (frozen into sorted items)."""
        scheduler = tuple(sorted((k, _frozen(v)) for k, v in scheduler_config.items()))
        return cls(unet, vae, text_encoder, scheduler, float(scale_factor))

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The scheduler config as a dict."""
        return dict(self.scheduler)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """NHWC latent shape for images of ``height`` x ``width``; ValueError if not divisible by the VAE factor."""
        factor = 2 ** (len(self.vae.block_out_channels) - 1)
        if height % factor or width % factor:
            raise ValueError(f"image size {height}x{width} must be divisible by the VAE's downsampling factor "
                             f"{factor}")
        return batch, height // factor, width // factor, self.vae.latent_channels


def _encode_text(models: Models, params: Any, ids: jax.Array) -> jax.Array:
    hidden, _ = models.text_encoder.apply({"params": params}, ids)
    return hidden


def _guided_model(models: Models, unet_params: Any, context: jax.Array, guidance_scale: float) -> Callable:
    """``model_fn(x, t)`` with classifier-free guidance: both halves in one U-Net call.

    ``context`` is [uncond; cond] stacked on the batch axis when guidance is on,
    just cond when ``guidance_scale == 1``.
    """
    guided = guidance_scale != 1.0

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        x_in = jnp.concatenate([x, x]) if guided else x
        t_in = jnp.broadcast_to(t, (x_in.shape[0],))
        out = models.unet.apply({"params": unet_params}, x_in.astype(models.unet.dtype), t_in, context)
        out = out.astype(x.dtype)
        if not guided:
            return out
        uncond, cond = jnp.split(out, 2)
        return uncond + guidance_scale * (cond - uncond)

    return model_fn


def _start_step(num_steps: int, strength: float) -> int:
    """The first step of an img2img run at ``strength`` (diffusers' rule: the last ``int(N * strength)`` steps)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    run = min(int(num_steps * strength), num_steps)
    if run < 1:
        raise ValueError(f"strength {strength} with {num_steps} steps leaves no step to run")
    return num_steps - run


@functools.partial(jax.jit, static_argnames=(
    "models", "sampler", "steps", "guidance_scale", "height", "width", "strength", "sampler_options",
    "sample_posterior", "return_latents"))
def sample_fn(params: Mapping[str, Any], cond_ids: jax.Array, uncond_ids: jax.Array | None, rng: jax.Array,
              latents: jax.Array | None = None, init_image: jax.Array | None = None, mask: jax.Array | None = None,
              *, models: Models, sampler: str = "ddim", steps: int = 50, guidance_scale: float = 7.5,
              height: int = 512, width: int = 512, strength: float = 1.0,
              sampler_options: tuple[tuple[str, Any], ...] = (), sample_posterior: bool = True,
              return_latents: bool = False):
    """Generate images for a batch of prompts; jitted and pure.

    Args:
      params: ``{'unet', 'vae', 'text_encoder'}`` param trees.
      cond_ids: int token ids [B, L] of the prompts.
      uncond_ids: token ids [B, L] of the negative / empty prompts; unused (may
        be None) when ``guidance_scale == 1``.
      rng: key for the initial latents, stochastic samplers and the img2img
        posterior sample.
      latents: optional standard normal initial latents [B, h, w, C] (NHWC);
        drawn from ``rng`` when None.
      init_image: optional image [B, height, width, 3] in [-1, 1] to start from
        (img2img: it is encoded, noised with ``latents`` to ``strength`` and
        denoised over the last ``int(steps * strength)`` steps).
      mask: optional [B, h, w, 1] at latent resolution, 1 where to generate and 0
        where to keep ``init_image`` (inpainting by latent masking; needs
        ``init_image``). At ``strength`` 1 the run starts from pure noise, below
        it from the noised image, as diffusers' StableDiffusionInpaintPipeline
        does with a 4-channel U-Net.
      models: the static `Models` bundle (``Pipeline.models``).
      sampler: one of ``samplers.SAMPLERS``; ``sampler_options`` are its
        options as ``(name, value)`` pairs, e.g. ``(('eta', 0.0),)``.
      steps, guidance_scale, height, width, strength: as in diffusers' pipelines
        (``strength`` needs ``init_image``). Unlike diffusers, a
        ``guidance_scale`` below 1 still applies guidance; only exactly 1 skips
        the unconditional half.
      sample_posterior: encode ``init_image`` to a sample of the VAE posterior
        (drawn from ``rng``, as diffusers does) or, if False, to its mode (the
        mean: diffusers' ``sample_mode="argmax"``), which makes img2img and
        inpainting deterministic given ``latents``.
      return_latents: also return the final latents, in the U-Net's space (VAE
        latents times ``scale_factor``, as diffusers' ``output_type="latent"``).

    Returns:
      images [B, height, width, 3] float32 in [0, 1], and the final latents if
      ``return_latents``.
    """
    sampler_ = samplers.make_sampler(sampler, models.scheduler_config, steps, **dict(sampler_options))
    batch = cond_ids.shape[0]
    shape = models.latent_shape(batch, height, width)
    latents_key, noise_key, posterior_key = jax.random.split(rng, 3)
    if latents is None:
        latents = jax.random.normal(latents_key, shape, jnp.float32)
    elif latents.shape != shape:
        raise ValueError(f"latents have shape {latents.shape}, expected {shape} for {height}x{width} images")
    if mask is not None and init_image is None:
        raise ValueError("inpainting needs init_image as well as mask")
    if init_image is None and strength != 1.0:
        raise ValueError(f"strength {strength} needs init_image (img2img or inpainting)")
    if uncond_ids is not None and uncond_ids.shape != cond_ids.shape:
        raise ValueError(f"uncond_ids have shape {uncond_ids.shape}, cond_ids {cond_ids.shape}: they must match")
    if init_image is not None and init_image.shape[:3] != (batch, height, width):
        raise ValueError(f"init_image has shape {init_image.shape}, expected ({batch}, {height}, {width}, channels)")
    if mask is not None and not (mask.ndim == 4 and all(m in (1, n) for m, n in zip(mask.shape, shape[:3] + (1,)))):
        raise ValueError(f"mask has shape {mask.shape}, expected {shape[:3] + (1,)} (latent resolution) or one "
                         "that broadcasts to it")

    context = _encode_text(models, params["text_encoder"], cond_ids)
    if guidance_scale != 1.0:
        if uncond_ids is None:
            raise ValueError("guidance_scale != 1 needs uncond_ids (the negative or empty prompts)")
        context = jnp.concatenate([_encode_text(models, params["text_encoder"], uncond_ids), context])
    model_fn = _guided_model(models, params["unet"], context, guidance_scale)

    start, x0, after_step = 0, None, None
    x = latents * sampler_.init_noise_sigma
    if init_image is not None:
        posterior = models.vae.apply({"params": params["vae"]}, init_image, method="encode")
        x0 = (posterior.sample(posterior_key) if sample_posterior else posterior.mode()) * models.scale_factor
        start = _start_step(sampler_.num_steps, strength)
        if mask is None or strength < 1.0:
            x = samplers.noise_to_step(sampler_, x0, latents, start)
        if mask is not None:
            def after_step(i, x):
                """Put back the known region, noised to the level after step ``i``."""
                known = samplers.noise_to_step(sampler_, x0, latents, i + 1)
                return mask * x + (1.0 - mask) * known

    z = samplers.sample_loop(sampler_, model_fn, x, start=start, rng=noise_key, after_step=after_step)
    if mask is not None:
        z = mask * z + (1.0 - mask) * x0
    images = models.vae.apply({"params": params["vae"]}, z / models.scale_factor, method="decode")
    images = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return (images, z) if return_latents else images
