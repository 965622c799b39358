"""ldm_jax.models.convolution: lax's convolution with a per-tap kernel gradient on CPU, same numbers as lax."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ldm_jax.models import convolution, layers

NHWC = ("NHWC", "HWIO", "NHWC")


def _inputs(batch, side, c_in, c_out, kernel, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, side, side, c_in)).astype(np.float32)
    w = (rng.standard_normal((kernel, kernel, c_in, c_out)) / np.sqrt(kernel * kernel * c_in)).astype(np.float32)
    cotangent = rng.standard_normal((batch, side, side, c_out)).astype(np.float32)
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(cotangent, dtype)


def _value_and_grads(conv, x, w, cotangent, **kwargs):
    """The convolution's output and the gradients (x, w) of <output, cotangent>, jitted (``cotangent`` is cropped
    to the output's shape)."""
    def run(x, w):
        out, pullback = jax.vjp(lambda x, w: conv(x, w, **kwargs), x, w)
        return out, pullback(cotangent[tuple(slice(0, n) for n in out.shape)])
    return jax.jit(run)(x, w)


SAME = dict(window_strides=(1, 1), dimension_numbers=NHWC)


@pytest.mark.parametrize("batch,side,c_in,c_out,kernel", [
    (2, 8, 32, 32, 3), (3, 6, 48, 32, 3), (2, 5, 32, 40, 1), (1, 7, 32, 32, 5)])
def test_taps_path_matches_lax_in_float32(batch, side, c_in, c_out, kernel):
    x, w, cotangent = _inputs(batch, side, c_in, c_out, kernel)
    padding = ((kernel // 2,) * 2,) * 2
    assert convolution._uses_taps(x, w, (1, 1), padding, None, None, NHWC, 1, 1)
    ours = _value_and_grads(convolution.conv_general_dilated, x, w, cotangent, padding=padding, **SAME)
    ref = _value_and_grads(lax.conv_general_dilated, x, w, cotangent, padding=padding, **SAME)
    np.testing.assert_array_equal(ours[0], ref[0])  # the forward pass is lax's
    for a, b in zip(ours[1], ref[1]):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_kernel_gradient_in_bfloat16_accumulates_in_float32():
    x, w, cotangent = _inputs(4, 8, 32, 32, 3, jnp.bfloat16)
    padding = ((1, 1), (1, 1))
    _, (dx, dw) = _value_and_grads(convolution.conv_general_dilated, x, w, cotangent, padding=padding, **SAME)
    _, (_, exact) = _value_and_grads(lax.conv_general_dilated, *(a.astype(jnp.float32) for a in (x, w, cotangent)),
                                     padding=padding, **SAME)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    error = float(jnp.max(jnp.abs(dw.astype(jnp.float32) - exact)) / jnp.max(jnp.abs(exact)))
    assert error < 1e-2  # bfloat16 rounding of the result, not of 256 accumulated products


@pytest.mark.parametrize("change,args", [
    ("stride 2", dict(window_strides=(2, 2), padding=((1, 1), (1, 1)))),
    ("16 channels", dict(window_strides=(1, 1), padding=((1, 1), (1, 1)))),
    ("'SAME' string", dict(window_strides=(1, 1), padding="SAME")),
    ("even kernel", dict(window_strides=(1, 1), padding=((1, 1), (1, 1)))),
    ("dilated kernel", dict(window_strides=(1, 1), padding=((2, 2), (2, 2)), rhs_dilation=(2, 2))),
])
def test_other_convolutions_are_lax_unchanged(change, args):
    c_in = 16 if change == "16 channels" else 32
    kernel = 4 if change == "even kernel" else 3
    x, w, cotangent = _inputs(2, 8, c_in, 32, kernel)
    assert not convolution._uses_taps(x, w, args["window_strides"], args["padding"], None,
                                      args.get("rhs_dilation"), NHWC, 1, 1)
    ours = _value_and_grads(convolution.conv_general_dilated, x, w, cotangent, dimension_numbers=NHWC, **args)
    ref = _value_and_grads(lax.conv_general_dilated, x, w, cotangent, dimension_numbers=NHWC, **args)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(a, b)


def test_flax_conv_layer_uses_it_and_keeps_lax_gradients():
    """layers.conv (every U-Net / VAE convolution) routes through it: same params, output and gradients as a
    plain flax conv; the gradient program holds the per-tap matmuls."""
    x, _, cotangent = _inputs(2, 8, 32, 32, 3)
    ours, plain = layers.conv(32, 3, "c"), nn.Conv(32, (3, 3), padding=((1, 1), (1, 1)))
    params = plain.init(jax.random.key(0), x)["params"]

    def grads(module):
        loss = lambda p, x: jnp.sum(module.apply({"params": p}, x) * cotangent)
        return jax.grad(loss, argnums=(0, 1)), loss

    (grad_ours, _), (grad_plain, _) = grads(ours), grads(plain)
    for a, b in zip(jax.tree.leaves(jax.jit(grad_ours)(params, x)), jax.tree.leaves(jax.jit(grad_plain)(params, x))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))
    assert "dot_general" in str(jax.make_jaxpr(grad_ours)(params, x))
    assert "dot_general" not in str(jax.make_jaxpr(grad_plain)(params, x))
