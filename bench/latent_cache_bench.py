r"""The latent cache's worth: VAE encoding throughput, and the stage-2 step with cached latents vs encoding on the fly.

Models are those of configs/base.py (the base run's f=2 VAE, U-Net, text
encoder and stage-2 settings at 64x64 images, 32x32x4 latents) with random
weights, or SD 1.5's at 512x512 with the trainer's default settings with
``--config sd15`` (for an accelerator). In one process:

1. *encode*: the jitted posterior encoder over a batch of images, images/s;
2. *stage-2 step*: the trainer's train step (``ldm_jax.training.diffusion
   .state.build``, through ``bench/stage2.py``: latent sample, caption
   dropout, frozen text encoder, U-Net forward and backward, optimizer
   update, EMA), fed either the cached posterior moments of the images or
   the images themselves, which the frozen VAE then encodes inside the step.
   The on-the-fly step is the same builder's ``make_train_step`` for the
   stage's task with the VAE added (``dataclasses.replace(stage.task,
   vae=stage.models.vae)``), its frozen params the text encoder's and the
   VAE's (laid out as the latent cache lays the VAE out), with the same batch
   slices. Both are compiled ahead of time (*compile s*), then alternate
   over ``--repeats`` calls after one warm-up call each; the table gives the
   median step times and their ratio (on-the-fly / cached: how much the
   cache saves per step).

Run from the repository root::

  python -m bench.latent_cache_bench [--config base|sd15] [--batch 32] [--repeats 5]

Prints a table and one JSON line.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from bench import stage2
from bench.common import alternating, timed
from configs import base as base_config
from configs import sd15
from ldm_jax import parallel
from ldm_jax.data.latents import vae_shardings
from ldm_jax.models.vae import scaling_factor
from ldm_jax.pipeline import init_inputs, model_configs
from ldm_jax.training.diffusion import state as diffusion_state


def main() -> None:
    """Run the benchmark and print its table and JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=("base", "sd15"), default="base")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = base_config.get_config() if args.config == "base" else sd15.get_config()
    configs, size = model_configs(config), config["image_size"]
    settings = stage2.settings(config["diffusion"] if args.config == "base" else None)
    images = np.random.default_rng(0).uniform(-1, 1, (args.batch, size, size, 3)).astype(np.float32)
    batch = stage2.moments_batch(args.batch, stage2.latent_shape(configs, size), configs["text_encoder"])
    cached = stage2.prepare(configs, settings, batch, scaling_factor(configs["vae"]))
    stage, (state, device_batch, frozen, rng) = cached["stage"], cached["args"]
    vae = stage.models.vae
    layout = vae_shardings(vae, stage.mesh, stage.frozen_layout, stage.rules)
    vae_params = jax.device_put(stage2.host_random_params(vae, init_inputs("vae", configs["vae"]), 2), layout)
    images = parallel.shard_batch({"image": images}, stage.mesh)["image"]

    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))
    encode_compile, posterior = timed(lambda: jax.block_until_ready(encode(vae_params, images)))
    encode_times = [timed(lambda: jax.block_until_ready(encode(vae_params, images)))[0]
                    for _ in range(args.repeats)]

    device_batch = {**device_batch, "mean": posterior.mean, "logvar": posterior.logvar}
    state_sh, frozen_sh = stage.shardings
    on_the_fly = diffusion_state.make_train_step(
        dataclasses.replace(stage.task, vae=vae), stage.optimizer, stage.mesh,
        (state_sh, {**frozen_sh, "vae": layout}), settings["state_layout"], stage.batch_slices)
    fly_batch = {"image": images, **{key: device_batch[key] for key in ("input_ids", "empty_ids")}}
    runs = {"cached": (stage.step, jax.tree.map(jnp.copy, state), device_batch, frozen),
            "on the fly": (on_the_fly, state, fly_batch, {**frozen, "vae": vae_params})}
    states, calls, compiles = {}, {}, {}
    for name, (step, state, step_batch, step_frozen) in runs.items():
        compiles[name], (compiled, states[name]) = timed(lambda: step.compile(state, step_batch, step_frozen, rng))

        def call(name=name, compiled=compiled, step_batch=step_batch, step_frozen=step_frozen):
            states[name], metrics = compiled(states[name], step_batch, step_frozen, rng)
            jax.block_until_ready(metrics)

        call()  # the warm-up
        calls[name] = call
    times = alternating(calls, args.repeats)  # both see the same machine load

    encode_s = statistics.median(encode_times)
    cached_s, fly = statistics.median(times["cached"]), statistics.median(times["on the fly"])
    result = dict(config=args.config, batch=args.batch, image_size=size, device=jax.devices()[0].device_kind,
                  cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                  batch_slices=stage.batch_slices, encode_images_per_s=args.batch / encode_s,
                  encode_compile_s=encode_compile, step_cached_s=cached_s, step_on_the_fly_s=fly,
                  ratio_on_the_fly_over_cached=fly / cached_s, cached_images_per_s=args.batch / cached_s,
                  on_the_fly_images_per_s=args.batch / fly, compile_s=compiles)
    print(f"{'measure':34s} {'value':>10s}")
    print(f"{'VAE encode, images/s':34s} {result['encode_images_per_s']:10.1f}")
    print(f"{'stage-2 step, cached latents, s':34s} {cached_s:10.3f}")
    print(f"{'stage-2 step, encode on the fly, s':34s} {fly:10.3f}")
    print(f"{'on the fly / cached':34s} {fly / cached_s:10.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
