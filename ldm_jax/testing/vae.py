"""diffusers AutoencoderKL references with random weights."""

import torch
from diffusers import AutoencoderKL

from . import perturb_norms

# Two blocks (f = 2), 8 groups, one resnet per encoder block: runs in well under a second.
VAE_TINY = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
}

# Stable Diffusion v1/v2's VAE (f = 8); for the slow test.
VAE_SD = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}


def build(config: dict, seed: int) -> AutoencoderKL:
    """A float32 diffusers AutoencoderKL with ``config``, seeded random weights and randomized norms, in eval mode."""
    torch.manual_seed(seed)
    return perturb_norms(AutoencoderKL(**config), seed)
