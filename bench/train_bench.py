r"""Stage-2 train-step throughput: ldm_jax vs diffusers (PyTorch), and latent vs pixel diffusion.

The step timed is the trainer's own: ``ldm_jax.training.diffusion.state.build``
makes it (through ``bench/stage2.py``) from a config's models and its run
config's ``diffusion`` section, as ``python -m ldm_jax.train`` does. A step
draws a posterior sample of the batch's cached latent moments times the scale
factor, drops captions to the empty prompt, encodes them with the frozen text
encoder, draws timesteps and noise, runs the U-Net forward and backward on the
MSE against the schedule's target, and applies the optimizer (AdamW with
clipping) and the EMA, the state donated. ``--config base`` is configs/base.py
(32x32x4 latents of 64x64 images, its U-Net, text encoder and v-prediction
schedule, and its stage-2 settings: logit-normal timesteps, 10% caption
dropout, AdamW lr 1e-3 clipped at 1.0, EMA 0.999); ``f4`` its f=4 variant
(16x16x4 latents); ``sd15`` SD 1.5's models on 64x64x4 latents with the
trainer's default settings, for an accelerator. Random weights, float32 on
both sides, one process. ldm_jax's U-Net runs on ``--batch-slices`` slices of
the batch, by default the trainer's choice (``diffusion.batch_slices`` 0: two
on a single CPU device with at least two cores and an even batch, run as the
concurrent programs of ``ldm_jax.training.cpu_step``; else one program); the
compile time is then the programs' together.

1. *peer* (``--part peer``): ldm_jax's step against diffusers' step doing the
   same work on the same batch (``bench/stage2.py``'s ``diffusers_step``, as
   diffusers' ``train_text_to_image.py`` trains on cached latents: the latent
   sample, caption dropout on the device, ``transformers.CLIPTextModel``
   under ``no_grad``, the same timestep density, ``DDPMScheduler.add_noise``,
   the ``UNet2DConditionModel`` forward and backward, ``F.mse_loss`` against
   the noise or ``get_velocity``, ``clip_grad_norm_``, ``torch.optim.AdamW``
   and ``EMAModel.step`` at the trainer's decay; torch threads = the cores JAX
   uses; on the GPU when JAX runs on one and torch has CUDA). One warm-up step
   each (their losses are recorded), then ``--repeats`` steps of each,
   alternating; the table gives the median step times, images/s, *ldm_jax /
   diffusers* in images/s (> 1: ldm_jax is faster), the quartiles of the same
   ratio taken step by step (each ldm_jax step against the diffusers step
   after it: on a busy host the machine's speed drifts between steps, the
   ratio of neighbours less) and the median minor page faults of the process
   during one step of each.
2. *pixel* (``--part pixel``, configs/base.py and f4): ldm_jax alone, the
   trainer's step on 64x64 images either as latents (32x32x4, or 16x16x4 for
   f4) or as 64x64x3 pixels: the same builder with the U-Net's input and
   output channels 3 at the image size, fed the pixels as 'mean' with a
   'logvar' of -30 and scale factor 1 (so the step's z0 is the pixels). Step
   time, images/s, XLA's FLOPs and memory (``stage2.step_costs``: arguments +
   outputs - aliased (donated) + temporaries of the step's programs, not the
   process RSS), and the ratios pixel / latent. The LDM paper (Rombach et al.
   2022) reports latent diffusion needing ~3x less memory (8 vs 24 GB) and
   training 4-8x faster than pixel diffusion at SD's f=8; the JSON line's
   ``pixel_over_latent`` ratios measure the same at this scale. On a CPU, a
   step whose memory exceeds the machine's available memory is compiled but
   not run (its times are null).

Both parts report the FLOP rate each step achieves (the model's FLOPs: its
matmuls' and convolutions' multiply-adds counted from the traced step by
``bench/hardware.py``'s ``jaxpr_flops``, over the step time) and, when the
peak FLOP/s is known (``--peak-flops``, or the bfloat16 peak of a known
accelerator from ``bench/hardware.py``; a CPU's is unknown), the model FLOPs
utilization.

On a Linux CPU host, run it as the trainer runs best, with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` in the environment (both frameworks
then get huge pages; the JSON line records the variable). Run from the
repository root::

  python -m bench.train_bench [--config base|f4|sd15] [--batch 32] [--repeats 5] [--part peer|pixel|all] \
      [--batch-slices K] [--peak-flops FLOP/s]

Prints a table per part and one JSON line.
"""

import argparse
import json
import math
import os
import resource
import statistics
from typing import Any, Callable

import jax
import numpy as np
import torch

