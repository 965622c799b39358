"""The run config of ``python -m ldm_jax.train``: its sections, their defaults and validation.

Top-level keys::

    workdir        where checkpoints, the latent cache, metrics and samples go (``--workdir`` overrides)
    seed           seeds parameters, data order and per-step randomness
    stages         comma-separated, run in this order: 'autoencoder' (stage 1), 'latents' (the latent cache),
                   'diffusion' (stage 2, which builds the cache first when it is missing)
    image_size     side of the square training images (must equal data.image_size)
    attention_impl the attention kernel of every model in every stage (ldm_jax/models/attention.py): 'auto',
                   'xla', 'cudnn' (NVIDIA GPUs), 'einsum', 'pallas_tpu' (TPUs); not part of the model configs
    unet, vae, text_encoder, scheduler   diffusers / transformers config dicts of the models
    vae_from       the frozen VAE for the latent cache and stage 2: '' = this workdir's stage-1 checkpoint
                   (or init_from's VAE); else a stage-1 workdir, a diffusers folder or a single-file SD .safetensors
    init_from      fine-tune a pretrained pipeline (diffusers folder or single-file SD .safetensors): its
                   U-Net, text encoder, VAE, scale factor and tokenizer replace the config's models
    data           the data section (ldm_jax/data/config.py)
    mesh           the device mesh: axis sizes within and across slices, frozen models' layout, and
                   axis_rules, the (logical_name, mesh_axis_or_None) pairs that lay parameters out over the mesh
                   (default parallel.LOGICAL_AXIS_RULES; unknown mesh axes or a logical name listed twice are
                   errors) (ldm_jax/parallel.py)
    autoencoder    stage-1 training (AUTOENCODER_DEFAULTS below)
    latents        the latent cache (LATENTS_DEFAULTS below)
    diffusion      stage-2 training (DIFFUSION_DEFAULTS below)

``run_config(...)`` fills in defaults and locks the dict, so a misspelt key,
in a config file or on the command line, is an error.
"""

from typing import Any, Mapping

import ml_collections

from ldm_jax.data.config import data_config
from ldm_jax.models.attention import check_attention_impl
from ldm_jax.models.layers import REMAT_POLICIES
from ldm_jax.parallel import AXES, MESH_DEFAULTS, check_mesh_config, mesh_shape
from ldm_jax.training.diffusion.step import TIMESTEP_SAMPLING
from ldm_jax.training.nonfinite import POLICIES
from ldm_jax.training.train_state import OPTIMIZER_DEFAULTS, check_state_layout

STAGES = ("autoencoder", "latents", "diffusion")

# Stage 1, as LDM's kl-f* autoencoders: Adam(0.5, 0.9) for both nets, KL 1e-6, GAN from disc_start.
AUTOENCODER_DEFAULTS = dict(
    steps=1000,
    optimizer=dict(OPTIMIZER_DEFAULTS, learning_rate=4.5e-6, b1=0.5, b2=0.9),
    disc_optimizer=dict(OPTIMIZER_DEFAULTS, learning_rate=4.5e-6, b1=0.5, b2=0.9),
    kl_weight=1e-6,
    perceptual_weight=1.0,
    lpips="",               # folder with vgg16.safetensors + lpips_vgg_heads.safetensors; '' = no perceptual loss
    disc_weight=0.5,
    disc_factor=1.0,
    disc_start=50001,
    disc_channels=64,
    disc_layers=3,
    disc_norm="batch",
    sample_posterior=True,
    log_every=50,
    eval_every=500,          # 0: only at the end
    eval_examples=512,
    checkpoint_every=500,
    keep=3,
    nan_policy="stop",       # a NaN/Inf loss or gradient: 'stop' (with an error naming the step) or 'skip' the update
)

# The latent cache: posterior moments (mean, logvar) per example, with token ids and captions.
LATENTS_DEFAULTS = dict(
    dir="",                  # '' = WORKDIR/latents
    splits="train",          # comma-separated splits to encode
    batch_size=0,            # 0 = data.batch_size
    shard_size=4096,         # examples per shard file
)

