"""The hardware limit: peak dense bfloat16 FLOP/s per accelerator, a program's model FLOPs, and the FLOP rate and
MFU of a measured step; the machine and its load, and the JSON record, for every bench's report.

No torch, no JAX at import: the benchmarks' workers of either framework use it.
"""

import json
import math
import os
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


def jaxpr_flops(jaxpr: Any) -> float:
    """Model FLOPs of a (closed) jaxpr: 2 x the multiply-adds of its matmuls and convolutions.

    Counted from shapes alone, so it is the same on every backend (a GPU
    program's cost analysis misses its cuBLAS and cuDNN custom calls) and
    needs no compile: trace the step with ``jax.make_jaxpr`` and a plain
    attention (a fused kernel is an opaque primitive here). Nested jaxprs
    (jit, remat, custom derivatives) are counted once, ``scan`` bodies
    ``length`` times, the costliest branch of a ``cond``; a ``while`` body
    once (its trip count is not static). Elementwise work is not counted.
    """
    return sum(_equation_flops(eqn) for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns)


def _equation_flops(eqn: Any) -> float:
    """FLOPs of one jaxpr equation (see :func:`jaxpr_flops`)."""
    name = eqn.primitive.name
    if name == "dot_general":
        (contracting, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
    if name == "conv_general_dilated":
        kernel = eqn.invars[1].aval.shape
        out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel) / out_features
    total = 0.0
    for value in eqn.params.values():
        if _is_jaxpr(value):
            total += jaxpr_flops(value)
        elif isinstance(value, (tuple, list)) and value and all(_is_jaxpr(v) for v in value):
            total += max(jaxpr_flops(v) for v in value)  # cond branches: one runs
    return total * eqn.params.get("length", 1) if name == "scan" else total


def _is_jaxpr(value: Any) -> bool:
    """Whether ``value`` is a Jaxpr or ClosedJaxpr."""
    return hasattr(getattr(value, "jaxpr", value), "eqns")


def utilization(flops: float, seconds: float, peak: float | None) -> dict[str, float | None]:
    """The achieved FLOP rate of ``flops`` in ``seconds`` and the model FLOPs utilization against ``peak``."""
    achieved = flops / seconds
    return dict(achieved_flops_per_s=achieved, mfu=achieved / peak if peak else None)


def machine() -> dict:
    """JAX device kind, CPU model and the core count both frameworks use."""
    import jax

    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    return dict(device=jax.devices()[0].device_kind, cpu=cpu, cores=len(os.sched_getaffinity(0)))


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def report(record: dict, path: str | None) -> dict:
    """Print ``record`` as one JSON line and, with ``path``, also write it there (indented); returns it."""
    print(json.dumps(record))
    if path:
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
    return record
