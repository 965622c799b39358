r"""The latent cache's worth: VAE encoding throughput, and the stage-2 step with cached latents vs encoding on the fly.

Models are those of configs/base.py (the base run's f=2 VAE, U-Net and text
encoder at 64x64 images, 32x32x4 latents) with random weights, or SD 1.5's at
512x512 with ``--config sd15`` (for an accelerator). In one process:

1. *encode*: the jitted posterior encoder over a batch of images, images/s;
2. *stage-2 step*: the same jitted diffusion train step (U-Net forward and
   backward, optimizer update, EMA), fed either cached posterior moments or
   images that the frozen VAE encodes inside the step. The two alternate
   over ``--repeats`` calls; the table gives the median step times and
   their ratio (on-the-fly / cached: how much the cache saves per step).

Run from the repository root::

  python -m bench.latent_cache_bench [--config base|sd15] [--batch 32] [--repeats 5]

Prints a table and one JSON line.
"""

import argparse
import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import sd15
from configs import base as base_config
from ldm_jax.models.clip import CLIPTextModel
from ldm_jax.models.unet import UNet2DConditionModel
from ldm_jax.models.vae import AutoencoderKL
from ldm_jax.pipeline import init_inputs
from ldm_jax.training.diffusion.step import DiffusionTask, train_step
from ldm_jax.training.train_state import TrainState, make_optimizer

CONFIGS = {
    "base": dict(size=64, vae=base_config.VAE, unet=base_config.UNET, text_encoder=base_config.TEXT_ENCODER),
    "sd15": dict(size=512, vae=sd15.SD_VAE, unet=sd15.get_config().unet.to_dict(),
                 text_encoder=sd15.get_config().text_encoder.to_dict()),
}


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def main() -> None:
    """Run the benchmark and print its table and JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="base")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    spec = CONFIGS[args.config]
    vae = AutoencoderKL.from_diffusers_config(spec["vae"])
    unet = UNet2DConditionModel.from_diffusers_config(spec["unet"])
    text = CLIPTextModel.from_transformers_config(spec["text_encoder"])
    keys = jax.random.split(jax.random.key(0), 4)
    params = {name: jax.jit(module.init)(key, *init_inputs(name, spec[name]))["params"]
              for (name, module), key in zip((("vae", vae), ("unet", unet), ("text_encoder", text)), keys)}
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (args.batch, spec["size"], spec["size"], 3)), jnp.float32)
    length = spec["text_encoder"]["max_position_embeddings"]
    ids = jnp.asarray(rng.integers(0, spec["text_encoder"]["vocab_size"], (args.batch, length)), jnp.int32)

    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))
    compile_start = time.perf_counter()
    posterior = jax.block_until_ready(encode(params["vae"], images))
    encode_compile = time.perf_counter() - compile_start
    encode_times = [_timed(encode, params["vae"], images) for _ in range(args.repeats)]

    task = DiffusionTask(unet=unet, text_encoder=text, vae=vae, scheduler=tuple(sorted(sd15.SD_SCHEDULER.items())),
                         scale_factor=0.18215)
    optimizer = make_optimizer({"learning_rate": 1e-4}, 1000)
    step = jax.jit(functools.partial(train_step, task, optimizer), donate_argnums=0)
    frozen = {"vae": params["vae"], "text_encoder": params["text_encoder"]}
    common = {"input_ids": ids, "empty_ids": ids[0]}
    batches = {"cached": {**common, "mean": posterior.mean, "logvar": posterior.logvar},
               "on the fly": {**common, "image": images}}
    states, times, compiles = {}, {name: [] for name in batches}, {}
    for name, batch in batches.items():
        unet = jax.tree.map(jnp.copy, params["unet"])  # each run donates its own buffers
        state = TrainState(step=jnp.zeros((), jnp.int32), params={"unet": unet}, opt_state=optimizer.init({"unet": unet}),
                           ema={"unet": jax.tree.map(jnp.copy, unet)})
        start = time.perf_counter()
        states[name], metrics = step(state, batch, frozen, jax.random.key(1))
        jax.block_until_ready(metrics)
        compiles[name] = time.perf_counter() - start
    for _ in range(args.repeats):  # alternate, so both see the same machine load
        for name, batch in batches.items():
            start = time.perf_counter()
            states[name], metrics = step(states[name], batch, frozen, jax.random.key(1))
            jax.block_until_ready(metrics)
            times[name].append(time.perf_counter() - start)

    encode_s = statistics.median(encode_times)
    cached, fly = statistics.median(times["cached"]), statistics.median(times["on the fly"])
    result = dict(config=args.config, batch=args.batch, image_size=spec["size"], device=jax.devices()[0].device_kind,
                  cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                  encode_images_per_s=args.batch / encode_s, encode_compile_s=encode_compile,
                  step_cached_s=cached, step_on_the_fly_s=fly, ratio_on_the_fly_over_cached=fly / cached,
                  cached_images_per_s=args.batch / cached, on_the_fly_images_per_s=args.batch / fly,
                  compile_s=compiles)
    print(f"{'measure':34s} {'value':>10s}")
    print(f"{'VAE encode, images/s':34s} {result['encode_images_per_s']:10.1f}")
    print(f"{'stage-2 step, cached latents, s':34s} {cached:10.3f}")
    print(f"{'stage-2 step, encode on the fly, s':34s} {fly:10.3f}")
    print(f"{'on the fly / cached':34s} {fly / cached:10.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
