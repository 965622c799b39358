"""Samplers against diffusers' schedulers: whole trajectories with one model function and the same noise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler)
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete

from ldm_jax.diffusion.samplers import SAMPLERS, make_sampler, sample_loop

SD_CONFIG = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "num_train_timesteps": 1000,
             "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
             "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "trained_betas": None}
V = {"prediction_type": "v_prediction"}
ZERO_SNR = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
SHAPE = (2, 4, 8, 8)
TOLERANCE = 1e-4  # max abs difference of the final sample (float32)

DIFFUSERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++2m": DPMSolverMultistepScheduler,
             "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler}
# Modules whose step draws its noise with randn_tensor (patched to return the test's noise).
RANDN_MODULES = {"ddpm": scheduling_ddpm, "euler_a": scheduling_euler_ancestral_discrete}

# (sampler, config overrides, steps, eta); config overrides are passed to both sides.
CASES = {
    "ddpm-eps-leading": ("ddpm", {}, 10, None),
    "ddpm-eps-linspace-clip": ("ddpm", {"timestep_spacing": "linspace", "clip_sample": True}, 12, None),
    "ddpm-v-zero_snr": ("ddpm", ZERO_SNR, 10, None),
    "ddim-eps": ("ddim", {}, 20, 0.0),
    "ddim-v": ("ddim", V, 15, 0.0),
    "ddim-v-zero_snr": ("ddim", ZERO_SNR, 10, 0.0),
    "ddim-eps-eta": ("ddim", {"timestep_spacing": "linspace"}, 12, 0.7),
    "ddim-sample-clip-eta1": ("ddim", {"prediction_type": "sample", "clip_sample": True,
                                       "set_alpha_to_one": True}, 10, 1.0),
    "dpm-eps": ("dpm++2m", {}, 20, None),
    "dpm-v-karras": ("dpm++2m", {**V, "use_karras_sigmas": True}, 12, None),
    "dpm-eps-karras-linspace": ("dpm++2m", {"use_karras_sigmas": True, "timestep_spacing": "linspace"}, 25, None),
    "dpm-heun-sigma_min": ("dpm++2m", {"solver_type": "heun", "final_sigmas_type": "sigma_min"}, 16, None),
    "dpm-sample-sigma_min-short": ("dpm++2m", {"prediction_type": "sample", "final_sigmas_type": "sigma_min"},
                                   10, None),
    "dpm-v-zero_snr": ("dpm++2m", ZERO_SNR, 10, None),
    "euler-eps-linspace": ("euler", {"timestep_spacing": "linspace"}, 15, None),
    "euler-eps-karras": ("euler", {"use_karras_sigmas": True}, 20, None),
    "euler-v-karras-linspace": ("euler", {**V, "use_karras_sigmas": True, "timestep_spacing": "linspace"}, 12, None),
    "euler-v-zero_snr": ("euler", ZERO_SNR, 10, None),
    "euler_a-eps": ("euler_a", {}, 15, None),
    "euler_a-v-linspace": ("euler_a", {**V, "timestep_spacing": "linspace"}, 12, None),
}


def model_fn(x, t, xp):
    """A fixed nonlinear stand-in for a U-Net, written once for torch (xp=torch) and jax (xp=jnp)."""
    s = t / 1000.0
    return 0.8 * xp.tanh(x) * (1.0 - s) + 0.3 * x * s + 0.1 * xp.sin(2.0 * x + s)


def _inputs(steps: int, seed: int = 0):
    """Standard normal initial latents and per-step noise [steps, *SHAPE]."""
    rng = np.random.RandomState(seed)
    return rng.randn(*SHAPE).astype(np.float32), rng.randn(steps, *SHAPE).astype(np.float32)


def _diffusers_trajectory(name, overrides, steps, eta, latents, noise, monkeypatch):
    """diffusers' scheduler loop (as its pipelines run it) with ``noise[i]`` as step i's noise."""
    sched = DIFFUSERS[name].from_config({**SD_CONFIG, **overrides})
    sched.set_timesteps(steps)
    current = {"i": 0}
    if name in RANDN_MODULES:
        monkeypatch.setattr(RANDN_MODULES[name], "randn_tensor",
                            lambda shape, **kwargs: torch.from_numpy(noise[current["i"]]))
    x = torch.from_numpy(latents) * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        current["i"] = i
        out = model_fn(sched.scale_model_input(x, t), float(t), torch)
        kwargs = {}
        if name == "ddim":
            kwargs = {"eta": eta, "variance_noise": torch.from_numpy(noise[i]) if eta > 0 else None}
        x = sched.step(out, t, x, **kwargs).prev_sample
    return sched, x.numpy()


def _jax_model(x, t):
    """``model_fn`` for jax, on the sampler's (possibly traced) timestep."""
    return model_fn(x, t.astype(jnp.float32), jnp)


def _python_loop(sampler, latents, noise):
    """Our sampler stepped from Python, one step at a time."""
    x = jnp.asarray(latents) * sampler.init_noise_sigma
    state = sampler.init_state(x)
    for i in range(sampler.num_steps):
        out = _jax_model(sampler.scale_model_input(state, x, i), sampler.timestep(i))
        x, state = sampler.step(state, i, x, out, jnp.asarray(noise[i]))
    return np.asarray(x)


