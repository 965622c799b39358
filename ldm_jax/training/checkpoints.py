"""Checkpoints of a training workdir: everything the sampler needs to rebuild the `Pipeline`.

Layout on disk::

    WORKDIR/
      checkpoints/               an orbax CheckpointManager directory
        <step>/                  one folder per kept step (the newest ``keep``)
          params/                PyTree item: {'unet', 'vae', 'text_encoder'[, 'ema_unet']} param trees
          config/                JSON item: {'configs': {'unet', 'vae', 'text_encoder', 'scheduler'},
                                             'scale_factor': float}
          _CHECKPOINT_METADATA
      tokenizer/                 the CLIPTokenizer files (``tokenizer.save_pretrained``)

The params item holds only parameters; training state (optimizer state, data
iterator position, ...) goes into further items of the same step, which a
reader that does not ask for them ignores: add their handlers to
`item_handlers` and their save args next to `pipeline_save_args`'s.
Params are restored into the abstract tree that the saved configs describe, so
a checkpoint that does not fit its configs is reported key by key before any
array is read.

Every read goes through ``ldm_jax.training.damage.read_guarded``: a step whose
files were damaged after it was committed fails as a `DamagedCheckpointError`
naming its folder, the files and the error. The trainer moves such a step
aside (``<step>.damaged``, which orbax does not list) and resumes from the
newest step that reads back whole (`restore_latest_intact`).
"""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from ldm_jax import paths
from ldm_jax.models.clip import load_tokenizer, write_tokenizer
from ldm_jax.pipeline import COMPONENTS, Pipeline, abstract_params, build_modules
from ldm_jax.training.damage import DamagedCheckpointError, damaged, move_aside, read_guarded
from ldm_jax.weights.convert import WeightsMismatchError

PARAMS, CONFIG, STATE = "params", "config", "state"
EMA_UNET = "ema_unet"
def save_train_step(manager: ocp.CheckpointManager, step: int, params: dict[str, Any], state: Any,
                    config: dict[str, Any]) -> None:
    """Save ``params`` (by model name), the rest of the training ``state`` and a JSON ``config`` as ``step``.

    Asynchronous: call ``manager.wait_until_finished()`` before reading it back.
    """
    manager.save(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.PyTreeSave(flax.linen.meta.unbox(params)),
        STATE: ocp.args.PyTreeSave(flax.linen.meta.unbox(state)),
        CONFIG: ocp.args.JsonSave(config)}))


def restore_train_step(manager: ocp.CheckpointManager, step: int, params: dict[str, Any],
                       state: Any) -> tuple[dict[str, Any], Any]:
    """Restore the ``params`` and ``state`` items of ``step`` into the given abstract trees (with shardings).

    The params are checked key by key and shape by shape first.
    """
    restored_params = restore_params(manager, step, params, params_metadata(manager, step))
    restore = ocp.args.PyTreeRestore(state, restore_args=ocp.checkpoint_utils.construct_restore_args(state))
    restored_state = read_guarded(manager, step, lambda: jax.block_until_ready(manager.restore(
        step, args=ocp.args.Composite(**{STATE: restore}))[STATE]))
    return restored_params, restored_state


def unfinished_saves(manager: ocp.CheckpointManager) -> list[str]:
    """Names of the step folders whose save never finished (a process died while saving).

    Orbax (0.12) commits step ``N`` last: on a local disk it writes ``N.orbax-checkpoint-tmp/`` (each item in its
    own ``<item>.orbax-checkpoint-tmp/``) with ``commit_success.txt`` and then renames it to ``N/``; on object
    storage (no rename) it writes ``N/`` in place and ``N/commit_success.txt`` after everything else. A process
    killed before that last operation leaves a folder orbax never lists among the steps, so it is never restored,
    and the next save of step ``N`` replaces it.
    """
    return sorted(path.get().name for path in ocp.path.step.all_temporary_paths(manager.directory))


def resume_step(manager: ocp.CheckpointManager, stage: str) -> int:
    """The latest complete step of ``manager`` (0 if none), logging any unfinished save that is passed over."""
    unfinished = unfinished_saves(manager)
    if unfinished:
        logging.warning("%s: ignoring unfinished checkpoint save(s) %s in %s (the run died while saving); "
                        "resuming from the latest complete step", stage, unfinished, manager.directory)
    return manager.latest_step() or 0


def restore_latest_intact(manager: ocp.CheckpointManager, stage: str,
                          restore: Callable[[int], Any]) -> tuple[int, Any]:
    """``(step, restore(step))`` for the newest step that reads back whole, or ``(0, None)`` when none does.

    Logs any unfinished save passed over (`resume_step`); a step that raises
    `DamagedCheckpointError` (on any process) is logged (folder, file, error)
    and moved aside (`move_aside`, by process 0), and the step before it is
    tried.
    """
    step = resume_step(manager, stage)
    while step:
        try:
            restored, error = restore(step), None
        except DamagedCheckpointError as raised:
            restored, error = None, raised
        if not _on_any_process(error is not None):
            return step, restored
        if error is not None:
            logging.error("%s: %s", stage, error)
        if jax.process_index() == 0:
            logging.error("%s: moved checkpoint step %d aside to %s; trying the step before it", stage, step,
                          move_aside(manager, step))
        multihost_utils.sync_global_devices(f"{stage}: checkpoint step {step} moved aside")
        manager.reload()
        step = manager.latest_step() or 0
    return 0, None


