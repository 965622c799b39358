"""Stage 2's train step on one CPU device: the batch in slices, each slice's pass a concurrent program of its own.

XLA:CPU runs each convolution on one thread, so one pass over the batch
leaves the other cores of a small host idle much of the time. Here the
U-Net's forward and backward pass runs on k interleaved slices of the batch,
each a program of its own with buffers of its own, and the step is 2 + k
programs:

1. ``prepare``: `step.noised_batch` of the whole batch (latent samples,
   timesteps, noise, loss weights) and, for a frozen text encoder, its
   context; split into k interleaved slices (`slice_of`);
2. k x ``slice_gradients``: the U-Net's (and a trained text encoder's)
   forward and backward pass on one slice, giving its share of the loss and
   of the gradient. Each is dispatched on an XLA execution stream of its own
   (`on_streams`): the runtime runs programs on different streams side by
   side, ordered only by the data they share;
3. ``update``: the shares summed, then `step.apply_gradients` (optimizer,
   EMA, non-finite guard), the state donated.

The loss and the update are `step.train_step`'s up to float rounding (the
gradient summed in another order). On configs/base.py's 2-core step this is
1.3x faster than one program (docs/experiments.md). Several devices already
run side by side, and accelerators run each kernel on the whole chip, so
`resolve_batch_slices` applies slices to a run on one CPU device only.
"""

import copy
import functools
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from jaxlib import xla_client

from ldm_jax.training.diffusion.step import (DiffusionTask, apply_gradients, encode_text, example_mse,
                                             noised_batch)
from ldm_jax.training.train_state import TrainState

PROGRAMS = ("prepare", "slice_gradients", "update")  # the programs of a step, in the order they run


def resolve_batch_slices(requested: int, device_batch: int) -> int:
    """The number of batch slices (``diffusion.batch_slices``) for a step whose devices each hold ``device_batch``
    examples; 1 is one program, k > 1 a `ConcurrentSliceStep`.

    0 means auto: 2 when the run has one device in all, a CPU with at least 2
    cores and an execution-stream API to run on, and ``device_batch`` is even;
    else 1. Two, not one per core: each slice adds a program to compile, and
    on 2 cores 4 slices were no faster than 2 (docs/experiments.md).
    ``requested`` > 1 is taken as given, with a ValueError naming
    ``diffusion.batch_slices`` unless it divides ``device_batch`` and the run
    is on one CPU device.
    """
    if requested < 0:
        raise ValueError(f"diffusion.batch_slices must be 0 (auto) or positive, got {requested}")
    if requested == 1:
        return 1
    reasons = []
    if jax.device_count() != 1:
        reasons.append(f"they run on one device, this run has {jax.device_count()}")
    if jax.default_backend() != "cpu":
        reasons.append(f"they are for a CPU, this run is on {jax.default_backend()!r}")
    if not hasattr(xla_client, "execution_stream_id"):
        reasons.append("this jaxlib has no xla_client.execution_stream_id")
    if requested:
        if reasons:
            raise ValueError(f"diffusion.batch_slices {requested} runs the slices as concurrent programs, which "
                             "does not apply here: " + "; ".join(reasons))
        if device_batch % requested:
            raise ValueError(f"diffusion.batch_slices {requested} does not divide the {device_batch} examples "
                             "each device holds of a batch")
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 2 if not reasons and cores >= 2 and device_batch % 2 == 0 else 1


