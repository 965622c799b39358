r"""Stable Diffusion 1.5: the real architecture (860M-parameter U-Net, 84M VAE, CLIP ViT-L/14 text encoder).

Model sections use the keys of the diffusers / transformers config files
(unet/config.json, vae/config.json, text_encoder/config.json,
scheduler/scheduler_config.json), so a pretrained folder and this config build
the same modules.

Check that the weights of a real checkpoint fit this architecture:
  python -c "from ldm_jax import Pipeline; Pipeline.from_pretrained('path/to/sd15')"

Pod shapes it is meant for (the bytes follow from the parameter counts; not measured on a pod).
The stage-2 state in float32 is 860M U-Net params + AdamW moments + EMA = 13.8 GB, plus the frozen
text encoder's 123M params (0.5 GB): 14.3 GB, divided by fsdp on each chip (``mesh.frozen=shard``):
  v4-32 (16 chips x 32 GiB, 4 hosts):    mesh data=16 (the whole state on every chip), or
                                          data=4,fsdp=4 (3.6 GB a chip) to leave room for activations
  v5e-64 (64 chips x 16 GiB, 16 hosts):  mesh data=8,fsdp=8: the whole state and its gradients would
                                          not fit a 16 GiB chip; split 8 ways it is 1.8 GB (1.66 GiB)
  2 x v5e-256 (multislice):              mesh data=32,fsdp=8,dcn_data=2
Activation memory depends on the batch a chip gets and is not estimated here.
Before renting one, compile the step for the mesh on fake CPU devices (README, "Scaling out"):
  python -m ldm_jax.compile_check --config configs/sd15.py --mesh data=1,fsdp=8,tensor=1 --devices 8 --batch 8
"""

import ml_collections

SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, clip_sample=False,
    set_alpha_to_one=False,
)

SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.18215,
)


def get_config(arg=None):
    """SD 1.5 model config; ``arg`` is unused."""
    del arg
    config = ml_collections.ConfigDict()
    config.image_size = 512
    config.unet = dict(
        sample_size=64, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
        cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5, use_linear_projection=False,
    )
    config.vae = dict(SD_VAE)
    config.text_encoder = dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    config.scheduler = dict(SD_SCHEDULER)
    return config
