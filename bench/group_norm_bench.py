r"""Every GroupNorm of a U-Net's forward and backward pass: the hand-written backward vs JAX's, side by side.

    python -m bench.group_norm_bench                                  # configs/base.py's U-Net, batch 16, float32
    python -m bench.group_norm_bench --config sd15 --dtype bfloat16   # SD 1.5's at 64x64x4 latents: for a GPU

Records the GroupNorm calls of the U-Net's forward pass at ``--batch``
(input shape and dtype, groups, epsilon, fused activation) by tracing it
with ``flax.linen.intercept_methods``, then builds one jitted function that
runs all of them forward and backward (``jax.vjp`` with random inputs and
output cotangents, in the compute ``--dtype``) with
``ldm_jax.models.group_norm.group_norm`` (the trainer's) or with
``group_norm_autodiff`` (the same forward pass differentiated by JAX). The
two are compiled in one process and timed in alternating rounds, after
checking that they give the same gradients. Prints the median time of each,
*autodiff / hand-written* (> 1: the hand-written backward is faster) and
one JSON line.
"""

import argparse
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bench.common import alternating, relative_difference, timed
from bench.hardware import load_average, machine, report
from configs import base as base_config
from configs import sd15
from ldm_jax.models import group_norm as group_norm_lib
from ldm_jax.models.layers import GroupNorm
from ldm_jax.models.unet import UNet2DConditionModel

# U-Net config and latent side of each --config.
CONFIGS = {
    "base": (base_config.UNET, base_config.UNET["sample_size"]),
    "f4": (base_config.F4_UNET, base_config.F4_UNET["sample_size"]),
    "sd15": (sd15.get_config().unet.to_dict(), 64),
}
IMPLEMENTATIONS = {"hand_written": group_norm_lib.group_norm, "autodiff": group_norm_lib.group_norm_autodiff}


def group_norm_calls(unet_config: dict, side: int, batch: int, dtype) -> list[dict]:
    """The GroupNorm calls of one forward pass of the U-Net on [batch, side, side, C] latents in ``dtype``:
    each call's input ``shape`` and ``dtype`` and the module's ``groups``, ``epsilon``, ``activation`` and
    output ``dtype``."""
    unet = UNet2DConditionModel(**unet_config, dtype=dtype)
    calls = []

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, GroupNorm) and context.method_name == "__call__":
            calls.append(dict(shape=args[0].shape, in_dtype=args[0].dtype, groups=module.groups,
                              epsilon=module.epsilon, activation=module.activation, out_dtype=module.dtype))
        return next_fun(*args, **kwargs)

    inputs = (jnp.zeros((batch, side, side, unet_config.get("in_channels", 4))), jnp.zeros((batch,), jnp.int32),
              jnp.zeros((batch, 77, unet_config["cross_attention_dim"])))
    with nn.intercept_methods(record):
        jax.eval_shape(unet.init, jax.random.key(0), *inputs)
    return calls


def make_inputs(calls: list[dict], seed: int) -> tuple:
    """Random inputs, scales, biases and output cotangents for ``calls``, on the device."""
    rng = np.random.default_rng(seed)
    draw = lambda shape, dtype, mean=0.0, std=1.0: jnp.asarray(rng.normal(mean, std, shape).astype(np.float32),
                                                                dtype)
    xs = [draw(c["shape"], c["in_dtype"], 0.3, 2.0) for c in calls]
    scales = [draw(c["shape"][-1:], jnp.float32, 1.0, 0.2) for c in calls]
    biases = [draw(c["shape"][-1:], jnp.float32, 0.0, 0.2) for c in calls]
    cotangents = [draw(c["shape"], c["out_dtype"]) for c in calls]
    return xs, scales, biases, cotangents


def forward_backward(calls: list[dict], implementation):
    """A jitted function of (xs, scales, biases, cotangents) running every call's GroupNorm forward and its
    vector-Jacobian product; returns the gradients."""
    def run(xs, scales, biases, cotangents):
        def forward(xs, scales, biases):
            return [implementation(x, s, b, c["groups"], c["epsilon"], c["activation"], c["out_dtype"])
                    for x, s, b, c in zip(xs, scales, biases, calls)]
        return jax.vjp(forward, xs, scales, biases)[1](cotangents)
    return jax.jit(run)


def main(argv=None) -> dict:
    """Run the benchmark, print the table and the JSON line; returns the JSON record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="base")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls-per-round", type=int, default=3)
    parser.add_argument("--out", help="also write the JSON record here")
    args = parser.parse_args(argv)

    unet_config, side = CONFIGS[args.config]
    calls = group_norm_calls(unet_config, side, args.batch, jnp.dtype(args.dtype))
    inputs = make_inputs(calls, 0)
    record = dict(config=args.config, batch=args.batch, dtype=args.dtype, group_norms=len(calls),
                  fused_silu=sum(c["activation"] == "silu" for c in calls),
                  input_bytes=sum(int(np.prod(c["shape"])) * jnp.dtype(c["in_dtype"]).itemsize for c in calls),
                  load_average_start=load_average(), **machine())
    functions, gradients = {}, {}
    for name, implementation in IMPLEMENTATIONS.items():
        record[f"{name}_compile_s"], functions[name] = timed(
            lambda: forward_backward(calls, implementation).lower(*inputs).compile())
        gradients[name] = jax.block_until_ready(functions[name](*inputs))
    # Per leaf: the largest of each gradient's own relative difference.
    record["max_relative_gradient_difference"] = relative_difference(gradients["hand_written"],
                                                                     gradients["autodiff"], per_leaf=True)
    del gradients

    def round_of(function):
        def run():
            for _ in range(args.calls_per_round):
                out = function(*inputs)
            jax.block_until_ready(out)
        return run

    rounds = alternating({name: round_of(function) for name, function in functions.items()}, args.rounds)
    for name in IMPLEMENTATIONS:
        record[f"{name}_round_s"] = [seconds / args.calls_per_round for seconds in rounds[name]]
        record[f"{name}_s"] = statistics.median(record[f"{name}_round_s"])
    record["speedup"] = record["autodiff_s"] / record["hand_written_s"]
    record["load_average_end"] = load_average()
    print(f"{record['device']}, {args.config} U-Net, batch {args.batch}, {args.dtype}: {len(calls)} GroupNorms "
          f"({record['fused_silu']} with SiLU), forward + backward: hand-written {record['hand_written_s'] * 1e3:.2f} ms,"
          f" autodiff {record['autodiff_s'] * 1e3:.2f} ms: {record['speedup']:.2f}x "
          f"(gradients differ by {record['max_relative_gradient_difference']:.1e} of their largest)")
    return report(record, args.out)


if __name__ == "__main__":
    main()
