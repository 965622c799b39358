"""bfloat16 compute with float32 master weights in the stage-2 train step (``diffusion.dtype='bfloat16'``)."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import sd15, tiny
from ldm_jax.pipeline import build_modules, init_inputs
from ldm_jax.training.diffusion.step import DiffusionTask, diffusion_loss, train_step
from ldm_jax.training.train_state import TrainState, make_optimizer
from ldm_jax.testing import random_params
from tests.test_remat import CONFIG as SMALL_UNET

# bfloat16 keeps 8 significant bits; the loss of this batch moves by 1.0e-4 relative (1.3e-3 with a resnet per
# level on the way down too).
LOSS_TOLERANCE = 1e-2


def _setup(dtype):
    configs = {name: tiny.get_config()[name].to_dict() for name in ("vae", "text_encoder")}
    configs["unet"] = SMALL_UNET
    modules = build_modules(configs, dtype)
    task = DiffusionTask(unet=modules["unet"], text_encoder=modules["text_encoder"], vae=None,
                         scheduler=tuple(sorted(sd15.SD_SCHEDULER.items())), scale_factor=0.5, ema_decay=0.9)
    params = {name: random_params(modules[name], *init_inputs(name, configs[name]), seed=i)
              for i, name in enumerate(("unet", "text_encoder"))}
    return task, {"unet": params["unet"]}, {"text_encoder": params["text_encoder"]}


def _batch():
    rng = np.random.default_rng(0)
    return {"mean": rng.standard_normal((4, 8, 8, 4)).astype(np.float32),
            "logvar": rng.normal(-3, 1, (4, 8, 8, 4)).astype(np.float32),
            "input_ids": rng.integers(3, 1000, (4, 16)).astype(np.int32), "empty_ids": np.zeros((16,), np.int32)}


def test_bfloat16_step_keeps_float32_params_optimizer_state_and_ema():
    task, trained, frozen = _setup(jnp.bfloat16)
    batch, rng = _batch(), jax.random.key(3)
    jaxpr = str(jax.make_jaxpr(lambda p: diffusion_loss(task, p, frozen, batch, rng))(trained))
    assert "bf16[" in jaxpr and "conv_general_dilated" in jaxpr  # the network really computes in bfloat16

    optimizer = make_optimizer(dict(learning_rate=1e-3), 10)
    copy = lambda tree: jax.tree.map(jnp.array, tree)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trained, opt_state=optimizer.init(trained),
                       ema={"unet": copy(trained["unet"])})
    step = jax.jit(lambda state, batch: train_step(task, optimizer, state, batch, frozen, rng), donate_argnums=0)
    losses = []
    for _ in range(2):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    for name, tree in (("params", state.params), ("opt_state", state.opt_state), ("ema", state.ema)):
        dtypes = {str(leaf.dtype) for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)}
        assert dtypes == {"float32"}, (name, dtypes)
    assert np.isfinite(losses).all() and np.isfinite(float(metrics["grad_norm"]))

    # The first step's loss against float32 compute on the same params, batch and per-step key.
    f32_task, _, _ = _setup(jnp.float32)
    f32_loss, _ = jax.jit(lambda p: diffusion_loss(f32_task, p, frozen, batch, jax.random.fold_in(rng, 0)))(trained)
    assert abs(losses[0] - float(f32_loss)) <= LOSS_TOLERANCE * abs(float(f32_loss))
    assert losses[0] != float(f32_loss)  # and not silently float32
