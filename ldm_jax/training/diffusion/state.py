"""Stage 2's parts on a device mesh: the one builder of task, optimizer, state, frozen params and train step.

`build` is what the stage-2 loop, ``python -m ldm_jax.compile_check`` and
the benchmarks make their stage 2 with, so that all of them lay out and step
the same state. The shardings come from ``jax.eval_shape`` of `init_state`
and the logical axis rules (the config's ``mesh.axis_rules``, see
``ldm_jax.parallel``), checked against the parameters' shapes before anything
is compiled; the frozen text encoder follows ``mesh.frozen``.

The train step is one type whatever runs it (`make_train_step`): called as
``step(state, batch, frozen, rng) -> (state, metrics)``, compiled ahead of
time by ``step.compile(state, batch, frozen, rng) -> (compiled step,
state)``, its programs in ``step.programs`` (and ``step.calls``: how often
each runs a step). It is a `JittedStep` (one program over the mesh) or, with
batch slices on one CPU device, a ``cpu_step.ConcurrentSliceStep``.

The state's memory layouts are the config's ``diffusion.state_layout``:
'default' (row-major) or 'auto', the layouts XLA picks for the step. On a
GPU 'auto' keeps convolution kernels, their Adam moments and EMA in cuDNN's
filter layout, so the step no longer transposes each kernel, its gradient
and its moments every step (SD 1.5 at batch 16 on an H200: 0.142 -> 0.130 s,
docs/experiments.md); on a CPU XLA picks the default layouts.
"""

import copy
import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.experimental.layout import Format, Layout

from ldm_jax import parallel
from ldm_jax.diffusion.sample_fn import Models
from ldm_jax.pipeline import build_modules, init_inputs
from ldm_jax.training import checkpoints
from ldm_jax.training.cpu_step import ConcurrentSliceStep, resolve_batch_slices
from ldm_jax.training.diffusion.step import DiffusionTask, task_from_settings, train_step
from ldm_jax.training.train_state import TrainState, check_state_layout, make_optimizer

EMA_UNET = checkpoints.EMA_UNET


def trained_names(task: DiffusionTask) -> tuple[str, ...]:
    """The models whose params the optimizer updates."""
    return ("unet", "text_encoder") if task.train_text_encoder else ("unet",)


def init_state(task: DiffusionTask, configs: Mapping[str, dict], optimizer: optax.GradientTransformation,
               rng: jax.Array, pretrained: dict[str, Any] | None = None) -> tuple[TrainState, dict[str, Any]]:
    """A fresh (boxed) train state and the frozen params: random, or ``pretrained`` ({'unet', 'text_encoder'}).

    ``configs`` holds the 'unet' and 'text_encoder' config dicts. ``pretrained``
    is an argument, not a closed-over constant, so that jitting this function
    does not bake the weights into the program.
    """
    keys = dict(zip(("unet", "text_encoder"), jax.random.split(rng)))
    modules = {"unet": task.unet, "text_encoder": task.text_encoder}
    params = {name: module.init(keys[name], *init_inputs(name, configs[name]))["params"]
              for name, module in modules.items()}
    if pretrained is not None:  # keep the logical-partitioning boxes, swap in the pretrained values
        params = jax.tree.map(lambda box, value: box.replace_boxed(value) if hasattr(box, "replace_boxed") else value,
                              params, pretrained, is_leaf=lambda x: hasattr(x, "replace_boxed"))
    trained = {name: params[name] for name in trained_names(task)}
    frozen = {name: params[name] for name in params if name not in trained}
    ema = {"unet": params["unet"]} if task.ema_decay > 0 else {}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trained, opt_state=optimizer.init(trained), ema=ema)
    return state, frozen


def _boxed_shapes(task: DiffusionTask, configs: Mapping[str, dict],
                  optimizer: optax.GradientTransformation) -> tuple[TrainState, dict[str, Any]]:
    return jax.eval_shape(functools.partial(init_state, task, configs, optimizer), jax.random.key(0))


def state_shardings(task: DiffusionTask, configs: Mapping[str, dict], optimizer: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, frozen_layout: str = "shard",
                    rules: Any = parallel.LOGICAL_AXIS_RULES) -> tuple[TrainState, dict[str, Any]]:
    """The shardings of (state, frozen params), from their abstract shapes and the logical axis ``rules``;
    ValueError naming parameters that do not fit the mesh (before anything is compiled)."""
    state, frozen = _boxed_shapes(task, configs, optimizer)
    return (parallel.logical_shardings(state, mesh, rules),
            parallel.frozen_shardings(frozen, mesh, frozen_layout, rules))


