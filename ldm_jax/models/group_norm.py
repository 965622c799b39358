"""GroupNorm over the channel axis, optionally followed by SiLU, with a hand-written backward pass.

Statistics are float32 and exact (two-pass variance), as torch computes
them. Each is summed over the spatial axes per channel first, then over each
group's channels: XLA runs that 1.1-1.6x faster on CPU than a single
reduction over (spatial, channels of a group), and the float32 sums are
more accurate.

Left to JAX, the backward pass of this function keeps float32 intermediates
of activation size (the centered input, the normalized output) and
differentiates each reduction of the forward pass separately. The backward
of :func:`group_norm` keeps only the input and the per-group mean and
reciprocal standard deviation, and needs two passes over the input and the
output cotangent ``dy``: one multi-output reduction of ``dy`` and
``dy * x_hat`` per example and channel, which give the scale and bias
gradients and the two per-group terms of

    dx = rstd * (dy * scale - mean_group(dy * scale) - x_hat * mean_group(dy * scale * x_hat)),

then one elementwise pass for ``dx``. A fused SiLU is recomputed from the
input in both passes rather than stored. :func:`group_norm_autodiff` is the
same forward pass left to JAX's differentiation (for benchmarks and tests).
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

ACTIVATIONS = (None, "silu")


def _group_sum(per_channel: jax.Array, groups: int, ndim: int) -> jax.Array:
    """Sums [B, C] over each group's channels, repeated back to every channel, shaped [B, 1, ..., C]."""
    batch, channels = per_channel.shape
    per_group = channels // groups
    sums = per_channel.reshape(batch, groups, per_group).sum(-1)
    return jnp.repeat(sums, per_group, axis=-1).reshape((batch,) + (1,) * (ndim - 2) + (channels,))


def _statistics(x: jax.Array, groups: int, epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``x`` in float32, and its per-group mean and reciprocal standard deviation, shaped [B, 1, ..., C]."""
    x32 = x.astype(jnp.float32)
    spatial = tuple(range(1, x.ndim - 1))
    count = math.prod(x.shape[1:-1]) * (x.shape[-1] // groups)
    mean = _group_sum(x32.sum(spatial), groups, x.ndim) / count
    variance = _group_sum(jnp.square(x32 - mean).sum(spatial), groups, x.ndim) / count
    return x32, mean, jax.lax.rsqrt(variance + epsilon)


def _affine(x_hat: jax.Array, scale: jax.Array, bias: jax.Array, activation: str | None) -> jax.Array:
    y = x_hat * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y * jax.nn.sigmoid(y) if activation == "silu" else y


def group_norm_autodiff(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, epsilon: float,
                        activation: str | None = None, dtype: Any = None) -> jax.Array:
    """:func:`group_norm`'s forward pass, differentiated by JAX (what its backward pass replaces)."""
    return _forward(x, scale, bias, groups, epsilon, activation, dtype)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, epsilon: float,
               activation: str | None = None, dtype: Any = None) -> jax.Array:
    """GroupNorm of ``x`` [B, ..., C] per example and group of ``C // groups`` channels, then ``* scale + bias``
    per channel and ``activation`` (None or 'silu'); returned in ``dtype`` (default: ``x``'s).

    Equal to :func:`group_norm_autodiff` in value; its gradient is computed
    by the two-pass backward of the module docstring.
    """
    return group_norm_autodiff(x, scale, bias, groups, epsilon, activation, dtype)


def _forward(x, scale, bias, groups, epsilon, activation, dtype):
    x32, mean, rstd = _statistics(x, groups, epsilon)
    y = _affine((x32 - mean) * rstd, scale, bias, activation).astype(dtype or x.dtype)
    return y, (x, scale, bias, mean, rstd)


def _backward(groups, epsilon, activation, dtype, residuals, dy):
    x, scale, bias, mean, rstd = residuals
    spatial = tuple(range(1, x.ndim - 1))
    count = math.prod(x.shape[1:-1]) * (x.shape[-1] // groups)
    scale32 = scale.astype(jnp.float32)
    x_hat = (x.astype(jnp.float32) - mean) * rstd
    dy = dy.astype(jnp.float32)
    if activation == "silu":
        y = _affine(x_hat, scale, bias, None)
        sigmoid = jax.nn.sigmoid(y)
        dy = dy * sigmoid * (1 + y * (1 - sigmoid))
    dy_sum, dy_x_hat_sum = dy.sum(spatial), (dy * x_hat).sum(spatial)  # [B, C] each
    mean_dy = _group_sum(dy_sum * scale32, groups, x.ndim) / count
    mean_dy_x_hat = _group_sum(dy_x_hat_sum * scale32, groups, x.ndim) / count
    dx = rstd * (dy * scale32 - mean_dy - x_hat * mean_dy_x_hat)
    return dx.astype(x.dtype), dy_x_hat_sum.sum(0).astype(scale.dtype), dy_sum.sum(0).astype(bias.dtype)


group_norm.defvjp(_forward, _backward)