# Stage 2. Image size and tokenizer come from ``data``.
DIFFUSION_DEFAULTS = dict(
    steps=1000,
    batch_size=0,            # 0 = data.batch_size
    optimizer=dict(OPTIMIZER_DEFAULTS, learning_rate=1e-4, weight_decay=0.01, grad_clip=1.0, warmup_steps=100),
    caption_dropout=0.1,     # fraction of captions replaced by the empty prompt (for classifier-free guidance)
    min_snr_gamma=0.0,       # 0: plain MSE; e.g. 5.0: min-SNR-gamma weighting
    timestep_sampling="uniform",  # or 'logit_normal': t = T * sigmoid(N(timestep_logit_mean, timestep_logit_std))
    timestep_logit_mean=0.0,
    timestep_logit_std=1.0,
    train_text_encoder=False,  # True: train it jointly (LDM); False: frozen (Stable Diffusion)
    ema_decay=0.9999,        # 0: no EMA
    ema_warmup=True,         # decay min(ema_decay, (1 + step) / (10 + step))
    dtype="float32",         # compute dtype ('bfloat16' on accelerators); params, optimizer state and EMA stay float32
    batch_slices=0,          # k > 1: the U-Net's passes over k slices of the batch as concurrent programs, on one CPU
                             # device only; 0 = auto (2 on a single CPU device, else 1; ldm_jax/training/cpu_step.py)
    remat_policy="none",     # U-Net activation rematerialization: none, full, dots_saveable,
                             # dots_with_no_batch_dims_saveable (ldm_jax/models/layers.py)
    state_layout="auto",     # memory layouts of params, optimizer state and EMA: 'auto' (XLA's pick for the step;
                             # on GPUs cuDNN's conv kernel layout) or 'default' (ldm_jax/training/diffusion/state.py)
    nan_policy="stop",       # a NaN/Inf loss or gradient: 'stop' (with an error naming the step) or 'skip' the update
    log_every=50,
    checkpoint_every=500,
    keep=3,
    sample_every=500,        # 0: only at the end; -1: never
    sample_prompts=("",),    # ('',) = the first 8 test-split captions for the built-in data
    sample_steps=25,
    sample_sampler="ddim",
    guidance_scale=4.0,
)

TOP_LEVEL = ("workdir", "seed", "stages", "image_size", "attention_impl", "unet", "vae", "text_encoder", "scheduler",
             "vae_from", "init_from", "data", "mesh", "autoencoder", "latents", "diffusion")

# The run configs in configs/ (the get_config variants that return run_config(...)); configs/tiny.py, sd15.py and
# sd21.py without ':run' are model configs, configs/data_example.py a data section.
RUN_CONFIGS = ("configs/base.py", "configs/base.py:quick", "configs/base.py:f4", "configs/tiny.py:run",
               "configs/vae.py", "configs/vae.py:quick")


def _section(name: str, defaults: Mapping[str, Any], values: Mapping[str, Any] | None) -> ml_collections.ConfigDict:
    values = dict(values or {})
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise KeyError(f"unknown {name} config key(s) {unknown}; known keys: {sorted(defaults)}")
    section = ml_collections.ConfigDict({**defaults})
    for key, value in values.items():
        if isinstance(defaults[key], dict):
            section[key] = _section(f"{name}.{key}", defaults[key], value)
        elif isinstance(defaults[key], tuple):
            section[key] = tuple(value)
        else:
            section[key] = value
    return section


