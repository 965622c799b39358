"""Stage 2: train the text-conditioned U-Net on cached latents, with EMA, checkpoints and sample grids.

Checkpoints go to ``WORKDIR/checkpoints/<step>/`` in the layout that
``ldm_jax.training.checkpoints.load_pipeline`` (and so ``python -m
ldm_jax.sample --checkpoint WORKDIR``) reads: item ``params`` = {'unet',
'text_encoder', 'vae', 'ema_unet'}, item ``config`` = the model configs, the
latent scale factor and the VAE's reference, plus item ``state`` (step and
optimizer state) for resuming; the tokenizer goes to ``WORKDIR/tokenizer``.
Sample grids for fixed prompts go to ``WORKDIR/samples/step_<step>.png`` and
TensorBoard; metrics to ``WORKDIR/metrics.jsonl`` and TensorBoard.
"""

import dataclasses
import functools
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from ldm_jax import parallel
from ldm_jax.data import latents
from ldm_jax.data import shapes
from ldm_jax.data.pipeline import make_tokenizer
from ldm_jax.diffusion.sampling import Models, sample_fn
from ldm_jax.images import make_grid
from ldm_jax.models.clip import tokenize
from ldm_jax.pipeline import Pipeline, build_modules, init_inputs
from ldm_jax.training import checkpoints
from ldm_jax.training.diffusion_step import DiffusionTask, train_step
from ldm_jax.training.latent_cache import cache_folder, ensure_latents
from ldm_jax.training.metrics import MetricWriter
from ldm_jax.training.nonfinite import NonFiniteTracker
from ldm_jax.training.preemption import StopRequest
from ldm_jax.training.state import TrainState, learning_rate_schedule, make_optimizer, OPTIMIZER_DEFAULTS

SAMPLES_PER_GRID = 8


@dataclasses.dataclass
class Stage2:
    """What the stage-2 loop is built from: modules, configs, the frozen VAE, tokenizer and pretrained params."""
    configs: dict[str, dict]
    models: Models
    task: DiffusionTask
    vae: latents.FrozenVAE
    tokenizer: Any
    max_length: int
    pretrained: dict[str, Any] | None


def _model_configs(config: Mapping[str, Any], pretrained: Pipeline | None) -> dict[str, dict]:
    if pretrained is not None:
        return {name: dict(value) for name, value in pretrained.configs.items()}
    return {name: config[name].to_dict() if hasattr(config[name], "to_dict") else dict(config[name])
            for name in ("unet", "vae", "text_encoder", "scheduler")}


def setup(config: Mapping[str, Any], workdir: str) -> tuple[Stage2, dict[str, Any]]:
    """Build stage 2's parts (building the latent cache first if it is missing); also returns the manifest."""
    d = config["diffusion"]
    pretrained = Pipeline.from_pretrained(config["init_from"]) if config["init_from"] else None
    if pretrained is not None:
        logging.info("stage 2: fine-tuning %s (its models replace the config's unet/vae/text_encoder/scheduler)",
                     config["init_from"])
    manifest, vae = ensure_latents(config, workdir)
    configs = _model_configs(config, pretrained)
    configs["vae"] = vae.module.diffusers_config(scaling_factor=manifest["scale_factor"],
                                                 sample_size=config["image_size"])
    tokenizer = pretrained.tokenizer if pretrained is not None and pretrained.tokenizer else make_tokenizer(
        config["data"])
    if tokenizer is None:
        raise ValueError("stage 2 needs token ids: set data.tokenizer (a CLIP tokenizer folder) or init_from a "
                         "pipeline with a tokenizer/ folder")
    max_length = config["data"]["max_length"] or tokenizer.model_max_length
    modules = build_modules(configs, jnp.dtype(d["dtype"]))
    models = Models.create(modules["unet"], modules["vae"], modules["text_encoder"], configs["scheduler"],
                           manifest["scale_factor"])
    task = DiffusionTask(unet=modules["unet"], text_encoder=modules["text_encoder"], vae=None,
                         scheduler=models.scheduler, scale_factor=manifest["scale_factor"],
                         caption_dropout=d["caption_dropout"], min_snr_gamma=d["min_snr_gamma"],
                         train_text_encoder=d["train_text_encoder"], ema_decay=d["ema_decay"])
    params = None if pretrained is None else {n: pretrained.params[n] for n in ("unet", "text_encoder")}
    return Stage2(configs, models, task, vae, tokenizer, max_length, params), manifest


def trained_names(task: DiffusionTask) -> tuple[str, ...]:
    """The models whose params the optimizer updates."""
    return ("unet", "text_encoder") if task.train_text_encoder else ("unet",)


