r"""The CPU demo: a text-to-image latent diffusion model trained from nothing on the built-in ldm_shapes data.

    python -m ldm_jax.train --config configs/base.py [--workdir runs/base]

Stages, each resumed if the workdir already has it: (1) an f=2 AutoencoderKL
(64x64x3 images -> 32x32x4 latents; L1 + KL, with a PatchGAN for the last third), (2) the latent
cache of the 20k training images, (3) a text-conditioned U-Net (v-prediction on a zero-terminal-SNR
schedule, plain MSE, logit-normal timesteps, EMA) under a frozen, randomly initialised 2-layer text
encoder, with sample grids of held-out prompts. Then score prompt following:

    python -m ldm_jax.evaluate --checkpoint runs/base

Cost: about 25 minutes on an idle 2-core Intel Xeon, peak RSS 3.4 GiB; scores and the evidence for each
setting: docs/experiments.md.
``configs/base.py:quick`` runs every stage for a few steps on the 512-example build (a smoke test,
about 3 minutes). ``configs/base.py:f4`` is an f=4 VAE (16x16x4 latents) and SD's schedule, 2.5x
faster and worse at shapes (workdir runs/base_f4).
"""

import ml_collections

from configs import sd15
from ldm_jax.training.run_config import run_config

# An f=2 VAE: its reconstructions keep small shapes' shape 78% of the time (f=4: 26%) and every large star.
# Its mid-block attention stays (tiled on the CPU): without it stage 2 scores shape 45.5% against 62.5%
# (docs/experiments.md).
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1, norm_num_groups=8, act_fn="silu", sample_size=64,
)
# The U-Net for these 32x32 latents: four levels, the top two narrow. Attention at 8x8 and 4x4 only: at 16x16 it
# costs 1.56x the step time for no better shapes (docs/experiments.md). The attention-pooled prompt is added to the
# time embedding (addition_embed_type='text'), besides cross-attention.
UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 32, 64, 64), layers_per_block=1, attention_head_dim=2,
    cross_attention_dim=128, norm_num_groups=16, norm_eps=1e-5, use_linear_projection=True,
    addition_embed_type="text", addition_embed_type_num_heads=4,
)
# SD's noise schedule with v-prediction (at high noise the target is close to -x0, so the layout gets a strong
# gradient), rescaled to zero SNR at t = 999 with trailing sampler timesteps (Lin et al. 2023): on 32x32 latents
# SD's schedule leaves the layout readable at t = 999, so position stays at chance (20%) unless rescaled (100%).
SCHEDULER = dict(sd15.SD_SCHEDULER, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                 timestep_spacing="trailing")
TEXT_ENCODER = dict(
    vocab_size=589, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=16, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=128,
    bos_token_id=587, eos_token_id=588, pad_token_id=588,
)
# configs/vae.py: L1 + KL for 400 steps, then the PatchGAN joins for the last 200. The base run trains 1200
# steps at batch 8 instead (BASE_AUTOENCODER), the PatchGAN joining for the last 400: it lifts the samples' shape
# accuracy (37.5% vs 33.5%) at ~1.7x the cost of a plain step. Batch 8 beats batch 16 over the same images
# (reconstructions' shape 70% vs 58%). The learning rate decays (cosine, to a tenth): at a constant 1e-3 the
# colour of the reconstructions swings between 88% and 99% from one checkpoint to the next (docs/experiments.md).
AUTOENCODER = dict(
    steps=600, optimizer=dict(learning_rate=1e-3, b1=0.5, b2=0.9, warmup_steps=50),
    disc_optimizer=dict(learning_rate=1e-3, b1=0.5, b2=0.9), disc_start=401, disc_weight=0.5,
    disc_channels=32, log_every=50, eval_every=200, eval_examples=1000, checkpoint_every=200,
)


BASE_AUTOENCODER = dict(AUTOENCODER, steps=1200, disc_start=801, eval_every=600, eval_examples=500,
                        checkpoint_every=600, optimizer=dict(AUTOENCODER["optimizer"], schedule="cosine",
                                                             end_factor=0.1))
