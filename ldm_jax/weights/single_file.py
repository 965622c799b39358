"""Original single-file Stable Diffusion checkpoints (CompVis / Stability layout) without torch.

An original SD 1.x / 2.x checkpoint holds the whole ``LatentDiffusion`` module
in one state dict; the three models live under fixed prefixes:

* ``model.diffusion_model.*`` -- the U-Net (``time_embed``, ``input_blocks``,
  ``middle_block``, ``output_blocks``, ``out``);
* ``first_stage_model.*`` -- the VAE (``encoder.down.N.block.M``,
  ``encoder.mid.block_1/attn_1/block_2``, ``decoder.up.N`` in reverse order,
  attention q/k/v/proj_out as 1x1 convs, ``nin_shortcut``, ``quant_conv``);
* ``cond_stage_model.*`` -- the text encoder: SD 1.x ships transformers' CLIP
  under ``cond_stage_model.transformer.text_model.*``; SD 2.x ships OpenCLIP
  under ``cond_stage_model.model.*`` (``token_embedding``,
  ``positional_embedding``, ``transformer.resblocks.N`` with a packed
  ``attn.in_proj_weight``, ``ln_final``, ``text_projection``).

This module renames those to the diffusers / transformers names that our Flax
models use (``ldm_jax.weights.convert``) and back. Both directions come from one
table of module prefixes (built from the architecture), so
``split_original(join_original(x)) == x`` holds by construction and every key
that fits no entry is reported instead of silently dropped.

Text encoder conventions. The text-encoder state dict uses transformers'
``CLIPTextModel`` names *with* the ``text_model.`` prefix (as in diffusers
``text_encoder/`` folders and ``ldm_jax.models.clip``); :func:`join_original`
also accepts them without it (transformers >= 5.6 ``state_dict()``). SD 2.x
conditions on the *penultimate* OpenCLIP layer, so, like diffusers, the last
OpenCLIP resblock is dropped: a 24-block OpenCLIP file gives a 23-layer
``CLIPTextModel`` with ``hidden_act='gelu'``, and the final LayerNorm is
applied to layer 23's output. :func:`join_original` writes the inverse: the
N layers, then an all-zero resblock N (an exact identity block for a
pre-LayerNorm residual block, so an OpenCLIP model run to the end computes the
same thing), an identity ``text_projection`` and OpenCLIP's initial
``logit_scale`` -- placeholders, since ``CLIPTextModel`` carries neither.

Keys that are read but not converted (documented in IGNORED_* below):
schedule buffers of ``LatentDiffusion`` (``betas``, ``alphas_cumprod`` ...;
``betas`` / ``alphas_cumprod`` are used to infer the scheduler config), the
EMA copy of the U-Net ``model_ema.*`` (used instead of the trained weights
with ``extract_ema=True``), the VAE's training loss ``first_stage_model.loss.*``
(LPIPS / discriminator), CLIP's ``position_ids`` buffer, OpenCLIP's
``logit_scale``, ``text_projection`` and ``attn_mask`` and its last resblock.

Nothing here imports torch. ``.ckpt`` (pickle) files are refused: convert
them to ``.safetensors`` first (the error message says how).
"""

import math
import re
from collections import Counter
from typing import Any, Mapping

import numpy as np
from etils import epath

from ldm_jax.weights import diffusers_folder
from ldm_jax.models.vae import DEFAULT_SCALING_FACTOR

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
HF_CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
TEXT_MODEL = "text_model."  # transformers' CLIPTextModel submodule prefix in our text-encoder state dicts

COMPONENTS = ("unet", "vae", "text_encoder")
COMPONENT_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIX}
COMPONENT_NAMES = {"unet": "U-Net", "vae": "VAE", "text_encoder": "text encoder"}

# Top-level buffers of ldm's LatentDiffusion / DDPM: the noise schedule and derived terms.
IGNORED_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "scale_factor",
})
# Key prefixes that are not weights of our three models.
IGNORED_PREFIXES = (
    EMA_PREFIX,                       # EMA copy of the U-Net (LitEma: dots removed from the names)
    VAE_PREFIX + "loss.",             # autoencoder training loss (LPIPS, discriminator)
)
# Keys inside the text-encoder prefixes that are not CLIPTextModel weights.
IGNORED_TEXT_KEYS = frozenset({
    HF_CLIP_PREFIX + "text_model.embeddings.position_ids",
    HF_CLIP_PREFIX + "embeddings.position_ids",
    OPEN_CLIP_PREFIX + "logit_scale",
    OPEN_CLIP_PREFIX + "text_projection",
    OPEN_CLIP_PREFIX + "attn_mask",
})

SD_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}
OPEN_CLIP_LOGIT_SCALE = math.log(1 / 0.07)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class SingleFileError(ValueError):
    """A file or state dict is not an original Stable Diffusion checkpoint we can convert."""


# --------------------------------------------------------------------------------------------------
# Rename tables
# --------------------------------------------------------------------------------------------------
# A module entry is (original prefix, diffusers prefix, sub-table). The sub-table renames the first
# part of the rest of the key (None: the rest is kept as is). A sub-table row is
# (original, diffusers, is_1x1_conv): is_1x1_conv weights are [C, C, 1, 1] originally, [C, C] in diffusers.