def init_state(stage: Stage2, optimizer: Any, rng: jax.Array,
               pretrained: dict[str, Any] | None = None) -> tuple[TrainState, dict[str, Any]]:
    """A fresh (boxed) train state and the frozen params: random, or ``pretrained`` ({'unet', 'text_encoder'}).

    ``pretrained`` is an argument, not a closed-over constant, so that jitting
    this function does not bake the weights into the program.
    """
    keys = dict(zip(("unet", "text_encoder"), jax.random.split(rng)))
    modules = {"unet": stage.task.unet, "text_encoder": stage.task.text_encoder}
    params = {name: module.init(keys[name], *init_inputs(name, stage.configs[name]))["params"]
              for name, module in modules.items()}
    if pretrained is not None:  # keep the logical-partitioning boxes, swap in the pretrained values
        params = jax.tree.map(lambda box, value: box.replace_boxed(value) if hasattr(box, "replace_boxed") else value,
                              params, pretrained, is_leaf=lambda x: hasattr(x, "replace_boxed"))
    trained = {name: params[name] for name in trained_names(stage.task)}
    frozen = {name: params[name] for name in params if name not in trained}
    ema = {"unet": params["unet"]} if stage.task.ema_decay > 0 else {}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trained, opt_state=optimizer.init(trained), ema=ema)
    return state, frozen


def sample_prompts(config: Mapping[str, Any]) -> list[str]:
    """The grid's prompts: ``diffusion.sample_prompts``, or for ('',) the first test-split captions of ldm_shapes.

    ``run_config.validate`` has refused ('',) for other data sources.
    """
    prompts = list(config["diffusion"]["sample_prompts"])
    if prompts == [""]:
        prompts = [shapes.example("test", i)["caption"] for i in range(SAMPLES_PER_GRID)]
    return prompts


