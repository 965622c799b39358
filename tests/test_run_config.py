"""The run config: defaults, locking, and errors that name the values involved, before anything is built."""

import pytest

from configs import base, vae
from ldm_jax import parallel
from ldm_jax.training import run_config


def _sections(**changes):
    config = base.get_config("quick").to_dict()
    sections = {k: config[k] for k in ("unet", "vae", "text_encoder", "scheduler", "data", "workdir",
                                       "autoencoder", "diffusion")}
    sections.update(changes)
    return sections


def test_configs_build_and_lock():
    config = base.get_config()
    assert run_config.stages(config) == ["autoencoder", "latents", "diffusion"]
    assert run_config.stages(vae.get_config()) == ["autoencoder"]
    with pytest.raises(AttributeError, match="steps"):
        config.diffusion.step = 3  # locked: a misspelt key is an error, not a new key


@pytest.mark.parametrize("changes,message", [
    (dict(diffusion=dict(stepz=3)), r"unknown diffusion config key\(s\) \['stepz'\]"),
    (dict(autoencoder=dict(optimizer=dict(lr=1.0))), r"unknown autoencoder.optimizer config key\(s\) \['lr'\]"),
    (dict(image_size=66, data=dict(source="shapes", image_size=66)),
     "image_size 66 is not divisible by the VAE's downsampling factor 4"),
    (dict(image_size=32), "image_size 32 differs from data.image_size 64"),
    (dict(unet={**base.UNET, "cross_attention_dim": 64}),
     "unet.cross_attention_dim 64 differs from the text encoder's width text_encoder.hidden_size 128"),
    (dict(unet={**base.UNET, "in_channels": 8}), "unet.in_channels 8 differs from vae.latent_channels 4"),
    (dict(data=dict(source="shapes", max_length=77)),
     "data.max_length 77 exceeds the text encoder's text_encoder.max_position_embeddings 16"),
    (dict(stages="autoencoder,difusion"), r"unknown stage\(s\) \['difusion'\]"),
    (dict(diffusion=dict(dtype="float8")), "diffusion.dtype must be float32, bfloat16 or float16, got 'float8'"),
    (dict(attention_impl="flash"), "unknown attention_impl 'flash'; choose one of"),
    (dict(diffusion=dict(remat_policy="some")), r"diffusion.remat_policy must be one of \['none', 'full'.*got 'some'"),
])
def test_bad_configs_fail_with_the_values_named(changes, message):
    with pytest.raises((KeyError, ValueError), match=message):
        run_config.run_config(**_sections(**changes))


@pytest.mark.parametrize("mesh,devices,message", [
    (dict(data=3), 8, r"make 3 devices, but there are 8"),
    (dict(data=-1, fsdp=3), 8, "8 devices are not divisible by the fixed axes' product 3"),
    (dict(data=-1, fsdp=-1), 8, "at most one may be -1"),
    (dict(pipeline=2), 8, r"unknown mesh axes \['pipeline'\]"),
])
def test_bad_meshes_fail_with_the_sizes_named(mesh, devices, message):
    with pytest.raises(ValueError, match=message):
        parallel.mesh_shape(mesh, devices)


def test_batch_must_split_over_the_data_parallel_axes():
    mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2))
    assert parallel.mesh_shape(dict(data=-1, tensor=2), 8) == (4, 1, 2)
    parallel.check_batch(8, mesh)
    with pytest.raises(ValueError, match="batch size 6 is not divisible by the data-parallel size 4"):
        parallel.check_batch(6, mesh)