def create_state(task: DiffusionTask, configs: Mapping[str, dict], optimizer: optax.GradientTransformation,
                 mesh: jax.sharding.Mesh, rng: jax.Array, pretrained: dict[str, Any] | None = None,
                 frozen_layout: str = "shard", rules: Any = parallel.LOGICAL_AXIS_RULES, shardings: Any = None
                 ) -> tuple[TrainState, dict[str, Any], tuple[TrainState, dict]]:
    """A train state and frozen params born sharded on ``mesh`` (``shardings``, by default `state_shardings`),
    and their shardings."""
    if shardings is None:
        shardings = state_shardings(task, configs, optimizer, mesh, frozen_layout, rules)
    (state, frozen), _ = parallel.sharded_init(functools.partial(init_state, task, configs, optimizer), mesh, rng,
                                               pretrained, shardings=shardings)
    return state, frozen, shardings


def abstract_state(task: DiffusionTask, configs: Mapping[str, dict], optimizer: optax.GradientTransformation,
                   mesh: jax.sharding.Mesh, frozen_layout: str = "shard", rules: Any = parallel.LOGICAL_AXIS_RULES,
                   shardings: Any = None) -> tuple[TrainState, dict[str, Any]]:
    """(state, frozen) as ``ShapeDtypeStruct``s placed on ``shardings`` (by default `state_shardings`): nothing
    is allocated."""
    if shardings is None:
        shardings = state_shardings(task, configs, optimizer, mesh, frozen_layout, rules)
    return checkpoints.abstract_like(nn.meta.unbox(_boxed_shapes(task, configs, optimizer)), shardings)


def state_formats(shardings: Any, state_layout: str) -> Any:
    """The state's ``shardings`` as jit takes them for ``state_layout`` ('auto' or 'default'): as they are for
    'default', each with ``Layout.AUTO`` for 'auto'."""
    check_state_layout(state_layout)
    return jax.tree.map(lambda s: Format(Layout.AUTO, s), shardings) if state_layout == "auto" else shardings


def compile_with_state(jitted: Any, state: Any, *args: Any) -> tuple[jax.stages.Compiled, Any]:
    """``jitted`` compiled for ``state`` and the other arguments ``args``, and ``state`` moved (donated) into the
    layouts the compiled program takes.

    The state is lowered abstractly, so that an 'auto' layout is XLA's to
    pick; the arrays it returns keep the picked layouts step after step, and
    any other jitted function or checkpoint reads them as usual. An abstract
    ``state`` (``ShapeDtypeStruct``s) comes back as it is.
    """
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    compiled = jitted.lower(abstract, *args).compile()
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state)):
        return compiled, state
    return compiled, jax.device_put(state, compiled.input_formats[0][0], donate=True)


