"""Tiny diffusers StableDiffusionPipelines with random weights, saved to a folder: references for our Pipeline."""

import functools
import os

import diffusers

from ldm_jax.testing import clip as clip_refs
from ldm_jax.testing import unet as unet_refs
from ldm_jax.testing import vae as vae_refs

# (U-Net config, CLIP config) of each style; both use VAE_TINY (f = 2) and a 16-token tokenizer.
STYLES = {"sd1": (unet_refs.SD1_TINY, clip_refs.CLIP_SD1_TINY), "sd2": (unet_refs.SD2_TINY, clip_refs.CLIP_SD2_TINY)}

# For sample_fn's tests, where XLA's compile time of the U-Net dominates: SD1_TINY with half the channels and
# one transformer layer per block (half the compile time).
UNET_SMALL = dict(unet_refs.SD1_TINY, sample_size=8, block_out_channels=(16, 32), transformer_layers_per_block=1)
SMALL = "sd1-small"
_CONFIGS = {**STYLES, SMALL: (UNET_SMALL, clip_refs.CLIP_SD1_TINY)}

# SD's scheduler settings, as in runwayml/stable-diffusion-v1-5's scheduler_config.json. The spacing is explicit:
# diffusers' from_config drops values a scheduler got by default, so another scheduler class built from this one's
# in-memory config would otherwise fall back to its own default spacing, unlike one loaded from the saved folder.
SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                 clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading")


@functools.cache
def build(style: str, root: str) -> tuple[diffusers.StableDiffusionPipeline, str]:
    """The diffusers pipeline of ``style`` (seeded random weights, DDIM scheduler) and the folder it was saved to.

    ``style`` is a key of STYLES or SMALL. Built and saved once per ``(style, root)``; the folder is ``root/style``.
    """
    unet_config, clip_config = _CONFIGS[style]
    folder = os.path.join(root, style)
    tokenizer = clip_refs.make_tokenizer(os.path.join(root, f"{style}_tokenizer"))
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae_refs.build(vae_refs.VAE_TINY, seed=1), text_encoder=clip_refs.build(clip_config, seed=2),
        tokenizer=tokenizer, unet=unet_refs.build(unet_config, seed=0),
        scheduler=diffusers.DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe, folder
