r"""Build the latent cache of a run: ``python -m ldm_jax.encode_latents --config configs/base.py [--workdir DIR]``.

Encodes ``latents.splits`` of the config's data with the frozen VAE that
``vae_from`` names (see ``ldm_jax.training.latent_cache``) into ``latents.dir`` (default
``WORKDIR/latents``); see ``ldm_jax.data.latents`` for what is stored. The
trainer calls `ensure_latents` itself before stage 2, so running this alone
is only needed to build the cache ahead of time.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from ldm_jax import parallel
from ldm_jax.training.latent_cache import ensure_latents

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder; default: the config's workdir.")


def main(argv: list[str]) -> None:
    """Build (or check) the latent cache of the config's run."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    parallel.initialize_distributed()
    config = _CONFIG.value
    manifest, _ = ensure_latents(config, _WORKDIR.value or config.workdir)
    logging.info("latent cache ready: %s", {s: v["count"] for s, v in manifest["splits"].items()})


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
