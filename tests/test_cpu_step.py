"""Stage 2's step on one CPU device (ldm_jax/training/cpu_step.py): concurrent slice programs against the one-program
step, and when the trainer picks them."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxlib import xla_client

from configs import base, sd15
from ldm_jax.training import cpu_step, run_config
from ldm_jax.training.cpu_step import ConcurrentSliceStep, on_streams, resolve_batch_slices
from ldm_jax.training.diffusion.step import DiffusionTask, train_step
from ldm_jax.training.train_state import TrainState, make_optimizer
from tests.test_diffusion_training import _tiny_models_and_batch, assert_trained_alike
from tests.test_run_config import _sections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _task_state_and_inputs(train_text_encoder: bool = False):
    unet, text, params, frozen, batch = _tiny_models_and_batch()
    if train_text_encoder:
        params, frozen = {**params, **frozen}, {}
    task = DiffusionTask(unet=unet, text_encoder=text, vae=None, scheduler=tuple(sorted(sd15.SD_SCHEDULER.items())),
                         scale_factor=0.5, caption_dropout=0.5, min_snr_gamma=5.0, ema_decay=0.9,
                         train_text_encoder=train_text_encoder)
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


# 4 slices (one example each) run the same code as 2 with a larger count: -m slow (CI time budget).
@pytest.mark.parametrize("slices,train_text_encoder", [(2, False), pytest.param(4, False, marks=pytest.mark.slow),
                                                       (2, True)])
def test_concurrent_slices_train_as_the_one_program_step(slices, train_text_encoder):
    """Three steps (AdamW with clipping, EMA, caption dropout, min-SNR weights; the text encoder frozen or
    trained): the same metrics every step and the same params, optimizer
    state and EMA as `train_step` over the whole batch in one program."""
    task, optimizer, state, batch, frozen = _task_state_and_inputs(train_text_encoder)
    reference = jax.jit(lambda s, b, f, r: train_step(task, optimizer, s, b, f, r), donate_argnums=0)
    expected_state, expected = _run(reference, state, batch, frozen)
    got_state, got = _run(ConcurrentSliceStep(task, optimizer, slices), state, batch, frozen)
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
    """`compile` (as the trainer calls it) lowers the programs on the arguments' shapes; the compiled step then
    steps bit-identically to the jitted one."""
    task, optimizer, state, batch, frozen = _task_state_and_inputs(train_text_encoder=True)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    jitted = ConcurrentSliceStep(task, optimizer, 2)
    compiled, same_state = jitted.compile(abstract, batch, frozen, jax.random.key(5))
    assert same_state is abstract and list(compiled.programs) == list(cpu_step.PROGRAMS)
    assert compiled.calls == {"prepare": 1, "slice_gradients": 2, "update": 1}
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
    task, optimizer, state, batch, frozen = _task_state_and_inputs(train_text_encoder)
    batch = {**batch, "mean": batch["mean"].at[1].set(jnp.nan)}
    before = jax.tree.map(np.asarray, state)
    after, metrics = ConcurrentSliceStep(task, optimizer, 2)(jax.tree.map(jnp.copy, state), batch, frozen,
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


def _slices_in_a_fresh_process(one_core: bool) -> list[str]:
    """resolve_batch_slices(0, 16), (0, 15) and (2, 16) on one CPU device, printed by a new process on all this
    process's cores or on one."""
    pin = "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); " if one_core else ""
    code = (f"import os; {pin}from ldm_jax.training.cpu_step import resolve_batch_slices as r; "
            "print(r(0, 16), r(0, 15), r(2, 16))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.split()


def test_batch_slices_resolve_to_two_on_one_cpu_device_with_cores_to_spare():
    """Auto picks 2 slices on one CPU device with 2 cores and an even batch; an explicit count is refused where
    concurrent programs do not apply (this process has 8 CPU devices) or when it does not divide the batch."""
    assert resolve_batch_slices(1, 8) == 1
    assert resolve_batch_slices(0, 16) == 1
    with pytest.raises(ValueError, match=r"diffusion.batch_slices 2 runs the slices as concurrent programs, which "
                                         r"does not apply here: they run on one device, this run has 8"):
        resolve_batch_slices(2, 16)
    with pytest.raises(ValueError, match=r"must be 0 \(auto\) or positive, got -1"):
        resolve_batch_slices(-1, 8)
    cores = len(os.sched_getaffinity(0))
    assert _slices_in_a_fresh_process(one_core=False) == (["2", "1", "2"] if cores >= 2 else ["1", "1", "2"])
    assert _slices_in_a_fresh_process(one_core=True) == ["1", "1", "2"]
    code = "from ldm_jax.training.cpu_step import resolve_batch_slices as r; r(3, 8)"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=120)
    assert "diffusion.batch_slices 3 does not divide the 8 examples each device holds" in done.stderr


def test_run_config_refuses_slices_on_several_devices_and_the_removed_key():
    quick = base.get_config("quick").diffusion.to_dict()
    with pytest.raises(KeyError, match="slice_execution"):
        run_config.run_config(**_sections(diffusion={**quick, "slice_execution": "concurrent"}))
    config = run_config.run_config(**_sections(diffusion={**quick, "batch_slices": 2}))
    run_config.check_devices(config, 1)
    with pytest.raises(ValueError, match="runs the slices as concurrent programs on one CPU device; this run has 2"):
        run_config.check_devices(config, 2)
