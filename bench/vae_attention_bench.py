r"""The VAE's mid-block attention on XLA:CPU: tiled (``LOGITS_PER_TILE``) against whole, side by side.

    python -m bench.vae_attention_bench                  # configs/base.py's VAE: 64x64 images, batch 8 / 64
    python -m bench.vae_attention_bench --config sd15 --train-batch 1 --encode-batch 1   # SD's VAE at 512x512

Builds the VAE twice in one process, its ``einsum`` attention tracing with
``ldm_jax.models.attention.LOGITS_PER_TILE`` as shipped (*tiled*: the
flash-style kernel with its hand-written backward) and with no limit
(*whole*: one logits array per call), and times two jitted functions of
each, after checking that both give the same results:

- *train*: the gradient of the L1 reconstruction loss with respect to the
  parameters at ``--train-batch`` (the stage-1 step's VAE forward and
  backward; no optimizer, no discriminator);
- *encode*: the posterior mean at ``--encode-batch`` (what the latent cache
  runs).

Rounds alternate between the two. Prints the median times, *whole / tiled*
(> 1: tiling is faster) and one JSON line with the machine.
"""

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import alternating, relative_difference
from bench.hardware import load_average, machine, report
from configs import base as base_config
from configs import sd15
from ldm_jax.models import attention as attention_lib
from ldm_jax.models.vae import AutoencoderKL

# VAE config and image side of each --config.
CONFIGS = {"base": (base_config.VAE, 64), "sd15": (sd15.SD_VAE, 512)}
VARIANTS = {"tiled": attention_lib.LOGITS_PER_TILE, "whole": None}


def compiled_functions(vae: AutoencoderKL, params, images: jax.Array, encode_images: jax.Array,
                       logits_per_tile: int | None) -> dict:
    """The compiled *train* and *encode* functions, traced with ``LOGITS_PER_TILE = logits_per_tile``
    (None: no limit)."""
    def train(params, images):
        return jax.grad(lambda p: jnp.abs(vae.apply({"params": p}, images)[0] - images).mean())(params)

    def encode(params, images):
        return vae.apply({"params": params}, images, method="encode").mean

    shipped = attention_lib.LOGITS_PER_TILE
    attention_lib.LOGITS_PER_TILE = logits_per_tile or np.iinfo(np.int64).max
    try:
        return dict(train=jax.jit(train).lower(params, images).compile(),
                    encode=jax.jit(encode).lower(params, encode_images).compile())
    finally:
        attention_lib.LOGITS_PER_TILE = shipped


def main(argv=None) -> dict:
    """Run the benchmark, print the summary and the JSON line; returns the JSON record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="base")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--encode-batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", help="also write the JSON record here")
    args = parser.parse_args(argv)

    vae_config, side = CONFIGS[args.config]
    vae = AutoencoderKL.from_diffusers_config(vae_config, attention_impl="einsum")
    rng = np.random.default_rng(0)
    images = lambda batch: jnp.asarray(rng.uniform(-1, 1, (batch, side, side, 3)).astype(np.float32))
    train_images, encode_images = images(args.train_batch), images(args.encode_batch)
    params = vae.init(jax.random.key(0), train_images[:1])["params"]
    latent_side = side // 2 ** (len(vae_config["block_out_channels"]) - 1)
    record = dict(config=args.config, train_batch=args.train_batch, encode_batch=args.encode_batch,
                  attention_tokens=latent_side ** 2, logits_per_tile=attention_lib.LOGITS_PER_TILE,
                  load_average_start=load_average(), **machine())
    functions = {name: compiled_functions(vae, params, train_images, encode_images, limit)
                 for name, limit in VARIANTS.items()}
    inputs = dict(train=(params, train_images), encode=(params, encode_images))
    for part, part_inputs in inputs.items():
        outputs = {name: functions[name][part](*part_inputs) for name in VARIANTS}
        # Over all leaves together: per leaf, the key projection's bias, whose gradient is zero up to rounding,
        # would dominate.
        record[f"{part}_max_relative_difference"] = relative_difference(outputs["tiled"], outputs["whole"])

    def call(name: str, part: str):
        return lambda: jax.block_until_ready(functions[name][part](*inputs[part]))

    rounds = alternating({f"{part}_{name}": call(name, part) for name in VARIANTS for part in inputs}, args.rounds)
    for key, times in rounds.items():
        record[f"{key}_s"] = statistics.median(times)
    for part in inputs:
        record[f"{part}_speedup"] = record[f"{part}_whole_s"] / record[f"{part}_tiled_s"]
    record["load_average_end"] = load_average()
    print(f"{record['device']}, {args.config} VAE, mid-block attention over {record['attention_tokens']} tokens:")
    for part in inputs:
        print(f"  {part:6s} tiled {record[f'{part}_tiled_s'] * 1e3:8.1f} ms  whole "
              f"{record[f'{part}_whole_s'] * 1e3:8.1f} ms  {record[f'{part}_speedup']:.2f}x  (results differ by "
              f"{record[f'{part}_max_relative_difference']:.1e} of their largest)")
    return report(record, args.out)


if __name__ == "__main__":
    main()
