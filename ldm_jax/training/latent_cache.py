"""The frozen VAE of a run and its latent cache: find the VAE that ``vae_from`` names, build what is missing."""

from typing import Any, Mapping

import flax
import jax
from etils import epath

from ldm_jax.data import latents
from ldm_jax.models.vae import AutoencoderKL, scaling_factor
from ldm_jax.pipeline import abstract_params, load_vae
from ldm_jax.training import checkpoints
from ldm_jax.training.autoencoder.state import stage_dir


def cache_folder(config: Mapping[str, Any], workdir: str) -> str:
    """``latents.dir``, or ``WORKDIR/latents`` when it is ''."""
    return config["latents"]["dir"] or str(epath.Path(workdir) / "latents")


def _from_autoencoder_run(run: str, attention_impl: str) -> latents.FrozenVAE:
    folder = stage_dir(run)
    if not epath.Path(checkpoints.checkpoint_dir(folder)).is_dir():
        raise FileNotFoundError(f"no stage-1 checkpoint in {folder}: train the autoencoder first (add "
                                "'autoencoder' to stages) or set vae_from to a trained VAE")
    step = checkpoints.resolve_step(folder)
    with checkpoints.checkpoint_manager(folder, keep=None, create=False) as manager:
        config = checkpoints.read_config(manager, step)["configs"]["vae"]
        module = AutoencoderKL.from_diffusers_config(config, attention_impl=attention_impl)
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                flax.linen.meta.unbox(abstract_params(module, "vae", config)))
        params = checkpoints.restore_params(manager, step, {"vae": abstract},
                                            checkpoints.params_metadata(manager, step))["vae"]
    return latents.frozen_vae(module, params, scaling_factor(config), folder, step)


def load_frozen_vae(config: Mapping[str, Any], workdir: str) -> latents.FrozenVAE:
    """The VAE that ``vae_from`` names: a stage-1 workdir or a pretrained pipeline; '' = ``init_from``'s VAE,
    or this workdir's stage 1 when that is '' too.

    A pretrained pipeline is a diffusers folder or a single-file SD
    ``.safetensors``; its VAE config's scaling factor is used.
    """
    source, attention_impl = config["vae_from"] or config["init_from"], config["attention_impl"]
    if not source:
        return _from_autoencoder_run(workdir, attention_impl)
    if (epath.Path(source) / "autoencoder").is_dir():
        return _from_autoencoder_run(source, attention_impl)
    module, params, scale = load_vae(source, attention_impl=attention_impl)
    return latents.frozen_vae(module, params, scale, source)


def ensure_latents(config: Mapping[str, Any], workdir: str,
                   splits: list[str] | None = None) -> tuple[dict[str, Any], latents.FrozenVAE]:
    """The manifest of the run's latent cache, after building whatever is missing (``latents.splits`` by
    default), and the frozen VAE it belongs to."""
    splits = splits or [s.strip() for s in config["latents"]["splits"].split(",") if s.strip()]
    vae = load_frozen_vae(config, workdir)
    return latents.ensure_cache(config, vae, cache_folder(config, workdir), splits), vae