UNET_RESNET = (
    ("in_layers.0.", "norm1.", False),
    ("in_layers.2.", "conv1.", False),
    ("emb_layers.1.", "time_emb_proj.", False),
    ("out_layers.0.", "norm2.", False),
    ("out_layers.3.", "conv2.", False),
    ("skip_connection.", "conv_shortcut.", False),
)
VAE_RESNET = (
    ("norm1.", "norm1.", False),
    ("conv1.", "conv1.", False),
    ("norm2.", "norm2.", False),
    ("conv2.", "conv2.", False),
    ("nin_shortcut.", "conv_shortcut.", False),
)
VAE_ATTENTION = (
    ("norm.", "group_norm.", False),
    ("q.", "to_q.", True),
    ("k.", "to_k.", True),
    ("v.", "to_v.", True),
    ("proj_out.", "to_out.0.", True),
)


def _unet_modules(levels: int, layers: int, down_attention: list[bool], up_attention: list[bool]) -> list:
    """Module entries of an LDM UNetModel with ``levels`` resolutions and ``layers`` resnets per level."""
    modules = [
        ("time_embed.0.", "time_embedding.linear_1.", None),
        ("time_embed.2.", "time_embedding.linear_2.", None),
        ("input_blocks.0.0.", "conv_in.", None),
        ("out.0.", "conv_norm_out.", None),
        ("out.2.", "conv_out.", None),
        ("middle_block.0.", "mid_block.resnets.0.", UNET_RESNET),
        ("middle_block.1.", "mid_block.attentions.0.", None),
        ("middle_block.2.", "mid_block.resnets.1.", UNET_RESNET),
    ]
    block = 1
    for level in range(levels):
        for j in range(layers):
            modules.append((f"input_blocks.{block}.0.", f"down_blocks.{level}.resnets.{j}.", UNET_RESNET))
            if down_attention[level]:
                modules.append((f"input_blocks.{block}.1.", f"down_blocks.{level}.attentions.{j}.", None))
            block += 1
        if level < levels - 1:
            modules.append((f"input_blocks.{block}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.", None))
            block += 1
    block = 0
    for level in range(levels):
        for j in range(layers + 1):
            modules.append((f"output_blocks.{block}.0.", f"up_blocks.{level}.resnets.{j}.", UNET_RESNET))
            slot = 1
            if up_attention[level]:
                modules.append((f"output_blocks.{block}.1.", f"up_blocks.{level}.attentions.{j}.", None))
                slot = 2
            if j == layers and level < levels - 1:
                modules.append((f"output_blocks.{block}.{slot}.conv.", f"up_blocks.{level}.upsamplers.0.conv.",
                                None))
            block += 1
    return modules