def run_config(*, unet: Mapping, vae: Mapping, text_encoder: Mapping, scheduler: Mapping, data: Mapping,
               workdir: str, stages: str = "autoencoder,latents,diffusion", seed: int = 0,
               image_size: int | None = None, attention_impl: str = "auto", vae_from: str = "", init_from: str = "",
               mesh: Mapping | None = None,
               autoencoder: Mapping | None = None, latents: Mapping | None = None,
               diffusion: Mapping | None = None) -> ml_collections.ConfigDict:
    """A locked, validated run config; every section not given gets its defaults."""
    config = ml_collections.ConfigDict()
    config.workdir = workdir
    config.seed = seed
    config.stages = stages
    config.unet, config.vae, config.text_encoder, config.scheduler = (dict(unet), dict(vae), dict(text_encoder),
                                                                      dict(scheduler))
    config.data = data_config(data)
    config.image_size = image_size or config.data.image_size
    config.attention_impl = attention_impl
    config.vae_from = vae_from
    config.init_from = init_from
    config.mesh = _section("mesh", MESH_DEFAULTS, mesh)
    config.autoencoder = _section("autoencoder", AUTOENCODER_DEFAULTS, autoencoder)
    config.latents = _section("latents", LATENTS_DEFAULTS, latents)
    config.diffusion = _section("diffusion", DIFFUSION_DEFAULTS, diffusion)
    validate(config)
    config.lock()
    return config


def stages(config: Mapping[str, Any]) -> list[str]:
    """The stages to run, in order; ValueError naming an unknown one."""
    names = [s.strip() for s in config["stages"].split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown} in stages={config['stages']!r}; stages are {list(STAGES)}")
    return sorted(names, key=STAGES.index)


def validate(config: Mapping[str, Any]) -> None:
    """Check what can be checked before building anything; errors name the keys and values involved.

    Raises ValueError for a config that is not a run config (a model config
    such as configs/tiny.py without ':run': the message lists `RUN_CONFIGS`),
    KeyError for unknown keys, ValueError for values that cannot work
    together (image size vs the VAE's factor, latent channels, text widths,
    token lengths, dtypes, step counts, policies). Checks against the devices
    are `check_devices`'s; checks of ``init_from`` / ``vae_from`` paths are
    ``ldm_jax.training.sources.check_sources``'.
    """
    missing = [key for key in TOP_LEVEL if key not in config]
    if missing:
        models = {"unet", "vae", "text_encoder"} <= set(config) and "stages" in missing
        what = (f"a model config (keys {', '.join(sorted(config))}; no 'stages')" if models else
                f"not a run config (no {', '.join(map(repr, missing))})")
        raise ValueError(f"this is {what}; training takes a run config (built by "
                         f"ldm_jax.training.run_config.run_config): {', '.join(RUN_CONFIGS)}")
    unknown = sorted(set(config) - set(TOP_LEVEL))
    if unknown:
        raise KeyError(f"unknown config key(s) {unknown}; known keys: {sorted(TOP_LEVEL)}")
    stages(config)
    check_mesh_config(config["mesh"])
    if config["image_size"] != config["data"]["image_size"]:
        raise ValueError(f"image_size {config['image_size']} differs from data.image_size "
                         f"{config['data']['image_size']}")
    factor = 2 ** (len(config["vae"]["block_out_channels"]) - 1)
    if config["image_size"] % factor:
        raise ValueError(f"image_size {config['image_size']} is not divisible by the VAE's downsampling factor "
                         f"{factor} (vae.block_out_channels has {len(config['vae']['block_out_channels'])} entries)")
    latent = config["vae"].get("latent_channels", 4)
    for key in ("in_channels", "out_channels"):
        if config["unet"].get(key, 4) != latent:
            raise ValueError(f"unet.{key} {config['unet'].get(key, 4)} differs from vae.latent_channels {latent}")
    positions = config["text_encoder"]["max_position_embeddings"]
    if config["data"]["max_length"] > positions:
        raise ValueError(f"data.max_length {config['data']['max_length']} exceeds the text encoder's "
                         f"text_encoder.max_position_embeddings {positions}")
    if config["diffusion"]["dtype"] not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"diffusion.dtype must be float32, bfloat16 or float16, got {config['diffusion']['dtype']!r}")
    check_attention_impl(config["attention_impl"])
    check_state_layout(config["diffusion"]["state_layout"])
    if config["diffusion"]["remat_policy"] not in REMAT_POLICIES:
        raise ValueError(f"diffusion.remat_policy must be one of {list(REMAT_POLICIES)}, got "
                         f"{config['diffusion']['remat_policy']!r}")
    width = config["text_encoder"]["hidden_size"]
    if config["unet"]["cross_attention_dim"] != width:
        raise ValueError(f"unet.cross_attention_dim {config['unet']['cross_attention_dim']} differs from the text "
                         f"encoder's width text_encoder.hidden_size {width}")
    for section in ("autoencoder", "diffusion"):
        for key in ("steps", "log_every", "checkpoint_every", "keep"):
            if config[section][key] < 1:
                raise ValueError(f"{section}.{key} must be at least 1, got {config[section][key]}")
        if config[section]["nan_policy"] not in POLICIES:
            raise ValueError(f"{section}.nan_policy must be one of {POLICIES}, got "
                             f"{config[section]['nan_policy']!r}")
    d = config["diffusion"]
    if d["timestep_sampling"] not in TIMESTEP_SAMPLING:
        raise ValueError(f"diffusion.timestep_sampling must be one of {list(TIMESTEP_SAMPLING)}, got "
                         f"{d['timestep_sampling']!r}")
    if d["batch_slices"] < 0:
        raise ValueError(f"diffusion.batch_slices must be 0 (auto) or positive, got {d['batch_slices']}")
    if not d["timestep_logit_std"] > 0:
        raise ValueError(f"diffusion.timestep_logit_std must be positive, got {d['timestep_logit_std']}")
    if ("diffusion" in stages(config) and d["sample_every"] >= 0 and list(d["sample_prompts"]) == [""]
            and config["data"]["source"] != "shapes"):
        raise ValueError(f"diffusion.sample_prompts must name the sample grid's prompts for data.source "
                         f"{config['data']['source']!r} (only the built-in shapes data has default ones), or set "
                         "diffusion.sample_every=-1 for no grids")


