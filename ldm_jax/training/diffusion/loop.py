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
import time
from typing import Any, Mapping

import jax
import numpy as np
import tqdm
from absl import logging
from etils import epath

from ldm_jax import parallel, paths
from ldm_jax.data import latents, shapes
from ldm_jax.data.input_pipeline import make_tokenizer
from ldm_jax.diffusion.sample_fn import sample_fn
from ldm_jax.images import make_grid
from ldm_jax.models.clip import tokenize
from ldm_jax.pipeline import Pipeline, model_configs
from ldm_jax.training import checkpoints
from ldm_jax.training.diffusion import state as diffusion_state
from ldm_jax.training.latent_cache import cache_folder, ensure_latents
from ldm_jax.training.metrics import DeferredWriter, MetricWriter
from ldm_jax.training.nonfinite import NonFiniteTracker
from ldm_jax.training.preemption import StopRequest
from ldm_jax.training.train_state import OPTIMIZER_DEFAULTS, learning_rate_schedule

SAMPLES_PER_GRID = 8


@dataclasses.dataclass
class Inputs:
    """What stage 2 trains from besides its config: the model configs, the frozen VAE, the tokenizer and the
    pretrained params (None: random), and the latent cache's manifest."""
    configs: dict[str, dict]
    vae: latents.FrozenVAE
    tokenizer: Any
    max_length: int
    pretrained: dict[str, Any] | None
    manifest: dict[str, Any]


def _model_configs(config: Mapping[str, Any], pretrained: Pipeline | None) -> dict[str, dict]:
    if pretrained is not None:
        return {name: dict(value) for name, value in pretrained.configs.items()}
    return model_configs(config)


def load_inputs(config: Mapping[str, Any], workdir: str) -> Inputs:
    """Stage 2's `Inputs`: ``init_from``'s pipeline or the config's models, and the latent cache (built first if
    it is missing)."""
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
    params = None if pretrained is None else {n: pretrained.params[n] for n in ("unet", "text_encoder")}
    return Inputs(configs, vae, tokenizer, max_length, params, manifest)


