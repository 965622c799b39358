"""The hardware limit: peak dense bfloat16 FLOP/s per accelerator, and the FLOP rate and MFU of a measured step.

No torch, no JAX at import: the benchmarks' workers of either framework use it.
"""

from typing import Any

# (a substring of JAX's ``device_kind``, peak dense bfloat16 FLOP/s from the vendor's data sheet); the first
# match wins, so more specific names come first. TPU v5e reports 'TPU v5 lite', v5p 'TPU v5p' (or 'TPU v5').
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)


def peak_flops(device_kind: str) -> float | None:
    """Peak dense bfloat16 FLOP/s of a device kind from :data:`PEAK_BF16_FLOPS` (None when unknown, e.g. CPUs)."""
    return next((peak for name, peak in PEAK_BF16_FLOPS if name.lower() in device_kind.lower()), None)


def lowered_flops(lowered: Any) -> float:
    """FLOPs of a lowered (not yet optimized) JAX program, from XLA's cost analysis.

    Counted before XLA fuses or rewrites anything, so with a plain-XLA
    attention and no rematerialization this is the model's FLOP count; a
    compiled program's count can miss custom calls (cuDNN kernels) and adds
    recomputation.
    """
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list of one dict on older jax
    return float(cost["flops"])


def utilization(flops: float, seconds: float, peak: float | None) -> dict[str, float | None]:
    """The achieved FLOP rate of ``flops`` in ``seconds`` and the model FLOPs utilization against ``peak``."""
    achieved = flops / seconds
    return dict(achieved_flops_per_s=achieved, mfu=achieved / peak if peak else None)
