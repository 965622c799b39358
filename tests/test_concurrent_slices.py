"""Stage 2's step as concurrent slice programs (ldm_jax/training/cpu_step.py) against the one-program step."""

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
from ldm_jax.training import run_config
from ldm_jax.training import cpu_step
from ldm_jax.training.cpu_step import ConcurrentSliceStep, on_streams, resolve_concurrent_slices
from ldm_jax.training.diffusion.state import compile_train_step
from ldm_jax.training.diffusion.step import DiffusionTask, train_step
from ldm_jax.training.train_state import TrainState, make_optimizer
from tests.test_diffusion_training import _tiny_models_and_batch, assert_trained_alike
from tests.test_run_config import _sections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _task_state_and_inputs(slices: int, train_text_encoder: bool = False):
    unet, text, params, frozen, batch = _tiny_models_and_batch()
    if train_text_encoder:
        params, frozen = {**params, **frozen}, {}
    task = DiffusionTask(unet=unet, text_encoder=text, vae=None, scheduler=tuple(sorted(sd15.SD_SCHEDULER.items())),
                         scale_factor=0.5, caption_dropout=0.5, min_snr_gamma=5.0, ema_decay=0.9,
                         batch_slices=slices, train_text_encoder=train_text_encoder)
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


@pytest.mark.parametrize("slices,train_text_encoder", [(2, False), (4, False), (2, True)])  # 4: one example each
def test_concurrent_slices_train_as_the_one_program_step(slices, train_text_encoder):
    """Three steps (AdamW with clipping, EMA, caption dropout, min-SNR weights; the text encoder frozen or
    trained): the same metrics every step and the same params, optimizer
    state and EMA as `train_step` over the whole batch in one program."""
    task, optimizer, state, batch, frozen = _task_state_and_inputs(slices, train_text_encoder)
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
    assert_trained_alike(got_state, expected_state)
    assert sorted(got_state.params) == (["text_encoder", "unet"] if train_text_encoder else ["unet"])
    for name in got_state.params:  # every trained model moved
        assert not np.allclose(jax.tree.leaves(got_state.params[name])[0], jax.tree.leaves(state.params[name])[0])


def test_programs_compiled_ahead_of_time_step_as_the_jitted_ones():
    """`compile` (what `compile_train_step` does to this step) lowers the programs on the arguments' shapes; the
    compiled step then steps bit-identically to the jitted one."""
    task, optimizer, state, batch, frozen = _task_state_and_inputs(2, train_text_encoder=True)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    jitted = ConcurrentSliceStep(task, optimizer)
    compiled, same_state = compile_train_step(jitted, abstract, batch, frozen, jax.random.key(5))
    assert same_state is abstract and list(compiled.programs) == list(cpu_step.PROGRAMS)
    assert all(isinstance(program, jax.stages.Compiled) for program in compiled.programs.values())
    assert all(isinstance(program, jax.stages.Wrapped) for program in jitted.programs.values())
    assert compiled.programs["slice_gradients"].cost_analysis()["flops"] > 0
    (got_state, got), (expected_state, expected) = (_run(step, state, batch, frozen, steps=2)
                                                    for step in (compiled, jitted))
    assert got == expected
    for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(expected_state), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_a_non_finite_batch_leaves_the_state_unchanged_but_the_step(train_text_encoder):
    task, optimizer, state, batch, frozen = _task_state_and_inputs(2, train_text_encoder)
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


def test_resolution_names_the_key_and_why_concurrent_does_not_apply():
    assert resolve_concurrent_slices("in_program", 2) is False
    assert resolve_concurrent_slices("auto", 1) is False
    assert resolve_concurrent_slices("auto", 2) is False  # this process has 8 CPU devices
    with pytest.raises(ValueError, match=r"'concurrent' does not apply: it runs on one device, this run has 8"):
        resolve_concurrent_slices("concurrent", 2)
    with pytest.raises(ValueError, match=r"diffusion.slice_execution must be one of \['auto', 'concurrent', "
                                         r"'in_program'\], got 'threads'"):
        resolve_concurrent_slices("threads", 2)
    code = ("from ldm_jax.training.cpu_step import resolve_concurrent_slices as r; "
            "print(r('auto', 2), r('concurrent', 2), r('in_program', 2), r('auto', 1))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["True", "True", "False", "False"]


def test_run_config_checks_slice_execution():
    quick = base.get_config("quick").diffusion.to_dict()
    with pytest.raises(ValueError, match=r"diffusion.slice_execution must be one of .*got 'threads'"):
        run_config.run_config(**_sections(diffusion={**quick, "slice_execution": "threads"}))
    config = run_config.run_config(**_sections(diffusion={**quick, "slice_execution": "concurrent"}))
    run_config.check_devices(config, 1)
    with pytest.raises(ValueError, match="'concurrent' runs on one device; this run has 2"):
        run_config.check_devices(config, 2)
    assert cpu_step.SLICE_EXECUTION == ("auto", "concurrent", "in_program")
