"""Stage 1: train the AutoencoderKL (L1 + LPIPS + KL + PatchGAN) and save it with its latent scale factor.

Checkpoints go to ``WORKDIR/autoencoder/checkpoints/<step>/`` with the items
``params`` ({'vae', 'discriminator'}), ``state`` (step and optimizer states)
and ``config`` ({'configs': {'vae': ...}, 'scale_factor': ..., 'eval': ...}).
The scale factor is 1 / std of posterior samples of the first training
batch under the VAE being saved (LDM's ``scale_by_std``), recomputed at every
save. A run resumes from the latest checkpoint of its workdir that reads back
whole (a damaged one is moved aside: ``checkpoints.restore_latest_intact``). Everything the
loop runs (modules, optimizers, the sharded state, the jitted steps, save and
restore) is built by ``ldm_jax.training.autoencoder.state``.
"""

import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ldm_jax import parallel
from ldm_jax.data.input_pipeline import make_iterator, report_skipped
from ldm_jax.training import checkpoints
from ldm_jax.training.autoencoder import state as ae_state
from ldm_jax.training.autoencoder.losses import perceptual_weight
from ldm_jax.training.metrics import MetricWriter
from ldm_jax.training.nonfinite import NonFiniteTracker
from ldm_jax.training.preemption import StopRequest


def evaluate(config: Mapping[str, Any], vae_params: Any, mesh: jax.sharding.Mesh,
             step_fn: Any) -> dict[str, float]:
    """Mean reconstruction PSNR and L1 over the first ``eval_examples`` of the test split (in index order)."""
    data, wanted = config["data"], config["autoencoder"]["eval_examples"]
    iterator = make_iterator(data, "test", seed=config["seed"], num_epochs=1, shuffle=False)
    per_host = data["batch_size"] // jax.process_count()
    totals, count = {}, 0
    for batch in iterator:
        rows = len(batch["image"])
        images = np.zeros((per_host, *batch["image"].shape[1:]), np.float32)
        images[:rows] = batch["image"]
        out = step_fn(vae_params, parallel.shard_batch({"image": images}, mesh))
        for name, values in out.items():
            local = np.asarray(multihost_utils.global_array_to_host_local_array(
                values, mesh, jax.sharding.PartitionSpec(parallel.BATCH_AXES)))[:rows]
            totals[name] = totals.get(name, 0.0) + float(local.sum())
        count += rows
        if count >= wanted // jax.process_count():
            break
    iterator.close()
    return {f"eval_{name}": value / max(count, 1) for name, value in totals.items()}


def train_autoencoder(config: Mapping[str, Any], workdir: str, stop: StopRequest | None = None) -> dict[str, float]:
    """Train stage 1 to ``autoencoder.steps`` (resuming from the workdir); returns the final eval metrics.

    ``stop`` (from ``ldm_jax.train``) ends the loop early on SIGTERM, after
    saving the step it stopped at. Non-finite steps are handled as
    ``autoencoder.nan_policy`` says (``ldm_jax.training.nonfinite``).
    """
    ae = config["autoencoder"]
    folder = ae_state.stage_dir(workdir)
    mesh = parallel.make_mesh(config["mesh"])
    parallel.check_batch(config["data"]["batch_size"], mesh)
    stage = ae_state.Stage1.from_config(config)
    lpips_params = ae_state.load_lpips(ae["lpips"])
    if perceptual_weight(stage.loss, {"lpips": lpips_params}) == 0.0:
        logging.warning("stage 1: no LPIPS weights configured (autoencoder.lpips=''), so the perceptual loss is "
                        "off; the autoencoder trains on L1 + KL (+ the GAN from disc_start) only")
    rng = jax.random.key(config["seed"])
    state, shardings = ae_state.create_state(stage, mesh, jax.random.fold_in(rng, 0),
                                             parallel.axis_rules(config["mesh"]))

    manager = checkpoints.checkpoint_manager(folder, keep=ae["keep"])
    start, restored = checkpoints.restore_latest_intact(manager, "stage 1", lambda step: (
        ae_state.restore_state(manager, step, state, shardings), checkpoints.read_config(manager, step)))
    if start >= ae["steps"]:
        logging.info("stage 1: %s already holds step %d of %d; nothing to train", folder, start, ae["steps"])
        return restored[1]["eval"]
    skips = 0
    if start:
        state, saved = restored
        skips = saved.get("nonfinite_skips", 0)
        logging.info("stage 1: resumed from step %d in %s", start, folder)
    tracker = NonFiniteTracker(ae["nan_policy"], stage="stage 1", policy_key="autoencoder.nan_policy",
                               previous=skips)

    train = ae_state.jit_train_steps(stage, mesh, shardings)  # by step >= disc_start; compiled when first used
    eval_fn = ae_state.jit_eval_step(stage, mesh, shardings)
    std_fn = ae_state.jit_latent_std(stage, mesh)
    first = make_iterator(config["data"], "train", seed=config["seed"])
    first_images = parallel.shard_batch({"image": next(first)["image"]}, mesh)["image"]
    first.close()
    step_rng = jax.random.fold_in(rng, 1)
    writer = MetricWriter(folder)
    writer.restart_at(start)

    def save(step: int, eval_metrics: dict[str, float]) -> None:
        skipped = tracker.check(manager.latest_step())
        scale = 1.0 / float(std_fn(state.params["vae"], first_images, jax.random.fold_in(rng, 2)))
        configs = {"vae": stage.loss.vae.diffusers_config(scaling_factor=scale, sample_size=config["image_size"])}
        ae_state.save_state(manager, step, state, {"configs": configs, "scale_factor": scale, "eval": eval_metrics,
                                                   "nonfinite_skips": skipped})
        logging.info("stage 1: saved step %d (scale factor %.5f)", step, scale)

    iterator = make_iterator(config["data"], "train", seed=config["seed"], start_step=start)
    report_skipped(iterator, "stage 1")
    if not start:
        writer.write(0, {"skipped_images": len(iterator.skipped)}, prefix="data/")
    eval_metrics, started, timed_from = {}, time.time(), start
    try:
        for step in range(start, ae["steps"]):
            batch = parallel.shard_batch({"image": next(iterator)["image"]}, mesh)
            state, metrics = train[step >= ae["disc_start"]](state, batch, lpips_params, step_rng)
            done = step + 1
            tracker.update(metrics.pop("nonfinite"), done)
            last = done == ae["steps"]
            preempted = stop is not None and stop.should_stop(done)
            if done % ae["log_every"] == 0 or last or preempted:
                elapsed = time.time() - started
                metrics = {**metrics, "steps_per_sec": (done - timed_from) / elapsed,
                           "images_per_sec": (done - timed_from) * config["data"]["batch_size"] / elapsed,
                           "nonfinite_skips": tracker.check(manager.latest_step())}
                writer.write(done, metrics, prefix="train/")
            if (ae["eval_every"] and done % ae["eval_every"] == 0) or last:
                eval_metrics = evaluate(config, state.params["vae"], mesh, eval_fn)
                writer.write(done, eval_metrics, prefix="test/")
            if done % ae["checkpoint_every"] == 0 or last or preempted:
                save(done, eval_metrics)
            if preempted:
                logging.warning("stage 1: stopped at step %d of %d on %s; the same command resumes from there",
                                done, ae["steps"], stop.received or "the preemption notice")
                break
            if done % ae["log_every"] == 0:
                started, timed_from = time.time(), done  # time evals and saves apart from steps
    finally:  # also on errors: a save in flight completes, so the last checkpoint is whole
        iterator.close()
        manager.wait_until_finished()
        manager.close()
        writer.flush()
    return eval_metrics

