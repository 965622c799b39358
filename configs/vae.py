r"""Stage 1 only: train an f=4 AutoencoderKL on the built-in ldm_shapes data (64x64 -> 16x16x4 latents).

    python -m ldm_jax.train --config configs/vae.py [--workdir runs/vae]

Writes ``WORKDIR/autoencoder/checkpoints/<step>`` (VAE + discriminator +
optimizer states, the latent scale factor, test PSNR) and metrics
(``metrics.jsonl``, TensorBoard). Cost on a 2-core CPU: see README "Results".
Perceptual loss: set ``--config.autoencoder.lpips=DIR`` (VGG16 + lpips heads as
safetensors, see ldm_jax/training/autoencoder_loop.py); without it the loss is
L1 + KL + GAN, and the log says so. The GAN starts at ``disc_start``.
Variant ``configs/vae.py:quick``: a few steps, for smoke tests.
"""

import ml_collections

from configs import sd15
from ldm_jax.training.run_config import run_config

VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1, norm_num_groups=8, act_fn="silu", sample_size=64,
)
# The diffusion models that this VAE's latents are meant for (configs/base.py trains them).
UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 128, 128), layers_per_block=1, attention_head_dim=4,
    cross_attention_dim=128, norm_num_groups=16, norm_eps=1e-5, use_linear_projection=True,
)
TEXT_ENCODER = dict(
    vocab_size=589, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=16, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=128,
    bos_token_id=587, eos_token_id=588, pad_token_id=588,
)
# L1 + KL for 400 steps, then the PatchGAN joins for the last 200 (about 12 minutes on 2 CPU cores).
AUTOENCODER = dict(
    steps=600, optimizer=dict(learning_rate=1e-3, b1=0.5, b2=0.9, warmup_steps=50),
    disc_optimizer=dict(learning_rate=1e-3, b1=0.5, b2=0.9), disc_start=401, disc_weight=0.5,
    disc_channels=32, log_every=50, eval_every=200, eval_examples=1000, checkpoint_every=200,
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Stage 1 on ldm_shapes; ``arg='quick'`` trains 4 steps on the 512-example build."""
    autoencoder, data = dict(AUTOENCODER), dict(source="shapes", batch_size=16, max_length=16)
    workdir = "runs/vae"
    if arg == "quick":
        autoencoder.update(steps=4, disc_start=2, log_every=2, eval_every=0, eval_examples=32, checkpoint_every=2)
        data.update(name="ldm_shapes/tiny", batch_size=8)
        workdir = "runs/vae_quick"
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/vae.py; the variant is 'quick'")
    return run_config(unet=UNET, vae=VAE, text_encoder=TEXT_ENCODER, scheduler=sd15.SD_SCHEDULER, data=data,
                      workdir=workdir, stages="autoencoder", autoencoder=autoencoder)