class JittedStep:
    """`step.train_step` as one program jitted over the mesh: the state on its shardings (in the layouts of
    ``state_layout``), the batch split over the batch axes, replicated metrics, the state donated."""

    def __init__(self, task: DiffusionTask, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                 shardings: tuple[TrainState, dict[str, Any]], state_layout: str = "default"):
        """Jit the step (compiled at its first call, or ahead of time by `compile`)."""
        state_sh, frozen_sh = shardings
        state_sh = state_formats(state_sh, state_layout)
        batch, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
        self.programs = {"train_step": jax.jit(functools.partial(train_step, task, optimizer),
                                               in_shardings=(state_sh, batch, frozen_sh, replicated),
                                               out_shardings=(state_sh, replicated), donate_argnums=0)}
        self.calls = {"train_step": 1}

    def compile(self, state: TrainState, batch: Mapping[str, Any], frozen: Mapping[str, Any],
                rng: jax.Array) -> tuple["JittedStep", TrainState]:
        """This step compiled for these arguments' shapes (arrays or ``ShapeDtypeStruct``s), and ``state``
        in the layouts it takes (`compile_with_state`): call the compiled step from then on."""
        compiled = copy.copy(self)
        program, state = compile_with_state(self.programs["train_step"], state, batch, frozen, rng)
        compiled.programs = {"train_step": program}
        return compiled, state

    def __call__(self, state: TrainState, batch: Mapping[str, jax.Array], frozen: Mapping[str, Any],
                 rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        """One step (dispatched, not waited on)."""
        return self.programs["train_step"](state, batch, frozen, rng)


def make_train_step(task: DiffusionTask, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                    shardings: tuple[TrainState, dict[str, Any]], state_layout: str = "default",
                    batch_slices: int = 1) -> JittedStep | ConcurrentSliceStep:
    """The train step: a `JittedStep`, or for ``batch_slices`` > 1 (``cpu_step.resolve_batch_slices``: one CPU
    device) a ``ConcurrentSliceStep`` in the default layouts (a CPU's 'auto' pick)."""
    if batch_slices > 1:
        return ConcurrentSliceStep(task, optimizer, batch_slices)
    return JittedStep(task, optimizer, mesh, shardings, state_layout)


@dataclasses.dataclass(frozen=True)
class Stage2:
    """Stage 2 built for a mesh (`build`): the models (for sampling), the task and optimizer, the state's
    shardings and the train step."""
    configs: Mapping[str, dict]
    models: Models
    task: DiffusionTask
    optimizer: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    frozen_layout: str
    rules: Any
    shardings: tuple[TrainState, dict[str, Any]]
    step: JittedStep | ConcurrentSliceStep
    batch_slices: int

    def init(self, rng: jax.Array, pretrained: dict[str, Any] | None = None) -> tuple[TrainState, dict[str, Any]]:
        """The state and frozen params born sharded on the mesh: random, or ``pretrained`` (`create_state`)."""
        state, frozen, _ = create_state(self.task, self.configs, self.optimizer, self.mesh, rng, pretrained,
                                        shardings=self.shardings)
        return state, frozen

    def abstract(self) -> tuple[TrainState, dict[str, Any]]:
        """(state, frozen) as ``ShapeDtypeStruct``s on their shardings (`abstract_state`)."""
        return abstract_state(self.task, self.configs, self.optimizer, self.mesh, shardings=self.shardings)


def build(configs: Mapping[str, dict], settings: Mapping[str, Any], mesh: jax.sharding.Mesh, global_batch: int,
          scale_factor: float, attention_impl: str = "auto", frozen_layout: str = "shard",
          rules: Any = parallel.LOGICAL_AXIS_RULES) -> Stage2:
    """Stage 2 of the models in ``configs`` ('unet', 'vae', 'text_encoder', 'scheduler' config dicts) under a
    run config's ``diffusion`` section ``settings`` (dtype, remat policy, loss, EMA, optimizer, state layout,
    batch slices) for steps of ``global_batch`` examples over ``mesh``.

    ValueErrors name the parameters that do not fit the mesh and batch
    slices that do not apply (before anything is compiled).
    """
    modules = build_modules(configs, jnp.dtype(settings["dtype"]), attention_impl=attention_impl,
                            remat_policy=settings["remat_policy"])
    models = Models.create(modules["unet"], modules["vae"], modules["text_encoder"], configs["scheduler"],
                           scale_factor)
    task = task_from_settings(modules["unet"], modules["text_encoder"], models.scheduler, scale_factor, settings)
    optimizer = make_optimizer(settings["optimizer"], settings["steps"])
    shardings = state_shardings(task, configs, optimizer, mesh, frozen_layout, rules)
    slices = resolve_batch_slices(settings["batch_slices"], global_batch // parallel.data_parallel_size(mesh))
    step = make_train_step(task, optimizer, mesh, shardings, settings["state_layout"], slices)
    return Stage2(configs, models, task, optimizer, mesh, frozen_layout, rules, shardings, step, slices)


def checkpoint_params(task: DiffusionTask, state: TrainState, frozen: dict[str, Any]) -> dict[str, Any]:
    """The params item of a stage-2 checkpoint: 'unet', 'text_encoder' and, with EMA, 'ema_unet'."""
    text = state.params["text_encoder"] if task.train_text_encoder else frozen["text_encoder"]
    params = {"unet": state.params["unet"], "text_encoder": text}
    if state.ema:
        params[EMA_UNET] = state.ema["unet"]
    return params


def save_state(manager: Any, step: int, task: DiffusionTask, state: TrainState, frozen: dict[str, Any],
               config: dict[str, Any], extra_params: dict[str, Any] | None = None) -> None:
    """Save the state as checkpoint ``step``: `checkpoint_params` (plus ``extra_params``, e.g. the VAE's),
    the step and optimizer state, and the JSON ``config`` item (asynchronous)."""
    params = {**checkpoint_params(task, state, frozen), **(extra_params or {})}
    checkpoints.save_train_step(manager, step, params, {"step": state.step, "opt_state": state.opt_state}, config)


def restore_state(manager: Any, step: int, task: DiffusionTask, state: TrainState, frozen: dict[str, Any],
                  shardings: tuple[TrainState, dict[str, Any]]) -> tuple[TrainState, dict[str, Any]]:
    """The state and frozen params saved at ``step``, restored onto ``shardings`` (``state`` and ``frozen``
    give the shapes; any mesh works, whatever mesh saved them)."""
    state_sh, frozen_sh = shardings
    params = checkpoints.abstract_like(checkpoint_params(task, state, frozen),
                                       checkpoint_params(task, state_sh, frozen_sh))
    rest = checkpoints.abstract_like({"step": state.step, "opt_state": state.opt_state},
                                     {"step": state_sh.step, "opt_state": state_sh.opt_state})
    restored, rest = checkpoints.restore_train_step(manager, step, params, rest)
    trained = {name: restored[name] for name in trained_names(task)}
    ema = {"unet": restored[EMA_UNET]} if state.ema else {}
    state = TrainState(step=rest["step"], params=trained, opt_state=rest["opt_state"], ema=ema)
    return state, {name: restored[name] for name in frozen}
