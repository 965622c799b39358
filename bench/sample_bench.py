r"""Text-to-image sampling speed: ldm_jax's jitted ``sample_fn`` against diffusers' StableDiffusionPipeline.

One diffusers pipeline with random weights is built at a config, saved, and
loaded into ldm_jax with ``Pipeline.from_pretrained``; both then generate the
same batch (same prompts, starting latents, steps, sampler, guidance 7.5) in
one process, and the images are compared so that both sides do equal work.

Run from the repository root (CPU: "small" takes about 2 minutes on 2 cores)::

  python -m bench.sample_bench [--config small|sd15] [--steps 20] [--batch 2] \
      [--sampler ddim|dpm++2m|euler] [--repeats 3] [--size PIXELS]

ldm_jax: ``sample_fn.lower(...).compile()`` is timed as the compile time, then
a first call, then ``--repeats`` calls with ``block_until_ready``. diffusers:
a warm-up call, then ``--repeats`` calls under ``torch.inference_mode()`` with
as many torch threads as the cores JAX's CPU backend uses. The repeats of the
two alternate; steady state is their median (best: their minimum). Prints a
table and one JSON line.
"""

import argparse
import json
import os
import statistics
import tempfile
from typing import Callable

import diffusers
import jax
import numpy as np
import torch

from bench.common import alternating, rounded, timed
from bench.hardware import load_average, machine
from configs import sd15
from ldm_jax import Pipeline, sample_fn
from ldm_jax.models.clip import tokenize
from ldm_jax.testing import clip as clip_refs
from ldm_jax.testing import unet as unet_refs
from ldm_jax.testing import vae as vae_refs

GUIDANCE = 7.5
PROMPTS = ("a photo of a cat on a mat", "a red circle in the sky", "a painting of a big green tree",
           "a small blue house with a dog")
SCHEDULERS = {"ddim": diffusers.DDIMScheduler, "dpm++2m": diffusers.DPMSolverMultistepScheduler,
              "euler": diffusers.EulerDiscreteScheduler}  # deterministic samplers only: images must match
_TOKENS = dict(bos_token_id=clip_refs.BOS_ID, eos_token_id=clip_refs.EOS_ID, pad_token_id=clip_refs.EOS_ID)

# Model configs (diffusers / transformers keys) and image size. The tokenizer is the tiny test tokenizer
# (ldm_jax/testing/clip.py) padded to the text encoder's length: no hub download, same token count as SD.
CONFIGS = {
    # SD 1.x layout scaled down: 3-level U-Net (64, 128, 256) with 2 resnets per level, 24x24x4 latents
    # (576 attention tokens at the top level; SD 1.5 has 4096), f=8 VAE decoding to 192x192, 4-layer
    # 256-wide CLIP over 77 tokens. About 2 minutes per run on 2 CPU cores.
    "small": dict(
        size=192,
        unet=dict(sample_size=24, in_channels=4, out_channels=4,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  block_out_channels=(64, 128, 256), layers_per_block=2, attention_head_dim=8,
                  cross_attention_dim=256, norm_num_groups=32),
        vae=dict(vae_refs.VAE_SD, block_out_channels=[32, 64, 128, 128], layers_per_block=1,
                 norm_num_groups=32, sample_size=192),
        text_encoder=dict(vocab_size=clip_refs.VOCAB_SIZE, hidden_size=256, intermediate_size=1024,
                          num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=77,
                          hidden_act="quick_gelu", layer_norm_eps=1e-5, **_TOKENS)),
    # The real SD 1.5 architecture at 512x512 (860M U-Net): minutes per image on a CPU.
    "sd15": dict(
        size=512, unet=unet_refs.SD15, vae=vae_refs.VAE_SD,
        text_encoder={**sd15.get_config().text_encoder.to_dict(), **_TOKENS}),
}


def build_reference(name: str, folder: str) -> diffusers.StableDiffusionPipeline:
    """A diffusers StableDiffusionPipeline with seeded random weights at config ``name``, saved to ``folder``."""
    config = CONFIGS[name]
    tokenizer = clip_refs.make_tokenizer(os.path.join(folder, "_tokenizer"),
                                         model_max_length=config["text_encoder"]["max_position_embeddings"])
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae_refs.build(config["vae"], seed=1), text_encoder=clip_refs.build(config["text_encoder"], seed=2),
        tokenizer=tokenizer, unet=unet_refs.build(config["unet"], seed=0),
        scheduler=diffusers.DDIMScheduler(**sd15.SD_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(os.path.join(folder, "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours_runner(pipe: Pipeline, prompts: list[str], latents: np.ndarray, args) -> tuple[float, Callable]:
    """Compile ldm_jax's ``sample_fn`` for this batch; returns (compile seconds, a blocking call giving images)."""
    cond = tokenize(pipe.tokenizer, prompts, pipe.text_encoder.max_position_embeddings)
    uncond = tokenize(pipe.tokenizer, [""] * len(prompts), pipe.text_encoder.max_position_embeddings)
    size = latents.shape[1] * 2 ** (len(pipe.vae.block_out_channels) - 1)
    inputs = (pipe.params, cond, uncond, jax.random.key(0), latents)
    compile_s, compiled = timed(lambda: sample_fn.lower(
        *inputs, models=pipe.models, sampler=args.sampler, steps=args.steps, guidance_scale=GUIDANCE,
        height=size, width=size).compile())
    return compile_s, lambda: np.asarray(compiled(*inputs).block_until_ready())


def diffusers_runner(pipe: diffusers.StableDiffusionPipeline, prompts: list[str], latents: np.ndarray,
                     args) -> Callable:
    """A call of diffusers' pipeline (float32, CPU, ``args.sampler``'s scheduler) giving images [B, H, W, 3]."""
    pipe.scheduler = SCHEDULERS[args.sampler].from_config(pipe.scheduler.config)
    size = latents.shape[1] * pipe.vae_scale_factor
    torch_latents = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2)))

    def call():
        with torch.inference_mode():
            return pipe(prompts, height=size, width=size, num_inference_steps=args.steps, guidance_scale=GUIDANCE,
                        latents=torch_latents.clone(), output_type="np").images

    return call


