"""diffusers UNet2DConditionModel references at tiny configs (diffusers config dicts)."""

import torch
from diffusers import UNet2DConditionModel

from . import perturb_norms

# SD 1.x layout: 1x1-conv projections, one head count for all levels, context width 32;
# a plain (attention-free) level, and two transformer blocks per transformer.
SD1_TINY = dict(
    sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, transformer_layers_per_block=2, attention_head_dim=2,
    cross_attention_dim=32, norm_num_groups=8,
)

# SD 2.x layout: linear projections, head count per level (the mid block takes the last level's),
# upcast attention, context width 48; two resnets per level (three per up level), so skip
# connections are consumed in order.
SD2_TINY = dict(
    sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=(2, 4),
    cross_attention_dim=48, norm_num_groups=8, use_linear_projection=True, upcast_attention=True,
)

# SD 2.x layout plus the pooled-text embedding added to the time embedding (addition_embed_type='text').
TEXT_TIME_TINY = dict(SD2_TINY, addition_embed_type="text", addition_embed_type_num_heads=4)

# Transformers at both levels, the first attention of level 0's a second cross-attention (only_cross_attention):
# diffusers reverses the per-block flags for the up path, so a flag read at the wrong level changes the output.
ONLY_CROSS_TINY = dict(SD2_TINY, down_block_types=("CrossAttnDownBlock2D",) * 2,
                       up_block_types=("CrossAttnUpBlock2D",) * 2, only_cross_attention=(True, False))

# Stable Diffusion 1.5's unet/config.json (numerics-relevant keys).
SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
    cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
    downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", center_input_sample=False,
)


def build(config: dict, seed: int) -> UNet2DConditionModel:
    """A diffusers UNet2DConditionModel with random weights (randomized norms too), in eval mode."""
    torch.manual_seed(seed)
    return perturb_norms(UNet2DConditionModel(**config), seed)