# Batch 16 rather than 32 over the same images and time: large shapes' shape 41% vs 35%. 4,500 steps rather than
# 3,000: shape 72.0% vs 69.3% over three sampling seeds, within 30 minutes on 2 cores (docs/experiments.md).
DIFFUSION = dict(
    steps=4500, batch_size=16, optimizer=dict(learning_rate=1e-3, weight_decay=0.01, grad_clip=1.0,
                                              warmup_steps=100, schedule="cosine", end_factor=0.1),
    # Plain v-prediction MSE, no min-SNR weighting: min-SNR-5 gives the high-noise steps, where the layout is
    # decided, an x0 weight of min(snr, 5) (0.005 at t = 999), and position stays at chance (20% vs 99%).
    # Timesteps t = 1000 * sigmoid(n), n ~ N(1, 1), not uniform: shape 40.3% vs 30.3% over three seeds; centred on
    # t = 500 instead, position falls to chance, since the layout is decided above t = 900 (docs/experiments.md).
    timestep_sampling="logit_normal", timestep_logit_mean=1.0, timestep_logit_std=1.0,
    caption_dropout=0.1, ema_decay=0.999, log_every=100, checkpoint_every=1500,
    sample_every=1500, sample_steps=25, guidance_scale=4.0,  # evaluate's default too: it follows prompts best
    # Frozen: trained jointly, the text encoder learns to mute the position words (their effect on its output
    # falls to a tenth of the colour words'), and colour reaches 92% vs 96% frozen (docs/experiments.md).
    train_text_encoder=False,
)


# The 'f4' variant: 13 min 26 s end to end on a 2-core Intel Xeon, shape 49.0% (docs/experiments.md).
F4_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1, norm_num_groups=8, act_fn="silu", sample_size=64,
)
# The U-Net for the f=4 VAE's 16x16 latents.
# Attention at 8x8 and 4x4 only: at 16x16 it costs 1.38x the step time for no better shapes (docs/experiments.md).
# The attention-pooled prompt is added to the time embedding (addition_embed_type='text'), besides cross-attention.
F4_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=2,
    cross_attention_dim=128, norm_num_groups=16, norm_eps=1e-5, use_linear_projection=True,
    addition_embed_type="text", addition_embed_type_num_heads=4,
)
# SD's noise schedule with v-prediction: at high noise the target is close to -x0, so the layout gets a
# strong gradient (with epsilon colour and size train more slowly: docs/experiments.md).
F4_SCHEDULER = dict(sd15.SD_SCHEDULER, prediction_type="v_prediction")
# 2,400 steps: 2,800 score no better (shape 35.5% vs 37.5%, guidance 8).
F4_DIFFUSION = dict(DIFFUSION, steps=2400, checkpoint_every=800, sample_every=800)


def get_config(arg: str | None = None, autoencoder: dict | None = None) -> ml_collections.ConfigDict:
    """The base run; ``arg='quick'`` shrinks every stage to a few steps on the 512-example build, ``arg='f4'``
    is the f=4 variant (workdir runs/base_f4).

    ``autoencoder`` replaces the stage-1 settings (configs/vae.py passes AUTOENCODER).
    """
    autoencoder, diffusion, latents = dict(autoencoder or BASE_AUTOENCODER), dict(DIFFUSION), dict(batch_size=64)
    data = dict(source="shapes", batch_size=8, max_length=16)  # stage 1's batch; the cache encodes 64 at a time
    workdir, vae, unet, scheduler = "runs/base", VAE, UNET, SCHEDULER
    if arg == "f4":
        vae, unet, scheduler, diffusion, workdir = F4_VAE, F4_UNET, F4_SCHEDULER, dict(F4_DIFFUSION), "runs/base_f4"
    elif arg == "quick":
        autoencoder.update(steps=4, disc_start=2, log_every=2, eval_every=0, eval_examples=32, checkpoint_every=2)
        diffusion.update(steps=4, batch_size=8, log_every=2, checkpoint_every=2, sample_every=0, sample_steps=2)
        data.update(name="ldm_shapes/tiny")
        latents.update(batch_size=8)
        workdir = "runs/base_quick"
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/base.py; the variants are 'quick' and 'f4'")
    return run_config(unet=unet, vae=vae, text_encoder=TEXT_ENCODER, scheduler=scheduler, data=data,
                      workdir=workdir, autoencoder=autoencoder, latents=latents, diffusion=diffusion)
