"""What the benchmarks measure with: timing a call, timing several in alternating rounds, the relative difference
of two results, and a record's numbers rounded for its JSON line.

No torch, no JAX at import (as ``bench/hardware.py``): the benchmarks' workers of either framework use it. XLA's
cost and memory analyses of a compiled program are read by ``ldm_jax.training.compile_cost.program_cost``.
"""

import time
from typing import Any, Callable, Mapping, TypeVar

T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """Seconds ``fn()`` takes and its result (``fn`` blocks on asynchronous work itself)."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def alternating(calls: Mapping[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each of ``calls`` in each of ``rounds`` rounds, by name; a round calls each once, in order
    (ABAB...), so that load from other processes on a shared machine hits all of them alike."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(timed(call)[0])
    return times


def relative_difference(a: Any, b: Any, per_leaf: bool = False) -> float:
    """max |a - b| over max |b|, in float32, of two arrays or two trees of arrays of the same structure.

    Over a tree, both maxima are taken over all its leaves: per leaf, one whose values are zero up to rounding
    (e.g. the gradient of an attention key's bias) would dominate. ``per_leaf`` takes the largest of the
    leaves' own ratios instead. (The tests' ``ldm_jax.testing.max_rel_error`` divides by max(1, max |b|).)
    """
    import jax
    import jax.numpy as jnp

    if jax.tree.structure(a) != jax.tree.structure(b):
        raise ValueError(f"different trees: {jax.tree.structure(a)} and {jax.tree.structure(b)}")
    pairs = []
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jnp.shape(x) != jnp.shape(y):
            raise ValueError(f"different shapes: {jnp.shape(x)} and {jnp.shape(y)}")
        x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
        pairs.append((float(jnp.abs(x - y).max()), float(jnp.abs(y).max())))
    ratio = lambda difference, largest: difference / largest if largest else 0.0 if difference == 0 else float("inf")
    if per_leaf:
        return max(ratio(difference, largest) for difference, largest in pairs)
    return ratio(max(difference for difference, _ in pairs), max(largest for _, largest in pairs))


def rounded(value: Any) -> Any:
    """``value`` with floats to 4 significant digits, recursively through dicts and lists."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value
