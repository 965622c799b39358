"""Stage 2's step as concurrent slice programs (ldm_jax/training/concurrent_slices.py) against the one-program step."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxlib import xla_client

from configs import base, sd15
from ldm_jax.training import concurrent_slices, run_config
from ldm_jax.training.concurrent_slices import ConcurrentSliceStep, on_streams, resolve_concurrent_slices
from ldm_jax.training.diffusion_step import DiffusionTask, train_step
from ldm_jax.training.state import TrainState, make_optimizer
from tests.test_diffusion_training import _tiny_models_and_batch
from tests.test_run_config import _sections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _task_state_and_inputs(slices: int):
    unet, text, params, frozen, batch = _tiny_models_and_batch()
    task = DiffusionTask(unet=unet, text_encoder=text, vae=None, scheduler=tuple(sorted(sd15.SD_SCHEDULER.items())),
                         scale_factor=0.5, caption_dropout=0.5, min_snr_gamma=5.0, ema_decay=0.9,
                         batch_slices=slices)
    optimizer = make_optimizer({"learning_rate": 1e-3, "weight_decay": 0.01, "grad_clip": 1.0}, 100)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                       ema={"unet": jax.tree.map(jnp.copy, params["unet"])})
    return task, optimizer, state, jax.device_put(batch), frozen


def _run(step, state, batch, frozen, steps=3):
    history = []
    for _ in range(steps):
        state, metrics = step(jax.tree.map(jnp.copy, state) if not history else state, batch, frozen,
                              jax.random.key(5))
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


@pytest.mark.parametrize("slices", [2, 4])  # 4: slices of one example
def test_concurrent_slices_train_as_the_one_program_step(slices):
    """Three steps (AdamW with clipping, EMA, caption dropout, min-SNR weights): the same metrics every step and
    the same params, optimizer state and EMA as `train_step` over the whole
    batch in one program."""
    task, optimizer, state, batch, frozen = _task_state_and_inputs(slices)
    whole = dataclasses.replace(task, batch_slices=1)
    reference = jax.jit(lambda s, b, f, r: train_step(whole, optimizer, s, b, f, r), donate_argnums=0)
    expected_state, expected = _run(reference, state, batch, frozen)
    got_state, got = _run(ConcurrentSliceStep(task, optimizer), state, batch, frozen)
    assert [h["nonfinite"] for h in got] == [0.0, 0.0, 0.0]
    for step, (a, b) in enumerate(zip(got, expected)):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=2e-5, err_msg=f"step {step} {key}")
    assert int(got_state.step) == 3
    # Adam divides by the gradient's root mean square, so near-zero gradient entries summed in another order
    # move by up to ~1e-5 after 3 steps of 1e-3 (the whole update); the metrics above pin the gradient's scale.
    for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(expected_state)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3 * float(np.abs(b).max()))
    assert not np.allclose(jax.tree.leaves(got_state.params)[0], jax.tree.leaves(state.params)[0])


def test_a_non_finite_batch_leaves_the_state_unchanged_but_the_step():
    task, optimizer, state, batch, frozen = _task_state_and_inputs(2)
    batch = {**batch, "mean": batch["mean"].at[1].set(jnp.nan)}
    before = jax.tree.map(np.asarray, state)
    after, metrics = ConcurrentSliceStep(task, optimizer)(jax.tree.map(jnp.copy, state), batch, frozen,
                                                          jax.random.key(5))
    assert float(metrics["nonfinite"]) == 1.0 and int(after.step) == 1
    for a, b in zip(jax.tree.leaves(after.params) + jax.tree.leaves(after.opt_state) + jax.tree.leaves(after.ema),
                    jax.tree.leaves(before.params) + jax.tree.leaves(before.opt_state) + jax.tree.leaves(before.ema)):
        np.testing.assert_array_equal(a, b)


def test_each_call_is_dispatched_on_a_stream_of_its_own():
    """on_streams sets streams 1..k around the calls (seen by the called function) and restores the caller's."""
    seen = []
    results = on_streams(lambda x: seen.append(xla_client._xla.get_execution_stream_id()) or x * 2, [(1,), (2,), (3,)])
    assert results == [2, 4, 6] and seen == [1, 2, 3]
    assert xla_client._xla.get_execution_stream_id() == 0


def test_a_trained_text_encoder_is_refused():
    task, optimizer, *_ = _task_state_and_inputs(2)
    with pytest.raises(ValueError, match="need a frozen text encoder"):
        ConcurrentSliceStep(dataclasses.replace(task, train_text_encoder=True), optimizer)


def test_resolution_names_the_key_and_why_concurrent_does_not_apply():
    assert resolve_concurrent_slices("in_program", 2, False) is False
    assert resolve_concurrent_slices("auto", 1, False) is False
    assert resolve_concurrent_slices("auto", 2, False) is False  # this process has 8 CPU devices
    with pytest.raises(ValueError, match=r"'concurrent' does not apply: it runs on one device, this run has 8; "
                                         r"diffusion.train_text_encoder must be False"):
        resolve_concurrent_slices("concurrent", 2, True)
    with pytest.raises(ValueError, match=r"diffusion.slice_execution must be one of \['auto', 'concurrent', "
                                         r"'in_program'\], got 'threads'"):
        resolve_concurrent_slices("threads", 2, False)
    code = ("from ldm_jax.training.concurrent_slices import resolve_concurrent_slices as r; "
            "print(r('auto', 2, False), r('auto', 2, True), r('concurrent', 2, False), r('auto', 1, False))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["True", "False", "True", "False"]


def test_run_config_checks_slice_execution():
    quick = base.get_config("quick").diffusion.to_dict()
    with pytest.raises(ValueError, match=r"diffusion.slice_execution must be one of .*got 'threads'"):
        run_config.run_config(**_sections(diffusion={**quick, "slice_execution": "threads"}))
    trained = {**quick, "slice_execution": "concurrent", "train_text_encoder": True}
    with pytest.raises(ValueError, match="'concurrent' needs a frozen text encoder"):
        run_config.run_config(**_sections(diffusion=trained))
    config = run_config.run_config(**_sections(diffusion={**quick, "slice_execution": "concurrent"}))
    run_config.check_devices(config, 1)
    with pytest.raises(ValueError, match="'concurrent' runs on one device; this run has 2"):
        run_config.check_devices(config, 2)
    assert concurrent_slices.SLICE_EXECUTION == ("auto", "concurrent", "in_program")
