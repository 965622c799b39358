r"""The trainer: ``python -m ldm_jax.train --config configs/base.py [--config.key=value ...] [--workdir DIR]``.

Runs the config's ``stages`` in order: 'autoencoder' (stage 1,
``ldm_jax.training.autoencoder.loop``), 'latents' (the latent cache,
``ldm_jax.training.latent_cache``) and 'diffusion' (stage 2,
``ldm_jax.training.diffusion.loop``). Every stage
resumes from what its workdir already holds, so re-running the same command
continues an interrupted run (killed, preempted or crashed) from its latest
complete checkpoint. On SIGTERM the running stage saves the step it is at and
the command exits 0 without starting the next stage
(``ldm_jax.training.preemption``). The config, the batch sizes against the
devices and the ``init_from`` / ``vae_from`` paths are checked before anything
is compiled. Multi-host runs start JAX's distributed runtime first (see
``ldm_jax.parallel.initialize_distributed``).
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ldm_jax import parallel
from ldm_jax.training import run_config
from ldm_jax.training.autoencoder.loop import train_autoencoder
from ldm_jax.training.diffusion.loop import train_diffusion
from ldm_jax.training.latent_cache import ensure_latents
from ldm_jax.training.preemption import StopRequest
from ldm_jax.training.sources import check_sources

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder; default: the config's workdir.")


def check(config) -> None:
    """Every check that needs no compiled program: the config, batch sizes vs devices, init_from / vae_from."""
    run_config.validate(config)
    run_config.check_devices(config, jax.device_count(), jax.process_count())
    check_sources(config)


def run(config, workdir: str) -> None:
    """Run the config's stages in ``workdir``; on SIGTERM, stop after checkpointing the current step."""
    check(config)
    with StopRequest() as stop:
        for stage in run_config.stages(config):
            logging.info("stage %s in %s", stage, workdir)
            if stage == "autoencoder":
                train_autoencoder(config, workdir, stop)
            elif stage == "latents":
                ensure_latents(config, workdir)
            else:
                train_diffusion(config, workdir, stop)
            if stop.stopped_at is not None or stop.received:
                logging.warning("stopped on %s in stage %s%s; later stages not started", stop.received or "preemption",
                                stage, "" if stop.stopped_at is None else f" at step {stop.stopped_at}")
                return


def main(argv: list[str]) -> None:
    """Entry point of ``python -m ldm_jax.train``."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    try:  # a config that cannot run (e.g. a model config) is one line on stderr, before any device is touched
        run_config.validate(config)
    except (KeyError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        sys.exit(f"ldm_jax.train: error: --config {config_flags.get_config_filename(flags.FLAGS['config'])}: "
                 f"{message}")
    jax.config.update("jax_threefry_partitionable", True)
    parallel.initialize_distributed()
    run(config, _WORKDIR.value or config.workdir)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