def diffusion_batch(config: Mapping[str, Any]) -> tuple[str, int]:
    """Stage 2's global batch size and the key that sets it: ``diffusion.batch_size``, or ``data.batch_size``
    where that is 0."""
    size = config["diffusion"]["batch_size"]
    return ("diffusion.batch_size", size) if size else ("data.batch_size", config["data"]["batch_size"])


def batch_sizes(config: Mapping[str, Any]) -> dict[str, int]:
    """The global batch size of each batched job the config's stages run, by the key that sets it."""
    data = config["data"]["batch_size"]
    names = stages(config)
    sizes = {}
    if "autoencoder" in names:
        sizes["data.batch_size"] = data
    if "latents" in names or "diffusion" in names:  # stage 2 builds a missing cache first
        sizes["latents.batch_size" if config["latents"]["batch_size"] else "data.batch_size"] = (
            config["latents"]["batch_size"] or data)
    if "diffusion" in names:
        key, size = diffusion_batch(config)
        sizes[key] = size
    return sizes


def check_devices(config: Mapping[str, Any], device_count: int, process_count: int = 1) -> None:
    """ValueError naming the key, the batch size and the mesh when a batch does not split over the devices.

    Runs before anything is compiled: ``mesh`` must tile ``device_count``
    devices, and every batch size must divide by the data-parallel size
    (mesh data x fsdp) and by the number of processes; ``diffusion.batch_slices`` > 1 needs one device and
    must divide stage 2's batch.
    """
    shape = dict(zip(AXES, mesh_shape(dict(config["mesh"]), device_count)))
    parallel_size = shape["data"] * shape["fsdp"]
    for key, size in batch_sizes(config).items():
        if size % parallel_size:
            raise ValueError(f"{key} {size} is not divisible by the data-parallel size {parallel_size} (mesh "
                             f"{shape} over {device_count} devices: data x fsdp)")
        if size % process_count:
            raise ValueError(f"{key} {size} is not divisible by the {process_count} processes")
    slices = config["diffusion"]["batch_slices"]
    if "diffusion" in stages(config) and slices > 1:
        key, size = diffusion_batch(config)
        if device_count > 1:
            raise ValueError(f"diffusion.batch_slices {slices} runs the slices as concurrent programs on one CPU "
                             f"device; this run has {device_count} devices (set it to 0 or 1)")
        if size % slices:
            raise ValueError(f"diffusion.batch_slices {slices} does not divide {key} {size}")