def measure(runners: dict[str, Callable], repeats: int) -> dict[str, dict]:
    """Per runner: first-call seconds, images of that call, and ``repeats`` steady-state times.

    The repeats alternate between the runners (ABAB...), so that load from
    other processes on a shared machine hits both alike.
    """
    results = {}
    for name, call in runners.items():
        first_s, images = timed(call)
        results[name] = dict(first_s=first_s, images=np.asarray(images))
    for name, times in alternating(runners, repeats).items():
        results[name]["times"] = times
    return results


def main(argv=None) -> dict:
    """Run the benchmark, print the table and the JSON line; returns the JSON record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--sampler", choices=sorted(SCHEDULERS), default="ddim")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the config's)")
    args = parser.parse_args(argv)

    load_start, info = load_average(), machine()
    torch.set_num_threads(info["cores"])
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    with tempfile.TemporaryDirectory() as folder:
        reference = build_reference(args.config, folder)
        ours = Pipeline.from_pretrained(os.path.join(folder, "pipeline"))
    channels = ours.vae.latent_channels
    size = args.size or CONFIGS[args.config]["size"]
    side = size // reference.vae_scale_factor
    latents = np.random.default_rng(0).standard_normal((args.batch, side, side, channels)).astype(np.float32)

    compile_s, ours_call = ours_runner(ours, prompts, latents, args)
    results = measure({"ldm_jax": ours_call, "diffusers": diffusers_runner(reference, prompts, latents, args)},
                      args.repeats)
    jax_result, torch_result = results["ldm_jax"], results["diffusers"]
    for result in results.values():
        result.update(steady_s=statistics.median(result["times"]), best_s=min(result["times"]))
    diff = np.abs(jax_result["images"] - torch_result["images"])

    record = dict(
        config=args.config, **info, torch_threads=torch.get_num_threads(), steps=args.steps, batch=args.batch,
        sampler=args.sampler, guidance=GUIDANCE, image_size=size,
        ours_compile_s=compile_s, ours_first_s=jax_result["first_s"], ours_steady_s=jax_result["steady_s"],
        ours_best_s=jax_result["best_s"], diffusers_first_s=torch_result["first_s"],
        diffusers_steady_s=torch_result["steady_s"], diffusers_best_s=torch_result["best_s"],
        ratio=torch_result["steady_s"] / jax_result["steady_s"],
        ratio_best=torch_result["best_s"] / jax_result["best_s"],
        ours_images_per_s=args.batch / jax_result["steady_s"],
        diffusers_images_per_s=args.batch / torch_result["steady_s"],
        max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
        unclipped_fraction=float(np.mean((torch_result["images"] > 0) & (torch_result["images"] < 1))),
        ours_times=jax_result["times"], diffusers_times=torch_result["times"],
        loadavg_start=load_start, loadavg_end=load_average())
    record = rounded(record)

    print(f"config {args.config} ({record['image_size']}px), {args.steps} {args.sampler} steps, batch {args.batch}, "
          f"guidance {GUIDANCE}; {info['device']} / {info['cpu']}, {info['cores']} cores "
          f"(torch threads {record['torch_threads']}); load average {load_start} -> {record['loadavg_end']}")
    print(f"{'':10} {'compile s':>10} {'first s':>9} {'steady s':>9} {'best s':>8} {'images/s':>9}")
    for name, result in results.items():
        compiled = f"{compile_s:10.2f}" if name == "ldm_jax" else f"{'-':>10}"
        print(f"{name:10} {compiled} {result['first_s']:9.2f} {result['steady_s']:9.2f} {result['best_s']:8.2f} "
              f"{args.batch / result['steady_s']:9.3f}")
    print(f"diffusers / ldm_jax time: {record['ratio']:.2f}x steady (median), {record['ratio_best']:.2f}x best; "
          f"images max |diff| {record['max_abs_diff']:.2e} (mean {record['mean_abs_diff']:.2e}, "
          f"{record['unclipped_fraction']:.0%} of pixels unclipped)")
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