def setup(config: Mapping[str, Any], workdir: str) -> tuple[Inputs, diffusion_state.Stage2]:
    """Stage 2's `Inputs` and its parts on the config's mesh (``diffusion_state.build``)."""
    mesh = parallel.make_mesh(config["mesh"])
    batch_size = config["diffusion"]["batch_size"] or config["data"]["batch_size"]
    parallel.check_batch(batch_size, mesh)
    inputs = load_inputs(config, workdir)
    stage = diffusion_state.build(inputs.configs, config["diffusion"], mesh, batch_size,
                                  inputs.manifest["scale_factor"], config["attention_impl"], config["mesh"]["frozen"],
                                  parallel.axis_rules(config["mesh"]))
    return inputs, stage


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
    inputs, stage = setup(config, workdir)
    mesh, batch_size = stage.mesh, d["batch_size"] or config["data"]["batch_size"]
    logging.info("stage 2: the U-Net runs on %d slice(s) of each device's batch%s", stage.batch_slices,
                 ", as concurrent programs" if stage.batch_slices > 1 else "")
    optimizer = {**OPTIMIZER_DEFAULTS, **d["optimizer"]}
    schedule, every = learning_rate_schedule(optimizer, d["steps"]), optimizer["accumulate"]
    rng = jax.random.key(config["seed"])
    state, frozen = stage.init(jax.random.fold_in(rng, 0), inputs.pretrained)
    manager = checkpoints.checkpoint_manager(workdir, keep=d["keep"])
    start, restored = checkpoints.restore_latest_intact(manager, "stage 2", lambda step: (
        diffusion_state.restore_state(manager, step, stage.task, state, frozen, stage.shardings),
        checkpoints.read_config(manager, step)))
    if start >= d["steps"]:
        logging.info("stage 2: %s already holds step %d of %d; nothing to train", workdir, start, d["steps"])
        return {}
    skips = 0
    if start:
        (state, frozen), saved = restored
        skips = saved.get("nonfinite_skips", 0)
        logging.info("stage 2: resumed from step %d in %s", start, workdir)
    tracker = NonFiniteTracker(d["nan_policy"], stage="stage 2", policy_key="diffusion.nan_policy", previous=skips)

    step_fn = None  # compiled at the first step, which also moves the state into the step's layouts
    vae_params = jax.device_put(inputs.vae.params, latents.vae_shardings(inputs.vae.module, mesh, stage.frozen_layout,
                                                                         stage.rules))
    empty = np.asarray(tokenize(inputs.tokenizer, [""], inputs.max_length), np.int32)
    if d["sample_every"] >= 0:  # -1: no sample grids
        cond = np.asarray(tokenize(inputs.tokenizer, sample_prompts(config), inputs.max_length), np.int32)
    checkpoints.save_tokenizer(workdir, inputs.tokenizer)
    writer = MetricWriter(workdir)
    writer.restart_at(start)
    if not start:
        writer.write(0, {"skipped_images": inputs.manifest.get("skipped", {}).get("train", 0)}, prefix="data/")
    # Metrics are written one log interval late (the loop does not wait on the step it just dispatched for them);
    # rates are measured between dispatches, which the device keeps pace with in steady state.
    deferred = DeferredWriter(writer, prefix="train/")

    def save(step: int) -> None:
        saved = {"configs": stage.configs, "scale_factor": stage.models.scale_factor, "vae": inputs.vae.reference,
                 "nonfinite_skips": tracker.check(manager.latest_step())}
        diffusion_state.save_state(manager, step, stage.task, state, frozen, saved, {"vae": vae_params})

    def sample_grid(step: int) -> None:
        params = {**diffusion_state.checkpoint_params(stage.task, state, frozen), "vae": vae_params}
        params["unet"] = params.pop(checkpoints.EMA_UNET, params["unet"])
        size = config["image_size"]
        images = sample_fn(params, cond, np.repeat(empty, len(cond), 0), jax.random.fold_in(rng, 2),
                           models=stage.models, sampler=d["sample_sampler"], steps=d["sample_steps"],
                           guidance_scale=d["guidance_scale"], height=size, width=size)
        grid = make_grid(np.asarray(images))
        if jax.process_index() == 0:
            (epath.Path(workdir) / "samples").mkdir(parents=True, exist_ok=True)
            paths.save_image(grid, epath.Path(workdir) / "samples" / f"step_{step:06d}.png")
        writer.write_images(step, "samples", np.asarray(grid)[None])

    iterator = latents.LatentIterator(cache_folder(config, workdir), "train", batch_size, config["seed"],
                                      start_step=start)
    per_host = batch_size // jax.process_count()
    empty_rows = np.repeat(empty, per_host, 0)
    logged, started, timed_from = {}, time.time(), start
    step_rng = jax.random.fold_in(rng, 1)  # the train step folds in the step number itself
    bar = tqdm.tqdm(total=d["steps"], initial=start, desc="stage 2", disable=jax.process_index() != 0)
    try:
        for step in range(start, d["steps"]):
            batch = next(iterator)
            batch = {"mean": batch["mean"], "logvar": batch["logvar"], "input_ids": batch["input_ids"],
                     "empty_ids": empty_rows}
            batch = parallel.shard_batch(batch, mesh)
            if step_fn is None:
                step_fn, state = stage.step.compile(state, batch, frozen, step_rng)
            state, metrics = step_fn(state, batch, frozen, step_rng)
            done = step + 1
            tracker.update(metrics.pop("nonfinite"), done)
            bar.update(1)
            last = done == d["steps"]
            preempted = stop is not None and stop.should_stop(done)
            if done % d["log_every"] == 0 or last or preempted:
                elapsed = time.time() - started
                # lr: the rate of this step's update; with ``accumulate`` k, the schedule at the update's first step
                rates = {"steps_per_sec": (done - timed_from) / elapsed,
                         "images_per_sec": (done - timed_from) * batch_size / elapsed,
                         "lr": schedule(step // every * every),
                         "nonfinite_skips": tracker.check(manager.latest_step())}
                written = deferred.push(done, {**metrics, **rates})
                if written:
                    logged = written
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
        logged = deferred.flush() or logged
    finally:  # also on errors: a save in flight completes, so the last checkpoint is whole
        bar.close()
        manager.wait_until_finished()
        manager.close()
        writer.flush()
    return logged

