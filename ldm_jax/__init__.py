"""ldm_jax: latent diffusion (the Stable Diffusion family) in JAX/Flax."""
