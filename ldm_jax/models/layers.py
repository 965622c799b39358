"""Building blocks shared by the autoencoder and the U-Net.

Module and parameter names follow the diffusers PyTorch modules (``conv1``,
``to_q``, ``to_out_0`` ...) so that weight conversion is a mechanical rename
(see ``ldm_jax.weights.convert``). Every parameter carries logical axis names; the
mesh rules that map them to device axes live in the config.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import convolution
from ldm_jax.models.attention import attention
from ldm_jax.models.group_norm import ACTIVATIONS
from ldm_jax.models.group_norm import group_norm as fused_group_norm

Dtype = Any

CONV_AXES = (None, None, "conv_in", "conv_out")

# Rematerialization of blocks (activation checkpointing): which intermediates the backward pass may keep
# instead of recomputing. 'none' keeps everything (no remat); 'full' keeps only each block's inputs; the others
# keep the matmul / conv outputs (all of them, or those without batch dimensions) and recompute the rest.
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat_policy(policy: str) -> None:
    """ValueError unless ``policy`` names one of :data:`REMAT_POLICIES`."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {policy!r}; choose one of {list(REMAT_POLICIES)}")


def remat(module_class: type[nn.Module], policy: str, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
    """``module_class`` rematerialized under ``policy`` (``nn.remat``; the class itself for 'none').

    Parameter names and values are those of the plain class: only what the
    backward pass stores changes. ``static_argnums`` counts ``self`` as 0.
    """
    check_remat_policy(policy)
    if policy == "none":
        return module_class
    return nn.remat(module_class, policy=REMAT_POLICIES[policy], static_argnums=static_argnums)


# A convolution's bias: zeros, sharded like the kernel's output channels.
CONV_BIAS_INIT = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",))


def conv(features: int, kernel: int, name: str, *, stride: int = 1, padding=None,
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, use_bias: bool = True,
         kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()) -> nn.Conv:
    """A 2D convolution with torch-style symmetric padding (kernel // 2 unless given); its kernel gradient is
    ``ldm_jax.models.convolution``'s (fast on XLA:CPU)."""
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=padding, use_bias=use_bias,
        dtype=dtype, param_dtype=param_dtype, name=name, conv_general_dilated=convolution.conv_general_dilated,
        kernel_init=nn.with_logical_partitioning(kernel_init, CONV_AXES), bias_init=CONV_BIAS_INIT)


def dense(features: int, name: str, axes: tuple[str | None, str | None] = ("embed", "mlp"), *,
          use_bias: bool = True, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> nn.Dense:
    """A dense layer whose kernel has the logical axes ``axes`` (input, output)."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


def group_norm(groups: int, epsilon: float, name: str, *, activation: str | None = None,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> "GroupNorm":
    """GroupNorm with exact (two-pass) variance, as torch computes it, then ``activation`` (None or 'silu')."""
    return GroupNorm(groups, epsilon, activation, dtype=dtype, param_dtype=param_dtype, name=name)


class GroupNorm(nn.Module):
    """GroupNorm over the last (channel) axis, statistics in float32, optionally followed by SiLU.

    Parameters ``scale`` and ``bias`` as flax's ``nn.GroupNorm``. The
    computation and its hand-written backward pass are
    :func:`ldm_jax.models.group_norm.group_norm`'s.
    """

    groups: int
    epsilon: float
    activation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalize ``x`` [B, ..., C] per example and group; scale and shift per channel; then the activation."""
        channels = x.shape[-1]
        if channels % self.groups:
            raise ValueError(f"GroupNorm {self.name!r}: {channels} channels do not split into {self.groups} groups")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GroupNorm {self.name!r}: unknown activation {self.activation!r}; "
                             f"choose one of {list(ACTIVATIONS)}")
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (channels,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                          (channels,), self.param_dtype)
        return fused_group_norm(x, scale, bias, self.groups, self.epsilon, self.activation, self.dtype)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as PyTorch computes it, ``0.5 * x * (1 + erf(x / sqrt(2)))``.

    ``jax.nn.gelu(approximate=False)`` uses ``erfc`` instead, which XLA:CPU
    evaluates 1.56x slower (forward and backward at [16, 64, 256],
    docs/experiments.md). Its accuracy is torch's: in float32 over [-12, 12] at most
    1.2e-6 from the exact value (the rounding of ``1 + erf``), relative
    error 4e-6 above x = -2 and 7e-5 above x = -3 (torch: 6e-5), where
    ``erfc``'s stays at 2e-6.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * (2.0 ** -0.5)))


