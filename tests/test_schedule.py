"""Noise schedules, timestep spacings and prediction conversions against diffusers' schedulers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as torch_rescale_zero_terminal_snr

from ldm_jax.diffusion import schedule as S

SD_CONFIG = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "num_train_timesteps": 1000,
             "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
             "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "trained_betas": None}
ZERO_SNR_CONFIG = {**SD_CONFIG, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                   "prediction_type": "v_prediction"}
SHAPE = (2, 4, 8, 8)


def _normal(seed: int, shape=SHAPE) -> np.ndarray:
    """A float32 standard normal array."""
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


@pytest.mark.parametrize("name,start,end", [("linear", 0.0001, 0.02), ("scaled_linear", 0.00085, 0.012),
                                            ("squaredcos_cap_v2", 0.0001, 0.02)])
def test_betas_match_diffusers(name, start, end):
    ref = DDPMScheduler(beta_schedule=name, beta_start=start, beta_end=end).betas.numpy()
    ours = S.betas(name, 1000, start, end)
    assert ours.shape == (1000,)
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=1e-9)


def test_betas_default_is_stable_diffusion():
    b = S.betas("scaled_linear")
    np.testing.assert_array_equal(b, S.betas("scaled_linear", 1000, 0.00085, 0.012))
    assert b[0] == pytest.approx(0.00085) and b[-1] == pytest.approx(0.012)


def test_unknown_beta_schedule_lists_valid_ones():
    with pytest.raises(ValueError, match="linear, scaled_linear, squaredcos_cap_v2"):
        S.betas("sigmoid")


def test_rescale_zero_terminal_snr_matches_diffusers():
    b = S.betas("scaled_linear")
    ours = S.rescale_zero_terminal_snr(b)
    ref = torch_rescale_zero_terminal_snr(torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)
    ac = np.cumprod(1 - ours)
    assert ac[-1] == pytest.approx(0.0, abs=1e-12)
    assert np.sqrt(ac[0]) == pytest.approx(np.sqrt(1 - b[0]))


@pytest.mark.parametrize("config", [SD_CONFIG, ZERO_SNR_CONFIG, {"beta_schedule": "squaredcos_cap_v2"}, {}],
                         ids=["sd", "zero_snr", "cosine", "defaults"])
def test_noise_schedule_from_config_matches_diffusers(config):
    ref = DDIMScheduler.from_config(config)
    sched = S.NoiseSchedule.from_config(config)
    assert sched.num_train_timesteps == 1000
    assert sched.prediction_type == config.get("prediction_type", "epsilon")
    assert sched.betas.dtype == jnp.float32 and sched.alphas_cumprod.dtype == jnp.float32
    # diffusers rescales in float32 and recovers betas by division (relative error up to ~2e-4; ours is
    # float64); alphas_cumprod still agree to ~4e-7.
    beta_rtol = 5e-4 if config.get("rescale_betas_zero_snr") else 2e-6
    np.testing.assert_allclose(sched.betas, ref.betas.numpy(), rtol=beta_rtol, atol=1e-9)
    np.testing.assert_allclose(sched.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=3e-6, atol=1e-6)


def test_noise_schedule_trained_betas_and_errors():
    b = np.linspace(1e-4, 0.02, 50)
    sched = S.NoiseSchedule.from_config({"trained_betas": b.tolist(), "beta_schedule": "unused"})
    np.testing.assert_allclose(sched.betas, b.astype(np.float32))
    with pytest.raises(ValueError, match="valid: linear, scaled_linear"):
        S.NoiseSchedule.from_config({**SD_CONFIG, "beta_schedule": "laplace"})
    with pytest.raises(ValueError, match="valid: epsilon, v_prediction, sample"):
        S.NoiseSchedule.from_config({**SD_CONFIG, "prediction_type": "flow_prediction"})


def test_noise_schedule_is_a_pytree():
    sched = S.NoiseSchedule.from_config(ZERO_SNR_CONFIG)
    leaves, treedef = jax.tree_util.tree_flatten(sched)
    assert len(leaves) == 2
    assert jax.tree_util.tree_unflatten(treedef, leaves).prediction_type == "v_prediction"


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("steps", [1, 7, 10, 25, 50, 333, 1000])
def test_timesteps_match_diffusers(spacing, offset, steps):
    """Also where both give a timestep out of range (leading, offset 1, 1000 steps: 1000), which samplers refuse."""
    ref = DDIMScheduler.from_config({**SD_CONFIG, "timestep_spacing": spacing, "steps_offset": offset})
    ref.set_timesteps(steps)
    ours = S.timesteps(steps, 1000, spacing, offset)
    assert ours.dtype == np.int64 and ours.shape == (steps,)
    np.testing.assert_array_equal(ours, ref.timesteps.numpy())
    assert np.all(np.diff(ours) < 0)


def test_trailing_timesteps_drop_diffusers_spurious_last_step():
    ref = DDIMScheduler.from_config({**SD_CONFIG, "timestep_spacing": "trailing"})
    ref.set_timesteps(61)
    ref_ts = ref.timesteps.numpy()
    assert len(ref_ts) == 62 and ref_ts[-1] == -1  # the diffusers quirk this guards against
    ours = S.timesteps(61, 1000, "trailing")
    np.testing.assert_array_equal(ours, ref_ts[:61])


def test_timesteps_errors():
    with pytest.raises(ValueError, match="leading, trailing, linspace"):
        S.timesteps(10, 1000, "karras")
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        S.timesteps(0)
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        S.timesteps(1001)


@pytest.mark.parametrize("config", [SD_CONFIG, ZERO_SNR_CONFIG], ids=["sd", "zero_snr"])
def test_add_noise_and_velocity_match_diffusers(config):
    ref = DDPMScheduler.from_config(config)
    sched = S.NoiseSchedule.from_config(config)
    z0, eps = _normal(0), _normal(1)
    t = np.array([0, 999], np.int64)
    tz, te, tt = torch.from_numpy(z0), torch.from_numpy(eps), torch.from_numpy(t)
    noisy = jax.jit(S.add_noise)(sched, jnp.asarray(z0), jnp.asarray(eps), jnp.asarray(t, jnp.int32))
    np.testing.assert_allclose(noisy, ref.add_noise(tz, te, tt).numpy(), atol=2e-6)
    v = S.velocity_target(sched, jnp.asarray(z0), jnp.asarray(eps), jnp.asarray(t))
    np.testing.assert_allclose(v, ref.get_velocity(tz, te, tt).numpy(), atol=2e-6)
    ac = ref.alphas_cumprod.numpy().astype(np.float64)[t]
    np.testing.assert_allclose(S.snr(sched, jnp.asarray(t)), ac / (1 - ac), rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_conversions_invert_the_forward_process(prediction_type):
    sched = S.NoiseSchedule.from_config({**SD_CONFIG, "prediction_type": prediction_type})
    z0, eps = jnp.asarray(_normal(2)), jnp.asarray(_normal(3))
    t = jnp.array([17, 640])
    z_t = S.add_noise(sched, z0, eps, t)
    target = S.training_target(sched, z0, eps, t)
    expected = {"epsilon": eps, "v_prediction": S.velocity_target(sched, z0, eps, t), "sample": z0}[prediction_type]
    np.testing.assert_array_equal(target, expected)
    # atol: float32 round trips, measured at most 8.5e-7
    np.testing.assert_allclose(S.predict_x0(sched, z_t, t, target), z0, atol=1e-5)
    np.testing.assert_allclose(S.predict_eps(sched, z_t, t, target), eps, atol=1e-5)
    # an explicit prediction type overrides the schedule's
    np.testing.assert_allclose(S.predict_x0(sched, z_t, t, eps, "epsilon"), z0, atol=1e-5)


def test_split_prediction_rejects_unknown_type():
    with pytest.raises(ValueError, match="epsilon, v_prediction, sample"):
        S.split_prediction(jnp.zeros(3), 1.0, 0.0, jnp.zeros(3), "x0")
