r"""Stable Diffusion 1.5 on one accelerator: ldm_jax against diffusers (PyTorch) and against the hardware limit.

Random weights at configs/sd15.py's shapes; ldm_jax computes in bfloat16 with
float32 params, diffusers trains with float32 weights under bfloat16 autocast
and samples with bfloat16 weights (``--torch-dtype``), as its scripts do.
Measured, side by side:

* **train**: the trainer's own stage-2 step, built by
  ``ldm_jax.training.diffusion.state.build`` (``bench/stage2.py``: posterior
  sample of cached latents, 10% caption dropout, frozen CLIP, U-Net forward
  and backward, AdamW with clipping, EMA) at batch 16 on 64x64x4 latents;
  diffusers' step doing the same work (``stage2.diffusers_step``:
  train_text_to_image.py's recipe). Step time, images/s, compile time, peak
  memory, the model's FLOPs (``jaxpr_flops`` of the step traced with
  plain-XLA attention, no remat) and MFU against the device's peak bf16
  FLOP/s (``bench/hardware.py``).
* **sample**: text to one 512x512 image, 50 DDIM steps, guidance 7.5
  (latency), and a batch of 8 (images/s); ``sample_fn`` vs diffusers'
  ``StableDiffusionPipeline`` (numpy images out on both sides).

Each framework runs in its own subprocess, ldm_jax first, so neither holds
GPU memory the other needs. Everything, compiles included, fits in
``--budget-s`` (default 560 s): a part that would start too late is skipped
and says so. Run from the repository root::

  python -m bench.gpu_bench --out results.json                    # SD 1.5 on the GPU, ~9 minutes on an H100
  python -m bench.gpu_bench --config tiny --out /tmp/tiny.json    # tiny models on any machine (the smoke test)

Options: ``--attention-impl`` (ldm_jax's kernel; default cudnn on a GPU, auto
elsewhere), ``--remat-policy`` (default none), ``--state-layout auto|default``
(default auto, as the trainer), ``--torch-dtype
bfloat16|float16``, ``--skip-diffusers``, ``--budget-s``. Writes the JSON
record to ``--out`` and prints a summary table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

from bench import stage2
from bench.common import timed
from bench.hardware import peak_flops, utilization
from bench.stage2 import host_random_params, token_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDANCE = 7.5
SAMPLE_STEPS = 50
CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.9999
PROMPTS = ("a photo of a cat on a mat", "a red circle in the sky", "a painting of a big green tree",
           "a small blue house with a dog")
# Per config: the models (a configs/ module), the train batch, the sampling batch for images/s, timing repeats.
SPECS = {
    "sd15": dict(module="configs.sd15", train_batch=16, sample_batch=8, train_rounds=3, steps_per_round=5,
                 sample_repeats=3, diffusers_reserve_s=150),
    "tiny": dict(module="configs.tiny", train_batch=2, sample_batch=8, train_rounds=2, steps_per_round=2,
                 sample_repeats=1, diffusers_reserve_s=100),
}
# Seconds a part needs at least; one that would start with less left is skipped.
MIN_PART_S = {"sd15": 60, "tiny": 5}


def model_configs(module: str) -> dict[str, Any]:
    """The unet / vae / text_encoder / scheduler config dicts and image size of the config ``module``
    (``SPECS[name]["module"]``, e.g. ``configs.sd15``)."""
    import importlib
    config = importlib.import_module(module).get_config()
    from ldm_jax.pipeline import model_configs as configs_of
    return {**configs_of(config), "image_size": config["image_size"]}


class Parts:
    """A worker's record: each part's results (or its error, or why it was skipped), saved after every part."""

    def __init__(self, path: str, deadline: float, min_s: float, **header: Any):
        """Record into ``path``; parts that would start less than ``min_s`` before ``deadline`` are skipped."""
        self.path, self.deadline, self.min_s = path, deadline, min_s
        self.record = dict(header)
        self.save()

    def run(self, name: str, fn: Callable[[], dict]) -> None:
        """Run part ``name`` unless time is short; keep its result, or its error, and save the record."""
        left = self.deadline - time.time()
        if left < self.min_s:
            self.record[name] = dict(skipped=f"time budget: {left:.0f} s left, a part needs {self.min_s} s")
        else:
            try:
                self.record[name] = fn()
            except Exception as error:  # the next part may still run (e.g. after an out-of-memory)
                self.record[name] = dict(error=f"{type(error).__name__}: {error}",
                                         traceback=traceback.format_exc()[-3000:])
        print(f"[{self.record.get('framework')}] {name}: {json.dumps(self.record[name])[:400]}", flush=True)
        self.save()

    def save(self) -> None:
        """Write the record so far (a killed worker leaves its finished parts)."""
        with open(self.path, "w") as f:
            json.dump(self.record, f, indent=1)


def sampling_times(call: Callable, batch: int, size: int, repeats: int) -> dict:
    """Time ``call`` (``batch`` images [B, size, size, 3] out, checked): a first call, then the median of
    ``repeats`` calls; with the sampling settings both frameworks use."""
    first_s, images = timed(call)
    if images.shape != (batch, size, size, 3):
        raise ValueError(f"sampling returned {images.shape}, expected {(batch, size, size, 3)}")
    times = [timed(call)[0] for _ in range(repeats)]
    seconds = statistics.median(times)
    return dict(batch=batch, image_size=size, steps=SAMPLE_STEPS, guidance=GUIDANCE, first_s=first_s,
                seconds=seconds, times=times, images_per_s=batch / seconds)


# ------------------------------------------------------------------------------------------------ ldm_jax worker

def jax_worker(args) -> None:
    """Measure ldm_jax (train, sample latency, sample throughput) into ``args.out``."""
    import jax

    spec = SPECS[args.config]
    configs = model_configs(spec["module"])
    impl = args.attention_impl or ("cudnn" if jax.default_backend() == "gpu" else "auto")
    device = jax.devices()[0]
    parts = Parts(args.out, args.deadline, MIN_PART_S[args.config], framework="ldm_jax",
                  jax_version=jax.__version__, backend=jax.default_backend(), device_kind=device.device_kind,
                  attention_impl=impl, remat_policy=args.remat_policy, state_layout=args.state_layout,
                  compute_dtype="bfloat16", param_dtype="float32")
    parts.run("train", lambda: jax_train(configs, spec, impl, args.remat_policy, args.state_layout))
    for name, batch in (("sample_latency", 1), ("sample_throughput", spec["sample_batch"])):
        parts.run(name, lambda: jax_sample(configs, impl, batch, spec["sample_repeats"]))


def _memory(compiled) -> dict[str, int]:
    """XLA's buffer sizes of a compiled program (``compile_cost.program_cost``), as ``xla_memory_bytes`` (argument
    + output - alias + temp: its live bytes at peak) and ``xla_{argument,output,alias,temp}_bytes``."""
    from ldm_jax.training.compile_cost import program_cost

    return {f"xla_{key}": value for key, value in program_cost(compiled).items() if key.endswith("_bytes")}


def _step_memory(step) -> dict[str, int]:
    """`_memory` of a compiled train step (``stage2.step_costs``): ``xla_memory_bytes``, its buffers at peak, and
    the ``xla_{argument,output,alias,temp}_bytes`` of its programs (for one program, that program's)."""
    costs = stage2.step_costs(step)
    return {"xla_memory_bytes": int(costs["memory_bytes"]),
            **{f"xla_{key}_bytes": int(costs[key]) for key in ("argument", "output", "alias", "temp")}}


def _device_peak_bytes() -> int | None:
    """The device allocator's peak bytes in use so far (None where the backend keeps no stats, e.g. CPU)."""
    import jax
    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def train_settings(compute_dtype: str, remat_policy: str, state_layout: str, batch_slices: int) -> dict:
    """The stage-2 settings this bench trains with: the trainer's ``DIFFUSION_DEFAULTS`` (AdamW lr 1e-4, weight
    decay 0.01, clipping at 1.0) in ``compute_dtype`` with these ``remat_policy``, ``state_layout`` and
    ``batch_slices``, 10% caption dropout and EMA 0.9999."""
    return stage2.settings(dtype=compute_dtype, remat_policy=remat_policy, state_layout=state_layout,
                           batch_slices=batch_slices, caption_dropout=CAPTION_DROPOUT, ema_decay=EMA_DECAY,
                           steps=1000)


def train_batch(configs: dict, spec: dict) -> dict:
    """The host batch both frameworks train on: ``spec['train_batch']`` examples of cached latent moments of
    ``configs['image_size']`` images and their token ids (``stage2.moments_batch``)."""
    return stage2.moments_batch(spec["train_batch"], stage2.latent_shape(configs, configs["image_size"]),
                                configs["text_encoder"])


def scale_factor(configs: dict) -> float:
    """The latents' scale: the VAE config's, else 1.0 (a config whose VAE is trained estimates its own)."""
    return configs["vae"].get("scaling_factor", 1.0)


def prepare_train(configs: dict, spec: dict, impl: str, remat_policy: str, state_layout: str = "auto",
                  compute_dtype: str = "bfloat16", batch_slices: int = 0) -> dict:
    """The trainer's stage-2 step at ``spec['train_batch']`` (``diffusion_state.build`` with `train_settings`,
    on a mesh of one device: float32 params, ``compute_dtype`` activations, the state's layouts per
    ``state_layout``, the U-Net on ``cpu_step.resolve_batch_slices(batch_slices, ...)`` slices), with its inputs
    on the device (``stage2.prepare``).

    Returns ``stage`` (the ``Stage2``; compile its step with ``stage.step.compile(*args)``), ``args`` (state,
    batch, frozen params, rng), the latent ``shape`` and ``flops``, the model FLOPs of the same step traced
    with plain-XLA attention and no remat."""
    batch = train_batch(configs, spec)
    prepared = stage2.prepare(configs, train_settings(compute_dtype, remat_policy, state_layout, batch_slices),
                              batch, scale_factor(configs), impl)
    return dict(prepared, shape=batch["mean"].shape)


def jax_train(configs: dict, spec: dict, impl: str, remat_policy: str, state_layout: str) -> dict:
    """Compile and time ldm_jax's stage-2 train step (:func:`prepare_train`); its memory, model FLOPs and MFU."""
    import jax
    import numpy as np

    prepared = prepare_train(configs, spec, impl, remat_policy, state_layout)
    stage, (state, batch, frozen, step_rng) = prepared["stage"], prepared["args"]
    shape, flops, batch_size = prepared["shape"], prepared["flops"], spec["train_batch"]
    compile_s, (compiled, state) = timed(lambda: stage.step.compile(*prepared["args"]))

    def steps(n: int) -> None:
        nonlocal state
        for _ in range(n):
            state, metrics = compiled(state, batch, frozen, step_rng)
        jax.block_until_ready(metrics["loss"])
        if not np.isfinite(float(metrics["loss"])):
            raise FloatingPointError(f"train loss {float(metrics['loss'])}")

    first_s, _ = timed(lambda: steps(1))
    rounds = [timed(lambda: steps(spec["steps_per_round"]))[0] / spec["steps_per_round"]
              for _ in range(spec["train_rounds"])]
    step_s = statistics.median(rounds)
    peak = peak_flops(jax.devices()[0].device_kind)
    return dict(batch=batch_size, latent_shape=list(shape[1:]), batch_slices=stage.batch_slices,
                programs=list(compiled.programs), compile_s=compile_s, first_step_s=first_s, step_s=step_s,
                round_step_s=rounds, images_per_s=batch_size / step_s, peak_flops=peak,
                model_flops_per_step=flops, **utilization(flops, step_s, peak),
                device_peak_bytes=_device_peak_bytes(), **_step_memory(compiled))


def jax_sample(configs: dict, impl: str, batch: int, repeats: int) -> dict:
    """Compile and time ``sample_fn`` for ``batch`` prompts (50 DDIM steps, guidance 7.5, numpy images out)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ldm_jax.diffusion.sample_fn import Models, sample_fn
    from ldm_jax.pipeline import build_modules, init_inputs

    modules = build_modules(configs, jnp.bfloat16, attention_impl=impl)
    params = jax.device_put({name: host_random_params(modules[name], init_inputs(name, configs[name]), seed)
                             for seed, name in enumerate(("unet", "vae", "text_encoder"))})
    models = Models.create(modules["unet"], modules["vae"], modules["text_encoder"], configs["scheduler"],
                           scale_factor(configs))
    length, vocab = configs["text_encoder"]["max_position_embeddings"], configs["text_encoder"]["vocab_size"]
    cond, uncond = token_batch(batch, length, vocab, 3), token_batch(batch, length, vocab, 4)
    size = configs["image_size"]
    inputs = (params, cond, uncond, jax.random.key(5))
    compile_s, compiled = timed(lambda: sample_fn.lower(
        *inputs, models=models, sampler="ddim", steps=SAMPLE_STEPS, guidance_scale=GUIDANCE, height=size,
        width=size).compile())
    return dict(compile_s=compile_s, **sampling_times(lambda: np.asarray(compiled(*inputs)), batch, size, repeats),
                **_memory(compiled))


# ---------------------------------------------------------------------------------------------- diffusers worker

def diffusers_worker(args) -> None:
    """Measure diffusers (train, sample latency, sample throughput) into ``args.out``."""
    import diffusers
    import torch
    import transformers

    spec = SPECS[args.config]
    configs = model_configs(spec["module"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parts = Parts(args.out, args.deadline, MIN_PART_S[args.config], framework="diffusers",
                  torch_version=torch.__version__, diffusers_version=diffusers.__version__,
                  transformers_version=transformers.__version__, device=device,
                  device_name=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                  torch_dtype=args.torch_dtype, train_weights="float32 (autocast)")
    parts.run("train", lambda: torch_train(configs, spec, device, getattr(torch, args.torch_dtype)))
    for name, batch in (("sample_latency", 1), ("sample_throughput", spec["sample_batch"])):
        parts.run(name, lambda: torch_sample(configs, device, getattr(torch, args.torch_dtype), batch,
                                             spec["sample_repeats"]))


def _synchronize(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def torch_train(configs: dict, spec: dict, device: str, dtype) -> dict:
    """Time diffusers' train step (``stage2.diffusers_step``: train_text_to_image.py's recipe with this bench's
    settings, bf16 autocast, fused AdamW on CUDA, clipping, EMA) on the same batch as ldm_jax's."""
    import torch

    batch = train_batch(configs, spec)
    step = stage2.diffusers_step(configs, train_settings("float32", "none", "auto", 1), batch,
                                 scale_factor(configs), device, autocast=dtype)
    batch_size, shape = spec["train_batch"], batch["mean"].shape

    def steps(n: int) -> None:
        for _ in range(n):
            loss = step()
        _synchronize(device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train loss {loss.item()}")

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first_s, _ = timed(lambda: steps(1))
    steps(1)  # a second warm-up: allocator and kernel choices settle
    rounds = [timed(lambda: steps(spec["steps_per_round"]))[0] / spec["steps_per_round"]
              for _ in range(spec["train_rounds"])]
    step_s = statistics.median(rounds)
    peak_bytes = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return dict(batch=batch_size, latent_shape=list(shape[1:]), first_step_s=first_s, step_s=step_s,
                round_step_s=rounds, images_per_s=batch_size / step_s, device_peak_bytes=peak_bytes)


def torch_sample(configs: dict, device: str, dtype, batch: int, repeats: int) -> dict:
    """Time diffusers' StableDiffusionPipeline for ``batch`` prompts (50 DDIM steps, guidance 7.5, numpy out)."""
    import diffusers
    import torch

    from ldm_jax.testing.clip import make_tokenizer  # a CLIP tokenizer without a download

    models = stage2.diffusers_models(configs, device, ("unet", "vae", "text_encoder"))
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = make_tokenizer(folder, model_max_length=configs["text_encoder"]["max_position_embeddings"])
    pipe = diffusers.StableDiffusionPipeline(
        **models, tokenizer=tokenizer, scheduler=diffusers.DDIMScheduler(**configs["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    size = configs["image_size"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]

    def call():
        with torch.inference_mode():
            return pipe(prompts, height=size, width=size, num_inference_steps=SAMPLE_STEPS, guidance_scale=GUIDANCE,
                        output_type="np").images

    return sampling_times(call, batch, size, repeats)


# --------------------------------------------------------------------------------------------------- the driver

def run_worker(framework: str, args, deadline: float) -> dict:
    """Run one framework's worker in a subprocess until ``deadline`` (then kill it); returns its record."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, f"{framework}.json")
        command = [sys.executable, "-m", "bench.gpu_bench", "--worker", framework, "--config", args.config,
                   "--out", out, "--deadline", str(deadline), "--remat-policy", args.remat_policy,
                   "--state-layout", args.state_layout, "--torch-dtype", args.torch_dtype]
        if args.attention_impl:
            command += ["--attention-impl", args.attention_impl]
        # The worker is the only process on the accelerator: let JAX take 90% of its memory instead of 75%.
        env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9", **os.environ}
        try:
            code = subprocess.run(command, cwd=REPO, env=env, timeout=max(deadline - time.time(), 1) + 10).returncode
        except subprocess.TimeoutExpired:
            code = "killed at the time budget"
        record = {"framework": framework}
        if os.path.exists(out):
            with open(out) as f:
                record = json.load(f)
    if code != 0:
        record["worker_exit"] = code
    return record


def _get(record: dict, part: str, key: str) -> float | None:
    value = record.get(part, {}).get(key)
    return value if isinstance(value, (int, float)) else None


def speedups(ours: dict, theirs: dict) -> dict[str, float | None]:
    """How many times faster ldm_jax is (> 1: faster): train images/s, sampling latency, sampling images/s."""
    ratio = lambda a, b: a / b if a and b else None
    return dict(train=ratio(_get(ours, "train", "images_per_s"), _get(theirs, "train", "images_per_s")),
                sample_latency=ratio(_get(theirs, "sample_latency", "seconds"), _get(ours, "sample_latency", "seconds")),
                sample_throughput=ratio(_get(ours, "sample_throughput", "images_per_s"),
                                        _get(theirs, "sample_throughput", "images_per_s")))


def summary(record: dict) -> str:
    """The side-by-side table of a finished record (diffusers' FLOP rate and MFU use ldm_jax's FLOP count: same
    network, same batch)."""
    ours, theirs, ratio = record["ldm_jax"], record["diffusers"], record["speedup"]
    flops, peak = _get(ours, "train", "model_flops_per_step"), _get(ours, "train", "peak_flops")
    rate = lambda side: flops / _get(side, "train", "step_s") if flops and _get(side, "train", "step_s") else None
    per = lambda value, unit: value / unit if value and unit else None
    rows = [
        ("train step s", _get(ours, "train", "step_s"), _get(theirs, "train", "step_s"), ratio["train"], ".4f"),
        ("train images/s", _get(ours, "train", "images_per_s"), _get(theirs, "train", "images_per_s"), ratio["train"],
         ".2f"),
        ("train TFLOP/s (model FLOPs)", per(rate(ours), 1e12), per(rate(theirs), 1e12), None, ".1f"),
        ("train MFU", per(rate(ours), peak), per(rate(theirs), peak), None, ".3f"),
        ("train peak memory GiB", per(_get(ours, "train", "device_peak_bytes"), 2 ** 30),
         per(_get(theirs, "train", "device_peak_bytes"), 2 ** 30), None, ".2f"),
        ("train compile s", _get(ours, "train", "compile_s"), None, None, ".1f"),
        ("sample 1 image s", _get(ours, "sample_latency", "seconds"), _get(theirs, "sample_latency", "seconds"),
         ratio["sample_latency"], ".3f"),
        ("sample compile s (1 image)", _get(ours, "sample_latency", "compile_s"), None, None, ".1f"),
        ("sample images/s (batch)", _get(ours, "sample_throughput", "images_per_s"),
         _get(theirs, "sample_throughput", "images_per_s"), ratio["sample_throughput"], ".3f"),
        ("sample compile s (batch)", _get(ours, "sample_throughput", "compile_s"), None, None, ".1f"),
    ]
    fmt = lambda value, spec: format(value, spec) if isinstance(value, (int, float)) else "-"
    peak_text = f"peak {peak / 1e12:.0f} TFLOP/s bf16" if peak else "peak FLOP/s unknown: no MFU"
    lines = [f"{record['config']}: ldm_jax on {ours.get('device_kind', '?')} ({peak_text}), attention "
             f"{ours.get('attention_impl')}, remat {ours.get('remat_policy')}, state layout "
             f"{ours.get('state_layout')}; diffusers on "
             f"{theirs.get('device_name', '-')}, {theirs.get('torch_dtype', '-')}",
             f"{'':28} {'ldm_jax':>10} {'diffusers':>10} {'speedup':>8}"]
    for label, a, b, r, spec in rows:
        lines.append(f"{label:28} {fmt(a, spec):>10} {fmt(b, spec):>10} {fmt(r, '.2f') + ('x' if r else ''):>8}")
    for name, side in (("ldm_jax", ours), ("diffusers", theirs)):
        for part in ("train", "sample_latency", "sample_throughput"):
            problem = side.get(part, {}).get("error") or side.get(part, {}).get("skipped")
            if problem:
                lines.append(f"{name} {part}: {problem}")
        if "worker_exit" in side:
            lines.append(f"{name} worker exit: {side['worker_exit']}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    """Run both workers within the budget, write ``--out``, print the table; returns the record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(SPECS), default="sd15")
    parser.add_argument("--out", required=True, help="where to write the JSON record")
    parser.add_argument("--attention-impl", default=None,
                        help="ldm_jax's attention kernel (default: cudnn on a GPU, auto elsewhere)")
    parser.add_argument("--remat-policy", default="none")
    parser.add_argument("--state-layout", choices=("auto", "default"), default="auto",
                        help="the train state's memory layouts (the trainer's diffusion.state_layout)")
    parser.add_argument("--torch-dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--budget-s", type=float, default=560.0, help="wall-clock budget for everything")
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--worker", choices=("jax", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        (jax_worker if args.worker == "jax" else diffusers_worker)(args)
        return {}

    start = time.time()
    deadline = start + args.budget_s
    reserve = 0 if args.skip_diffusers else SPECS[args.config]["diffusers_reserve_s"]
    ours = run_worker("jax", args, deadline - reserve)
    theirs = {"framework": "diffusers", "skipped": "--skip-diffusers"} if args.skip_diffusers else run_worker(
        "diffusers", args, deadline)
    record = dict(config=args.config, budget_s=args.budget_s, wall_s=time.time() - start, ldm_jax=ours,
                  diffusers=theirs, speedup=speedups(ours, theirs))
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(summary(record))
    return record


if __name__ == "__main__":
    main()
