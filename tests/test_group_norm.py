"""layers.GroupNorm against torch.nn.GroupNorm: outputs and gradients, float32 and bfloat16 compute."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax.models.layers import group_norm


def torch_group_norm(x, scale, bias, groups, eps):
    """torch's GroupNorm output and the gradients of sum(sin(output)) for NHWC numpy inputs."""
    x_t = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    norm = torch.nn.GroupNorm(groups, x.shape[-1], eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor(scale))
        norm.bias.copy_(torch.tensor(bias))
    y = norm(x_t)
    torch.sin(y).sum().backward()
    return (y.detach().numpy().transpose(0, 2, 3, 1), x_t.grad.numpy().transpose(0, 2, 3, 1),
            norm.weight.grad.numpy(), norm.bias.grad.numpy())


@pytest.mark.parametrize("shape,groups", [((2, 8, 8, 16), 8), ((3, 4, 6, 32), 16), ((2, 5, 5, 12), 3)])
def test_matches_torch_output_and_gradients(shape, groups):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 1.5).astype(np.float32)
    scale, bias = rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32), rng.normal(size=shape[-1]).astype(np.float32)
    module = group_norm(groups, 1e-6, "norm")
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    initial = nn.meta.unbox(module.init(jax.random.key(0), x))["params"]
    assert jax.tree.map(np.asarray, initial) == {"scale": pytest.approx(np.ones(shape[-1])),
                                                 "bias": pytest.approx(np.zeros(shape[-1]))}
    loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
    (grads, grad_x) = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
    y_ref, grad_x_ref, grad_scale_ref, grad_bias_ref = torch_group_norm(x, scale, bias, groups, 1e-6)
    np.testing.assert_allclose(module.apply(params, x), y_ref, atol=2e-5)
    np.testing.assert_allclose(grad_x, grad_x_ref, atol=2e-5)
    np.testing.assert_allclose(grads["params"]["scale"], grad_scale_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads["params"]["bias"], grad_bias_ref, rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_keeps_float32_statistics():
    x = np.random.default_rng(1).standard_normal((2, 4, 4, 8)).astype(np.float32) * 100 + 1000  # large mean
    module = group_norm(4, 1e-6, "norm", dtype=jnp.bfloat16)
    params = module.init(jax.random.key(0), x)
    y = module.apply(params, jnp.asarray(x, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    y_ref = torch_group_norm(np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)), np.ones(8, np.float32),
                             np.zeros(8, np.float32), 4, 1e-6)[0]
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, atol=0.02)


def test_channels_that_do_not_split_into_groups_are_named():
    with pytest.raises(ValueError, match="'norm1'.*10 channels do not split into 4 groups"):
        group_norm(4, 1e-6, "norm1").init(jax.random.key(0), jnp.ones((1, 2, 2, 10)))
