r"""A tiny latent diffusion model for tests and smoke runs (seconds on a CPU).

Same structure as configs/sd15.py, scaled down: 32x32 images, f=4 VAE, a
two-level U-Net, a two-layer CLIP text encoder over a small vocabulary.

``get_config()`` is the models alone (for ``Pipeline.from_config``);
``configs/tiny.py:run`` is a whole run config of them on the 512-example
``ldm_shapes/tiny`` build, every stage a few steps (the fault-tolerance tests
drive it through the CLI):

    python -m ldm_jax.train --config configs/tiny.py:run [--workdir runs/tiny]
"""

import ml_collections

from configs import sd15
from ldm_jax.training.run_config import run_config


def get_config(arg=None):
    """Tiny model config; ``arg='run'``: a run config of these models on ldm_shapes/tiny (see the docstring)."""
    config = ml_collections.ConfigDict()
    config.image_size = 32
    config.unet = dict(
        sample_size=8, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
        cross_attention_dim=32, norm_num_groups=8, norm_eps=1e-5, use_linear_projection=False,
    )
    config.vae = dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, act_fn="silu", sample_size=32, scaling_factor=1.0,
    )
    config.text_encoder = dict(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    config.scheduler = dict(sd15.SD_SCHEDULER)
    if arg == "run":
        return _run(config)
    if arg:
        raise ValueError(f"unknown variant {arg!r} of configs/tiny.py; the variant is 'run'")
    return config


def _run(models: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run config of the tiny models: a few steps of each stage on ldm_shapes/tiny."""
    return run_config(
        unet=models.unet.to_dict(), vae=models.vae.to_dict(), text_encoder=models.text_encoder.to_dict(),
        scheduler=models.scheduler.to_dict(), workdir="runs/tiny",
        data=dict(source="shapes", name="ldm_shapes/tiny", batch_size=8, image_size=32, max_length=16),
        autoencoder=dict(steps=4, disc_start=2, log_every=1, eval_every=0, eval_examples=16, checkpoint_every=2,
                         disc_channels=8, disc_layers=2, optimizer=dict(learning_rate=1e-3, b1=0.5, b2=0.9),
                         disc_optimizer=dict(learning_rate=1e-3, b1=0.5, b2=0.9)),
        latents=dict(batch_size=16, shard_size=256),
        diffusion=dict(steps=8, log_every=1, checkpoint_every=2, sample_every=0, sample_steps=2, ema_decay=0.99,
                       train_text_encoder=True, optimizer=dict(learning_rate=1e-3, warmup_steps=1)))
