"""Stage 2's train step on one CPU device as concurrent programs, one per slice of the batch.

XLA:CPU runs each convolution on one thread, so one pass over the batch
leaves the second core of a small host idle much of the time. Slices of
the batch inside one program (``diffusion_step.in_slices``) gain less than
they could: the program's buffers are reused between the slices' kernels,
which orders much of one slice's work after the other's. Here each slice
is a program of its own, with buffers of its own, and the step is 2 + k
programs:

1. ``prepare``: `diffusion_step.denoising_inputs` of the whole batch (latent
   samples, the frozen text encoder, timesteps, noise and loss weights), split
   into k interleaved slices as `in_slices` splits them; a trained text
   encoder's context is left to the slice programs;
2. k x ``slice_gradients``: the U-Net's (and a trained text encoder's)
   forward and backward pass on one slice, giving its share of the loss and
   of the gradient. Each is
   dispatched on an XLA execution stream of its own (`on_streams`): the
   runtime runs one stream's programs one after another, and programs on
   different streams side by side, ordered only by the data they share;
3. ``update``: the shares summed, then `diffusion_step.apply_gradients`
   (optimizer, EMA, non-finite guard), the state donated.

The loss and the update are `diffusion_step.train_step`'s up to float
rounding (the gradient summed in another order). README "Results" gives the
speed against one program with the same slices. `resolve_concurrent_slices`
says where this applies: one device (several devices already run side by
side, and a program per slice would gather sharded parameters once per
slice) and a CPU.
"""

import copy
import functools
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from jaxlib import xla_client

from ldm_jax.training.diffusion.step import (DiffusionTask, apply_gradients, denoising_inputs, example_mse,
                                             noising_inputs, slice_of, text_context)
from ldm_jax.training.train_state import TrainState

SLICE_EXECUTION = ("auto", "concurrent", "in_program")
PROGRAMS = ("prepare", "slice_gradients", "update")  # the programs of a step, in the order they run


def streams_supported() -> bool:
    """Whether this jaxlib can dispatch a program on a chosen XLA execution stream."""
    return hasattr(xla_client, "execution_stream_id")


def check_slice_execution(value: str) -> None:
    """ValueError naming ``diffusion.slice_execution`` unless ``value`` is one of :data:`SLICE_EXECUTION`."""
    if value not in SLICE_EXECUTION:
        raise ValueError(f"diffusion.slice_execution must be one of {list(SLICE_EXECUTION)}, got {value!r}")


def resolve_concurrent_slices(requested: str, slices: int) -> bool:
    """Whether stage 2 runs its ``slices`` batch slices as concurrent programs (``diffusion.slice_execution``).

    'auto': yes when there is more than one slice and the step qualifies (module docstring); 'in_program': no;
    'concurrent': yes, and ValueError naming the key and the reason when the step does not qualify.
    """
    check_slice_execution(requested)
    if requested == "in_program" or slices == 1:
        return False
    reasons = []
    if jax.device_count() != 1:
        reasons.append(f"it runs on one device, this run has {jax.device_count()}")
    if jax.default_backend() != "cpu":
        reasons.append(f"it is for a CPU, this run is on {jax.default_backend()!r}")
    if not streams_supported():
        reasons.append("this jaxlib has no xla_client.execution_stream_id")
    if reasons and requested == "concurrent":
        raise ValueError("diffusion.slice_execution='concurrent' does not apply: " + "; ".join(reasons))
    return not reasons


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


def _prepare(task: DiffusionTask, frozen: Mapping[str, Any], batch: Mapping[str, jax.Array], rng: jax.Array,
             step: jax.Array) -> tuple[tuple[dict[str, jax.Array], ...], jax.Array]:
    # No trained params: a frozen text encoder's context is encoded here, a trained one's in the slice programs.
    rng = jax.random.fold_in(rng, step)
    inputs = (noising_inputs(task, frozen, batch, rng) if task.train_text_encoder
              else denoising_inputs(task, {}, frozen, batch, rng))
    k = task.batch_slices
    sliced = tuple({name: slice_of(value, k, s) for name, value in inputs.items()} for s in range(k))
    return sliced, jnp.mean(inputs["weight"])


def _slice_gradients(task: DiffusionTask, params: Mapping[str, Any],
                     inputs: Mapping[str, jax.Array]) -> tuple[Any, jax.Array, jax.Array]:
    # The slice's share of the loss and of the gradient of the trained ``params`` (a tree like the state's).
    batch_size = inputs["t"].shape[0] * task.batch_slices

    def loss_share(params):
        context = (text_context(task, params["text_encoder"], inputs["ids"]) if task.train_text_encoder
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
    """``step(state, batch, frozen, rng) -> (state, metrics)``: `diffusion_step.train_step`'s update, run as
    the programs of the module docstring on ``task.batch_slices`` slices (the state donated).

    ``programs`` maps 'prepare', 'slice_gradients' and 'update' to the
    programs: jitted (each compiled at its first call), or compiled ahead of
    time by `compile`.
    """

    def __init__(self, task: DiffusionTask, optimizer: optax.GradientTransformation):
        """Jit the three programs."""
        self.programs = {"prepare": jax.jit(functools.partial(_prepare, task)),
                         "slice_gradients": jax.jit(functools.partial(_slice_gradients, task)),
                         "update": jax.jit(functools.partial(_update, task, optimizer), donate_argnums=0)}

    def compile(self, state: TrainState, batch: Mapping[str, Any], frozen: Mapping[str, Any],
                rng: jax.Array) -> "ConcurrentSliceStep":
        """This step with its programs compiled for these arguments' shapes (arrays or ``ShapeDtypeStruct``s:
        nothing runs), as ``jax.stages.Compiled`` (their HLO text, cost and memory analyses)."""
        prepare, slice_gradients, update = (self.programs[name] for name in PROGRAMS)
        sliced, weight = jax.eval_shape(prepare, frozen, batch, rng, state.step)
        shares = [jax.eval_shape(slice_gradients, state.params, inputs) for inputs in sliced]
        compiled = copy.copy(self)
        compiled.programs = {"prepare": prepare.lower(frozen, batch, rng, state.step).compile(),
                             "slice_gradients": slice_gradients.lower(state.params, sliced[0]).compile(),
                             "update": update.lower(state, shares, weight).compile()}
        return compiled

    def __call__(self, state: TrainState, batch: Mapping[str, jax.Array], frozen: Mapping[str, Any],
                 rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        """One step: dispatches the programs and returns without waiting for them."""
        prepare, slice_gradients, update = (self.programs[name] for name in PROGRAMS)
        sliced, weight = prepare(frozen, batch, rng, state.step)
        shares = on_streams(slice_gradients, [(state.params, inputs) for inputs in sliced])
        return update(state, shares, weight)
