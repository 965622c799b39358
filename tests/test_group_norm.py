"""layers.GroupNorm (and its fused SiLU) against torch.nn.GroupNorm: outputs and gradients, float32 and bfloat16
compute; the hand-written backward pass against JAX's differentiation of the same forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax.models.group_norm import group_norm as fused_group_norm
from ldm_jax.models.group_norm import group_norm_autodiff
from ldm_jax.models.layers import group_norm


def torch_group_norm(x, scale, bias, groups, eps, activation=None):
    """torch's GroupNorm (then SiLU for ``activation='silu'``) output and the gradients of sum(sin(output)) for
    NHWC numpy inputs."""
    x_t = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    norm = torch.nn.GroupNorm(groups, x.shape[-1], eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor(scale))
        norm.bias.copy_(torch.tensor(bias))
    y = norm(x_t)
    if activation == "silu":
        y = torch.nn.functional.silu(y)
    torch.sin(y).sum().backward()
    return (y.detach().numpy().transpose(0, 2, 3, 1), x_t.grad.numpy().transpose(0, 2, 3, 1),
            norm.weight.grad.numpy(), norm.bias.grad.numpy())


@pytest.mark.parametrize("shape,groups,activation", [((2, 8, 8, 16), 8, None), ((3, 4, 6, 32), 16, None),
                                                     ((2, 5, 5, 12), 3, None), ((2, 8, 8, 16), 8, "silu"),
                                                     ((2, 3, 7, 24), 6, "silu"), ((2, 9, 12), 3, "silu")])
def test_matches_torch_output_and_gradients(shape, groups, activation):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 1.5).astype(np.float32)
    scale, bias = rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32), rng.normal(size=shape[-1]).astype(np.float32)
    module = group_norm(groups, 1e-6, "norm", activation=activation)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    initial = nn.meta.unbox(module.init(jax.random.key(0), x))["params"]
    assert jax.tree.map(np.asarray, initial) == {"scale": pytest.approx(np.ones(shape[-1])),
                                                 "bias": pytest.approx(np.zeros(shape[-1]))}
    loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
    (grads, grad_x) = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
    x_nhwc = x if x.ndim == 4 else x[:, :, None, :]  # torch's helper takes NHWC; one spatial axis gets W = 1
    y_ref, grad_x_ref, grad_scale_ref, grad_bias_ref = (a.reshape(b.shape) for a, b in zip(
        torch_group_norm(x_nhwc, scale, bias, groups, 1e-6, activation), (x, x, scale, bias)))
    # measured: values and input gradient within 7.2e-7 absolute, scale and bias gradients within 3.2e-6 relative
    np.testing.assert_allclose(module.apply(params, x), y_ref, atol=5e-6)
    np.testing.assert_allclose(grad_x, grad_x_ref, atol=5e-6)
    np.testing.assert_allclose(grads["params"]["scale"], grad_scale_ref, rtol=3e-5, atol=1e-6)
    np.testing.assert_allclose(grads["params"]["bias"], grad_bias_ref, rtol=3e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_statistics():
    x = np.random.default_rng(1).standard_normal((2, 4, 4, 8)).astype(np.float32) * 100 + 1000  # large mean
    module = group_norm(4, 1e-6, "norm", dtype=jnp.bfloat16)
    params = module.init(jax.random.key(0), x)
    y = module.apply(params, jnp.asarray(x, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    y_ref = torch_group_norm(np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)), np.ones(8, np.float32),
                             np.zeros(8, np.float32), 4, 1e-6)[0]
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, atol=0.02)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_backward_pass_equals_jax_differentiation_of_the_forward(dtype, activation):
    keys = jax.random.split(jax.random.key(3), 4)
    x = (jax.random.normal(keys[0], (2, 6, 5, 32)) * 2 - 1).astype(dtype)
    scale, bias = 1 + 0.3 * jax.random.normal(keys[1], (32,)), 0.5 * jax.random.normal(keys[2], (32,))
    weights = jax.random.normal(keys[3], x.shape)

    def grads(function):
        loss = lambda x, s, b: jnp.sum(function(x, s, b, 8, 1e-6, activation, jnp.float32) * weights)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)

    ours, jax_ref = grads(fused_group_norm), grads(group_norm_autodiff)
    assert [g.dtype for g in ours] == [dtype, jnp.float32, jnp.float32]
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2  # bfloat16: the two round dx differently
    for got, want in zip(ours, jax_ref):
        scale_of = float(jnp.abs(want.astype(jnp.float32)).max())
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tolerance * scale_of)


def test_channels_that_do_not_split_into_groups_are_named():
    with pytest.raises(ValueError, match="'norm1'.*10 channels do not split into 4 groups"):
        group_norm(4, 1e-6, "norm1").init(jax.random.key(0), jnp.ones((1, 2, 2, 10)))


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="'norm'.*unknown activation 'gelu'"):
        group_norm(4, 1e-6, "norm", activation="gelu").init(jax.random.key(0), jnp.ones((1, 2, 2, 8)))


def test_group_norm_bench_times_every_group_norm_of_the_unet(tmp_path):
    from bench import group_norm_bench

    record = group_norm_bench.main(["--batch", "1", "--rounds", "1", "--calls-per-round", "1",
                                    "--out", str(tmp_path / "gn.json")])
    # configs/base.py's U-Net: the resnets' two norms and conv_norm_out fuse SiLU; its 7 spatial transformers' don't.
    calls = group_norm_bench.group_norm_calls(*group_norm_bench.CONFIGS["base"], batch=1, dtype=jnp.float32)
    assert record["group_norms"] == len(calls) == 36 and record["fused_silu"] == 29
    assert record["max_relative_gradient_difference"] < 1e-5
    assert record["hand_written_s"] > 0 and record["autodiff_s"] > 0 and record["speedup"] > 0
