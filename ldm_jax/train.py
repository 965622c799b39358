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
is compiled; before those, in the first second, the config file, its
overrides and the workdir (a folder this process can write, created if
missing) are checked, each problem one line on stderr. Multi-host runs start JAX's distributed runtime first (see
``ldm_jax.parallel.initialize_distributed``).
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ldm_jax import cli, parallel, paths
from ldm_jax.training import run_config
from ldm_jax.training.preemption import StopRequest

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder; default: the config's workdir.")
PROGRAM = "ldm_jax.train"


def check(config) -> None:
    """Every check that needs no compiled program: the config, batch sizes vs devices, init_from / vae_from."""
    from ldm_jax.training.sources import check_sources  # with the stages' imports: see `run`
    run_config.validate(config)
    run_config.check_devices(config, jax.device_count(), jax.process_count())
    check_sources(config)


def run(config, workdir: str) -> None:
    """Run the config's stages in ``workdir``; on SIGTERM, stop after checkpointing the current step."""
    # Imported here: the stages pull in TensorFlow and orbax (seconds), which --help and the first checks do not need.
    from ldm_jax.training.autoencoder.loop import train_autoencoder
    from ldm_jax.training.diffusion.loop import train_diffusion
    from ldm_jax.training.latent_cache import ensure_latents
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


def check_paths(config, workdir: str) -> None:
    """ValueError naming the path unless the workdir (and a separate latent cache folder) can be written."""
    cli.check_writable_folder(workdir, "--workdir" if _WORKDIR.value else "workdir")
    if config.latents.dir:
        cli.check_writable_folder(config.latents.dir, "latents.dir")


def main(argv: list[str]) -> None:
    """Entry point of ``python -m ldm_jax.train``."""
    if len(argv) > 1:
        cli.fail(PROGRAM, f"unexpected arguments {argv[1:]}")
    config = _CONFIG.value
    cli.check_run_config(PROGRAM, config)  # before any device is touched
    workdir = _WORKDIR.value or config.workdir
    try:
        check_paths(config, workdir)
    except ValueError as error:
        cli.fail(PROGRAM, error)
    jax.config.update("jax_threefry_partitionable", True)
    parallel.initialize_distributed()
    from ldm_jax.data.latents import CacheDamagedError  # with the stages' imports: see `run`
    from ldm_jax.training.damage import DamagedCheckpointError
    try:
        run(config, workdir)
    except (CacheDamagedError, DamagedCheckpointError, *paths.storage_errors()) as error:
        # damaged inputs of a stage (vae_from, the cache), or storage refusing a path (init_from's bucket, ...)
        cli.fail(PROGRAM, error)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=cli.flags_parser(PROGRAM, config_flag="config"))
