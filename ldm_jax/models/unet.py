"""The conditional U-Net of Stable Diffusion (diffusers' ``UNet2DConditionModel``) in Flax.

Module names equal diffusers' parameter paths (``down_blocks_0/attentions_1/
transformer_blocks_0/attn2/to_k``), so a diffusers state dict loads with
``ldm_jax.weights.convert.state_dict_to_params`` and no renaming table. Arrays are NHWC.

Config fields keep diffusers' names and meanings, including its historical
misnomer: ``attention_head_dim`` is the NUMBER of attention heads per level
(8 for SD 1.x, (5, 10, 20, 20) for SD 2.x, i.e. 64-dim heads in SD 2.x).
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.attention import attention, check_attention_impl
from ldm_jax.models.layers import (Attention, Downsample2D, Dtype, ResnetBlock2D, Upsample2D, as_tuple,
                                   check_remat_policy, conv, dense, gelu, group_norm, layer_norm, remat)

CROSS_ATTN_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_ATTN_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
MID_BLOCK = "UNetMidBlock2DCrossAttn"

# Options of diffusers' UNet2DConditionModel that we do not implement: the values we accept
# (diffusers' defaults, or equivalents). Any other value raises ValueError naming the option.
_FIXED_OPTIONS = {
    "act_fn": ("silu", "swish"),
    "mid_block_type": (MID_BLOCK,),
    # Read only by diffusers' UNetMidBlock2DSimpleCrossAttn; its UNetMidBlock2DCrossAttn (ours) ignores it.
    "mid_block_only_cross_attention": (None, False, True),
    "dual_cross_attention": (False,),
    "num_attention_heads": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "projection_class_embeddings_input_dim": (None,),
    "addition_time_embed_dim": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "mid_block_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}
# The values of ``addition_embed_type`` we implement: none, or a pooled-text embedding added to the time embedding.
ADDITION_EMBED_TYPES = (None, "text")
# How the resnets take the time embedding: added before their second GroupNorm, or as a scale and shift after it.
RESNET_TIME_SCALE_SHIFTS = ("default", "scale_shift")
# Fields of ours that are no diffusers options: how the network computes, not what it is. Never in config.json.
RUNTIME_FIELDS = ("dtype", "param_dtype", "attention_impl", "remat_policy")
# Config fields of ours that are lists of values in the JSON config.
_TUPLE_FIELDS = ("down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
                 "attention_head_dim", "transformer_layers_per_block", "only_cross_attention")


def _constrain(x: jax.Array) -> jax.Array:
    """Logical sharding constraint of an NHWC activation (a no-op without axis rules)."""
    return nn.with_logical_constraint(x, ("batch", "height", "width", "channels"))


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [B, dim] (float32) of timesteps [B], as diffusers' ``get_timestep_embedding``.

    Frequencies are ``max_period ** (-i / (dim // 2 - freq_shift))``; the output
    is ``[sin, cos]``, or ``[cos, sin]`` with ``flip_sin_to_cos``, zero-padded to
    an odd ``dim``.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
    """Two-layer MLP (``linear_1``, SiLU, ``linear_2``) on the sinusoidal timestep embedding."""
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.silu(dense(self.features, "linear_1", **kw)(x))
        return dense(self.features, "linear_2", ("mlp", "embed"), **kw)(x)


class AttentionPooling(nn.Module):
    """Pools [B, L, D] to [B, D]: a query token (mean over L + a learned offset) attends over itself and the tokens.

    No output projection; ``positional_embedding`` [1, D] is the learned offset.
    """
    heads: int
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        offset = self.param("positional_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(width ** -0.5), (None, "embed")), (1, width), self.param_dtype)
        query = jnp.mean(x, axis=1, keepdims=True) + offset.astype(x.dtype)
        tokens = jnp.concatenate([query, x], axis=1)
        q = dense(width, "q_proj", ("embed", "heads"), **kw)(query)
        k = dense(width, "k_proj", ("embed", "heads"), **kw)(tokens)
        v = dense(width, "v_proj", ("embed", "heads"), **kw)(tokens)
        return attention(q, k, v, self.heads, impl=self.attention_impl)[:, 0]


class TextTimeEmbedding(nn.Module):
    """diffusers' ``addition_embed_type='text'``: the text context pooled into one vector of the time-embedding width.

    LayerNorm, attention pooling, a projection, LayerNorm. Added to the time
    embedding, it conditions every ResNet block on the whole prompt, besides
    the cross-attention layers.
    """
    features: int
    heads: int
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layer_norm(1e-5, "norm1", **kw)(context)
        x = AttentionPooling(self.heads, self.attention_impl, name="pool", **kw)(x)
        x = dense(self.features, "proj", **kw)(x)
        return layer_norm(1e-5, "norm2", **kw)(x)


class GEGLU(nn.Module):
    """``proj`` to twice ``features``, then value * GELU(gate) (exact GELU).

    ``proj`` is one [C, 2 * features] kernel and bias, as in diffusers, but
    applied as two matmuls on its halves: the backward pass then never
    concatenates the two activation-sized output gradients (only the kernel's
    halves). Those concatenations took 3.4 ms of SD 1.5's 128.5 ms train step
    on an H200 (docs/experiments.md).
    """
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = SplitDense(self.features, 2, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return value * gelu(gate)


class SplitDense(nn.Module):
    """A dense layer to ``parts * features`` outputs (kernel [C, parts * features], logical axes
    ('embed', 'mlp')), returned as ``parts`` arrays of ``features``, one matmul on each slice of the kernel."""
    features: int
    parts: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        width = self.parts * self.features
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
                            (x.shape[-1], width), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)),
                          (width,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        cuts = [(i * self.features, (i + 1) * self.features) for i in range(self.parts)]
        return tuple(jnp.dot(x, kernel[:, a:b]) + bias[a:b] for a, b in cuts)


class FeedForward(nn.Module):
    """diffusers' ``FeedForward`` with GEGLU: ``net_0`` (GEGLU to 4x width), ``net_2`` (back)."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(4 * x.shape[-1], name="net_0", **kw)(x)
        return dense(x.shape[-1], "net_2", ("mlp", "embed"), **kw)(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention to the context, GEGLU feed-forward.

    ``only_cross_attention`` makes the first attention a cross-attention to
    the context as well (diffusers' option of that name): no attention over
    the H*W tokens, whose cost grows with their square.
    """
    heads: int
    head_dim: int
    upcast_attention: bool = False
    attention_impl: str = "auto"
    only_cross_attention: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(heads=self.heads, head_dim=self.head_dim, out_features=x.shape[-1], upcast=self.upcast_attention,
                    attention_impl=self.attention_impl, **kw)
        first_context = context if self.only_cross_attention else None
        x = x + Attention(name="attn1", **attn)(layer_norm(1e-5, "norm1", **kw)(x), first_context)
        x = x + Attention(name="attn2", **attn)(layer_norm(1e-5, "norm2", **kw)(x), context)
        return x + FeedForward(name="ff", **kw)(layer_norm(1e-5, "norm3", **kw)(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, ``proj_in``, transformer blocks over the H*W tokens, ``proj_out``.

    The projections are 1x1 convs (SD 1.x) or dense layers (SD 2.x,
    ``use_linear_projection``); the block's input is added back at the end.
    """
    heads: int
    head_dim: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_impl: str = "auto"
    only_cross_attention: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, channels = x.shape
        inner = self.heads * self.head_dim
        h = group_norm(self.groups, 1e-6, "norm", **kw)(x)
        if self.use_linear_projection:
            h = dense(inner, "proj_in", **kw)(h.reshape(b, height * width, channels))
        else:
            h = conv(inner, 1, "proj_in", **kw)(h).reshape(b, height * width, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.heads, self.head_dim, self.upcast_attention, self.attention_impl,
                                      self.only_cross_attention, name=f"transformer_blocks_{i}", **kw)(h, context)
        if self.use_linear_projection:
            h = dense(channels, "proj_out", ("mlp", "embed"), **kw)(h).reshape(b, height, width, channels)
        else:
            h = conv(channels, 1, "proj_out", **kw)(h.reshape(b, height, width, inner))
        return x + h


class _UNetBlock(nn.Module):
    """Settings shared by the down, mid and up blocks; ``heads == 0`` means no transformers.

    ``remat_policy`` rematerializes each resnet and each transformer (``layers.remat``).
    """
    out_channels: int
    num_layers: int
    heads: int = 0
    transformer_layers: int = 1
    groups: int = 32
    epsilon: float = 1e-5
    dropout: float = 0.0
    time_scale_shift: bool = False
    use_linear_projection: bool = False
    upcast_attention: bool = False
    only_cross_attention: bool = False
    attention_impl: str = "auto"
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def resnet(self, i: int, x: jax.Array, temb: jax.Array, deterministic: bool) -> jax.Array:
        """Apply ``resnets_<i>``."""
        block = remat(ResnetBlock2D, self.remat_policy, static_argnums=(3,))  # deterministic is static
        return block(self.out_channels, self.groups, self.epsilon, self.dropout, self.time_scale_shift,
                     dtype=self.dtype, param_dtype=self.param_dtype, name=f"resnets_{i}")(x, temb, deterministic)

    def transformer(self, i: int, x: jax.Array, context: jax.Array) -> jax.Array:
        """Apply ``attentions_<i>`` if the block has transformers, else return ``x``."""
        if not self.heads:
            return x
        return remat(Transformer2DModel, self.remat_policy)(
            self.heads, self.out_channels // self.heads, self.transformer_layers, self.groups,
            self.use_linear_projection, self.upcast_attention, self.attention_impl, self.only_cross_attention,
            dtype=self.dtype, param_dtype=self.param_dtype, name=f"attentions_{i}")(x, context)


class DownBlock(_UNetBlock):
    """``CrossAttnDownBlock2D`` (``heads > 0``) or ``DownBlock2D``: resnets (+ transformers), then a stride-2 conv.

    Returns the output and the skip activations (one per resnet, plus the downsampled one).
    """
    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array,
                 deterministic: bool = True) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for i in range(self.num_layers):
            x = self.transformer(i, self.resnet(i, x, temb, deterministic), context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, asymmetric=self.downsample_padding == 0, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class MidBlock(_UNetBlock):
    """``UNetMidBlock2DCrossAttn``: resnet, then (transformer, resnet) ``num_layers`` times."""

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array, deterministic: bool = True) -> jax.Array:
        x = self.resnet(0, x, temb, deterministic)
        for i in range(self.num_layers):
            x = self.resnet(i + 1, self.transformer(i, x, context), temb, deterministic)
        return x


class UpBlock(_UNetBlock):
    """``CrossAttnUpBlock2D`` (``heads > 0``) or ``UpBlock2D``: resnets on [x, skip] (+ transformers), then 2x up.

    ``skips`` are the down path's activations for this level, consumed last first.
    """
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, skips: Sequence[jax.Array], temb: jax.Array, context: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        if len(skips) != self.num_layers:
            raise ValueError(f"UpBlock with {self.num_layers} resnets got {len(skips)} skip activations")
        for i, skip in enumerate(reversed(skips)):
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            x = self.transformer(i, self.resnet(i, x, temb, deterministic), context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="upsamplers_0")(x)
        return x


class UNet2DConditionModel(nn.Module):
    """Text-conditioned denoising U-Net, numerically equal to diffusers' ``UNet2DConditionModel``.

    Fields and defaults are diffusers' (``attention_head_dim`` is the head
    COUNT per level); ``sample_size`` is metadata only. Build from a diffusers
    ``unet/config.json`` with :meth:`from_diffusers_config`.

    :data:`RUNTIME_FIELDS` are ours and no diffusers options, so they are
    neither read from nor written to config.json: ``dtype`` (compute),
    ``param_dtype`` (storage), ``attention_impl`` (the attention kernel,
    ``ldm_jax.models.attention``) and ``remat_policy`` (rematerialization
    of the resnets and transformers in training, ``layers.REMAT_POLICIES``).
    Neither of the last two changes the parameters or, beyond float rounding,
    the outputs.

    ``__call__(sample [B, H, W, in_channels], timesteps int [B], context [B, L,
    cross_attention_dim])`` returns the prediction [B, H, W, out_channels];
    H and W must be divisible by ``2 ** (len(block_out_channels) - 1)``.
    """
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, PLAIN_DOWN)
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    attention_head_dim: int | tuple[int, ...] = 8
    transformer_layers_per_block: int | tuple[int, ...] = 1
    only_cross_attention: bool | tuple[bool, ...] = False
    cross_attention_dim: int = 1280
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    center_input_sample: bool = False
    downsample_padding: int = 1
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    time_embedding_dim: int | None = None
    addition_embed_type: str | None = None
    addition_embed_type_num_heads: int = 64
    resnet_time_scale_shift: str = "default"
    dropout: float = 0.0
    sample_size: int | None = None
    attention_impl: str = "auto"
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        super().__post_init__()
        n = len(self.block_out_channels)
        for field in ("down_block_types", "up_block_types", "layers_per_block", "attention_head_dim",
                      "transformer_layers_per_block", "only_cross_attention"):
            as_tuple(getattr(self, field), n)
        for kind in self.down_block_types:
            if kind not in (CROSS_ATTN_DOWN, PLAIN_DOWN):
                raise ValueError(f"unsupported down_block_types entry {kind!r}: use {CROSS_ATTN_DOWN} or {PLAIN_DOWN}")
        for kind in self.up_block_types:
            if kind not in (CROSS_ATTN_UP, PLAIN_UP):
                raise ValueError(f"unsupported up_block_types entry {kind!r}: use {CROSS_ATTN_UP} or {PLAIN_UP}")
        if not isinstance(self.cross_attention_dim, int):
            raise ValueError(f"cross_attention_dim must be one int, got {self.cross_attention_dim!r}")
        if not isinstance(self.norm_num_groups, int):
            raise ValueError(f"norm_num_groups must be an int, got {self.norm_num_groups!r}")
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(f"unsupported addition_embed_type {self.addition_embed_type!r}: use "
                             f"{' or '.join(map(repr, ADDITION_EMBED_TYPES))}")
        if self.addition_embed_type and self.cross_attention_dim % self.addition_embed_type_num_heads:
            raise ValueError(f"cross_attention_dim {self.cross_attention_dim} is not divisible by "
                             f"addition_embed_type_num_heads {self.addition_embed_type_num_heads}")
        if self.resnet_time_scale_shift not in RESNET_TIME_SCALE_SHIFTS:
            raise ValueError(f"unsupported resnet_time_scale_shift {self.resnet_time_scale_shift!r}: use "
                             f"{' or '.join(map(repr, RESNET_TIME_SCALE_SHIFTS))}")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"downsample_padding must be 0 or 1, got {self.downsample_padding!r}")
        if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
            raise ValueError("conv_in_kernel and conv_out_kernel must be odd, got "
                             f"{self.conv_in_kernel} and {self.conv_out_kernel}")
        check_attention_impl(self.attention_impl)
        check_remat_policy(self.remat_policy)

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any], dtype: Dtype = jnp.float32,
                              param_dtype: Dtype = jnp.float32, attention_impl: str = "auto",
                              remat_policy: str = "none") -> "UNet2DConditionModel":
        """The module described by a diffusers ``unet/config.json`` dict, with our runtime fields as given.

        Raises ValueError naming the option for unknown options (our runtime
        fields included: they are no diffusers options) and for options we do
        not implement that are set to a non-default value.
        """
        fields = {f for f in cls.__dataclass_fields__ if f not in ("parent", "name") + RUNTIME_FIELDS}
        kwargs = {}
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key in _FIXED_OPTIONS:
                if isinstance(value, (list, tuple)) and value and all(v == value[0] for v in value):
                    value = value[0]  # e.g. dual_cross_attention given per block
                if isinstance(value, (list, tuple)) or value not in _FIXED_OPTIONS[key]:
                    raise ValueError(f"unsupported diffusers UNet option {key}={value!r}: only "
                                     f"{' or '.join(map(repr, _FIXED_OPTIONS[key]))} is implemented")
            elif key in fields:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            else:
                raise ValueError(f"unknown diffusers UNet option {key!r}")
        return cls(**kwargs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                   remat_policy=remat_policy)

    def diffusers_config(self) -> dict[str, Any]:
        """A config dict that diffusers' ``UNet2DConditionModel.from_config`` builds the same network from."""
        config = {"_class_name": "UNet2DConditionModel", "mid_block_type": MID_BLOCK}
        for field in self.__dataclass_fields__:
            if field in ("parent", "name") + RUNTIME_FIELDS:
                continue
            value = getattr(self, field)
            config[field] = list(value) if field in _TUPLE_FIELDS and not isinstance(value, int) else value
        return config

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        n = len(self.block_out_channels)
        if sample.shape[1] % 2 ** (n - 1) or sample.shape[2] % 2 ** (n - 1):
            raise ValueError(f"sample height and width must be divisible by {2 ** (n - 1)}, got {sample.shape}")
        if sample.shape[-1] != self.in_channels:
            raise ValueError(f"sample has {sample.shape[-1]} channels, in_channels is {self.in_channels}")
        if context.shape[-1] != self.cross_attention_dim:
            raise ValueError(f"context has {context.shape[-1]} features, cross_attention_dim is "
                             f"{self.cross_attention_dim}")
        channels = self.block_out_channels
        layers = as_tuple(self.layers_per_block, n)
        heads = as_tuple(self.attention_head_dim, n)
        transformer_layers = as_tuple(self.transformer_layers_per_block, n)
        only_cross = as_tuple(self.only_cross_attention, n)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shared = dict(groups=self.norm_num_groups, epsilon=self.norm_eps, dropout=self.dropout,
                      time_scale_shift=self.resnet_time_scale_shift == "scale_shift",
                      use_linear_projection=self.use_linear_projection, upcast_attention=self.upcast_attention,
                      attention_impl=self.attention_impl, remat_policy=self.remat_policy, **kw)
        context = context.astype(self.dtype)

        timesteps = jnp.broadcast_to(timesteps, (sample.shape[0],))
        temb = timestep_embedding(timesteps, channels[0], self.flip_sin_to_cos, self.freq_shift)
        temb = TimestepEmbedding(self.time_embedding_dim or 4 * channels[0], name="time_embedding",
                                 **kw)(temb.astype(self.dtype))
        if self.addition_embed_type == "text":
            temb = temb + TextTimeEmbedding(temb.shape[-1], self.addition_embed_type_num_heads, self.attention_impl,
                                            name="add_embedding", **kw)(context)

        if self.center_input_sample:
            sample = 2 * sample - 1.0
        x = _constrain(conv(channels[0], self.conv_in_kernel, "conv_in", **kw)(sample))
        skips = [x]
        for i, kind in enumerate(self.down_block_types):
            x, block_skips = DownBlock(
                channels[i], layers[i], heads[i] if kind == CROSS_ATTN_DOWN else 0, transformer_layers[i],
                add_downsample=i < n - 1, downsample_padding=self.downsample_padding,
                only_cross_attention=only_cross[i], name=f"down_blocks_{i}", **shared)(x, temb, context, deterministic)
            x = _constrain(x)
            skips.extend(block_skips)

        x = MidBlock(channels[-1], 1, heads[-1], transformer_layers[-1], name="mid_block", **shared)(
            x, temb, context, deterministic)
        x = _constrain(x)

        for i, kind in enumerate(self.up_block_types):
            level = n - 1 - i
            count = layers[level] + 1
            x = UpBlock(channels[level], count, heads[level] if kind == CROSS_ATTN_UP else 0,
                        transformer_layers[level], add_upsample=i < n - 1, only_cross_attention=only_cross[level],
                        name=f"up_blocks_{i}", **shared)(
                x, skips[-count:], temb, context, deterministic)
            x = _constrain(x)
            skips = skips[:-count]

        x = group_norm(self.norm_num_groups, self.norm_eps, "conv_norm_out", activation="silu", **kw)(x)
        return _constrain(conv(self.out_channels, self.conv_out_kernel, "conv_out", **kw)(x))
