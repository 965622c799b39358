"""bench/hardware.py: the peak FLOP/s table, XLA's FLOP count of a lowered program, MFU."""

import jax
import jax.numpy as jnp
import pytest

from bench.hardware import lowered_flops, peak_flops, utilization


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12),
    ("cpu", None), ("NVIDIA GeForce RTX 4090", None)])
def test_peak_flops_by_device_kind(kind, peak):
    assert peak_flops(kind) == peak


def test_lowered_flops_counts_a_matmul_and_utilization_divides():
    lowered = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 128)), jnp.ones((128, 32)))
    flops = lowered_flops(lowered)
    assert flops == 2 * 64 * 128 * 32
    assert utilization(flops, 0.5, 1e6) == {"achieved_flops_per_s": 2 * flops, "mfu": 2 * flops / 1e6}
    assert utilization(flops, 0.5, None)["mfu"] is None