from bench import stage2
from bench.common import alternating, rounded, timed
from bench.hardware import load_average, machine, peak_flops, utilization
from configs import base as base_config
from configs import sd15
from ldm_jax.models.vae import scaling_factor
from ldm_jax.pipeline import model_configs

CONFIGS = ("base", "f4", "sd15")


def bench_spec(name: str) -> dict[str, Any]:
    """The models ('configs': unet, vae, text_encoder, scheduler), ``image_size`` and stage-2 ``section`` (None:
    the trainer's defaults) of ``--config`` ``name``."""
    if name == "sd15":
        config, section = sd15.get_config(), None
    else:
        config = base_config.get_config("f4" if name == "f4" else None)
        section = config["diffusion"]
    return dict(configs=model_configs(config), image_size=config["image_size"], section=section)


CONFIGS = ("base", "f4", "sd15")


def checked(loss: Any) -> float:
    """``loss`` as a float (waiting for it); FloatingPointError when it is NaN or infinite."""
    value = float(loss)
    if not math.isfinite(value):
        raise FloatingPointError(f"train loss {value}")
    return value


def jax_runner(configs: dict[str, dict], settings: dict[str, Any], batch: dict[str, np.ndarray],
               scale_factor: float) -> tuple[dict, Callable[[], float]]:
    """Compile the trainer's step for ``configs`` under ``settings`` on the host ``batch``
    (``stage2.prepare``; ``stage.step.compile``).

    Returns (compile seconds, the batch slices, the step's programs, the model's FLOPs per step and XLA's
    costs of the compiled step: ``stage2.step_costs``), and a call that runs one step and returns its loss.
    """
    prepared = stage2.prepare(configs, settings, batch, scale_factor)
    stage, (_, device_batch, frozen, rng) = prepared["stage"], prepared["args"]
    compile_s, (step, state) = timed(lambda: stage.step.compile(*prepared["args"]))
    states = [state]

    def call() -> float:
        states[0], metrics = step(states[0], device_batch, frozen, rng)
        return checked(metrics["loss"])

    costs = dict(compile_s=compile_s, batch_slices=stage.batch_slices, programs=list(step.programs),
                 model_flops=prepared["flops"], **stage2.step_costs(step))
    return costs, call


def torch_runner(configs: dict[str, dict], settings: dict[str, Any], batch: dict[str, np.ndarray],
                 scale_factor: float) -> Callable[[], float]:
    """A call running one step of diffusers' equivalent (``stage2.diffusers_step``, float32; the GPU if JAX runs on
    one, else the CPU) and returning its loss."""
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    step = stage2.diffusers_step(configs, settings, batch, scale_factor, device)
    return lambda: checked(step().item())  # .item() waits for the device


def measure(runners: dict[str, Callable], repeats: int
            ) -> tuple[dict[str, list[float]], dict[str, list[int]], dict[str, float]]:
    """One warm-up call per runner, then ``repeats`` timed calls of each, alternating (ABAB...).

    Returns the seconds and the process's minor page faults of every timed call, by runner, and each runner's
    warm-up result (its first loss)."""
    first = {name: call() for name, call in runners.items()}
    faults = {name: [] for name in runners}

    def counting_faults(name: str, call: Callable) -> Callable:
        def run():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            call()
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return run

    times = alternating({name: counting_faults(name, call) for name, call in runners.items()}, repeats)
    return times, faults, first


def rate_text(flops: float, seconds: float, peak: float | None) -> str:
    """'X GFLOP/s' of ``flops`` in ``seconds``, with the MFU when ``peak`` is known."""
    rates = utilization(flops, seconds, peak)
    mfu = f", MFU {rates['mfu']:.3f}" if rates["mfu"] is not None else ""
    return f"{rates['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s{mfu}"


