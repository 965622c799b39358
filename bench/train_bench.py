r"""Stage-2 train-step throughput: ldm_jax vs diffusers (PyTorch), and latent vs pixel diffusion.

One diffusion train step is the epsilon-prediction MSE of a U-Net at random
timesteps (``t ~ U{0..999}``, SD 1.5's noise schedule), its gradient and an
AdamW update (lr 1e-4, weight decay 0.01), on a batch of clean inputs and a
fixed text context [B, 16, cross_attention_dim] (a frozen text encoder's
output, computed once: no text encoder inside the step). Random weights,
float32. ldm_jax's U-Net runs on ``--batch-slices`` slices of the batch,
by default the trainer's choice (``diffusion.batch_slices`` 0: two on a
single CPU device, else one; ``ldm_jax.training.diffusion.step``), run as
``--slice-execution`` says, by default as the trainer runs them (on one CPU
device, as concurrent programs: ``ldm_jax.training.cpu_step``;
the compile time is then the programs' together). In one process:

1. *peer* (``--part peer``): the same U-Net config (configs/base.py's, on
   32x32x4 latents; its f4 variant's on 16x16x4 with ``--config f4``; SD
   1.5's on 64x64x4 with ``--config sd15``, for an accelerator) trained by ldm_jax (a jitted, state-donating step; its compile
   time and XLA's FLOP count are reported) and by diffusers
   (``UNet2DConditionModel``, ``DDPMScheduler.add_noise``, ``F.mse_loss``,
   ``torch.optim.AdamW``; torch threads = the cores JAX uses). One warm-up
   step each, then ``--repeats`` steps of each, alternating; the table gives
   the median step times, images/s, *ldm_jax / diffusers* in images/s
   (> 1: ldm_jax is faster), the quartiles of the same ratio taken step by
   step (each ldm_jax step against the diffusers step after it: on a busy
   host the machine's speed drifts between steps, the ratio of neighbours
   less) and the median minor page faults of the process during one step of
   each.
2. *pixel* (``--part pixel``, configs/base.py and f4): ldm_jax alone, 64x64
   images either as latents (32x32x4, or 16x16x4 for f4) or as 64x64x3 pixels
   (the same architecture with 3 input/output channels). Step time, images/s,
   XLA's FLOPs and memory (``compiled.memory_analysis()``: arguments + outputs
   - aliased (donated) + temporaries, not the process RSS), and the ratios
   pixel / latent. ../shared/seed/latent_diffusion.md claims latent
   diffusion needs ~3x less memory (8 vs 24 GB) and is 4-8x faster than
   pixel diffusion; the JSON line's ``pixel_over_latent`` ratios confirm or
   refute that at this scale. On a CPU, a step whose memory exceeds the
   machine's available memory is compiled but not run (its times are null):
   the pixel step needs about 1.5 GiB per image (47 GiB at batch 32).

Both parts report the FLOP rate each step achieves (the model's FLOPs: its
matmuls' and convolutions' multiply-adds counted from the traced step by
``bench/hardware.py``'s ``jaxpr_flops``, over the step time) and, when the peak FLOP/s is
known (``--peak-flops``, or the bfloat16 peak of a known accelerator from
``bench/hardware.py``; a CPU's is unknown), the model FLOPs utilization.

Like the trainer, the command first restarts itself with glibc's huge-page
malloc tunable where it applies (``ldm_jax.host_memory``), so both frameworks
run with it; ``LDM_JAX_HUGE_PAGES=0`` measures without it. Run from the
repository root::

  python -m bench.train_bench [--config base|f4|sd15] [--batch 32] [--repeats 5] [--part peer|pixel|all] \
      [--batch-slices K] [--slice-execution auto|concurrent|in_program] [--peak-flops FLOP/s]

Prints a table per part and one JSON line.
"""

import argparse
import functools
import json
import os
import resource
import statistics
from typing import Any, Callable

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F

