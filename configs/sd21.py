r"""Stable Diffusion 2.1: linear attention projections, 64-dim heads, OpenCLIP ViT-H text encoder (23 layers).

Variants:
  configs/sd21.py        SD 2.1 (768x768, v-prediction)
  configs/sd21.py:base   SD 2.1-base (512x512, epsilon prediction)

Model sections use the keys of the diffusers / transformers config files.

Pod shapes it is meant for (the bytes follow from the parameter counts; not measured on a pod).
The U-Net (866M) is SD 1.5's size, so its state with AdamW moments and EMA is 13.9 GB in float32, and
the frozen OpenCLIP-H text encoder (23 layers, 340M params) adds 1.4 GB: 15.2 GB, divided by fsdp on
each chip (``mesh.frozen=shard``, the default). 768px images give 96x96 latents, 2.25x the activations
of 512px (64x64), so these shapes use more fsdp than configs/sd15.py's:
  v4-64 (32 chips x 32 GiB, 8 hosts):    mesh data=8,fsdp=4 (3.8 GB of state a chip)
  v5e-64 (64 chips x 16 GiB, 16 hosts):  mesh data=4,fsdp=16 (1.0 GB a chip); ``:base`` (512px)
                                          data=8,fsdp=8 (1.9 GB a chip)
  2 x v5e-256 (multislice):              mesh data=16,fsdp=16,dcn_data=2
Check a mesh first with ``python -m ldm_jax.compile_check --config configs/sd21.py --mesh ...``.
"""

import ml_collections

from configs import sd15


def get_config(arg=None):
    """SD 2.1 model config; ``arg`` is None (768, v-prediction) or 'base' (512, epsilon)."""
    if arg not in (None, "base"):
        raise ValueError(f"unknown sd21 variant {arg!r}: use configs/sd21.py or configs/sd21.py:base")
    base = arg == "base"
    config = ml_collections.ConfigDict()
    config.image_size = 512 if base else 768
    config.unet = dict(
        sample_size=config.image_size // 8, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024, norm_num_groups=32, norm_eps=1e-5, use_linear_projection=True,
        upcast_attention=not base,
    )
    config.vae = dict(sd15.SD_VAE, sample_size=config.image_size)
    config.text_encoder = dict(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
        num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
        projection_dim=512, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    config.scheduler = dict(sd15.SD_SCHEDULER, prediction_type="epsilon" if base else "v_prediction")
    return config
