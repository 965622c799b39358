r"""Build the latent cache of a run: ``python -m ldm_jax.encode_latents --config configs/base.py [--workdir DIR]``.

Encodes ``latents.splits`` of the config's data with the frozen VAE that
``vae_from`` names (see ``ldm_jax.training.latent_cache``) into ``latents.dir`` (default
``WORKDIR/latents``); see ``ldm_jax.data.latents`` for what is stored. The
trainer calls `ensure_latents` itself before stage 2, so running this alone
is only needed to build the cache ahead of time.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from ldm_jax import cli, parallel
from ldm_jax.training.latent_cache import cache_folder, ensure_latents

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder; default: the config's workdir.")
PROGRAM = "ldm_jax.encode_latents"


def main(argv: list[str]) -> None:
    """Build (or check) the latent cache of the config's run; a config that is not a run config and a cache
    folder that cannot be written are one line on stderr, before anything is encoded."""
    if len(argv) > 1:
        cli.fail(PROGRAM, f"unexpected arguments {argv[1:]}")
    config = _CONFIG.value
    cli.check_run_config(PROGRAM, config)
    workdir = _WORKDIR.value or config.workdir
    try:
        cli.check_writable_folder(cache_folder(config, workdir), "the latent cache folder")
    except ValueError as error:
        cli.fail(PROGRAM, error)
    parallel.initialize_distributed()
    manifest, _ = ensure_latents(config, workdir)
    logging.info("latent cache ready: %s", {s: v["count"] for s, v in manifest["splits"].items()})


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=cli.flags_parser(PROGRAM, config_flag="config"))
