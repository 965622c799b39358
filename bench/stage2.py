"""The stage-2 train step as the benchmarks time it: the trainer's own, and diffusers' step doing the same work.

* `prepare`: ldm_jax's stage 2 built by ``ldm_jax.training.diffusion.state.build`` (the builder of the
  training loop and ``compile_check``) on a mesh of one device: task, optimizer, state, frozen text encoder and
  the train step (one jitted program, or with batch slices on one CPU device the concurrent slice programs of
  ``ldm_jax.training.cpu_step``), its random weights drawn on the host (`host_random_params`), a batch on the
  device, and the model FLOPs of the step (``bench/hardware.py``'s ``jaxpr_flops``).
* `diffusers_step`: the same step written with diffusers, transformers and torch, as diffusers'
  ``train_text_to_image.py`` trains on cached latents.
* `moments_batch`: the batch both take: cached posterior moments and token ids, as the latent cache holds them.

No torch and no JAX at import (as ``bench/hardware.py``): the workers of either framework use it.
"""

from typing import Any, Callable, Mapping

from bench.hardware import jaxpr_flops

# Stage-2 settings the diffusers step does not mirror, and the values it needs them at.
_UNMIRRORED = dict(min_snr_gamma=0.0, train_text_encoder=False)


def settings(section: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """A run config's ``diffusion`` section (default: the trainer's ``DIFFUSION_DEFAULTS``) with ``overrides``, its
    optimizer filled in from ``OPTIMIZER_DEFAULTS``: the ``settings`` that ``diffusion_state.build`` takes."""
    from ldm_jax.training.run_config import DIFFUSION_DEFAULTS
    from ldm_jax.training.train_state import OPTIMIZER_DEFAULTS

    section = section.to_dict() if hasattr(section, "to_dict") else dict(section or {})
    out = {**DIFFUSION_DEFAULTS, **section, **overrides}
    out["optimizer"] = {**OPTIMIZER_DEFAULTS, **out["optimizer"]}
    return out


def latent_shape(configs: Mapping[str, dict], image_size: int) -> tuple[int, int, int]:
    """(side, side, channels) of the VAE's latents of ``image_size`` images."""
    vae = configs["vae"]
    side = image_size // 2 ** (len(vae["block_out_channels"]) - 1)
    return side, side, vae.get("latent_channels", 4)


def token_batch(batch: int, length: int, vocab: int, seed: int):
    """Random token ids [batch, length] (int32): what the text encoder gets costs the same whatever they are."""
    import numpy as np
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def moments_batch(batch: int, shape: tuple[int, ...], text_config: Mapping[str, Any], logvar_mean: float = -4.0,
                  logvar_std: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """A host batch of cached moments as the trainer's loop feeds its step: 'mean' N(0, 1) and 'logvar'
    N(``logvar_mean``, ``logvar_std``) [batch, *shape] (NHWC, float32), 'input_ids' and 'empty_ids' (one row of
    ids repeated) [batch, length] (int32). A ``logvar_mean`` of -30 with ``logvar_std`` 0 makes the latent sample
    'mean' itself (``exp(-15)`` ~ 3e-7 of noise)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    length, vocab = text_config["max_position_embeddings"], text_config["vocab_size"]
    return {"mean": rng.standard_normal((batch, *shape)).astype(np.float32),
            "logvar": (logvar_mean + logvar_std * rng.standard_normal((batch, *shape))).astype(np.float32),
            "input_ids": token_batch(batch, length, vocab, seed + 1),
            "empty_ids": np.repeat(token_batch(1, length, vocab, seed + 2), batch, 0)}


# ------------------------------------------------------------------------------------------------------ ldm_jax

def host_random_params(module, inputs: tuple, seed: int) -> Any:
    """Random float32 params of ``module`` as numpy arrays: N(0, 1/fan_in) kernels, scales near 1, the rest
    small. Drawn on the host (seconds for SD 1.5's billion values): no init program to compile."""
    import flax.linen as nn
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        x = rng.standard_normal(leaf.shape, dtype=np.float32)
        name = path[-1].key
        if name == "kernel":
            return x / np.float32(np.sqrt(np.prod(leaf.shape[:-1])))
        return np.float32(name == "scale") + np.float32(0.02) * x

    abstract = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"])
    return jax.tree_util.tree_map_with_path(draw, abstract)


def prepare(configs: Mapping[str, dict], settings: Mapping[str, Any], batch: Mapping[str, Any], scale_factor: float,
            attention_impl: str = "auto", pretrained: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The trainer's stage 2 (``diffusion_state.build``) of ``configs`` ('unet', 'vae', 'text_encoder',
    'scheduler') under ``settings`` (`settings`) for steps of the host ``batch`` (`moments_batch`), on a mesh of
    this process's first device.

    Returns ``stage`` (the ``Stage2``: compile its step with ``stage.step.compile(*args)``), ``args`` (the
    state and frozen text encoder from ``pretrained`` {'unet', 'text_encoder'} params, default
    `host_random_params`, given to ``stage.init``; the batch on the device; the step's rng) and ``flops``:
    ``jaxpr_flops`` of ``train_step`` of the same stage built with plain-XLA attention and no remat (a fused
    attention kernel is opaque to the count, remat would add recomputation, batch slices change nothing).
    """
    import functools

    import jax

    from ldm_jax import parallel
    from ldm_jax.pipeline import init_inputs
    from ldm_jax.training.diffusion import state as diffusion_state
    from ldm_jax.training.diffusion.step import train_step

    mesh = parallel.make_mesh({}, jax.devices()[:1])
    build = functools.partial(diffusion_state.build, configs, mesh=mesh, global_batch=len(batch["input_ids"]),
                              scale_factor=scale_factor)
    stage = build(settings=settings, attention_impl=attention_impl)
    modules = {"unet": stage.task.unet, "text_encoder": stage.task.text_encoder}
    pretrained = pretrained or {name: host_random_params(module, init_inputs(name, configs[name]), seed)
                                for seed, (name, module) in enumerate(modules.items())}
    state, frozen = stage.init(jax.random.key(0), pretrained)
    args = (state, parallel.shard_batch(batch, mesh), frozen, jax.random.key(2))
    counted = build(settings={**settings, "remat_policy": "none", "batch_slices": 1}, attention_impl="xla")
    flops = jaxpr_flops(jax.make_jaxpr(functools.partial(train_step, counted.task, counted.optimizer))(*args))
    return dict(stage=stage, args=args, flops=flops)


def step_costs(step: Any) -> dict[str, float]:
    """XLA's costs of a compiled step (``stage.step.compile``): ``flops`` and the ``argument``, ``output``,
    ``alias`` and ``temp`` bytes summed over its programs and their calls (``compile_cost.step_cost``), and
    ``memory_bytes``, its buffers at peak: the largest of its programs' argument + output - alias + temp, with a
    program that runs k times a step (the slice programs, side by side) counted k times but for its arguments,
    which the k calls share."""
    from ldm_jax.training.compile_cost import program_cost, step_cost

    peaks = []
    for name, program in step.programs.items():
        cost, calls = program_cost(program), step.calls[name]
        peaks.append(cost["argument_bytes"] + calls * (cost["memory_bytes"] - cost["argument_bytes"]))
    return dict(step_cost(step), memory_bytes=max(peaks))


# ---------------------------------------------------------------------------------------------------- diffusers

def diffusers_models(configs: Mapping[str, dict], device: str, names: tuple[str, ...]) -> dict[str, Any]:
    """Seeded random diffusers / transformers models of ``configs`` ('unet', 'vae', 'text_encoder'), built on
    ``device``."""
    import diffusers
    import torch
    import transformers

    torch.manual_seed(0)
    build = {"unet": lambda: diffusers.UNet2DConditionModel(**configs["unet"]),
             "vae": lambda: diffusers.AutoencoderKL(**configs["vae"]),
             "text_encoder": lambda: transformers.CLIPTextModel(
                 transformers.CLIPTextConfig(**configs["text_encoder"]))}
    with torch.device(device):
        return {name: build[name]() for name in names}


def diffusers_step(configs: Mapping[str, dict], settings: Mapping[str, Any], batch: Mapping[str, Any],
                   scale_factor: float, device: str = "cpu", autocast=None, models: Mapping[str, Any] | None = None,
                   draws: Callable[[], dict] | None = None) -> Callable[[], Any]:
    """diffusers' equivalent of the trainer's step for the host ``batch`` (`moments_batch`), as
    ``train_text_to_image.py`` trains on cached latents, with the trainer's ``settings``: the 'unet' and
    'text_encoder' of ``models`` (default: `diffusers_models` of ``configs`` on ``device``) trained as below.

    A step: the latent sample ``(mean + exp(logvar / 2) * randn) * scale_factor``; each caption replaced by
    the empty prompt's ids with probability ``caption_dropout`` (on the device, as the trainer does); the frozen
    text encoder under ``no_grad``; timesteps uniform, or logit-normal as ``timestep_sampling`` says;
    ``DDPMScheduler.add_noise``; the U-Net forward (under ``torch.autocast`` to ``autocast``, the text encoder's
    weights in that dtype, when given) and backward on the MSE against the noise, ``get_velocity`` or the
    latents per the schedule's prediction type; ``clip_grad_norm_`` when the optimizer clips; ``AdamW`` with the
    optimizer's betas, eps and weight decay (fused on CUDA) at its peak learning rate (a schedule changes no
    work); ``EMAModel.step`` at ``ema_decay`` (``foreach``). ValueError for settings it does not mirror
    (min-SNR weighting, a trained text encoder, gradient accumulation).

    A step's random draws come from torch's generator, or from ``draws()`` when given: 'eps' (the latent
    sample's noise) and 'noise' (NCHW, like the latents), 'drop' (bool [B]: captions dropped) and 't' ([B]).

    Returns a call that dispatches one step and returns its loss (a tensor; not synchronized).
    """
    import diffusers
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import EMAModel

    unmirrored = {key: settings[key] for key, value in _UNMIRRORED.items() if settings[key] != value}
    if settings["optimizer"]["accumulate"] > 1:
        unmirrored["optimizer.accumulate"] = settings["optimizer"]["accumulate"]
    if unmirrored:
        raise ValueError(f"the diffusers step does not mirror the settings {unmirrored}")
    models = models or diffusers_models(configs, device, ("unet", "text_encoder"))
    unet = models["unet"].train()
    text_encoder = models["text_encoder"].to(autocast or torch.float32).eval().requires_grad_(False)
    params = list(unet.parameters())
    opt = settings["optimizer"]
    optimizer = torch.optim.AdamW(params, lr=opt["learning_rate"], betas=(opt["b1"], opt["b2"]), eps=opt["eps"],
                                  weight_decay=opt["weight_decay"], fused=device == "cuda")
    ema = EMAModel(params, decay=settings["ema_decay"], foreach=True) if settings["ema_decay"] > 0 else None
    scheduler = diffusers.DDPMScheduler.from_config(configs["scheduler"])
    steps = scheduler.config.num_train_timesteps
    mean, logvar = (torch.from_numpy(np.ascontiguousarray(batch[key].transpose(0, 3, 1, 2))).to(device)
                    for key in ("mean", "logvar"))
    ids, empty = (torch.from_numpy(batch[key]).long().to(device) for key in ("input_ids", "empty_ids"))
    size = mean.shape[0]

    def timesteps():
        if settings["timestep_sampling"] == "uniform":
            return torch.randint(0, steps, (size,), device=device)
        logits = settings["timestep_logit_mean"] + settings["timestep_logit_std"] * torch.randn(size, device=device)
        return torch.clamp(torch.floor(torch.sigmoid(logits) * steps).long(), max=steps - 1)

    def random_draws() -> dict:
        return dict(eps=torch.randn_like(mean), drop=torch.rand(size, device=device) < settings["caption_dropout"],
                    t=timesteps(), noise=torch.randn_like(mean))

    draws = draws or random_draws

    def target(latents, noise, t):
        kind = scheduler.config.prediction_type
        if kind == "v_prediction":
            return scheduler.get_velocity(latents, noise, t)
        return latents if kind == "sample" else noise

    def step():
        drawn = draws()
        latents = (mean + torch.exp(0.5 * logvar) * drawn["eps"]) * scale_factor
        with torch.no_grad():
            context = text_encoder(torch.where(drawn["drop"][:, None], empty, ids))[0]
        noise, t = drawn["noise"], drawn["t"]
        with torch.autocast(device_type=device, dtype=autocast, enabled=autocast is not None):
            prediction = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=context).sample
        loss = F.mse_loss(prediction.float(), target(latents, noise, t))
        loss.backward()
        if opt["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, opt["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        return loss

    return step
