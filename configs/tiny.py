r"""A tiny latent diffusion model for tests and smoke runs (seconds on a CPU).

Same structure as configs/sd15.py, scaled down: 32x32 images, f=4 VAE, a
two-level U-Net, a two-layer CLIP text encoder over a small vocabulary.
"""

import ml_collections

from configs import sd15


def get_config(arg=None):
    """Tiny model config; ``arg`` is unused."""
    del arg
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
    return config
