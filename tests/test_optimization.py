"""The optimizer pieces of both stages against independent formulas: learning-rate schedules, gradient
accumulation (``accumulate`` k equals one batch k times as large), and the EMA's warm-up."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.training.diffusion.step import DiffusionTask, apply_gradients
from ldm_jax.training.train_state import (OPTIMIZER_DEFAULTS, TrainState, ema_decay, learning_rate_schedule,
                                          make_optimizer)


def expected_learning_rate(step: int, peak: float, warmup: int, schedule: str, total: int, end_factor: float) -> float:
    """Linear warm-up from 0 over ``warmup`` updates, then ``peak`` (constant) or a half cosine from ``peak`` to
    ``end_factor * peak`` at update ``total``, flat after it."""
    if step < warmup:
        return peak * step / warmup
    if schedule == "constant":
        return peak
    end = end_factor * peak
    progress = min(step - warmup, total - warmup) / (total - warmup)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("schedule, warmup, end_factor", [
    ("constant", 0, 0.0), ("constant", 7, 0.0), ("cosine", 0, 0.0), ("cosine", 5, 0.1),
])
def test_learning_rate_schedules_match_the_formulas(schedule, warmup, end_factor):
    total, peak = 40, 3e-4
    config = dict(OPTIMIZER_DEFAULTS, learning_rate=peak, schedule=schedule, warmup_steps=warmup,
                  end_factor=end_factor)
    lr = learning_rate_schedule(config, total)
    steps = np.arange(total + 5)
    expected = [expected_learning_rate(int(s), peak, warmup, schedule, total, end_factor) for s in steps]
    # atol: float32 rounding of the cosine where it nears zero
    np.testing.assert_allclose([float(lr(s)) for s in steps], expected, rtol=1e-6, atol=1e-7 * peak)


def test_optimizer_applies_the_schedule_once_per_update():
    """With b1 = b2 = 0 Adam moves every parameter by ``lr * g / (|g| + eps)``, so each update's step size reads
    the learning rate the optimizer used. With ``accumulate`` 3 the params change on every third trainer step
    only, and update u uses the schedule (counted in trainer steps) at trainer step 3u."""
    total, peak, warmup, accumulate = 24, 0.1, 6, 3
    config = dict(learning_rate=peak, schedule="cosine", warmup_steps=warmup, end_factor=0.2, b1=0.0, b2=0.0,
                  eps=1e-12, accumulate=accumulate)
    tx = make_optimizer(config, total)
    params = jnp.zeros(4)
    state = tx.init(params)
    grad = jnp.array([1.0, -2.0, 0.5, -0.25])
    update_fn = jax.jit(tx.update)
    for update in range(total // accumulate):
        for call in range(accumulate):
            step, state = update_fn(grad, state, params)
            moved = np.asarray(step)
            if call < accumulate - 1:
                assert not np.any(moved)
                continue
            expected = expected_learning_rate(update * accumulate, peak, warmup, "cosine", total, 0.2)
            np.testing.assert_allclose(moved, -expected * np.sign(grad), rtol=1e-6, atol=1e-12)


def test_ema_warmup_matches_the_formula():
    """The EMA decay at step s is min(max_decay, (1 + s) / (10 + s)) with warm-up (0.1 at step 0, 0.5 at step 8),
    else max_decay."""
    steps = np.arange(0, 3000, 7)
    expected = np.minimum(0.999, (1.0 + steps) / (10.0 + steps))
    np.testing.assert_allclose(jax.vmap(lambda s: ema_decay(s, 0.999))(steps), expected, rtol=1e-6)
    assert float(ema_decay(0, 0.999)) == pytest.approx(0.1) and float(ema_decay(8, 0.999)) == pytest.approx(0.5)
    np.testing.assert_allclose(ema_decay(5, 0.9, warmup=False), 0.9)


def test_update_applies_the_ema_with_the_step_decay():
    """apply_gradients (stage 2's update) moves the EMA to ``d * ema + (1 - d) * new_params`` with ``d`` the
    warm-up decay of the step before the update."""
    task = DiffusionTask(unet=None, text_encoder=None, vae=None, scheduler=(), scale_factor=1.0, ema_decay=0.99)
    tx = make_optimizer(dict(learning_rate=0.1), 10)
    params = {"unet": {"w": jnp.array([1.0, -1.0, 2.0])}}
    ema = {"unet": {"w": jnp.array([0.5, 0.5, 0.5])}}
    for step in (0, 40, 5000):
        state = TrainState(step=jnp.int32(step), params=params, opt_state=tx.init(params), ema=ema)
        grads = {"unet": {"w": jnp.array([0.3, -0.2, 0.1])}}
        new, _ = jax.jit(lambda s, g: apply_gradients(task, tx, s, g, {"loss": jnp.float32(0.0)}))(state, grads)
        decay = min(0.99, (1 + step) / (10 + step))
        expected = decay * np.asarray(ema["unet"]["w"]) + (1 - decay) * np.asarray(new.params["unet"]["w"])
        np.testing.assert_allclose(new.ema["unet"]["w"], expected, rtol=1e-6)
        assert not np.allclose(new.params["unet"]["w"], params["unet"]["w"])


def mlp_loss(params, batch):
    """Mean squared error of a two-layer tanh MLP over the batch, and the mean prediction."""
    hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    prediction = hidden @ params["w2"]
    return jnp.mean(jnp.square(prediction - batch["y"])), jnp.mean(prediction)


@pytest.mark.parametrize("accumulate", [2, 4])
def test_accumulation_equals_one_large_batch(accumulate):
    """A run of 3k trainer steps with ``accumulate`` k (warm-up k steps) makes the same updates as a run of 3 steps
    with ``accumulate`` 1 (warm-up 1) on batches k times as large: the loss and gradient are the micro-batches'
    means, and the new params and Adam moments agree after each update (AdamW with weight decay, clipping that
    is active, cosine decay), and so does the EMA (with warm-up), which follows updates, not trainer steps."""
    rng = np.random.default_rng(accumulate)
    params = {"w1": rng.standard_normal((5, 16)), "b1": 0.1 * rng.standard_normal(16),
              "w2": rng.standard_normal((16, 3)) / 4}
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    config = dict(learning_rate=0.05, schedule="cosine", warmup_steps=1, weight_decay=0.01, grad_clip=0.5)
    task = DiffusionTask(unet=None, text_encoder=None, vae=None, scheduler=(), scale_factor=1.0, ema_decay=0.9)
    ema = {"unet": jax.tree.map(jnp.zeros_like, params)}
    big_tx = make_optimizer(config, 3)
    small_tx = make_optimizer(dict(config, accumulate=accumulate, warmup_steps=accumulate), 3 * accumulate)
    big = TrainState(step=jnp.int32(0), params={"unet": params}, opt_state=big_tx.init({"unet": params}), ema=ema)
    small = TrainState(step=jnp.int32(0), params={"unet": params}, opt_state=small_tx.init({"unet": params}), ema=ema)

    def step(tx, state, batch):
        (loss, _), grads = jax.value_and_grad(mlp_loss, has_aux=True)(state.params["unet"], batch)
        return apply_gradients(task, tx, state, {"unet": grads}, {"loss": loss}) + (grads,)

    big_step, small_step = jax.jit(lambda s, b: step(big_tx, s, b)), jax.jit(lambda s, b: step(small_tx, s, b))
    clipped = 0
    for _ in range(3):
        batch = {"x": rng.standard_normal((8 * accumulate, 5)), "y": rng.standard_normal((8 * accumulate, 3))}
        batch = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), batch)
        big, big_metrics, big_grads = big_step(big, batch)
        losses, grads = [], []
        for i in range(accumulate):
            before = small.params, small.ema
            small, metrics, micro_grads = small_step(small, jax.tree.map(lambda a: a[i::accumulate], batch))
            losses.append(float(metrics["loss"]))
            grads.append(micro_grads)
            if i < accumulate - 1:
                jax.tree.map(np.testing.assert_array_equal, (small.params, small.ema), before)
        np.testing.assert_allclose(np.mean(losses), big_metrics["loss"], rtol=1e-6)
        mean_grads = jax.tree.map(lambda *g: np.mean(g, axis=0), *grads)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), mean_grads, big_grads)
        clipped += float(big_metrics["grad_norm"]) > 0.5
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), small.params, big.params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), small.ema, big.ema)
        inner = small.opt_state.inner_opt_state
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), inner, big.opt_state)
    assert clipped > 0  # the clipping ran on the accumulated gradient, as on the large batch
    assert not np.allclose(small.params["unet"]["w1"], params["w1"])
