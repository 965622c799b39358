"""``lax.conv_general_dilated`` with a kernel gradient that is fast on XLA:CPU.

XLA:CPU computes a convolution's kernel gradient as another convolution
(batch and feature dimensions swapped), which ran at a fifth of its matmul
rate on a 2-core CPU and took 21% of configs/base.py's
stage-2 step (docs/experiments.md). :func:`conv_general_dilated` is a drop-in for lax's (flax's
``nn.Conv(conv_general_dilated=...)``): for a stride-1 NHWC / HWIO
convolution with "same" padding of an odd kernel and at least
:data:`MIN_CHANNELS` input and output channels, its forward pass and input
gradient are lax's and, on CPU, its kernel gradient is one matmul per kernel
tap::

    dW[i, j] = x^T · shift_ij(dy)    over all batch and spatial positions

(``lax.platform_dependent``: other backends keep lax's kernel gradient). Any
other convolution is lax's unchanged. Measured on that CPU (kernel gradient
alone, batch 32, 16×16): 30.5 -> 15.3 ms at 64 -> 64 channels, 8.9 -> 3.8 ms
at 32 -> 32; at 16 channels (8 × 64×64) it was slower, 4.4 -> 7.1 ms, hence
the channel threshold.
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

MIN_CHANNELS = 32
_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_unit(values: Sequence[int] | None) -> bool:
    return values is None or all(v == 1 for v in values)


def _same_padding(kernel_shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
    return tuple((k // 2, k // 2) for k in kernel_shape)


def _lax_conv(x: jax.Array, w: jax.Array, padding: tuple[tuple[int, int], ...]) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_NHWC)


def kernel_grad_by_taps(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int]) -> jax.Array:
    """The kernel gradient [kh, kw, C_in, C_out] of a stride-1 'same' NHWC convolution of ``x`` whose output
    has the cotangent ``dy``: one matmul per tap, accumulated and returned in float32."""
    kh, kw = kernel_shape[:2]
    _, height, width, c_in = x.shape
    c_out = dy.shape[-1]
    ph, pw = kh // 2, kw // 2
    padded = jnp.pad(dy, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    rows = x.reshape(-1, c_in)
    taps = [jnp.einsum("nc,no->co", rows,
                       padded[:, kh - 1 - i:kh - 1 - i + height, kw - 1 - j:kw - 1 - j + width].reshape(-1, c_out),
                       preferred_element_type=jnp.float32)
            for i in range(kh) for j in range(kw)]
    return jnp.stack(taps).reshape(kh, kw, c_in, c_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _same_conv(x: jax.Array, w: jax.Array, padding: tuple[tuple[int, int], ...]) -> jax.Array:
    return _lax_conv(x, w, padding)


def _same_conv_fwd(x, w, padding):
    return _lax_conv(x, w, padding), (x, w)


def _same_conv_bwd(padding, residuals, dy):
    x, w = residuals
    # Transposes of the linear maps, not jax.vjp: a vjp would also trace a (dead) forward convolution.
    dx = jax.linear_transpose(lambda x: _lax_conv(x, w, padding), x)(dy)[0]
    lax_dw = lambda x, dy: jax.linear_transpose(lambda w: _lax_conv(x, w, padding), w)(dy)[0]
    taps_dw = lambda x, dy: kernel_grad_by_taps(x, dy, w.shape).astype(w.dtype)
    return dx, lax.platform_dependent(x, dy, cpu=taps_dw, default=lax_dw)


_same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)


def _uses_taps(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation, rhs_dilation,
               dimension_numbers, feature_group_count: int, batch_group_count: int) -> bool:
    if lhs.ndim != 4 or rhs.ndim != 4 or feature_group_count != 1 or batch_group_count != 1:
        return False
    if not (_is_unit(window_strides) and _is_unit(lhs_dilation) and _is_unit(rhs_dilation)):
        return False
    if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != \
            lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC):
        return False
    kh, kw, c_in, c_out = rhs.shape
    if kh % 2 == 0 or kw % 2 == 0 or min(c_in, c_out) < MIN_CHANNELS:
        return False
    return not isinstance(padding, str) and tuple(map(tuple, padding)) == _same_padding((kh, kw))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    """``lax.conv_general_dilated``, with the CPU kernel gradient of the module docstring where it applies."""
    if precision is None and preferred_element_type is None and _uses_taps(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count):
        return _same_conv(lhs, rhs, _same_padding(rhs.shape[:2]))
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count, precision,
                                    preferred_element_type)