def _on_any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (each reads only its own shards, so damage may show on one)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def abstract_like(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct``s of ``tree``'s arrays placed on ``shardings`` (a matching tree): a restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def read_config(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The JSON config item saved at ``step`` (`DamagedCheckpointError` when it does not read back)."""
    config = read_guarded(manager, step, lambda: manager.restore(
        step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG])
    if not isinstance(config, dict):
        raise damaged(manager, step, ValueError(f"its '{CONFIG}' item reads as {config!r}"))
    return config


def checkpoint_dir(workdir: str) -> str:
    """The orbax CheckpointManager directory of ``workdir``."""
    return str(epath.Path(workdir) / "checkpoints")


def item_handlers() -> dict[str, ocp.CheckpointHandler]:
    """The orbax handler of every item a step may hold, by item name."""
    return {PARAMS: ocp.PyTreeCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler(),
            STATE: ocp.PyTreeCheckpointHandler()}


def checkpoint_manager(workdir: str, *, keep: int | None = 3, create: bool = True) -> ocp.CheckpointManager:
    """An orbax CheckpointManager over ``WORKDIR/checkpoints`` that keeps the newest ``keep`` steps (None: all)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    directory = paths.absolute(checkpoint_dir(workdir))  # orbax needs absolute paths; workdirs may be relative
    return ocp.CheckpointManager(directory, options=options, item_handlers=item_handlers())


def pipeline_save_args(pipeline: Pipeline, ema_unet: Any = None) -> dict[str, ocp.args.CheckpointArgs]:
    """The save args of the params and config items, for ``manager.save(step, args=Composite(**args))``.

    ``ema_unet`` (optional) is an EMA copy of the U-Net params, stored beside
    them and preferred by `load_pipeline`.
    """
    params = {name: flax.linen.meta.unbox(pipeline.params[name]) for name in COMPONENTS}
    if ema_unet is not None:
        ema_unet = flax.linen.meta.unbox(ema_unet)
        if jax.tree.structure(ema_unet) != jax.tree.structure(params["unet"]):
            raise ValueError("ema_unet does not have the tree structure of the pipeline's U-Net params")
        params[EMA_UNET] = ema_unet
    config = {"configs": pipeline.configs, "scale_factor": pipeline.scale_factor}
    return {PARAMS: ocp.args.PyTreeSave(params), CONFIG: ocp.args.JsonSave(config)}


def save_tokenizer(workdir: str, tokenizer: Any) -> None:
    """Write the tokenizer files to ``WORKDIR/tokenizer`` (on the first process only; no-op for None)."""
    if tokenizer is not None and jax.process_index() == 0:
        write_tokenizer(tokenizer, str(epath.Path(workdir) / "tokenizer"))


def save_pipeline(workdir: str, step: int, pipeline: Pipeline, *, ema_unet: Any = None, keep: int | None = 3) -> str:
    """Save the pipeline's params and configs as checkpoint ``step`` of ``workdir``; returns the step's folder.

    Keeps the newest ``keep`` steps (None: all) and copies the tokenizer to
    ``WORKDIR/tokenizer``. Blocks until the checkpoint is written.
    """
    with checkpoint_manager(workdir, keep=keep) as manager:
        manager.save(step, args=ocp.args.Composite(**pipeline_save_args(pipeline, ema_unet)))
        manager.wait_until_finished()
    save_tokenizer(workdir, pipeline.tokenizer)
    return str(epath.Path(checkpoint_dir(workdir)) / str(step))


def available_steps(workdir: str) -> list[int]:
    """The saved steps of ``workdir``, oldest first; FileNotFoundError when there are none."""
    folder = checkpoint_dir(workdir)
    steps = []
    # exists() first: TensorFlow's is_dir answers False where storage refuses access; exists() raises its error.
    if epath.Path(folder).exists() and epath.Path(folder).is_dir():
        with checkpoint_manager(workdir, keep=None, create=False) as manager:
            steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {workdir}: expected step folders {folder}/<step>/ with items "
                                f"'{PARAMS}' and '{CONFIG}' (written by ldm_jax.training.checkpoints.save_pipeline)")
    return steps


def resolve_step(workdir: str, step: int | None = None) -> int:
    """``step`` if ``workdir`` has it (the latest step for None); FileNotFoundError listing the saved steps if not."""
    steps = available_steps(workdir)
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)}; "
                                f"available steps: {', '.join(map(str, steps))}")
    return step


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``'a/b/c' -> shape`` for every leaf of a nested dict of arrays or array metadata."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    return {"/".join(path): tuple(leaf.shape) for path, leaf in flat.items()}


def check_fits(stored: Any, abstract: Any, *, what: str) -> None:
    """Raise WeightsMismatchError naming every missing, unexpected and misshapen parameter of ``stored``."""
    found, expected = _shapes(stored), _shapes(abstract)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [f"{key}: expected shape {shape}, found {found[key]}"
                  for key, shape in sorted(expected.items()) if key in found and found[key] != shape]
    problems = [f"{len(keys)} {kind}: " + ", ".join(keys[:20])
                for kind, keys in (("missing key(s)", missing), ("unexpected key(s)", unexpected),
                                   ("shape mismatch(es)", mismatched)) if keys]
    if problems:
        raise WeightsMismatchError(f"{what} does not fit its model configs: " + " | ".join(problems))


def params_metadata(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The shapes and dtypes of the params item at ``step``, by component (no array is read)."""
    metadata = read_guarded(manager, step, lambda: manager.item_metadata(step)[PARAMS])
    if metadata is None:
        raise damaged(manager, step, FileNotFoundError(f"its '{PARAMS}' item has no readable metadata"))
    return metadata.tree


def restore_params(manager: ocp.CheckpointManager, step: int, abstract: dict[str, Any],
                   stored: dict[str, Any]) -> dict[str, Any]:
    """Restore the components named by the keys of ``abstract`` (any subset of the params item) at ``step``.

    ``abstract`` holds ``jax.ShapeDtypeStruct`` trees; their dtypes and
    shardings are those of the restored arrays. Keys and shapes are first
    checked against ``stored``, the step's `params_metadata`.
    """
    for name, tree in abstract.items():
        if name not in stored:
            raise WeightsMismatchError(f"checkpoint step {step} in {manager.directory} has no '{name}' params "
                                       f"(it has {sorted(stored)})")
        check_fits(stored[name], tree, what=f"'{name}' params of checkpoint step {step} in {manager.directory}")
    restore = ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                     partial_restore=True)
    # blocked on inside the guard: an array is whole only once every read of it has finished
    return read_guarded(manager, step, lambda: jax.block_until_ready(manager.restore(
        step, args=ocp.args.Composite(**{PARAMS: restore}))[PARAMS]))


