"""bench/train_bench.py: the step-by-step ratio of the peer comparison, and its concurrent slice programs."""

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import train_bench
from ldm_jax.models.unet import UNet2DConditionModel
from ldm_jax.pipeline import init_inputs
from ldm_jax.training.cpu_step import on_streams
from ldm_jax.training.train_state import make_optimizer
from tests.test_diffusion_training import TINY_UNET


def test_pair_ratios_cancel_a_change_of_speed_that_the_ratio_of_medians_keeps():
    # ldm_jax is 1.25x faster throughout; the machine halves its speed between ldm_jax's third step and the
    # diffusers step after it.
    ours = [0.100, 0.100, 0.100, 0.200, 0.200]
    theirs = [0.125, 0.125, 0.250, 0.250, 0.250]
    assert statistics.median(theirs) / statistics.median(ours) == pytest.approx(2.5)
    assert train_bench.pair_ratios(theirs, ours) == pytest.approx([1.25, 1.25, 1.25])
    assert train_bench.pair_ratios([0.1, 0.3, 0.2, 0.4], [0.2, 0.1, 0.1, 0.2]) == pytest.approx(
        [1.625, 2.0, 2.25])  # ratios 0.5, 3, 2, 2
    with pytest.raises(ValueError):
        train_bench.pair_ratios([0.1, 0.2], [0.1])


def test_concurrent_programs_take_the_one_program_step():
    """The bench's step as concurrent slice programs (as the trainer runs slices on one CPU device): two steps give
    the losses, params and Adam moments of `make_jax_step` over the whole batch."""
    config = {**TINY_UNET, "cross_attention_dim": 32}
    unet = UNet2DConditionModel.from_diffusers_config(config)
    params = unet.init(jax.random.key(0), *init_inputs("unet", config))["params"]
    optimizer = make_optimizer(train_bench.OPTIMIZER, 1000)
    x0, context = (jnp.asarray(a) for a in train_bench.inputs(4, 8, 4, 32))
    whole = train_bench.make_jax_step(unet, optimizer, 1)
    prepare, slice_grads, update = train_bench.make_concurrent_programs(unet, optimizer, 2)
    expected, state = [], jax.tree.map(jnp.copy, (params, optimizer.init(params), jax.random.key(1)))
    for _ in range(2):
        state, loss = whole(state, x0, context)
        expected.append(float(loss))
    got, (p, opt, rng) = [], jax.tree.map(jnp.copy, (params, optimizer.init(params), jax.random.key(1)))
    for _ in range(2):
        rng, sliced = prepare(rng, x0, context)
        p, opt, loss = update(p, opt, on_streams(slice_grads, [(p, *inputs) for inputs in sliced]))
        got.append(float(loss))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    for a, b in zip(jax.tree.leaves((p, opt)), jax.tree.leaves(state[:2])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3 * float(np.abs(b).max()))