def slice_of(batched: jax.Array, slices: int, index: int) -> jax.Array:
    """Interleaved slice ``index`` of ``slices`` of a batch: rows index, index + k, index + 2k, ..."""
    return batched.reshape(batched.shape[0] // slices, slices, *batched.shape[1:])[:, index]


def on_streams(fn: Callable[..., Any], per_stream_args: Iterable[Sequence[Any]]) -> list[Any]:
    """``fn(*args)`` for each ``args``, each call dispatched on its own XLA execution stream (1, 2, ...), so
    that the runtime may run the programs side by side. Returns their results in order (not waited on)."""
    results = []
    for stream, args in enumerate(per_stream_args, start=1):
        with xla_client.execution_stream_id(stream):
            results.append(fn(*args))
    return results


def sum_trees(trees: Sequence[Any]) -> Any:
    """The leafwise sum of trees of one structure (the slices' gradient shares)."""
    return jax.tree.map(lambda *leaves: sum(leaves[1:], leaves[0]), *trees)


def _prepare(task: DiffusionTask, slices: int, frozen: Mapping[str, Any], batch: Mapping[str, jax.Array],
             rng: jax.Array, step: jax.Array) -> tuple[tuple[dict[str, jax.Array], ...], jax.Array]:
    # A frozen text encoder's context is encoded here, a trained one's in the slice programs.
    inputs = noised_batch(task, frozen, batch, jax.random.fold_in(rng, step))
    if not task.train_text_encoder:
        inputs["context"] = encode_text(task, frozen["text_encoder"], inputs["ids"])
    sliced = tuple({name: slice_of(value, slices, s) for name, value in inputs.items()} for s in range(slices))
    return sliced, jnp.mean(inputs["weight"])


def _slice_gradients(task: DiffusionTask, slices: int, params: Mapping[str, Any],
                     inputs: Mapping[str, jax.Array]) -> tuple[Any, jax.Array, jax.Array]:
    # The slice's share of the loss and of the gradient of the trained ``params`` (a tree like the state's).
    batch_size = inputs["t"].shape[0] * slices

    def loss_share(params):
        context = (encode_text(task, params["text_encoder"], inputs["ids"]) if task.train_text_encoder
                   else inputs["context"])
        mse = example_mse(task, params["unet"], inputs["z_t"], inputs["t"], context, inputs["target"])
        return jnp.sum(inputs["weight"] * mse) / batch_size, jnp.sum(mse) / batch_size

    (loss, mse), grads = jax.value_and_grad(loss_share, has_aux=True)(params)
    return grads, loss, mse


def _update(task: DiffusionTask, optimizer: optax.GradientTransformation, state: TrainState,
            shares: Sequence[tuple[Any, jax.Array, jax.Array]],
            weight: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    grads = sum_trees([share[0] for share in shares])
    metrics = {"loss": sum(share[1] for share in shares), "mse": sum(share[2] for share in shares),
               "weight": weight}
    return apply_gradients(task, optimizer, state, grads, metrics)


class ConcurrentSliceStep:
    """``step(state, batch, frozen, rng) -> (state, metrics)``: `step.train_step`'s update, run as the programs
    of the module docstring on ``slices`` slices of the batch (the state donated).

    ``programs`` maps 'prepare', 'slice_gradients' and 'update' to the
    programs: jitted (each compiled at its first call), or compiled ahead of
    time by `compile`; ``calls`` says how often each runs in a step.
    """

    def __init__(self, task: DiffusionTask, optimizer: optax.GradientTransformation, slices: int):
        """Jit the three programs."""
        self.programs = {"prepare": jax.jit(functools.partial(_prepare, task, slices)),
                         "slice_gradients": jax.jit(functools.partial(_slice_gradients, task, slices)),
                         "update": jax.jit(functools.partial(_update, task, optimizer), donate_argnums=0)}
        self.calls = {"prepare": 1, "slice_gradients": slices, "update": 1}

    def compile(self, state: TrainState, batch: Mapping[str, Any], frozen: Mapping[str, Any],
                rng: jax.Array) -> tuple["ConcurrentSliceStep", TrainState]:
        """This step with its programs compiled for these arguments' shapes (arrays or ``ShapeDtypeStruct``s:
        nothing runs), as ``jax.stages.Compiled``, and ``state`` as it is (these programs take default
        layouts)."""
        prepare, slice_gradients, update = (self.programs[name] for name in PROGRAMS)
        sliced, weight = jax.eval_shape(prepare, frozen, batch, rng, state.step)
        shares = [jax.eval_shape(slice_gradients, state.params, inputs) for inputs in sliced]
        compiled = copy.copy(self)
        compiled.programs = {"prepare": prepare.lower(frozen, batch, rng, state.step).compile(),
                             "slice_gradients": slice_gradients.lower(state.params, sliced[0]).compile(),
                             "update": update.lower(state, shares, weight).compile()}
        return compiled, state

    def __call__(self, state: TrainState, batch: Mapping[str, jax.Array], frozen: Mapping[str, Any],
                 rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        """One step: dispatches the programs and returns without waiting for them."""
        prepare, slice_gradients, update = (self.programs[name] for name in PROGRAMS)
        sliced, weight = prepare(frozen, batch, rng, state.step)
        shares = on_streams(slice_gradients, [(state.params, inputs) for inputs in sliced])
        return update(state, shares, weight)