def read_configs(manager: ocp.CheckpointManager, step: int) -> dict[str, dict]:
    """The model and scheduler configs saved at ``step``, the VAE's carrying the saved latent scale factor."""
    saved = read_config(manager, step)
    configs = saved["configs"]
    configs["vae"]["scaling_factor"] = saved["scale_factor"]
    return configs


def _abstract(module: Any, name: str, config: dict, sharding: jax.sharding.Sharding) -> Any:
    """The module's param shapes and dtypes as ``ShapeDtypeStruct``s placed on ``sharding``."""
    tree = flax.linen.meta.unbox(abstract_params(module, name, config))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _restore_pipeline(manager: ocp.CheckpointManager, step: int, use_ema: bool, dtype: Any, param_dtype: Any,
                      attention_impl: str) -> tuple[dict[str, dict], dict[str, Any], dict[str, Any]]:
    """The configs, modules and params (EMA U-Net as 'ema_unet' when used) of ``step``."""
    configs = read_configs(manager, step)
    modules = build_modules(configs, dtype, param_dtype, attention_impl=attention_impl)
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = {name: _abstract(modules[name], name, configs[name], sharding) for name in COMPONENTS}
    stored = params_metadata(manager, step)
    if use_ema and EMA_UNET in stored:
        abstract[EMA_UNET] = abstract.pop("unet")
    return configs, modules, restore_params(manager, step, abstract, stored)


def load_pipeline(workdir: str, step: int | None = None, *, use_ema: bool = True, dtype: Any = jnp.float32,
                  param_dtype: Any = jnp.float32, attention_impl: str = "auto") -> Pipeline:
    """The `Pipeline` saved as checkpoint ``step`` of ``workdir`` (the latest step for None).

    The EMA U-Net params are used when the checkpoint has them and
    ``use_ema``; ``dtype`` is the compute dtype, ``param_dtype`` that of the
    restored params (on the first local device); ``attention_impl`` the
    attention kernel (``ldm_jax.models.attention``). The tokenizer comes from
    ``WORKDIR/tokenizer`` (None when absent). A damaged step is a
    `DamagedCheckpointError` that names it and lists the other saved steps.
    """
    step = resolve_step(workdir, step)
    with checkpoint_manager(workdir, keep=None, create=False) as manager:
        try:
            configs, modules, params = _restore_pipeline(manager, step, use_ema, dtype, param_dtype, attention_impl)
        except DamagedCheckpointError as error:
            others = [s for s in available_steps(workdir) if s != step]
            hint = (f"; the other saved steps are {', '.join(map(str, others))} (choose one with step=N, "
                    "--step N on the command line)") if others else "; it is the only saved step"
            raise DamagedCheckpointError(f"{error}{hint}") from error
    if EMA_UNET in params:
        params["unet"] = params.pop(EMA_UNET)
    tokenizer_dir = epath.Path(workdir) / "tokenizer"
    tokenizer = load_tokenizer(str(tokenizer_dir)) if tokenizer_dir.is_dir() else None
    return Pipeline(**modules, params=params, configs=configs, tokenizer=tokenizer)