def peer_part(spec: dict[str, Any], settings: dict[str, Any], batch: int, repeats: int,
              peak: float | None) -> dict[str, Any]:
    """Part 1: the trainer's step vs diffusers' on the same models and batch; prints its table, returns its record.

    Both sides' FLOP rates use ldm_jax's model FLOP count (the same network and batch)."""
    configs = spec["configs"]
    moments = stage2.moments_batch(batch, stage2.latent_shape(configs, spec["image_size"]), configs["text_encoder"])
    scale = scaling_factor(configs["vae"])
    costs, ours = jax_runner(configs, settings, moments, scale)
    theirs = torch_runner(configs, settings, moments, scale)
    times, faults, first = measure({"ldm_jax": ours, "diffusers": theirs}, repeats)
    steps = {name: statistics.median(values) for name, values in times.items()}
    step_faults = {name: statistics.median(values) for name, values in faults.items()}
    shape = moments["mean"].shape
    record = dict(latent_shape=list(shape[1:]), ours_batch_slices=costs["batch_slices"],
                  ours_programs=costs["programs"], ours_compile_s=costs["compile_s"], ours_flops=costs["flops"],
                  ours_first_loss=first["ldm_jax"], diffusers_first_loss=first["diffusers"],
                  ours_step_s=steps["ldm_jax"], diffusers_step_s=steps["diffusers"],
                  ours_page_faults_per_step=step_faults["ldm_jax"],
                  diffusers_page_faults_per_step=step_faults["diffusers"],
                  ours_images_per_s=batch / steps["ldm_jax"], diffusers_images_per_s=batch / steps["diffusers"],
                  ours_over_diffusers_images_per_s=steps["diffusers"] / steps["ldm_jax"],
                  ours_times=times["ldm_jax"], diffusers_times=times["diffusers"], model_flops=costs["model_flops"])
    for name, key in (("ldm_jax", "ours"), ("diffusers", "diffusers")):
        rates = utilization(costs["model_flops"], steps[name], peak)
        record.update({f"{key}_achieved_flops_per_s": rates["achieved_flops_per_s"], f"{key}_mfu": rates["mfu"]})
    print(f"peer: the stage-2 train step on {batch}x{'x'.join(map(str, shape[1:]))} latents "
          f"(ldm_jax: {slices_text(costs)}, compile {costs['compile_s']:.1f} s, "
          f"{costs['model_flops'] / 1e9:.1f} GFLOP per step; first losses {first['ldm_jax']:.4f} / "
          f"{first['diffusers']:.4f})")
    print(f"{'':10} {'step s':>8} {'images/s':>9} {'faults':>8}  FLOP rate")
    for name, seconds in steps.items():
        print(f"{name:10} {seconds:8.3f} {batch / seconds:9.2f} {step_faults[name]:8.0f}  "
              f"{rate_text(costs['model_flops'], seconds, peak)}")
    pairs = pair_ratios(times["diffusers"], times["ldm_jax"])
    record["pair_ratio_quartiles"] = pairs
    print(f"ldm_jax / diffusers images/s: {record['ours_over_diffusers_images_per_s']:.2f}x; step by step "
          f"(each ldm_jax step against the diffusers step after it) quartiles {pairs[0]:.2f} / {pairs[1]:.2f} / "
          f"{pairs[2]:.2f}")
    return record


def slices_text(costs: dict[str, Any]) -> str:
    """'one program', or 'k batch slices as concurrent programs'."""
    if costs["batch_slices"] == 1:
        return "one program"
    return f"{costs['batch_slices']} batch slices as concurrent programs"


def pair_ratios(theirs: list[float], ours: list[float]) -> list[float]:
    """Quartiles (25th, 50th, 75th percentile) of ``theirs[i] / ours[i]``: each timed step against its
    neighbour in the alternation, so that a drift of the machine's speed over the run cancels out."""
    ratios = [their / our for their, our in zip(theirs, ours, strict=True)]
    return [float(q) for q in np.percentile(ratios, [25, 50, 75])]


def available_memory() -> float:
    """Bytes a new allocation may take: MemAvailable on XLA:CPU, unlimited elsewhere (XLA reports its own OOM)."""
    if jax.default_backend() != "cpu":
        return float("inf")
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def pixel_variants(spec: dict[str, Any], batch: int) -> dict[str, dict[str, Any]]:
    """The 'latent' and 'pixel' steps of part 2: their model ``configs``, host ``batch`` and ``scale`` factor.

    The pixel step is the same builder with the U-Net's input and output channels 3 at the image size, fed
    the images as 'mean' with a 'logvar' of -30 and scale 1, so that its z0 is the pixels."""
    configs, size = spec["configs"], spec["image_size"]
    text = configs["text_encoder"]
    pixel_unet = dict(configs["unet"], in_channels=3, out_channels=3, sample_size=size)
    return {"latent": dict(configs=configs, scale=scaling_factor(configs["vae"]),
                           batch=stage2.moments_batch(batch, stage2.latent_shape(configs, size), text)),
            "pixel": dict(configs=dict(configs, unet=pixel_unet), scale=1.0,
                          batch=stage2.moments_batch(batch, (size, size, 3), text, logvar_mean=-30.0,
                                                     logvar_std=0.0))}


