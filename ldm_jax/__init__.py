"""ldm_jax: latent diffusion (the Stable Diffusion family) in JAX/Flax."""

from ldm_jax.diffusion.sample_fn import Models, sample_fn
from ldm_jax.models.clip import tokenize
from ldm_jax.pipeline import Pipeline

__all__ = ["Models", "Pipeline", "sample_fn", "tokenize"]