def train_diffusion(config: Mapping[str, Any], workdir: str, stop: StopRequest | None = None) -> dict[str, float]:
    """Train stage 2 to ``diffusion.steps`` (resuming from the workdir); returns the last logged metrics.

    ``stop`` (from ``ldm_jax.train``) ends the loop early on SIGTERM, after
    saving the step it stopped at. Non-finite steps are handled as
    ``diffusion.nan_policy`` says (``ldm_jax.training.nonfinite``).
    """
    d = config["diffusion"]
    mesh = parallel.make_mesh(config["mesh"])
    batch_size = d["batch_size"] or config["data"]["batch_size"]
    parallel.check_batch(batch_size, mesh)
    stage, manifest = setup(config, workdir)
    optimizer = make_optimizer(d["optimizer"], d["steps"])
    schedule = learning_rate_schedule({**OPTIMIZER_DEFAULTS, **d["optimizer"]}, d["steps"])
    rng = jax.random.key(config["seed"])
    (state, frozen), shardings = parallel.sharded_init(functools.partial(init_state, stage, optimizer), mesh,
                                                       jax.random.fold_in(rng, 0), stage.pretrained)
    state_shardings, frozen_shardings = shardings
    manager = checkpoints.checkpoint_manager(workdir, keep=d["keep"])
    start = checkpoints.resume_step(manager, "stage 2")
    if start >= d["steps"]:
        logging.info("stage 2: %s already holds step %d of %d; nothing to train", workdir, start, d["steps"])
        return {}
    skips = 0
    if start:
        state, frozen = _restore(manager, start, state, frozen, state_shardings, frozen_shardings, stage.task)
        skips = checkpoints.read_config(manager, start).get("nonfinite_skips", 0)
        logging.info("stage 2: resumed from step %d in %s", start, workdir)
    tracker = NonFiniteTracker(d["nan_policy"], stage="stage 2", policy_key="diffusion.nan_policy", previous=skips)

    batch_sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    step_fn = jax.jit(functools.partial(train_step, stage.task, optimizer),
                      in_shardings=(state_shardings, batch_sharding, frozen_shardings, replicated),
                      out_shardings=(state_shardings, replicated), donate_argnums=0)
    vae_params = jax.device_put(stage.vae.params, replicated)
    empty = np.asarray(tokenize(stage.tokenizer, [""], stage.max_length), np.int32)
    if d["sample_every"] >= 0:  # -1: no sample grids
        cond = np.asarray(tokenize(stage.tokenizer, sample_prompts(config), stage.max_length), np.int32)
    checkpoints.save_tokenizer(workdir, stage.tokenizer)
    writer = MetricWriter(workdir)
    writer.restart_at(start)
    if not start:
        writer.write(0, {"skipped_images": manifest.get("skipped", {}).get("train", 0)}, prefix="data/")

    def pipeline_params() -> dict[str, Any]:
        text = state.params["text_encoder"] if stage.task.train_text_encoder else frozen["text_encoder"]
        return {"unet": state.params["unet"], "text_encoder": text, "vae": vae_params}

    def save(step: int) -> None:
        params = {**pipeline_params(), **({"ema_unet": state.ema["unet"]} if state.ema else {})}
        saved = {"configs": stage.configs, "scale_factor": stage.models.scale_factor, "vae": stage.vae.reference,
                 "nonfinite_skips": tracker.check(manager.latest_step())}
        checkpoints.save_train_step(manager, step, params, {"step": state.step, "opt_state": state.opt_state},
                                    saved)

    def sample_grid(step: int) -> None:
        params = {**pipeline_params(), **({"unet": state.ema["unet"]} if state.ema else {})}
        size = config["image_size"]
        images = sample_fn(params, cond, np.repeat(empty, len(cond), 0), jax.random.fold_in(rng, 2),
                           models=stage.models, sampler=d["sample_sampler"], steps=d["sample_steps"],
                           guidance_scale=d["guidance_scale"], height=size, width=size)
        grid = make_grid(np.asarray(images))
        if jax.process_index() == 0:
            os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
            grid.save(os.path.join(workdir, "samples", f"step_{step:06d}.png"))
        writer.write_images(step, "samples", np.asarray(grid)[None])

    iterator = latents.LatentIterator(cache_folder(config, workdir), "train", batch_size, config["seed"],
                                      start_step=start)
    per_host = batch_size // jax.process_count()
    empty_rows = np.repeat(empty, per_host, 0)
    logged, started, timed_from = {}, time.time(), start
    bar = tqdm.tqdm(total=d["steps"], initial=start, desc="stage 2", disable=jax.process_index() != 0)
    try:
        for step in range(start, d["steps"]):
            batch = next(iterator)
            batch = {"mean": batch["mean"], "logvar": batch["logvar"], "input_ids": batch["input_ids"],
                     "empty_ids": empty_rows}
            state, metrics = step_fn(state, parallel.shard_batch(batch, mesh), frozen, jax.random.fold_in(rng, 1))
            done = step + 1
            tracker.update(metrics.pop("nonfinite"), done)
            bar.update(1)
            last = done == d["steps"]
            preempted = stop is not None and stop.should_stop(done)
            if done % d["log_every"] == 0 or last or preempted:
                elapsed = time.time() - started
                rates = {"steps_per_sec": (done - timed_from) / elapsed,
                         "images_per_sec": (done - timed_from) * batch_size / elapsed, "lr": schedule(step),
                         "nonfinite_skips": tracker.check(manager.latest_step())}
                logged = writer.write(done, {**metrics, **rates}, prefix="train/")
                bar.set_postfix(loss=f"{logged['train/loss']:.4f}")
            if done % d["checkpoint_every"] == 0 or last or preempted:
                save(done)
            if d["sample_every"] >= 0 and ((d["sample_every"] and done % d["sample_every"] == 0) or last):
                sample_grid(done)
            if preempted:
                logging.warning("stage 2: stopped at step %d of %d on %s; the same command resumes from there",
                                done, d["steps"], stop.received or "the preemption notice")
                break
            if done % d["log_every"] == 0:
                started, timed_from = time.time(), done
    finally:  # also on errors: a save in flight completes, so the last checkpoint is whole
        bar.close()
        manager.wait_until_finished()
        manager.close()
        writer.flush()
    return logged


def _restore(manager: Any, step: int, state: TrainState, frozen: dict[str, Any], state_shardings: TrainState,
             frozen_shardings: dict[str, Any], task: DiffusionTask) -> tuple[TrainState, dict[str, Any]]:
    """The state and frozen params saved at ``step``, placed on their shardings."""
    params = {**checkpoints.abstract_like(state.params, state_shardings.params),
              **checkpoints.abstract_like(frozen, frozen_shardings)}
    if state.ema:
        params["ema_unet"] = checkpoints.abstract_like(state.ema["unet"], state_shardings.ema["unet"])
    rest = checkpoints.abstract_like({"step": state.step, "opt_state": state.opt_state},
                    {"step": state_shardings.step, "opt_state": state_shardings.opt_state})
    restored, rest = checkpoints.restore_train_step(manager, step, params, rest)
    trained = {name: restored[name] for name in trained_names(task)}
    ema = {"unet": restored["ema_unet"]} if state.ema else {}
    state = TrainState(step=rest["step"], params=trained, opt_state=rest["opt_state"], ema=ema)
    return state, {name: restored[name] for name in frozen}