def pixel_part(spec: dict[str, Any], settings: dict[str, Any], batch: int, repeats: int,
               peak: float | None) -> dict[str, Any]:
    """Part 2: the trainer's step on latents vs on pixels of the same images; prints its table, returns its record.

    A step whose XLA memory exceeds the machine's available memory is compiled
    (FLOPs, memory) but not run: its times are null.
    """
    variants = pixel_variants(spec, batch)
    costs, runners = {}, {}
    for name, variant in variants.items():
        costs[name], runners[name] = jax_runner(variant["configs"], settings, variant["batch"], variant["scale"])
        costs[name].update(input_shape=list(variant["batch"]["mean"].shape[1:]), step_s=None, images_per_s=None,
                           times=None)
        if costs[name]["memory_bytes"] > available_memory():
            del runners[name]
    times, _, first = measure(runners, repeats)
    for name, values in times.items():
        costs[name].update(step_s=statistics.median(values), images_per_s=batch / statistics.median(values),
                           times=values, first_loss=first[name],
                           **utilization(costs[name]["model_flops"], statistics.median(values), peak))
    ratios = {key: costs["pixel"][key] / costs["latent"][key] if costs["pixel"][key] and costs["latent"][key]
              else None
              for key in ("step_s", "flops", "memory_bytes")}
    print_pixel_table(costs, ratios, batch, spec["image_size"], peak)
    return dict(image_size=spec["image_size"], latent=costs["latent"], pixel=costs["pixel"], pixel_over_latent=ratios)


def print_pixel_table(costs: dict[str, dict], ratios: dict[str, float | None], batch: int, size: int,
                      peak: float | None) -> None:
    """Print part 2's table: one row per step (latent, pixel), then the ratios pixel / latent."""
    print(f"pixel: ldm_jax's stage-2 train step on {batch} {size}x{size} images as latents or pixels "
          f"(memory: XLA argument + output - alias + temp bytes; available {available_memory() / 2**30:.1f} GiB)")
    print(f"{'':14} {'step s':>8} {'images/s':>9} {'GFLOP':>8} {'memory MiB':>11} {'compile s':>10}  FLOP rate")
    for name, c in costs.items():
        label = f"{name} {'x'.join(map(str, c['input_shape']))}"
        timing = f"{c['step_s']:8.3f} {c['images_per_s']:9.2f}" if c["step_s"] else f"{'not run: memory':>18}"
        rate = rate_text(c["model_flops"], c["step_s"], peak) if c["step_s"] else "-"
        print(f"{label:14} {timing} {c['flops'] / 1e9:8.1f} {c['memory_bytes'] / 2**20:11.1f} "
              f"{c['compile_s']:10.1f}  {rate}")
    print("pixel / latent: " + ", ".join(f"{key} {value:.2f}x" if value else f"{key} -"
                                         for key, value in ratios.items()))


def main(argv=None) -> dict:
    """Run the chosen parts, print their tables and the JSON line; returns the JSON record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=CONFIGS, default="base")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--part", choices=("peer", "pixel", "all"), default="all")
    parser.add_argument("--batch-slices", type=int, default=0,
                        help="slices of the batch, k > 1 as concurrent programs on one CPU device (default 0: the "
                             "trainer's choice, diffusion.batch_slices)")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="the device's peak FLOP/s for MFU (default: bench/hardware.py's bf16 table; none for CPUs)")
    args = parser.parse_args(argv)
    if args.config == "sd15" and args.part != "peer":
        parser.error("--config sd15 runs --part peer only: SD 1.5's U-Net on 512x512 pixels would attend "
                     "over 262144 tokens")

    load_start, info = load_average(), machine()
    peak = args.peak_flops or peak_flops(info["device"])
    peak_source = "--peak-flops" if args.peak_flops else "bf16 table (bench/hardware.py)" if peak else None
    torch.set_num_threads(info["cores"])
    print(f"config {args.config}, batch {args.batch}, {args.repeats} repeats; {info['device']} / {info['cpu']}, "
          f"{info['cores']} cores (torch threads {torch.get_num_threads()}); load average {load_start}")
    record = dict(config=args.config, batch=args.batch, repeats=args.repeats, **info,
                  torch_threads=torch.get_num_threads(), loadavg_start=load_start, peak_flops=peak,
                  peak_source=peak_source, glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""))
    print(f"peak FLOP/s: {f'{peak:.4g} ({peak_source})' if peak else 'unknown (no MFU; --peak-flops sets it)'}")
    spec = bench_spec(args.config)
    settings = stage2.settings(spec["section"], dtype="float32", batch_slices=args.batch_slices)
    if args.part in ("peer", "all"):
        record["peer"] = peer_part(spec, settings, args.batch, args.repeats, peak)
    if args.part in ("pixel", "all"):
        record["pixel"] = pixel_part(spec, settings, args.batch, args.repeats, peak)
    record["loadavg_end"] = load_average()
    record = rounded(record)
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
