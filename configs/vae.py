r"""Stage 1 only: the base run's f=2 AutoencoderKL on the built-in ldm_shapes data (64x64 -> 32x32x4 latents).

    python -m ldm_jax.train --config configs/vae.py [--workdir runs/vae]

Writes ``WORKDIR/autoencoder/checkpoints/<step>`` (VAE + discriminator +
optimizer states, the latent scale factor, test PSNR) and metrics
(``metrics.jsonl``, TensorBoard). The settings are configs/base.py's ``AUTOENCODER`` (600 steps:
L1 + KL, then the PatchGAN from step 401) at batch 16; the base run's own stage 1 trains 1,200 steps
at batch 8 (docs/experiments.md). Perceptual loss: set ``--config.autoencoder.lpips=DIR``
(VGG16 + lpips heads as safetensors, see ldm_jax/training/autoencoder/state.py);
without it the loss is L1 + KL + GAN, and the log says so.
Variant ``configs/vae.py:quick``: a few steps, for smoke tests.
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """configs/base.py (or its ``quick`` variant) with only the autoencoder stage, in its own workdir."""
    config = base.get_config(arg, autoencoder=base.AUTOENCODER)
    with config.unlocked():
        config.stages = "autoencoder"
        config.workdir = "runs/vae_quick" if arg == "quick" else "runs/vae"
        if arg != "quick":
            config.data.batch_size = 16  # a standalone stage 1 at batch 16; the base run's is 8
    return config
