"""bench/hardware.py: the peak FLOP/s table, the model FLOPs of a jaxpr, MFU."""

import jax
import jax.numpy as jnp
import pytest

from bench.hardware import jaxpr_flops, peak_flops, utilization


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12),
    ("cpu", None), ("NVIDIA GeForce RTX 4090", None)])
def test_peak_flops_by_device_kind(kind, peak):
    assert peak_flops(kind) == peak


def conv(x, w, groups=1):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups)


def test_matmul_flops_and_utilization():
    flops = jaxpr_flops(jax.make_jaxpr(lambda a, b: a @ b)(jnp.ones((64, 128)), jnp.ones((128, 32))))
    assert flops == 2 * 64 * 128 * 32
    batched = jax.make_jaxpr(lambda a, b: jnp.einsum("bij,bjk->bik", a, b))(jnp.ones((3, 5, 7)), jnp.ones((3, 7, 2)))
    assert jaxpr_flops(batched) == 2 * 3 * 5 * 7 * 2
    assert utilization(flops, 0.5, 1e6) == {"achieved_flops_per_s": 2 * flops, "mfu": 2 * flops / 1e6}
    assert utilization(flops, 0.5, None)["mfu"] is None


@pytest.mark.parametrize("groups", [1, 4])
def test_convolution_flops_and_their_gradients(groups):
    x, w = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16 // groups, 32))
    forward = 2 * 2 * 8 * 8 * 32 * 3 * 3 * (16 // groups)  # every output: 3x3 taps x input channels per group
    assert jaxpr_flops(jax.make_jaxpr(lambda x, w: conv(x, w, groups))(x, w)) == forward
    grads = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(conv(x, w, groups) ** 2), argnums=(0, 1)))(x, w)
    assert jaxpr_flops(grads) == 3 * forward  # forward, input gradient, kernel gradient


def test_nested_scanned_and_branching_programs():
    a = jnp.ones((16, 16))
    matmul = 2 * 16 ** 3
    assert jaxpr_flops(jax.make_jaxpr(jax.jit(jax.checkpoint(lambda a: a @ a @ a)))(a)) == 2 * matmul
    scanned = jax.make_jaxpr(lambda a: jax.lax.scan(lambda c, _: (c @ a, None), a, length=5)[0])(a)
    assert jaxpr_flops(scanned) == 5 * matmul
    branches = jax.make_jaxpr(lambda p, a: jax.lax.cond(p, lambda a: a @ a @ a, lambda a: a @ a, a))(True, a)
    assert jaxpr_flops(branches) == 2 * matmul  # the costlier branch


def test_the_unet_train_step_counts_three_forward_passes():
    """A tiny U-Net's forward pass and its train gradient: the backward pass costs twice the forward."""
    from configs import tiny
    from ldm_jax.models.unet import UNet2DConditionModel
    from ldm_jax.pipeline import init_inputs
    config = tiny.get_config().unet.to_dict()
    unet = UNet2DConditionModel.from_diffusers_config(config)
    inputs = init_inputs("unet", config)
    params = jax.eval_shape(unet.init, jax.random.key(0), *inputs)["params"]
    forward = jaxpr_flops(jax.make_jaxpr(lambda p: unet.apply({"params": p}, *inputs))(params))
    train = jaxpr_flops(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(unet.apply({"params": p}, *inputs) ** 2)))(params))
    assert forward > 1e6 and train == pytest.approx(3 * forward, rel=0.02)