@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_matches_diffusers(case, monkeypatch):
    name, overrides, steps, eta = CASES[case]
    latents, noise = _inputs(steps)
    ref_sched, ref = _diffusers_trajectory(name, overrides, steps, eta, latents, noise, monkeypatch)
    sampler = make_sampler(name, {**SD_CONFIG, **overrides}, steps, **({"eta": eta} if name == "ddim" else {}))

    assert sampler.num_steps == steps and sampler.sigmas.shape == (steps + 1,)
    ref_ts = ref_sched.timesteps.numpy()
    if np.issubdtype(sampler.timesteps.dtype, np.integer):
        np.testing.assert_array_equal(sampler.timesteps, ref_ts)
    else:  # fractional (Euler) timesteps: float64 here, float32 in diffusers
        np.testing.assert_allclose(sampler.timesteps, ref_ts, rtol=0, atol=2e-3)
    if hasattr(ref_sched, "sigmas"):
        np.testing.assert_allclose(sampler.sigmas, ref_sched.sigmas.numpy(), rtol=3e-5)
    assert sampler.init_noise_sigma == pytest.approx(float(ref_sched.init_noise_sigma), rel=1e-5)
    assert sampler.needs_noise == (name in ("ddpm", "euler_a") or bool(eta))

    ours = _python_loop(sampler, latents, noise)
    assert np.all(np.isfinite(ours)) and np.abs(ref).max() > 0.1
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOLERANCE)


def test_noise_changes_stochastic_samplers_only():
    """The comparison above could not pass by ignoring noise: it moves ddpm/ddim(eta)/euler_a, not the others."""
    latents, noise = _inputs(10)
    for name, options, stochastic in [("ddpm", {}, True), ("ddim", {"eta": 0.5}, True), ("euler_a", {}, True),
                                      ("ddim", {}, False), ("dpm++2m", {}, False), ("euler", {}, False)]:
        sampler = make_sampler(name, SD_CONFIG, 10, **options)
        a = _python_loop(sampler, latents, noise)
        b = _python_loop(sampler, latents, -noise)
        assert (np.abs(a - b).max() > 1e-2) == stochastic, name


@pytest.mark.parametrize("name,overrides,options", [("ddim", {}, {"eta": 0.5}), ("ddpm", ZERO_SNR, {}),
                                                    ("dpm++2m", {"use_karras_sigmas": True}, {}),
                                                    ("euler", {}, {}), ("euler_a", V, {})])
def test_jitted_scan_matches_python_loop(name, overrides, options):
    steps = 10
    latents, noise = _inputs(steps, seed=1)
    sampler = make_sampler(name, {**SD_CONFIG, **overrides}, steps, **options)
    run = jax.jit(lambda lat, nz: sample_loop(sampler, _jax_model, lat * sampler.init_noise_sigma, noise=nz))
    scanned = np.asarray(run(jnp.asarray(latents), jnp.asarray(noise)))
    np.testing.assert_allclose(scanned, _python_loop(sampler, latents, noise), rtol=0, atol=1e-5)


def test_sample_loop_draws_noise_from_rng():
    sampler = make_sampler("euler_a", SD_CONFIG, 6)
    latents = jnp.asarray(_inputs(1)[0])
    run = jax.jit(lambda key: sample_loop(sampler, _jax_model, latents * sampler.init_noise_sigma, rng=key))
    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2
    with pytest.raises(ValueError, match="needs noise"):
        sample_loop(sampler, _jax_model, latents)


def test_bfloat16_latents_keep_their_dtype():
    sampler = make_sampler("dpm++2m", SD_CONFIG, 5)
    x = jnp.asarray(_inputs(1)[0], jnp.bfloat16)
    out = sample_loop(sampler, lambda x, t: model_fn(x, t.astype(jnp.float32), jnp), x)
    assert out.dtype == jnp.bfloat16 and out.shape == SHAPE


def test_errors():
    with pytest.raises(ValueError, match="ddpm, ddim, dpm\\+\\+2m, euler, euler_a"):
        make_sampler("pndm", SD_CONFIG, 10)
    for steps in (0, -1, 2.5):
        with pytest.raises(ValueError, match="positive integer"):
            make_sampler("ddim", SD_CONFIG, steps)
    with pytest.raises(ValueError, match="no options \\['use_karras_sigmas'\\]"):
        make_sampler("ddim", SD_CONFIG, 10, use_karras_sigmas=True)
    with pytest.raises(ValueError, match="thresholding=True"):
        make_sampler("dpm++2m", {**SD_CONFIG, "thresholding": True}, 10)
    with pytest.raises(ValueError, match="variance_type='learned_range'"):
        make_sampler("ddpm", {**SD_CONFIG, "variance_type": "learned_range"}, 10)
    with pytest.raises(ValueError, match="prediction_type"):
        make_sampler("euler", SD_CONFIG, 10, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="solver_type"):
        make_sampler("dpm++2m", SD_CONFIG, 10, solver_type="bh2")
    with pytest.raises(ValueError, match="final_sigmas_type"):
        make_sampler("euler", SD_CONFIG, 10, final_sigmas_type="one")
    assert set(SAMPLERS) == set(DIFFUSERS)