from bench.hardware import jaxpr_flops, peak_flops, utilization
from bench.hardware import load_average, machine
from bench.sample_bench import timed
from configs import base as base_config
from configs import sd15
from ldm_jax import host_memory
from ldm_jax.diffusion import schedule as sched
from ldm_jax.models.unet import UNet2DConditionModel
from ldm_jax.pipeline import init_inputs
from ldm_jax.training.cpu_step import SLICE_EXECUTION, on_streams, resolve_concurrent_slices, sum_trees
from ldm_jax.training.diffusion.step import in_slices, resolve_batch_slices, slice_of
from ldm_jax.training.train_state import make_optimizer

CONTEXT_LENGTH = 16  # configs/base.py's text length
CONFIGS = {
    "base": dict(image_size=64, unet=base_config.UNET),
    "f4": dict(image_size=64, unet=base_config.F4_UNET),
    "sd15": dict(image_size=512, unet=sd15.get_config().unet.to_dict()),
}
OPTIMIZER = dict(learning_rate=1e-4, weight_decay=0.01)


def _timesteps_and_noise(schedule: sched.NoiseSchedule, rng: jax.Array, x0: jax.Array) -> tuple[jax.Array, jax.Array]:
    t_rng, noise_rng = jax.random.split(rng)
    t = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_train_timesteps)
    return t, jax.random.normal(noise_rng, x0.shape, x0.dtype)


def _example_mse(unet: UNet2DConditionModel, schedule: sched.NoiseSchedule, params: Any, x0: jax.Array,
                 noise: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
    prediction = unet.apply({"params": params}, sched.add_noise(schedule, x0, noise, t), t, context)
    return jnp.mean(jnp.square(prediction - noise), axis=(1, 2, 3))


def make_jax_step(unet: UNet2DConditionModel, optimizer: optax.GradientTransformation,
                  batch_slices: int = 1) -> Callable:
    """The jitted step ``(params, opt_state, rng), x0, context -> new state, loss``, the U-Net on
    ``batch_slices`` slices of the batch in the one program (``diffusion_step.in_slices``); donates the state."""
    schedule = sched.NoiseSchedule.from_config(sd15.SD_SCHEDULER)

    def loss_fn(params, x0, context, rng):
        t, noise = _timesteps_and_noise(schedule, rng, x0)
        example_mse = functools.partial(_example_mse, unet, schedule, params)
        return jnp.mean(in_slices(example_mse, batch_slices, x0, noise, t, context))

    def step(state, x0, context):
        params, opt_state, rng = state
        rng, step_rng = jax.random.split(rng)
        loss, grads = jax.value_and_grad(loss_fn)(params, x0, context, step_rng)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, rng), loss

    return jax.jit(step, donate_argnums=0)


def make_concurrent_programs(unet: UNet2DConditionModel, optimizer: optax.GradientTransformation,
                             slices: int) -> tuple[Callable, Callable, Callable]:
    """`make_jax_step`'s step as the trainer runs slices on one CPU device
    (``ldm_jax.training.cpu_step``): jitted ``prepare(rng, x0, context) -> (rng, per-slice inputs)``,
    ``slice_grads(params, x0, noise, t, context) -> (loss share, gradient share)``, to be dispatched with
    ``on_streams``, and ``update(params, opt_state, shares) -> (params, opt_state, loss)`` (donating both)."""
    schedule = sched.NoiseSchedule.from_config(sd15.SD_SCHEDULER)

    def prepare(rng, x0, context):
        rng, step_rng = jax.random.split(rng)
        t, noise = _timesteps_and_noise(schedule, step_rng, x0)
        return rng, tuple(tuple(slice_of(a, slices, s) for a in (x0, noise, t, context)) for s in range(slices))

    def slice_grads(params, x0, noise, t, context):
        share = lambda p: jnp.sum(_example_mse(unet, schedule, p, x0, noise, t, context)) / (x0.shape[0] * slices)
        return jax.value_and_grad(share)(params)

    def update(params, opt_state, shares):
        grads = sum_trees([grad for _, grad in shares])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, sum(loss for loss, _ in shares)

    return jax.jit(prepare), jax.jit(slice_grads), jax.jit(update, donate_argnums=(0, 1))