def layer_norm(epsilon: float, name: str, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> nn.LayerNorm:
    """LayerNorm over the last axis with exact variance."""
    return nn.LayerNorm(
        epsilon=epsilon, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


class Attention(nn.Module):
    """diffusers-style attention: to_q/to_k/to_v projections, heads, to_out_0.

    With ``context`` it is cross-attention (keys and values from the context).
    ``qkv_bias`` is False in the U-Net transformer and True in the VAE.
    ``upcast`` computes the attention itself (logits, softmax, weighted sum) in
    float32 whatever ``dtype`` is (diffusers' ``upcast_attention``, SD 2.x).
    ``attention_impl`` picks the kernel (``ldm_jax.models.attention``).
    """
    heads: int
    head_dim: int
    out_features: int
    qkv_bias: bool = False
    upcast: bool = False
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        inner = self.heads * self.head_dim
        context = x if context is None else context
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = dense(inner, "to_q", ("embed", "heads"), use_bias=self.qkv_bias, **kw)(x)
        k = dense(inner, "to_k", ("kv_embed", "heads"), use_bias=self.qkv_bias, **kw)(context)
        v = dense(inner, "to_v", ("kv_embed", "heads"), use_bias=self.qkv_bias, **kw)(context)
        if self.upcast:
            q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        out = attention(q, k, v, self.heads, impl=self.attention_impl).astype(self.dtype)
        return dense(self.out_features, "to_out_0", ("heads", "embed"), **kw)(out)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv residual block, conditioned on a time embedding ``temb`` (when given).

    ``time_scale_shift`` False (diffusers' 'default'): the projected
    embedding is added before ``norm2``. True ('scale_shift', FiLM): it is
    projected to twice the channels, ``scale`` then ``shift``, and ``norm2``'s
    output becomes ``h * (1 + scale) + shift``.
    """
    out_channels: int
    groups: int = 32
    epsilon: float = 1e-6
    dropout: float = 0.0
    time_scale_shift: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = group_norm(self.groups, self.epsilon, "norm1", activation="silu", **kw)(x)
        h = conv(self.out_channels, 3, "conv1", **kw)(h)
        film = None
        if temb is not None:
            width = 2 * self.out_channels if self.time_scale_shift else self.out_channels
            temb = dense(width, "time_emb_proj", **kw)(nn.silu(temb))[:, None, None, :]
            if self.time_scale_shift:
                film = jnp.split(temb, 2, axis=-1)
            else:
                h = h + temb
        if film is None:
            h = group_norm(self.groups, self.epsilon, "norm2", activation="silu", **kw)(h)
        else:
            scale, shift = film
            h = nn.silu(group_norm(self.groups, self.epsilon, "norm2", **kw)(h) * (1 + scale) + shift)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv(self.out_channels, 3, "conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", **kw)(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. ``asymmetric`` pads only bottom/right (the VAE's choice)."""
    channels: int
    asymmetric: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.asymmetric else ((1, 1), (1, 1))
        return conv(self.channels, 3, "conv", stride=2, padding=padding,
                    dtype=self.dtype, param_dtype=self.param_dtype)(x)


def _fold_taps(kernel: jax.Array, phase: int, axis: int) -> jax.Array:
    """The 3 taps of ``kernel`` along ``axis`` folded to the 2 that output phase ``phase`` of a nearest 2x
    upsampling sees: (0), (1 + 2) for phase 0, (0 + 1), (2) for phase 1."""
    first, middle, last = (jax.lax.index_in_dim(kernel, i, axis) for i in range(3))
    pair = (first, middle + last) if phase == 0 else (first + middle, last)
    return jnp.concatenate(pair, axis=axis)


def upsample_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """A 3x3 convolution (padding 1) of ``x`` [B, H, W, C] upsampled 2x by nearest neighbour, computed on ``x``.

    Each of the four output phases (even or odd row, even or odd column)
    sees only two rows and two columns of ``x``, so it is a 2x2 convolution
    whose taps are sums of the 3x3 kernel's (rows (0), (1, 2) for even
    output rows, (0, 1), (2) for odd ones; the same for columns): 16 taps at
    ``x``'s resolution instead of 9 at four times it, 2.25x fewer FLOPs and
    no upsampled copy of ``x``. Equal to the upsample-then-convolve result
    up to float32 rounding (tests/test_layers.py).
    """
    phases = []
    for row in (0, 1):
        columns = []
        for column in (0, 1):
            taps = _fold_taps(_fold_taps(kernel, row, axis=0), column, axis=1)  # [2, 2, C, O]
            padding = tuple((1, 0) if phase == 0 else (0, 1) for phase in (row, column))
            columns.append(jax.lax.conv_general_dilated(x, taps, (1, 1), padding,
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC")))
        phases.append(jnp.stack(columns, axis=3))  # [B, H, W, 2 (column phase), O]
    out = jnp.stack(phases, axis=2)  # [B, H, 2 (row phase), W, 2, O]
    b, h, _, w, _, features = out.shape
    return out.reshape(b, 2 * h, 2 * w, features) + bias


class UpsampleConv(nn.Module):
    """The parameters of ``conv(features, 3, ...)`` (``kernel`` [3, 3, C, O], ``bias``), applied by `upsample_conv`."""
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
                            (3, 3, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", CONV_BIAS_INIT, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return upsample_conv(x, kernel, bias)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv (`upsample_conv`: the same result without
    upsampling)."""
    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return UpsampleConv(self.channels, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


def as_tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    """Broadcast an int to an n-tuple, or check that a sequence has n entries."""
    if isinstance(value, int):
        return (value,) * n
    if len(value) != n:
        raise ValueError(f"expected {n} values (one per block), got {len(value)}: {tuple(value)}")
    return tuple(value)
