"""ldm_jax: latent diffusion (the Stable Diffusion family) in JAX/Flax."""

from ldm_jax.pipeline import Pipeline

__all__ = ["Pipeline"]
