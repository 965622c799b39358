"""The small stage-2 setup of tests/test_parallel.py, and one process of its multi-process run.

As a program (``python -m tests.multihost_worker WORKDIR``, one of
``JAX_NUM_PROCESSES`` processes started with ``JAX_COORDINATOR_ADDRESS`` and
``JAX_PROCESS_ID``): joins the distributed runtime, restores checkpoint 0 of
``WORKDIR`` (the initial state, written by the test) onto ``MULTIHOST_MESH``,
trains ``STEPS`` steps on its rows of `global_batches`, saves checkpoint
``STEPS`` (its config item holds the losses), restores it again and checks
that every local shard came back unchanged.
"""

import sys

import jax
import numpy as np

from configs import tiny
from ldm_jax import parallel, pipeline
from ldm_jax.diffusion.sample_fn import Models
from ldm_jax.pipeline import build_modules
from ldm_jax.training import checkpoints
from ldm_jax.training.diffusion import state as diffusion_state
from ldm_jax.training.diffusion.step import DiffusionTask
from ldm_jax.training.train_state import OPTIMIZER_DEFAULTS, make_optimizer

STEPS = 3
BATCH = 8
RNG_SEED = 1
# Within each process fsdp over its 4 devices; across the 2 processes data (a hybrid mesh over processes).
MULTIHOST_MESH = dict(data=1, fsdp=4, tensor=1, dcn_data=2)
# Adam's eps well above float32 round-off of the gradients: with the default 1e-8, parameters whose gradient is
# mathematically zero (zero-initialised residual branches at step 1) take full-size steps in the direction of
# their round-off, which differs between layouts; this keeps the comparison about the sharding.
OPTIMIZER = dict(OPTIMIZER_DEFAULTS, learning_rate=1e-3, eps=1e-3)


def model_configs() -> dict[str, dict]:
    """configs/tiny.py with a one-level U-Net (attention and cross-attention in its middle block only) and a
    one-layer text encoder: fewer ops to compile."""
    config = tiny.get_config()
    configs = pipeline.model_configs(config)
    configs["unet"].update(down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), block_out_channels=(32,))
    configs["text_encoder"]["num_hidden_layers"] = 1
    return configs


def setup() -> tuple[DiffusionTask, dict[str, dict], object]:
    """The stage-2 task (frozen text encoder, no EMA), the model configs and the optimizer."""
    configs = model_configs()
    modules = build_modules(configs)
    scheduler = Models.create(modules["unet"], modules["vae"], modules["text_encoder"], configs["scheduler"],
                              1.0).scheduler
    task = DiffusionTask(unet=modules["unet"], text_encoder=modules["text_encoder"], vae=None, scheduler=scheduler,
                         scale_factor=0.5, caption_dropout=0.25, ema_decay=0.0)
    return task, configs, make_optimizer(OPTIMIZER, STEPS)


def global_batches() -> list[dict[str, np.ndarray]]:
    """``STEPS`` global batches of cached moments and token ids (the same in every process)."""
    rng = np.random.default_rng(0)
    return [{"mean": rng.normal(size=(BATCH, 8, 8, 4)).astype(np.float32),
             "logvar": rng.normal(-3, 1, size=(BATCH, 8, 8, 4)).astype(np.float32),
             "input_ids": rng.integers(3, 1000, (BATCH, 16)).astype(np.int32),
             "empty_ids": np.tile(np.asarray([0] + [2] * 15, np.int32), (BATCH, 1))} for _ in range(STEPS)]


def local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's contiguous share of a global batch."""
    per_process = BATCH // jax.process_count()
    start = jax.process_index() * per_process
    return {key: value[start:start + per_process] for key, value in batch.items()}


def train(task: DiffusionTask, optimizer: object, mesh: jax.sharding.Mesh, state: object, frozen: object,
          shardings: tuple) -> tuple[object, list[float]]:
    """``STEPS`` jitted steps over `global_batches` (each process feeding its rows); returns the state and losses."""
    step = diffusion_state.make_train_step(task, optimizer, mesh, shardings)
    losses = []
    for batch in global_batches():
        state, metrics = step(state, parallel.shard_batch(local_rows(batch), mesh), frozen,
                              jax.random.key(RNG_SEED))
        losses.append(float(metrics["loss"]))
    return state, losses


def main(workdir: str) -> None:
    """One process of the multi-process run (module docstring)."""
    jax.config.update("jax_threefry_partitionable", True)
    jax.config.update("jax_disable_most_optimizations", True)
    if not parallel.initialize_distributed():
        raise RuntimeError("expected JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID")
    task, configs, optimizer = setup()
    mesh = parallel.make_mesh(MULTIHOST_MESH)
    shapes = diffusion_state.abstract_state(task, configs, optimizer, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, shapes)
    with checkpoints.checkpoint_manager(workdir, keep=None) as manager:
        state, frozen = diffusion_state.restore_state(manager, 0, task, *shapes, shardings)
        state, losses = train(task, optimizer, mesh, state, frozen, shardings)
        diffusion_state.save_state(manager, STEPS, task, state, frozen, {"losses": losses})
        manager.wait_until_finished()
    # Read back by a new manager, as a resumed run does: on object storage (no rename) orbax 0.12's manager that
    # saved a step keeps its items marked temporary on every process but process 0, which committed them.
    with checkpoints.checkpoint_manager(workdir, keep=None, create=False) as manager:
        again = diffusion_state.restore_state(manager, STEPS, task, *shapes, shardings)
    for saved, restored in zip(jax.tree.leaves((state, frozen)), jax.tree.leaves(again)):
        for a, b in zip(saved.addressable_shards, restored.addressable_shards):
            np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
    print(f"process {jax.process_index()} of {jax.process_count()}: mesh {dict(mesh.shape)}, losses {losses}")


if __name__ == "__main__":
    main(sys.argv[1])
