r"""The trainer: ``python -m ldm_jax.train --config configs/base.py [--config.key=value ...] [--workdir DIR]``.

Runs the config's ``stages`` in order: 'autoencoder' (stage 1,
``ldm_jax.training.autoencoder_loop``), 'latents' (the latent cache,
``ldm_jax.training.latent_cache``) and 'diffusion' (stage 2,
``ldm_jax.training.diffusion_loop``). Every stage
resumes from what its workdir already holds, so re-running the same command
continues an interrupted run. Multi-host runs start JAX's distributed runtime
first (see ``ldm_jax.parallel.initialize_distributed``).
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ldm_jax import parallel
from ldm_jax.training import run_config
from ldm_jax.training.autoencoder_loop import train_autoencoder
from ldm_jax.training.diffusion_loop import train_diffusion
from ldm_jax.training.latent_cache import ensure_latents

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder; default: the config's workdir.")


def run(config, workdir: str) -> None:
    """Run the config's stages in ``workdir``."""
    run_config.validate(config)
    for stage in run_config.stages(config):
        logging.info("stage %s in %s", stage, workdir)
        if stage == "autoencoder":
            train_autoencoder(config, workdir)
        elif stage == "latents":
            ensure_latents(config, workdir)
        else:
            train_diffusion(config, workdir)


def main(argv: list[str]) -> None:
    """Entry point of ``python -m ldm_jax.train``."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    jax.config.update("jax_threefry_partitionable", True)
    parallel.initialize_distributed()
    config = _CONFIG.value
    run(config, _WORKDIR.value or config.workdir)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
