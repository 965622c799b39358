"""Shared layers (ldm_jax.models.layers), against torch: the upsampler's convolution without the upsampled copy,
and GELU."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from ldm_jax.models.layers import Upsample2D, gelu, upsample_conv


def test_upsample_conv_matches_torch_interpolate_then_conv2d():
    """Values and the gradients of x, kernel and bias equal torch's nearest 2x interpolation then a 3x3 conv2d
    (padding 1), which is what diffusers' Upsample2D runs."""
    rng = np.random.default_rng(0)
    x, kernel = rng.standard_normal((2, 5, 7, 6)), rng.standard_normal((3, 3, 6, 4))  # odd sides, NHWC / HWIO
    bias, cotangent = rng.standard_normal(4), rng.standard_normal((2, 10, 14, 4))
    out, vjp = jax.vjp(upsample_conv, *(jnp.asarray(a, jnp.float32) for a in (x, kernel, bias)))
    grads = vjp(jnp.asarray(cotangent, jnp.float32))

    tx, tk, tb = (torch.tensor(a, requires_grad=True) for a in (x.transpose(0, 3, 1, 2), kernel.transpose(3, 2, 0, 1),
                                                                  bias))
    expected = F.conv2d(F.interpolate(tx, scale_factor=2, mode="nearest"), tk, tb, padding=1)
    expected.backward(torch.tensor(cotangent.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(np.asarray(out), expected.detach().numpy().transpose(0, 2, 3, 1), atol=2e-5)
    for got, want in zip(grads, (tx.grad.numpy().transpose(0, 2, 3, 1), tk.grad.numpy().transpose(2, 3, 1, 0),
                                 tb.grad.numpy())):
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-4 * np.abs(want).max())


def test_upsample2d_keeps_the_conv_parameters_and_dtype():
    """Upsample2D's params are a 3x3 conv's ('conv' / kernel [3, 3, C, O], bias [O]) with its logical axes, and
    a bfloat16 module computes in bfloat16 on float32 params."""
    module = Upsample2D(8, dtype=jnp.bfloat16)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
    params = variables["params"]["conv"]
    assert params["kernel"].value.shape == (3, 3, 3, 8) and params["bias"].value.shape == (8,)
    assert params["kernel"].names == (None, None, "conv_in", "conv_out") and params["kernel"].value.dtype == jnp.float32
    out = module.apply(variables, jnp.ones((1, 4, 4, 3)))
    assert out.shape == (1, 8, 8, 8) and out.dtype == jnp.bfloat16


def test_gelu_and_its_gradient_match_torch():
    """float32 over [-12, 12]: values within 1.5e-6 of torch's exact GELU (its error and ours are both the
    rounding of 1 + erf), gradients within 2e-6."""
    x = np.linspace(-12, 12, 200_001, dtype=np.float32)
    value, vjp = jax.vjp(gelu, jnp.asarray(x))
    tx = torch.tensor(x, requires_grad=True)
    expected = F.gelu(tx)
    expected.sum().backward()
    np.testing.assert_allclose(np.asarray(value), expected.detach().numpy(), atol=1.5e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(vjp(jnp.ones_like(value))[0]), tx.grad.numpy(), atol=2e-6, rtol=0)
