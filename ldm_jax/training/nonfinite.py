"""Non-finite losses and gradients: never applied, counted on the device, acted on at log and checkpoint steps.

Inside the jitted train step, `keep_if_finite` selects the updated state only
when the loss and the gradient norm are finite, and the old one otherwise
(the step count still advances, so data order and per-step randomness stay
those of an uninterrupted run). The select is elementwise: XLA:GPU fuses it
into the optimizer update (no extra pass over the parameters), XLA:CPU runs
it as one small kernel per array (docs/experiments.md); there is no host round
trip either way. A NaN can therefore never reach the params, the optimizer state
or the EMA, and so never a checkpoint.

The step reports a 0/1 ``nonfinite`` flag; `NonFiniteTracker` sums the flags
and remembers the first bad step in device scalars, and the host reads them
only where it syncs anyway (metrics logging, checkpointing). There the
config's ``nan_policy`` applies:

    'stop'   raise `NonFiniteError` naming the first bad step, before anything
             else is saved: the last checkpoint (written before that step) stays the latest
    'skip'   carry on; the skips are counted in the metrics (``nonfinite_skips``,
             cumulative over resumes) and logged as a warning
"""

from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

POLICIES = ("stop", "skip")


class NonFiniteError(FloatingPointError):
    """A training step produced a NaN or Inf loss or gradient and the policy is 'stop'."""


def is_finite(*scalars: jax.Array) -> jax.Array:
    """bool scalar: every one of ``scalars`` is finite."""
    return jnp.all(jnp.stack([jnp.isfinite(jnp.asarray(s, jnp.float32)) for s in scalars]))


def keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``finite`` is True, else ``old``, leaf by leaf (trees of the same structure)."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


@jax.jit
def _accumulate(count: jax.Array, first: jax.Array, flag: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    bad = flag > 0
    return count + bad.astype(jnp.int32), jnp.where(bad & (first < 0), step, first)


class NonFiniteTracker:
    """Counts the steps whose update was skipped as non-finite, on the device; `check` reads and acts.

    ``stage`` and ``policy_key`` name the stage and its config key in
    messages; ``previous`` is the count saved with the checkpoint resumed from.
    """

    def __init__(self, policy: str, *, stage: str, policy_key: str, previous: int = 0):
        """Start counting from ``previous`` skips; ValueError for an unknown policy."""
        if policy not in POLICIES:
            raise ValueError(f"{policy_key} must be one of {POLICIES}, got {policy!r}")
        self.policy, self.stage, self.policy_key = policy, stage, policy_key
        self.total = int(previous)
        self._count, self._first = jnp.zeros((), jnp.int32), jnp.full((), -1, jnp.int32)

    def update(self, flag: jax.Array, step: int) -> None:
        """Record step ``step``'s 0/1 non-finite flag (asynchronously: nothing is fetched)."""
        self._count, self._first = _accumulate(self._count, self._first, flag, jnp.int32(step))

    def check(self, latest_checkpoint: int | None) -> int:
        """Fetch the counts; raise `NonFiniteError` under 'stop' if a step was bad, else return the total skips.

        ``latest_checkpoint`` (the step a re-run would resume from) goes into the message.
        """
        count, first = int(self._count), int(self._first)
        if not count:
            return self.total
        self._count, self._first = jnp.zeros((), jnp.int32), jnp.full((), -1, jnp.int32)
        self.total += count
        if self.policy == "stop":
            kept = (f"the latest checkpoint, step {latest_checkpoint}, is kept" if latest_checkpoint
                    else "no checkpoint was written yet")
            raise NonFiniteError(
                f"{self.stage}: non-finite loss or gradient at step {first} (its update was not applied); stopping "
                f"as {self.policy_key}='stop' says: {kept}. Lower the learning rate, check the data, or set "
                f"{self.policy_key}='skip' to skip such steps")
        logging.warning("%s: skipped %d non-finite update(s) since the last check, the first at step %d (%d in all)",
                        self.stage, count, first, self.total)
        return self.total