def xla_costs(compiled) -> dict[str, float]:
    """FLOPs and memory of a compiled step, from XLA's cost and memory analyses.

    ``memory_bytes`` = argument + output - alias + temp sizes (the buffers
    live at the step's peak; aliased outputs reuse donated arguments).
    """
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list of one dict on older jax
    memory = compiled.memory_analysis()
    sizes = {field: getattr(memory, f"{field}_size_in_bytes", 0) for field in ("argument", "output", "alias", "temp")}
    total = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
    return dict(flops=cost["flops"], memory_bytes=total, **{f"{k}_bytes": v for k, v in sizes.items()})


def concurrent_costs(prepare: dict, slice_grads: dict, update: dict, slices: int) -> dict[str, float]:
    """`xla_costs` of a step of concurrent slice programs: the FLOPs of all its programs (``slices`` slice
    programs), and as ``memory_bytes`` the largest of its three phases, the slice programs' together (their
    arguments, the params, counted once)."""
    together = slice_grads["argument_bytes"] + slices * (slice_grads["memory_bytes"] - slice_grads["argument_bytes"])
    return dict(flops=prepare["flops"] + slices * slice_grads["flops"] + update["flops"],
                memory_bytes=max(prepare["memory_bytes"], together, update["memory_bytes"]))


def jax_runner(config: dict[str, Any], x0: np.ndarray, context: np.ndarray, batch_slices: int = 0,
               slice_execution: str = "auto") -> tuple[dict, Callable]:
    """Compile ldm_jax's step for ``config`` and these inputs, on ``resolve_batch_slices(batch_slices)`` slices,
    run as the trainer would under ``diffusion.slice_execution`` = ``slice_execution``.

    Returns (compile seconds, the slices, whether they run as concurrent programs, the model's FLOPs per step
    and XLA's costs of the compiled program(s), a blocking call that runs one step).
    """
    unet = UNet2DConditionModel.from_diffusers_config(config)
    params = jax.jit(unet.init)(jax.random.key(0), *init_inputs("unet", config))["params"]
    optimizer = make_optimizer(OPTIMIZER, 1000)
    state = [(params, optimizer.init(params), jax.random.key(1))]
    inputs = (jnp.asarray(x0), jnp.asarray(context))
    slices = resolve_batch_slices(batch_slices, x0.shape[0])
    concurrent = resolve_concurrent_slices(slice_execution, slices)
    traced = make_jax_step(unet, optimizer, slices).trace(state[0], *inputs)
    described = dict(batch_slices=slices, concurrent_slices=concurrent, model_flops=jaxpr_flops(traced.jaxpr))
    if not concurrent:
        compile_s, compiled = timed(traced.lower().compile)

        def call():
            state[0], loss = compiled(state[0], *inputs)
            return jax.block_until_ready(loss)

        return dict(compile_s=compile_s, **described, **xla_costs(compiled)), call

    prepare, slice_grads, update = make_concurrent_programs(unet, optimizer, slices)
    shapes = jax.eval_shape(prepare, state[0][2], *inputs)[1]
    shares = [jax.eval_shape(slice_grads, params, *shape) for shape in shapes]

    def compile_all():
        return (prepare.lower(state[0][2], *inputs).compile(), slice_grads.lower(params, *shapes[0]).compile(),
                update.lower(*state[0][:2], shares).compile())

    compile_s, (prepare, slice_grads, update) = timed(compile_all)

    def call():
        params, opt_state, rng = state[0]
        rng, sliced = prepare(rng, *inputs)
        shares = on_streams(slice_grads, [(params, *inputs) for inputs in sliced])
        params, opt_state, loss = update(params, opt_state, shares)
        state[0] = (params, opt_state, rng)
        return jax.block_until_ready(loss)

    costs = concurrent_costs(*(xla_costs(c) for c in (prepare, slice_grads, update)), slices)
    return dict(compile_s=compile_s, **described, **costs), call