def _vae_modules(levels: int, layers: int, mid_attention: bool = True) -> list:
    """Module entries of an LDM AutoencoderKL (encoder/decoder with ``levels`` resolutions)."""
    modules = [("quant_conv.", "quant_conv.", None), ("post_quant_conv.", "post_quant_conv.", None)]
    for part in ("encoder", "decoder"):
        modules += [
            (f"{part}.conv_in.", f"{part}.conv_in.", None),
            (f"{part}.conv_out.", f"{part}.conv_out.", None),
            (f"{part}.norm_out.", f"{part}.conv_norm_out.", None),
            (f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", VAE_RESNET),
            (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", VAE_RESNET),
        ]
        if mid_attention:
            modules.append((f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", VAE_ATTENTION))
    for level in range(levels):
        for j in range(layers):
            modules.append((f"encoder.down.{level}.block.{j}.", f"encoder.down_blocks.{level}.resnets.{j}.",
                            VAE_RESNET))
        if level < levels - 1:
            modules.append((f"encoder.down.{level}.downsample.conv.",
                            f"encoder.down_blocks.{level}.downsamplers.0.conv.", None))
    for up in range(levels):  # diffusers counts decoder blocks from the lowest resolution, ldm from the highest
        level = levels - 1 - up
        for j in range(layers + 1):
            modules.append((f"decoder.up.{level}.block.{j}.", f"decoder.up_blocks.{up}.resnets.{j}.", VAE_RESNET))
        if level > 0:
            modules.append((f"decoder.up.{level}.upsample.conv.", f"decoder.up_blocks.{up}.upsamplers.0.conv.",
                            None))
    return modules


def _longest_prefix(key: str, table: Mapping[str, Any]) -> str | None:
    """The longest ``a.b.`` prefix of ``key`` (ending at a dot) that is a key of ``table``."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n]) + "."
        if prefix in table:
            return prefix
    return None


def _rename(state: Mapping[str, np.ndarray], modules: list, *, to_diffusers: bool, what: str) -> dict:
    """Rename every key of ``state`` with the module ``modules`` table, in either direction."""
    table = {}
    for original, diffusers, sub in modules:
        src, dst = (original, diffusers) if to_diffusers else (diffusers, original)
        sub_table = None if sub is None else {
            (a if to_diffusers else b): ((b if to_diffusers else a), conv1x1) for a, b, conv1x1 in sub}
        table[src] = (dst, sub_table)
    out, unmapped = {}, []
    for key, value in state.items():
        prefix = _longest_prefix(key, table)
        if prefix is None:
            unmapped.append(key)
            continue
        dst, sub_table = table[prefix]
        rest, conv1x1 = key[len(prefix):], False
        if sub_table is not None:
            sub = _longest_prefix(rest, sub_table)
            if sub is None:
                unmapped.append(key)
                continue
            new, conv1x1 = sub_table[sub]
            rest = new + rest[len(sub):]
        value = np.asarray(value)
        if conv1x1 and rest.endswith("weight"):
            if to_diffusers:
                if value.ndim == 2:
                    pass  # already stored as a linear weight by some converters
                elif value.ndim != 4 or value.shape[2:] != (1, 1):
                    raise SingleFileError(f"{what}: {key} should be a 1x1 conv weight, has shape {value.shape}")
                value = value.reshape(value.shape[:2])
            else:
                if value.ndim != 2:
                    raise SingleFileError(f"{what}: {key} should be a linear weight, has shape {value.shape}")
                value = value.reshape(value.shape + (1, 1))
        out[dst + rest] = value
    if unmapped:
        raise SingleFileError(f"{what}: {len(unmapped)} key(s) do not fit the architecture read from the "
                              f"checkpoint: {', '.join(sorted(unmapped)[:20])}")
    return out


# --------------------------------------------------------------------------------------------------
# Architecture from tensor shapes
# --------------------------------------------------------------------------------------------------

def _indices(state: Mapping[str, Any], prefix: str) -> list[int]:
    """Sorted distinct integers N of keys ``prefix + 'N.'...``."""
    found = set()
    for key in state:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _unet_structure(unet: Mapping[str, Any]) -> dict:
    """Levels, resnets per level and attention placement of an LDM UNetModel state (prefix removed)."""
    inputs = _indices(unet, "input_blocks.")
    if not inputs or inputs != list(range(len(inputs))):
        raise SingleFileError(f"U-Net: input_blocks are missing or not numbered 0..N (found {inputs})")
    downs = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in unet]
    layers = downs[0] - 1 if downs else len(inputs) - 1
    levels = len(downs) + 1
    expected_downs = [1 + level * (layers + 1) + layers for level in range(levels - 1)]
    if layers < 1 or downs != expected_downs or len(inputs) != 1 + levels * layers + levels - 1:
        raise SingleFileError(f"U-Net: input_blocks 0..{len(inputs) - 1} with downsamplers at {downs} do not "
                              "form a Stable Diffusion U-Net (equal resnets per level, one downsampler between)")
    outputs = _indices(unet, "output_blocks.")
    if outputs != list(range(levels * (layers + 1))):
        raise SingleFileError(f"U-Net: expected output_blocks 0..{levels * (layers + 1) - 1} for {levels} levels of "
                              f"{layers} resnets, found {outputs[:1]}..{outputs[-1:]} ({len(outputs)} blocks)")
    if "middle_block.1.proj_in.weight" not in unet:
        raise SingleFileError("U-Net: middle_block.1 is not a spatial transformer; only Stable Diffusion's "
                              "cross-attention middle block (UNetMidBlock2DCrossAttn) is supported")
    first = [1 + level * (layers + 1) for level in range(levels)]
    return {
        "levels": levels,
        "layers": layers,
        "first_input": first,
        "down_attention": [f"input_blocks.{i}.1.proj_in.weight" in unet for i in first],
        "up_attention": [f"output_blocks.{level * (layers + 1)}.1.proj_in.weight" in unet
                         for level in range(levels)],
    }


def _vae_structure(vae: Mapping[str, Any]) -> dict:
    levels = len(_indices(vae, "encoder.down."))
    layers = len(_indices(vae, "encoder.down.0.block."))
    up_levels = len(_indices(vae, "decoder.up."))
    if levels == 0 or layers == 0 or up_levels != levels:
        raise SingleFileError(f"VAE: expected encoder.down.N.block.M and as many decoder.up.N levels, found "
                              f"{levels} encoder levels ({layers} blocks in the first), {up_levels} decoder levels")
    return {"levels": levels, "layers": layers, "mid_attention": "encoder.mid.attn_1.q.weight" in vae}


def _shape(state: Mapping[str, Any], key: str, what: str) -> tuple[int, ...]:
    if key not in state:
        raise SingleFileError(f"{what}: missing tensor {key}")
    return tuple(np.shape(state[key]))


def _heads_rule_error(what: str, detail: str, option: str) -> SingleFileError:
    return SingleFileError(f"{what}: the head count cannot be read from tensor shapes and Stable Diffusion's rule "
                           f"does not apply ({detail}); pass overrides={{...: {{'{option}': ...}}}}")


def _infer_unet(unet: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    what = "U-Net"
    s = _unet_structure(unet)
    layers = s["layers"]
    conv_in = _shape(unet, "input_blocks.0.0.weight", what)
    conv_out = _shape(unet, "out.2.weight", what)
    block_out = [_shape(unet, f"input_blocks.{i}.0.out_layers.3.weight", what)[0] for i in s["first_input"]]
    depths, cross_dims, linear = [], set(), set()
    for i, attention in zip(s["first_input"], s["down_attention"]):
        if attention:
            depths.append(len(_indices(unet, f"input_blocks.{i}.1.transformer_blocks.")))
            cross_dims.add(_shape(unet, f"input_blocks.{i}.1.transformer_blocks.0.attn2.to_k.weight", what)[1])
            linear.add(len(_shape(unet, f"input_blocks.{i}.1.proj_in.weight", what)) == 2)
        else:
            depths.append(None)
    cross_dims.add(_shape(unet, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", what)[1])
    linear.add(len(_shape(unet, "middle_block.1.proj_in.weight", what)) == 2)
    if len(cross_dims) != 1 or len(linear) != 1:
        raise SingleFileError(f"{what}: attention blocks disagree on cross_attention_dim {sorted(cross_dims)} or "
                              "on proj_in being linear / 1x1 conv")
    cross_attention_dim, = cross_dims
    attn_depths = {d for d in depths if d is not None}
    if len(attn_depths) <= 1:
        transformer_layers = attn_depths.pop() if attn_depths else 1
    else:
        transformer_layers = [d if d is not None else 1 for d in depths]
    time_dim = _shape(unet, "time_embed.0.weight", what)[0]
    config = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,
        "in_channels": conv_in[1],
        "out_channels": conv_out[0],
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in s["down_attention"]],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in s["up_attention"]],
        "only_cross_attention": False,
        "block_out_channels": block_out,
        "layers_per_block": layers,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": cross_attention_dim,
        "transformer_layers_per_block": transformer_layers,
        "use_linear_projection": linear.pop(),
        "upcast_attention": False,
        "dual_cross_attention": False,
        "conv_in_kernel": conv_in[2],
        "conv_out_kernel": conv_out[2],
        "time_embedding_dim": None if time_dim == 4 * block_out[0] else time_dim,
    }
    if "attention_head_dim" not in overrides:
        # diffusers' "attention_head_dim" of SD checkpoints: 8 (a head *count*) for SD 1.x's 768-dim
        # context; SD 2.x (1024-dim OpenCLIP context) uses 64-dim heads, i.e. channels // 64 heads per level.
        if cross_attention_dim == 768:
            config["attention_head_dim"] = 8
        elif all(c % 64 == 0 for c in block_out):
            config["attention_head_dim"] = [c // 64 for c in block_out]
        else:
            raise _heads_rule_error(what, f"cross_attention_dim {cross_attention_dim}, block_out_channels "
                                          f"{block_out} not multiples of 64", "attention_head_dim")
    return config


def _infer_vae(vae: Mapping[str, Any]) -> dict:
    what = "VAE"
    s = _vae_structure(vae)
    block_out = [_shape(vae, f"encoder.down.{level}.block.0.conv2.weight", what)[0] for level in range(s["levels"])]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": _shape(vae, "encoder.conv_in.weight", what)[1],
        "out_channels": _shape(vae, "decoder.conv_out.weight", what)[0],
        "down_block_types": ["DownEncoderBlock2D"] * s["levels"],
        "up_block_types": ["UpDecoderBlock2D"] * s["levels"],
        "block_out_channels": block_out,
        "layers_per_block": s["layers"],
        "act_fn": "silu",
        "latent_channels": _shape(vae, "decoder.conv_in.weight", what)[1],
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": DEFAULT_SCALING_FACTOR,
        "force_upcast": True,
        "use_quant_conv": "quant_conv.weight" in vae,
        "use_post_quant_conv": "post_quant_conv.weight" in vae,
        "mid_block_add_attention": s["mid_attention"],
    }


def _infer_text_encoder(state: Mapping[str, Any], layout: str, overrides: Mapping[str, Any]) -> dict:
    """CLIPTextConfig dict of the original text encoder (``layout`` 'clip' or 'open_clip')."""
    what = "text encoder"
    if layout == "open_clip":
        p = OPEN_CLIP_PREFIX
        vocab, hidden = _shape(state, p + "token_embedding.weight", what)
        positions = _shape(state, p + "positional_embedding", what)[0]
        intermediate = _shape(state, p + "transformer.resblocks.0.mlp.c_fc.weight", what)[0]
        layers = len(_indices(state, p + "transformer.resblocks.")) - 1  # the last block is dropped
        projection = (_shape(state, p + "text_projection", what)[1] if p + "text_projection" in state else hidden)
    else:
        p = HF_CLIP_PREFIX + (TEXT_MODEL if any(k.startswith(HF_CLIP_PREFIX + TEXT_MODEL) for k in state) else "")
        vocab, hidden = _shape(state, p + "embeddings.token_embedding.weight", what)
        positions = _shape(state, p + "embeddings.position_embedding.weight", what)[0]
        intermediate = _shape(state, p + "encoder.layers.0.mlp.fc1.weight", what)[0]
        layers = len(_indices(state, p + "encoder.layers."))
        projection = hidden
    config = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "projection_dim": projection,
        "num_hidden_layers": layers,
        "max_position_embeddings": positions,
        "hidden_act": "gelu" if layout == "open_clip" else "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        # SD 1.x / 2.x text-encoder configs keep CLIP's legacy ids (eos 2: pool at argmax(input_ids)).
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
    if "num_attention_heads" not in overrides:
        if hidden % 64:
            raise _heads_rule_error(what, f"hidden size {hidden} is not a multiple of 64 (CLIP's head size)",
                                    "num_attention_heads")
        config["num_attention_heads"] = hidden // 64
    return config


def _betas(config: Mapping[str, Any]) -> np.ndarray:
    """The betas of a diffusers scheduler config (scaled_linear, linear or trained_betas)."""
    n = int(config["num_train_timesteps"])
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], np.float64)
    schedule = config.get("beta_schedule", "linear")
    if schedule == "scaled_linear":
        return np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n, dtype=np.float64) ** 2
    if schedule == "linear":
        return np.linspace(config["beta_start"], config["beta_end"], n, dtype=np.float64)
    raise SingleFileError(f"scheduler: cannot write beta_schedule {schedule!r} into an original checkpoint")


def _infer_scheduler(state: Mapping[str, Any]) -> dict:
    """SD's schedule; ``betas`` / ``alphas_cumprod`` buffers, when present, are checked against it."""
    config = dict(SD_SCHEDULER)
    if "betas" in state:
        betas = np.asarray(state["betas"], np.float64)
    elif "alphas_cumprod" in state:
        alphas_cumprod = np.asarray(state["alphas_cumprod"], np.float64)
        betas = 1 - alphas_cumprod / np.concatenate([[1.0], alphas_cumprod[:-1]])
    else:
        return config
    config["num_train_timesteps"] = int(betas.shape[0])
    tolerance = dict(rtol=5e-3, atol=1e-6)  # schedule buffers may be stored in float16 or bfloat16
    if np.allclose(betas, _betas(config), **tolerance):
        return config
    linear = {**config, "beta_schedule": "linear", "beta_start": float(betas[0]), "beta_end": float(betas[-1])}
    if np.allclose(betas, _betas(linear), **tolerance):
        return linear
    return {**config, "trained_betas": betas.tolist()}


# --------------------------------------------------------------------------------------------------
# Layout detection and errors
# --------------------------------------------------------------------------------------------------

def _prefix_summary(keys) -> str:
    counts = Counter(k.split(".", 1)[0] + ("." if "." in k else "") for k in keys)
    return ", ".join(f"{p!r} ({n} keys)" for p, n in counts.most_common(12)) or "nothing (empty state dict)"


def _layout_hint(keys) -> str:
    keys = list(keys)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return (" This looks like an SDXL / SGM checkpoint (conditioner.embedders.*), which is not supported.")
    if any(k.startswith(("down_blocks.", "up_blocks.", "mid_block.", "encoder.down_blocks.")) for k in keys):
        return (" This looks like a diffusers-layout state dict of one model: load its folder with "
                "ldm_jax.pipeline / ldm_jax.weights.convert instead.")
    if any(k.startswith(("lora_", "lora.")) or ".lora_" in k for k in keys):
        return " This looks like a LoRA, not a full checkpoint."
    return ""


def _text_layout(state: Mapping[str, Any]) -> str | None:
    if OPEN_CLIP_PREFIX + "token_embedding.weight" in state:
        return "open_clip"
    if any(k.startswith(HF_CLIP_PREFIX) for k in state):
        return "clip"
    return None


def _check_layout(state: Mapping[str, Any]) -> None:
    present = {name: any(k.startswith(p) for k in state) for name, p in COMPONENT_PREFIXES.items()}
    expected = ", ".join(f"'{p}*' ({COMPONENT_NAMES[n]})" for n, p in COMPONENT_PREFIXES.items())
    if not any(present.values()):
        raise SingleFileError(f"unknown checkpoint layout: an original Stable Diffusion checkpoint has keys under "
                              f"{expected}; found top-level prefixes {_prefix_summary(state)}.{_layout_hint(state)}")
    missing = [n for n, p in present.items() if not p]
    if missing:
        raise SingleFileError(
            "incomplete Stable Diffusion checkpoint: no " + " and no ".join(
                f"{COMPONENT_NAMES[n]} weights ('{COMPONENT_PREFIXES[n]}*')" for n in missing)
            + f"; found top-level prefixes {_prefix_summary(state)}")
    if _text_layout(state) is None:
        found = sorted({".".join(k.split(".")[:2]) + "." for k in state if k.startswith(TEXT_PREFIX)})
        raise SingleFileError(f"unknown text-encoder layout: expected '{HF_CLIP_PREFIX}text_model.*' (CLIP, SD 1.x) "
                              f"or '{OPEN_CLIP_PREFIX}*' (OpenCLIP, SD 2.x); found {found}")


def _component(state: Mapping[str, Any], prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _ema_key(unet_key: str) -> str:
    """LitEma's buffer name for ``model.diffusion_model.<unet_key>`` (dots dropped)."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def _is_ignored(key: str) -> bool:
    return key in IGNORED_BUFFERS or key.startswith(IGNORED_PREFIXES) or key in IGNORED_TEXT_KEYS


# --------------------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------------------

_OPEN_CLIP_LAYER = (  # OpenCLIP resblock -> CLIPEncoderLayer (besides the packed in_proj)
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
)
_OPEN_CLIP_TOP = {
    "token_embedding.weight": TEXT_MODEL + "embeddings.token_embedding.weight",
    "positional_embedding": TEXT_MODEL + "embeddings.position_embedding.weight",
    "ln_final.weight": TEXT_MODEL + "final_layer_norm.weight",
    "ln_final.bias": TEXT_MODEL + "final_layer_norm.bias",
}


def _split_hf_clip(state: Mapping[str, Any]) -> dict:
    out = {}
    for key, value in _component(state, HF_CLIP_PREFIX).items():
        if HF_CLIP_PREFIX + key in IGNORED_TEXT_KEYS:
            continue
        out[key if key.startswith(TEXT_MODEL) else TEXT_MODEL + key] = np.asarray(value)
    return out


def _split_open_clip(state: Mapping[str, Any]) -> dict:
    what = "OpenCLIP text encoder"
    clip = _component(state, OPEN_CLIP_PREFIX)
    blocks = _indices(clip, "transformer.resblocks.")
    if len(blocks) < 2 or blocks != list(range(len(blocks))):
        raise SingleFileError(f"{what}: expected transformer.resblocks.0..N (N >= 1), found {blocks}")
    last = len(blocks) - 1  # dropped: SD 2.x conditions on the penultimate layer
    width = _shape(clip, "token_embedding.weight", what)[1]
    out, unknown = {}, []
    layer_table = dict(_OPEN_CLIP_LAYER)
    for key, value in clip.items():
        if OPEN_CLIP_PREFIX + key in IGNORED_TEXT_KEYS:
            continue
        if key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = np.asarray(value)
            continue
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
        if m is None:
            unknown.append(key)
            continue
        block, rest = int(m.group(1)), m.group(2)
        if block == last:
            continue
        layer = f"{TEXT_MODEL}encoder.layers.{block}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            value = np.asarray(value)
            if value.shape[0] != 3 * width:
                raise SingleFileError(f"{what}: {key} has shape {value.shape}, expected leading dim 3 x {width}")
            leaf = "weight" if rest.endswith("weight") else "bias"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
                out[f"{layer}self_attn.{name}.{leaf}"] = part
            continue
        sub = _longest_prefix(rest, layer_table)
        if sub is None:
            unknown.append(key)
            continue
        out[layer + layer_table[sub] + rest[len(sub):]] = np.asarray(value)
    if unknown:
        raise SingleFileError(f"{what}: {len(unknown)} unknown key(s): "
                              + ", ".join(OPEN_CLIP_PREFIX + k for k in sorted(unknown)[:20]))
    return out


def _join_hf_clip(text: Mapping[str, np.ndarray]) -> dict:
    return {HF_CLIP_PREFIX + k: v for k, v in text.items()}


def _join_open_clip(text: Mapping[str, np.ndarray]) -> dict:
    what = "text encoder (OpenCLIP layout)"
    inverse_top = {v: k for k, v in _OPEN_CLIP_TOP.items()}
    inverse_layer = {b: a for a, b in _OPEN_CLIP_LAYER}
    out, unknown, qkv = {}, [], {}
    for key, value in text.items():
        if key in inverse_top:
            out[OPEN_CLIP_PREFIX + inverse_top[key]] = value
            continue
        m = re.fullmatch(re.escape(TEXT_MODEL) + r"encoder\.layers\.(\d+)\.(.+)", key)
        if m is None:
            unknown.append(key)
            continue
        block, rest = int(m.group(1)), m.group(2)
        resblock = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{block}."
        qm = re.fullmatch(r"self_attn\.(q|k|v)_proj\.(weight|bias)", rest)
        if qm is not None:
            qkv.setdefault((block, qm.group(2)), {})[qm.group(1)] = value
            continue
        sub = _longest_prefix(rest, inverse_layer)
        if sub is None:
            unknown.append(key)
            continue
        out[resblock + inverse_layer[sub] + rest[len(sub):]] = value
    if unknown:
        raise SingleFileError(f"{what}: {len(unknown)} key(s) with no OpenCLIP name: {', '.join(sorted(unknown)[:20])}")
    for (block, leaf), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise SingleFileError(f"{what}: layer {block} has only {sorted(parts)} of q/k/v_proj.{leaf}")
        out[f"{OPEN_CLIP_PREFIX}transformer.resblocks.{block}.attn.in_proj_{leaf}"] = np.concatenate(
            [parts["q"], parts["k"], parts["v"]], axis=0)
    layers = _indices(text, TEXT_MODEL + "encoder.layers.")
    if not layers:
        raise SingleFileError(f"{what}: no encoder layers")
    # The dropped last OpenCLIP block, written as zeros: LayerNorm(·)*0 + 0 feeds zero attention / MLP
    # outputs into the residual stream, so the block is the identity.
    template = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layers[-1]}."
    padding = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{len(layers)}."
    for key in [k for k in out if k.startswith(template)]:
        out[padding + key[len(template):]] = np.zeros_like(out[key])
    width = np.shape(text[TEXT_MODEL + "embeddings.token_embedding.weight"])[1]
    dtype = np.asarray(text[TEXT_MODEL + "embeddings.token_embedding.weight"]).dtype
    out[OPEN_CLIP_PREFIX + "text_projection"] = np.eye(width, dtype=dtype)
    out[OPEN_CLIP_PREFIX + "logit_scale"] = np.asarray(OPEN_CLIP_LOGIT_SCALE, dtype=dtype)
    return out


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------

def split_original(state: Mapping[str, np.ndarray], *, extract_ema: bool = False, strict: bool = True
                   ) -> dict[str, dict[str, np.ndarray]]:
    """Split an original SD checkpoint into ``{'unet', 'vae', 'text_encoder'}`` diffusers-named state dicts.

    The text encoder comes out in transformers' ``CLIPTextModel`` naming with
    the ``text_model.`` prefix; an OpenCLIP (SD 2.x) encoder loses its last
    block (see the module docstring). ``extract_ema`` takes the U-Net weights
    from the ``model_ema.*`` copy instead. With ``strict`` (the default) keys
    that belong to no model and are not known buffers raise SingleFileError.
    Arrays keep their dtype.
    """
    _check_layout(state)
    layout = _text_layout(state)
    known_prefixes = (UNET_PREFIX, VAE_PREFIX, OPEN_CLIP_PREFIX if layout == "open_clip" else HF_CLIP_PREFIX)
    stray = sorted(k for k in state if not k.startswith(known_prefixes) and not _is_ignored(k))
    if stray and strict:
        raise SingleFileError(f"{len(stray)} key(s) outside the U-Net / VAE / text-encoder prefixes that are not known "
                              f"buffers: {', '.join(stray[:20])} (pass strict=False to ignore them)")
    unet = _component(state, UNET_PREFIX)
    if extract_ema:
        missing = [k for k in unet if _ema_key(k) not in state]
        if missing:
            raise SingleFileError(f"extract_ema: no EMA copy ({EMA_PREFIX}*) of {len(missing)} U-Net weight(s), "
                                  f"e.g. {UNET_PREFIX}{missing[0]} (expected key {_ema_key(missing[0])})")
        unet = {k: state[_ema_key(k)] for k in unet}
    s = _unet_structure(unet)
    unet = _rename(unet, _unet_modules(s["levels"], s["layers"], s["down_attention"], s["up_attention"]),
                   to_diffusers=True, what="U-Net")
    vae_state = {k: v for k, v in _component(state, VAE_PREFIX).items() if not k.startswith("loss.")}
    v = _vae_structure(vae_state)
    vae = _rename(vae_state, _vae_modules(v["levels"], v["layers"], v["mid_attention"]), to_diffusers=True,
                  what="VAE")
    text = _split_open_clip(state) if layout == "open_clip" else _split_hf_clip(state)
    return {"unet": unet, "vae": vae, "text_encoder": text}


def join_original(unet: Mapping[str, np.ndarray], vae: Mapping[str, np.ndarray],
                  text_encoder: Mapping[str, np.ndarray], configs: Mapping[str, Mapping[str, Any]], *,
                  text_encoder_layout: str | None = None) -> dict[str, np.ndarray]:
    """The original single-file state dict of diffusers-named ``unet``, ``vae`` and ``text_encoder`` states.

    ``configs`` holds the diffusers / transformers config dicts ('unet',
    'vae', 'text_encoder'; optionally 'scheduler', whose betas are then
    written as the ``betas`` / ``alphas_cumprod`` buffers). The text encoder
    is written in OpenCLIP layout (SD 2.x) when its ``hidden_act`` is 'gelu'
    and in CLIP layout (SD 1.x) otherwise, unless ``text_encoder_layout`` is
    'open_clip' or 'clip'. Text-encoder keys may come with or without the
    ``text_model.`` prefix. Every key must fit the architecture, or
    SingleFileError lists those that do not. Arrays are passed through
    (possibly as views; :func:`save_single_file` makes them contiguous).
    """
    u = configs["unet"]
    levels = len(u["block_out_channels"])
    layers = u.get("layers_per_block", 2)
    if not isinstance(layers, int):
        if len(set(layers)) != 1:
            raise SingleFileError(f"U-Net: per-level layers_per_block {layers} has no original layout")
        layers = layers[0]
    down_attention = [t.startswith("CrossAttn") for t in u["down_block_types"]]
    up_attention = [t.startswith("CrossAttn") for t in u["up_block_types"]]
    out = {UNET_PREFIX + k: v for k, v in _rename(
        unet, _unet_modules(levels, layers, down_attention, up_attention), to_diffusers=False, what="U-Net").items()}
    vc = configs["vae"]
    vae_modules = _vae_modules(len(vc["block_out_channels"]), vc.get("layers_per_block", 1),
                               vc.get("mid_block_add_attention", True))
    out.update({VAE_PREFIX + k: v for k, v in _rename(vae, vae_modules, to_diffusers=False, what="VAE").items()})

    layout = text_encoder_layout or ("open_clip" if configs["text_encoder"].get("hidden_act") == "gelu" else "clip")
    if layout not in ("clip", "open_clip"):
        raise ValueError(f"text_encoder_layout must be 'clip' or 'open_clip', not {layout!r}")
    text = {(k if k.startswith(TEXT_MODEL) else TEXT_MODEL + k): v for k, v in text_encoder.items()
            if not k.endswith("position_ids")}
    out.update(_join_open_clip(text) if layout == "open_clip" else _join_hf_clip(text))

    if configs.get("scheduler"):
        betas = _betas({**SD_SCHEDULER, **configs["scheduler"]})
        out["betas"] = betas.astype(np.float32)
        out["alphas_cumprod"] = np.cumprod(1 - betas).astype(np.float32)
    return out


def infer_configs(state: Mapping[str, Any], overrides: Mapping[str, Mapping[str, Any]] | None = None
                  ) -> dict[str, dict]:
    """Configs ``{'unet', 'vae', 'text_encoder', 'scheduler'}`` of an original SD checkpoint, read from shapes.

    Read from shapes: channels, block_out_channels, layers_per_block, which
    blocks have attention, transformer depth, cross_attention_dim,
    use_linear_projection (2-D proj_in), conv kernels; the VAE's channels,
    levels and latent channels; CLIP's width, depth, MLP size, vocabulary and
    positions, and its activation (quick_gelu for CLIP / SD 1.x, gelu for
    OpenCLIP / SD 2.x). Not in the shapes, hence Stable Diffusion's values
    unless ``overrides`` (a dict per component, merged last) says otherwise:
    U-Net head count (cross_attention_dim 768: ``attention_head_dim=8`` heads;
    otherwise 64-dim heads, ``channels // 64`` per level), CLIP heads
    (width // 64), ``norm_num_groups`` 32, sample sizes (64 latent / 512 px),
    ``scaling_factor`` 0.18215 and the scheduler (scaled_linear
    0.00085-0.012 over 1000 steps, or what the ``betas`` buffer holds;
    ``prediction_type`` 'epsilon' -- SD 2.x 768-v checkpoints need
    ``overrides={'scheduler': {'prediction_type': 'v_prediction'}}``).

    Works on anything with ``.shape`` (it reads no values except the schedule buffers).
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(COMPONENTS) - {"scheduler"})
    if unknown:
        raise ValueError(f"overrides for unknown component(s) {unknown}; expected some of "
                         f"{list(COMPONENTS) + ['scheduler']}")
    _check_layout(state)
    configs = {
        "unet": _infer_unet(_component(state, UNET_PREFIX), overrides.get("unet", {})),
        "vae": _infer_vae(_component(state, VAE_PREFIX)),
        "text_encoder": _infer_text_encoder(state, _text_layout(state), overrides.get("text_encoder", {})),
        "scheduler": _infer_scheduler(state),
    }
    for name, update in overrides.items():
        configs[name].update(update)
    return configs


def _looks_like_safetensors(path: str) -> bool:
    """A safetensors file: u64 little-endian header size N that fits the file, then a JSON object."""
    size = epath.Path(path).stat().length
    with epath.Path(path).open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    return int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{"


def _reject_pickle(path: str) -> None:
    with epath.Path(path).open("rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive ('PK\x03\x04'); older torch / plain pickle files start with opcode 0x80.
    pickle_magic = magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"
    if path.lower().endswith(PICKLE_SUFFIXES) or (pickle_magic and not _looks_like_safetensors(path)):
        raise SingleFileError(
            f"{path} is a PyTorch pickle checkpoint (.ckpt/.pt/.bin); ldm_jax does not import torch and never "
            "unpickles files. Convert it to safetensors once, where torch is installed:\n"
            "  python -c \"import sys, torch, safetensors.torch as st; sd = torch.load(sys.argv[1], "
            "map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); st.save_file({k: v.contiguous() "
            "for k, v in sd.items() if isinstance(v, torch.Tensor)}, sys.argv[2])\" model.ckpt model.safetensors\n"
            "(if weights_only=True is refused, the file pickles other objects: drop it only for a file you trust)")


def load_single_file(path: str, *, overrides: Mapping[str, Mapping[str, Any]] | None = None,
                     extract_ema: bool = False, strict: bool = True) -> tuple[dict[str, dict], dict[str, dict]]:
    """Read an original SD ``.safetensors`` file: ``(configs, {'unet', 'vae', 'text_encoder'} state dicts)``.

    ``configs`` is :func:`infer_configs` (with ``overrides``); the state dicts
    are :func:`split_original` (diffusers / transformers names, the file's
    dtypes). Pickle checkpoints (``.ckpt`` ...) raise SingleFileError with a
    conversion recipe; other layouts raise SingleFileError naming the prefixes found.
    """
    if not epath.Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    _reject_pickle(path)
    try:
        state = diffusers_folder.read_safetensors(path)
    except SingleFileError:
        raise
    except Exception as e:
        raise SingleFileError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        configs = infer_configs(state, overrides)
        states = split_original(state, extract_ema=extract_ema, strict=strict)
    except SingleFileError as e:
        raise SingleFileError(f"{path}: {e}") from e
    return configs, states


def save_single_file(path: str, unet: Mapping[str, np.ndarray], vae: Mapping[str, np.ndarray],
                     text_encoder: Mapping[str, np.ndarray], configs: Mapping[str, Mapping[str, Any]], *,
                     text_encoder_layout: str | None = None, metadata: Mapping[str, str] | None = None) -> None:
    """Write :func:`join_original` as one ``.safetensors`` file (``format: pt`` metadata, like SD releases)."""
    state = join_original(unet, vae, text_encoder, configs, text_encoder_layout=text_encoder_layout)
    diffusers_folder.write_state_dict(path, state, metadata)