def torch_runner(config: dict[str, Any], x0: np.ndarray, context: np.ndarray) -> Callable:
    """A blocking call running one diffusers train step (float32; the GPU if JAX runs on one, else CPU)."""
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=OPTIMIZER["learning_rate"],
                                  weight_decay=OPTIMIZER["weight_decay"])
    scheduler = diffusers.DDPMScheduler.from_config(sd15.SD_SCHEDULER)
    latents = torch.from_numpy(np.ascontiguousarray(x0.transpose(0, 3, 1, 2))).to(device)
    text = torch.from_numpy(context).to(device)

    def call():
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noise = torch.randn_like(latents)
        prediction = model(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=text).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # waits for the device

    return call


def measure(runners: dict[str, Callable], repeats: int) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """One warm-up call per runner, then ``repeats`` timed calls of each, alternating (ABAB...).

    Returns the seconds and the process's minor page faults of every timed call, by runner."""
    for call in runners.values():
        call()
    times = {name: [] for name in runners}
    faults = {name: [] for name in runners}
    for _ in range(repeats):
        for name, call in runners.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times[name].append(timed(call)[0])
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return times, faults


def inputs(batch: int, side: int, channels: int, context_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded clean inputs [B, side, side, channels] and a text context [B, 16, context_dim] (float32)."""
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((batch, side, side, channels)).astype(np.float32)
    return x0, rng.standard_normal((batch, CONTEXT_LENGTH, context_dim)).astype(np.float32)


def rate_text(flops: float, seconds: float, peak: float | None) -> str:
    """'X GFLOP/s' of ``flops`` in ``seconds``, with the MFU when ``peak`` is known."""
    rates = utilization(flops, seconds, peak)
    mfu = f", MFU {rates['mfu']:.3f}" if rates["mfu"] is not None else ""
    return f"{rates['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s{mfu}"


def peer_part(spec: dict[str, Any], batch: int, repeats: int, peak: float | None,
              batch_slices: int = 0, slice_execution: str = "auto") -> dict[str, Any]:
    """Part 1: ldm_jax vs diffusers on the same U-Net config; prints its table, returns its record.

    Both sides' FLOP rates use ldm_jax's model FLOP count (the same network and batch)."""
    config = spec["unet"]
    x0, context = inputs(batch, config["sample_size"], config["in_channels"], config["cross_attention_dim"])
    costs, ours = jax_runner(config, x0, context, batch_slices, slice_execution)
    times, faults = measure({"ldm_jax": ours, "diffusers": torch_runner(config, x0, context)}, repeats)
    steps = {name: statistics.median(values) for name, values in times.items()}
    step_faults = {name: statistics.median(values) for name, values in faults.items()}
    record = dict(latent_shape=list(x0.shape[1:]), ours_batch_slices=costs["batch_slices"],
                  ours_concurrent_slices=costs["concurrent_slices"],
                  ours_compile_s=costs["compile_s"], ours_flops=costs["flops"],
                  ours_step_s=steps["ldm_jax"], diffusers_step_s=steps["diffusers"],
                  ours_page_faults_per_step=step_faults["ldm_jax"],
                  diffusers_page_faults_per_step=step_faults["diffusers"],
                  ours_images_per_s=batch / steps["ldm_jax"], diffusers_images_per_s=batch / steps["diffusers"],
                  ours_over_diffusers_images_per_s=steps["diffusers"] / steps["ldm_jax"],
                  ours_times=times["ldm_jax"], diffusers_times=times["diffusers"], model_flops=costs["model_flops"])
    for name, key in (("ldm_jax", "ours"), ("diffusers", "diffusers")):
        rates = utilization(costs["model_flops"], steps[name], peak)
        record.update({f"{key}_achieved_flops_per_s": rates["achieved_flops_per_s"], f"{key}_mfu": rates["mfu"]})
    print(f"peer: U-Net train step on {batch}x{'x'.join(map(str, x0.shape[1:]))} latents "
          f"(ldm_jax: {slices_text(costs)}, compile {costs['compile_s']:.1f} s, "
          f"{costs['model_flops'] / 1e9:.1f} GFLOP per step)")
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
    """'k batch slice(s)', and how they run when there are several."""
    if costs["batch_slices"] == 1:
        return "1 batch slice"
    return f"{costs['batch_slices']} batch slices " + ("as concurrent programs" if costs["concurrent_slices"]
                                                      else "in one program")


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


def pixel_part(spec: dict[str, Any], batch: int, repeats: int, peak: float | None,
               batch_slices: int = 0, slice_execution: str = "auto") -> dict[str, Any]:
    """Part 2: ldm_jax's step on latents vs on pixels of the same images; prints its table, returns its record.

    A step whose XLA memory exceeds the machine's available memory is compiled
    (FLOPs, memory) but not run: its times are null.
    """
    size, latent = spec["image_size"], spec["unet"]
    configs = {"latent": latent, "pixel": dict(latent, in_channels=3, out_channels=3, sample_size=size)}
    costs, runners = {}, {}
    for name, config in configs.items():
        x0, context = inputs(batch, config["sample_size"], config["in_channels"], config["cross_attention_dim"])
        costs[name], runners[name] = jax_runner(config, x0, context, batch_slices, slice_execution)
        costs[name].update(step_s=None, images_per_s=None, times=None)
        if costs[name]["memory_bytes"] > available_memory():
            del runners[name]
    for name, values in measure(runners, repeats)[0].items():
        costs[name].update(step_s=statistics.median(values), images_per_s=batch / statistics.median(values),
                           times=values, **utilization(costs[name]["model_flops"], statistics.median(values), peak))
    ratios = {key: costs["pixel"][key] / costs["latent"][key] if costs["pixel"][key] and costs["latent"][key]
              else None
              for key in ("step_s", "flops", "memory_bytes")}
    print_pixel_table(configs, costs, ratios, batch, size, peak)
    return dict(image_size=size, latent=costs["latent"], pixel=costs["pixel"], pixel_over_latent=ratios)


def print_pixel_table(configs: dict[str, dict], costs: dict[str, dict], ratios: dict[str, float | None],
                      batch: int, size: int, peak: float | None) -> None:
    """Print part 2's table: one row per step (latent, pixel), then the ratios pixel / latent."""
    print(f"pixel: ldm_jax train step on {batch} {size}x{size} images as latents or pixels "
          f"(memory: XLA argument + output - alias + temp bytes; available {available_memory() / 2**30:.1f} GiB)")
    print(f"{'':14} {'step s':>8} {'images/s':>9} {'GFLOP':>8} {'memory MiB':>11} {'compile s':>10}  FLOP rate")
    for name, config in configs.items():
        c = costs[name]
        label = f"{name} {config['sample_size']}x{config['sample_size']}x{config['in_channels']}"
        timing = f"{c['step_s']:8.3f} {c['images_per_s']:9.2f}" if c["step_s"] else f"{'not run: memory':>18}"
        rate = rate_text(c["model_flops"], c["step_s"], peak) if c["step_s"] else "-"
        print(f"{label:14} {timing} {c['flops'] / 1e9:8.1f} {c['memory_bytes'] / 2**20:11.1f} "
              f"{c['compile_s']:10.1f}  {rate}")
    print("pixel / latent: " + ", ".join(f"{key} {value:.2f}x" if value else f"{key} -"
                                         for key, value in ratios.items()))


def rounded(value: Any) -> Any:
    """``value`` with floats to 4 significant digits, recursively through dicts and lists."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def main(argv=None) -> dict:
    """Run the chosen parts, print their tables and the JSON line; returns the JSON record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="base")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--part", choices=("peer", "pixel", "all"), default="all")
    parser.add_argument("--batch-slices", type=int, default=0,
                        help="slices of the batch ldm_jax's U-Net runs on (default 0: the trainer's automatic choice)")
    parser.add_argument("--slice-execution", choices=SLICE_EXECUTION, default="auto",
                        help="batch slices as concurrent programs or in one (default: the trainer's choice)")
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
    spec = CONFIGS[args.config]
    if args.part in ("peer", "all"):
        record["peer"] = peer_part(spec, args.batch, args.repeats, peak, args.batch_slices, args.slice_execution)
    if args.part in ("pixel", "all"):
        record["pixel"] = pixel_part(spec, args.batch, args.repeats, peak, args.batch_slices, args.slice_execution)
    record["loadavg_end"] = load_average()
    record = rounded(record)
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()  # as the trainer runs: both frameworks get it
    main()
