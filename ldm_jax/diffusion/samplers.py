"""Samplers as pure step functions over an explicit state, for ``lax.scan`` inside ``jax.jit``.

``make_sampler(name, scheduler_config, num_inference_steps, **options)``
reproduces diffusers' scheduler of the same algorithm built with
``XScheduler.from_config(scheduler_config, **options)``:

============  ======================================  ==========================================
name          diffusers scheduler                     options (config keys or keyword arguments)
============  ======================================  ==========================================
``ddpm``      DDPMScheduler (fixed_small variance)    clip_sample, clip_sample_range
``ddim``      DDIMScheduler                           eta, clip_sample, clip_sample_range,
                                                      set_alpha_to_one
``dpm++2m``   DPMSolverMultistepScheduler             use_karras_sigmas, solver_type,
              (dpmsolver++, order 2)                  lower_order_final, euler_at_final,
                                                      final_sigmas_type
``euler``     EulerDiscreteScheduler                  use_karras_sigmas, final_sigmas_type
``euler_a``   EulerAncestralDiscreteScheduler         (none)
============  ======================================  ==========================================

All samplers also take ``prediction_type`` (epsilon, v_prediction, sample),
``timestep_spacing`` and ``steps_offset``; missing keys get the diffusers
class's default (spacing ``leading`` for ddpm/ddim, ``linspace`` otherwise;
``clip_sample`` True for ddpm/ddim). Config values that would select an
algorithm we do not implement (thresholding, exponential/beta sigmas ...)
raise ValueError; the DPM-Solver variant is fixed by the name, so
``algorithm_type`` and ``solver_order`` are ignored.

Per-step scalars are precomputed in float64 numpy and applied in float32. A
loop (``sample_loop`` does this with ``lax.scan``)::

    sampler = make_sampler("ddim", scheduler_config, 50)
    x = noise * sampler.init_noise_sigma
    state = sampler.init_state(x)
    for i in range(sampler.num_steps):          # i may be a traced int
        out = model(sampler.scale_model_input(state, x, i), sampler.timestep(i))
        x, state = sampler.step(state, i, x, out, step_noise[i])
"""

import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.schedule import PREDICTION_TYPES, betas_from_config, split_prediction, timesteps

SAMPLERS = ("ddpm", "ddim", "dpm++2m", "euler", "euler_a")

# Keys every sampler reads, with diffusers' defaults (spacing defaults differ per sampler).
_COMMON = {"prediction_type": "epsilon", "steps_offset": 0}
_ZERO_SNR_ALPHA_CUMPROD = 2.0**-24  # diffusers' stand-in for alphas_cumprod[-1] = 0 in sigma-space samplers


class Sampler(NamedTuple):
    """A sampler: static per-step tables and pure functions (see the module docstring for a loop).

    ``timesteps`` [N]: what the model is given at step ``i`` (int32; float32
    for ``euler``/``euler_a``, whose timesteps may be fractional).
    ``sigmas`` [N + 1] float32: the noise level ``sqrt((1 - a) / a)`` at each
    step and after the last (``inf`` at zero SNR for ddpm/ddim).
    ``init_noise_sigma``: the scale of the initial standard normal latents.
    ``needs_noise``: whether ``step`` uses its ``noise`` argument.
    ``init_state(latents) -> state``: the initial state, a pytree.
    ``scale_model_input(state, x, i) -> x_in``: the model's input at step ``i``.
    ``step(state, i, x, model_output, noise=None) -> (x_next, state)``: one
    step; ``noise`` is a standard normal array of ``x``'s shape (stochastic
    samplers only). ``x_next`` keeps ``x``'s dtype.
    """

    name: str
    timesteps: np.ndarray
    sigmas: np.ndarray
    init_noise_sigma: float
    needs_noise: bool
    init_state: Callable[[jax.Array], Any]
    scale_model_input: Callable[[Any, jax.Array, jax.Array], jax.Array]
    step: Callable[..., tuple[jax.Array, Any]]

    @property
    def num_steps(self) -> int:
        """N, the number of steps (model evaluations)."""
        return len(self.timesteps)

    def timestep(self, i: int | jax.Array) -> jax.Array:
        """The model's timestep at step ``i`` (a scalar; ``i`` may be traced)."""
        return jnp.asarray(self.timesteps)[i]


def _at(table: np.ndarray, i: int | jax.Array) -> jax.Array:
    """``table[i]`` as a float32 scalar, for a possibly traced step index ``i``."""
    return jnp.asarray(table, jnp.float32)[i]


def _settings(name: str, config: Mapping[str, Any], options: Mapping[str, Any], defaults: Mapping[str, Any],
              supported: Mapping[str, tuple]) -> dict:
    """The sampler's settings: ``options`` over ``config`` over ``defaults`` (a ``None`` value means default).

    Raises ValueError for an option not in ``defaults``, a non-bool value for a
    bool setting, a config/option value outside ``supported[key]`` (``None``
    means absent), or an unknown prediction type.
    """
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"sampler {name!r} has no options {unknown}; valid: {sorted(defaults)}")
    merged = {**config, **options}
    for key, default in defaults.items():  # a string such as 'no' would otherwise count as True
        if isinstance(default, bool) and merged.get(key) is not None and not isinstance(merged[key], (bool, np.bool_)):
            raise ValueError(f"sampler {name!r}: {key} must be True or False, got {merged[key]!r}")
    for key, allowed in supported.items():
        if merged.get(key) not in allowed:
            raise ValueError(f"sampler {name!r} does not support {key}={merged[key]!r} (supported: {allowed})")
    out = {key: default if merged.get(key) is None else merged[key] for key, default in defaults.items()}
    if out["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {out['prediction_type']!r}; valid: {', '.join(PREDICTION_TYPES)}")
    return out


def _karras(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """``n`` noise levels from ``sigma_max`` down to ``sigma_min``, evenly spaced in ``sigma ** (1/7)`` (Karras)."""
    lo, hi = sigma_min ** (1 / 7), sigma_max ** (1 / 7)
    return (hi + np.linspace(0, 1, n) * (lo - hi)) ** 7


def _sigma_to_t(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps of ``sigmas`` by linear interpolation of ``log(train_sigmas)`` (increasing in t)."""
    return np.interp(np.log(sigmas), np.log(train_sigmas), np.arange(len(train_sigmas), dtype=np.float64))


def _vp_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """``sqrt((1 - a) / a)`` (``inf`` where ``a`` is 0)."""
    with np.errstate(divide="ignore"):
        return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def _identity_input(state: Any, x: jax.Array, i: int | jax.Array) -> jax.Array:
    """The model input of samplers in the variance-preserving parameterisation: ``x`` itself."""
    return x


def _no_state(latents: jax.Array) -> tuple:
    """The (empty) state of single-step samplers."""
    return ()


def _clip(x0: jax.Array, s: Mapping[str, Any]) -> jax.Array:
    """``x0`` clipped to ``[-clip_sample_range, clip_sample_range]`` when ``clip_sample`` is set."""
    return jnp.clip(x0, -s["clip_sample_range"], s["clip_sample_range"]) if s["clip_sample"] else x0


def _ddpm(config: Mapping[str, Any], n: int, options: Mapping[str, Any]) -> Sampler:
    """Ancestral DDPM sampling (Ho et al. 2020) with the posterior ("fixed_small") variance."""
    s = _settings("ddpm", config, options,
                  {**_COMMON, "timestep_spacing": "leading", "clip_sample": True, "clip_sample_range": 1.0},
                  {"thresholding": (None, False), "variance_type": (None, "fixed_small", "fixed_small_log")})
    ac = np.cumprod(1.0 - betas_from_config(config))
    ts = timesteps(n, len(ac), s["timestep_spacing"], s["steps_offset"])
    a_t, a_prev = ac[ts], np.append(ac[ts[1:]], 1.0)
    beta = 1.0 - a_t / a_prev
    coef_x0 = np.sqrt(a_prev) * beta / (1.0 - a_t)
    coef_x = np.sqrt(a_t / a_prev) * (1.0 - a_prev) / (1.0 - a_t)
    std = np.where(ts > 0, np.sqrt(np.maximum((1.0 - a_prev) / (1.0 - a_t) * beta, 1e-20)), 0.0)
    alpha, sigma = np.sqrt(a_t), np.sqrt(1.0 - a_t)

    def step(state, i, x, model_output, noise=None):
        """x_{t'} ~ q(x_{t'} | x_t, x0): the posterior mean at the predicted x0, plus std * noise."""
        x0, _ = split_prediction(x, _at(alpha, i), _at(sigma, i), model_output, s["prediction_type"])
        x_next = _at(coef_x0, i) * _clip(x0, s) + _at(coef_x, i) * x + _at(std, i) * noise
        return x_next.astype(x.dtype), state

    return Sampler("ddpm", ts.astype(np.int32), _vp_sigmas(np.append(a_t, 1.0)).astype(np.float32), 1.0, True,
                   _no_state, _identity_input, step)


def _ddim(config: Mapping[str, Any], n: int, options: Mapping[str, Any]) -> Sampler:
    """DDIM (Song et al. 2021); ``eta`` > 0 adds that fraction of the ancestral noise.

    As diffusers, the step from timestep ``t`` goes to ``t - T // N`` (not
    necessarily the next timestep for ``linspace``/``trailing`` spacing), and
    past ``t = 0`` to ``alphas_cumprod = 1`` (``set_alpha_to_one``) or ``alphas_cumprod[0]``.
    """
    s = _settings("ddim", config, options,
                  {**_COMMON, "timestep_spacing": "leading", "clip_sample": True, "clip_sample_range": 1.0,
                   "set_alpha_to_one": True, "eta": 0.0},
                  {"thresholding": (None, False)})
    ac = np.cumprod(1.0 - betas_from_config(config))
    ts = timesteps(n, len(ac), s["timestep_spacing"], s["steps_offset"])
    prev = ts - len(ac) // n
    a_t = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], 1.0 if s["set_alpha_to_one"] else ac[0])
    eta = float(s["eta"])
    std = eta * np.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
    coef_eps = np.sqrt(np.maximum(1.0 - a_prev - std**2, 0.0))
    alpha, sigma, alpha_prev = np.sqrt(a_t), np.sqrt(1.0 - a_t), np.sqrt(a_prev)

    def step(state, i, x, model_output, noise=None):
        """x_prev = alpha_prev * x0 + sqrt(1 - alpha_prev**2 - std**2) * eps (+ std * noise when eta > 0)."""
        x0, eps = split_prediction(x, _at(alpha, i), _at(sigma, i), model_output, s["prediction_type"])
        x_next = _at(alpha_prev, i) * _clip(x0, s) + _at(coef_eps, i) * eps
        if eta > 0:
            x_next = x_next + _at(std, i) * noise
        return x_next.astype(x.dtype), state

    return Sampler("ddim", ts.astype(np.int32), _vp_sigmas(np.append(a_t, a_prev[-1])).astype(np.float32), 1.0,
                   eta > 0, _no_state, _identity_input, step)


def _sigma_space(config: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(alphas_cumprod, sigmas)`` [T] for sigma-space samplers: a zero terminal SNR becomes 2**-24, as diffusers."""
    ac = np.cumprod(1.0 - betas_from_config(config))
    if config.get("rescale_betas_zero_snr", False):
        ac[-1] = _ZERO_SNR_ALPHA_CUMPROD
    return ac, _vp_sigmas(ac)


def _final_sigma(kind: str, train_sigmas: np.ndarray) -> float:
    """The noise level after the last step: ``zero`` or ``sigma_min`` (that of timestep 0)."""
    if kind not in ("zero", "sigma_min"):
        raise ValueError(f"unknown final_sigmas_type {kind!r}; valid: zero, sigma_min")
    return 0.0 if kind == "zero" else float(train_sigmas[0])


def _dpmpp_2m(config: Mapping[str, Any], n: int, options: Mapping[str, Any]) -> Sampler:
    """DPM-Solver++ 2M (Lu et al. 2022): a multistep second-order solver in data (x0) prediction.

    The state is the previous step's x0 prediction. The first step, and the last
    one when ``final_sigmas_type`` is ``zero``, ``euler_at_final`` is set, or
    ``lower_order_final`` is set with fewer than 15 steps, are first order.
    """
    s = _settings("dpm++2m", config, options,
                  {**_COMMON, "timestep_spacing": "linspace", "use_karras_sigmas": False, "solver_type": "midpoint",
                   "lower_order_final": True, "euler_at_final": False, "final_sigmas_type": "zero"},
                  {"thresholding": (None, False), "use_exponential_sigmas": (None, False),
                   "use_beta_sigmas": (None, False), "use_lu_lambdas": (None, False),
                   "use_flow_sigmas": (None, False), "lambda_min_clipped": (None, -math.inf)})
    if s["solver_type"] not in ("midpoint", "heun"):
        raise ValueError(f"unknown solver_type {s['solver_type']!r}; valid: midpoint, heun")
    ac, train_sigmas = _sigma_space(config)
    T = len(ac)
    if s["timestep_spacing"] == "trailing":
        ts = timesteps(n, T, "trailing", s["steps_offset"])
    else:  # N + 1 points from T - 1 down to 0; the final 0 is dropped
        ts = timesteps(n + 1, T, s["timestep_spacing"], s["steps_offset"])[:-1]
    if s["use_karras_sigmas"]:
        sig = _karras(float(train_sigmas[0]), float(train_sigmas[-1]), n)
        t_frac = _sigma_to_t(sig, train_sigmas)
        # diffusers rounds these timesteps, except for the cosine schedule, where the int cast truncates them.
        ts = t_frac.astype(np.int64) if config.get("beta_schedule") == "squaredcos_cap_v2" else np.round(t_frac)
    else:
        sig = train_sigmas[ts]
    sigmas = np.append(sig, _final_sigma(s["final_sigmas_type"], train_sigmas))
    alphas = 1.0 / np.sqrt(1.0 + sigmas**2)  # VP alpha_t; the VP sigma_t is sigmas * alphas

    first_order = np.zeros(n, bool)
    first_order[0] = True
    first_order[-1] |= (s["euler_at_final"] or (s["lower_order_final"] and n < 15)
                        or s["final_sigmas_type"] == "zero")
    coef_x = sigmas[1:] * alphas[1:] / (sigmas[:-1] * alphas[:-1])
    phi = alphas[1:] * (1.0 - sigmas[1:] / sigmas[:-1])  # alpha_t * (1 - exp(-h)), h = log(sigma_s / sigma_t)
    coef_m0, coef_m1 = phi.copy(), np.zeros(n)
    for i in np.flatnonzero(~first_order):
        h = math.log(sigmas[i] / sigmas[i + 1])
        r0 = math.log(sigmas[i - 1] / sigmas[i]) / h
        # x_next = coef_x x + phi D0 + d1 D1 with D0 = x0, D1 = (x0 - x0_prev) / r0
        d1 = 0.5 * phi[i] if s["solver_type"] == "midpoint" else alphas[i + 1] * (math.expm1(-h) / h + 1.0)
        coef_m0[i], coef_m1[i] = phi[i] + d1 / r0, -d1 / r0

    def init_state(latents):
        """The previous x0 prediction (zeros before the first step) and whether there is one."""
        return jnp.zeros_like(latents), jnp.asarray(False)

    def step(state, i, x, model_output, noise=None):
        """x_next = (sigma_t / sigma_s) x + phi (x0 + (x0 - x0_prev) / (2 r0)) (midpoint; first order: phi x0).

        The first step taken is first order whatever ``i`` is, so a run that
        starts part-way (img2img) begins as diffusers' does.
        """
        x0_prev, has_prev = state
        x0, _ = split_prediction(x, _at(alphas, i), _at(sigmas * alphas, i), model_output, s["prediction_type"])
        m0 = jnp.where(has_prev, _at(coef_m0, i), _at(phi, i))
        m1 = jnp.where(has_prev, _at(coef_m1, i), 0.0)
        x_next = _at(coef_x, i) * x + m0 * x0 + m1 * x0_prev
        return x_next.astype(x.dtype), (x0.astype(x0_prev.dtype), jnp.asarray(True))

    return Sampler("dpm++2m", ts.astype(np.int32), sigmas.astype(np.float32), 1.0, False, init_state,
                   _identity_input, step)


def _euler_family(name: str, config: Mapping[str, Any], n: int, options: Mapping[str, Any]) -> Sampler:
    """Euler (Karras et al. 2022, Algorithm 2 without churn) or Euler ancestral, in sigma space.

    The sample is ``x = x_vp * sqrt(1 + sigma**2)``, so the model input is
    ``x / sqrt(1 + sigma**2)`` and ``dx/dsigma = eps``. Euler ancestral steps
    down to ``sigma_down`` and adds ``sigma_up * noise``
    (``sigma_up**2 + sigma_down**2 = sigma_next**2``).
    """
    ancestral = name == "euler_a"
    defaults = {**_COMMON, "timestep_spacing": "linspace"}
    supported = {}
    if not ancestral:
        defaults.update(use_karras_sigmas=False, final_sigmas_type="zero")
        supported = {"use_exponential_sigmas": (None, False), "use_beta_sigmas": (None, False),
                     "timestep_type": (None, "discrete"), "interpolation_type": (None, "linear"),
                     "sigma_min": (None,), "sigma_max": (None,)}
    s = _settings(name, config, options, defaults, supported)
    ac, train_sigmas = _sigma_space(config)
    T = len(ac)
    if s["timestep_spacing"] == "linspace":  # not rounded: fractional timesteps
        ts = np.linspace(0, T - 1, n)[::-1].astype(np.float32).astype(np.float64)
    else:
        ts = timesteps(n, T, s["timestep_spacing"], s["steps_offset"]).astype(np.float64)
    sig = np.interp(ts, np.arange(T), train_sigmas)
    final = 0.0
    if not ancestral:
        if s["use_karras_sigmas"]:
            sig = _karras(float(sig[-1]), float(sig[0]), n)
            ts = _sigma_to_t(sig, train_sigmas)
        final = _final_sigma(s["final_sigmas_type"], train_sigmas)
    sigmas = np.append(sig, final)
    sigma_max = float(sigmas.astype(np.float32).max())
    init_noise_sigma = sigma_max if s["timestep_spacing"] in ("linspace", "trailing") else math.sqrt(sigma_max**2 + 1)
    alphas = 1.0 / np.sqrt(1.0 + sigmas**2)
    if ancestral:
        sigma_up = np.sqrt(sigmas[1:] ** 2 * (sigmas[:-1] ** 2 - sigmas[1:] ** 2) / sigmas[:-1] ** 2)
        sigma_to = np.sqrt(sigmas[1:] ** 2 - sigma_up**2)
    else:
        sigma_up, sigma_to = np.zeros(n), sigmas[1:]
    dsigma = sigma_to - sigmas[:-1]

    def scale_model_input(state, x, i):
        """``x / sqrt(1 + sigma_i**2)``: the variance-preserving sample the model was trained on."""
        return x * _at(alphas, i)

    def step(state, i, x, model_output, noise=None):
        """x_next = x + eps * (sigma_to - sigma) (+ sigma_up * noise for euler_a)."""
        alpha = _at(alphas, i)
        _, eps = split_prediction(x * alpha, alpha, _at(sigmas * alphas, i), model_output, s["prediction_type"])
        x_next = x + _at(dsigma, i) * eps
        if ancestral:
            x_next = x_next + _at(sigma_up, i) * noise
        return x_next.astype(x.dtype), state

    return Sampler(name, ts.astype(np.float32), sigmas.astype(np.float32), init_noise_sigma, ancestral, _no_state,
                   scale_model_input, step)


_BUILDERS = {
    "ddpm": _ddpm,
    "ddim": _ddim,
    "dpm++2m": _dpmpp_2m,
    "euler": lambda config, n, options: _euler_family("euler", config, n, options),
    "euler_a": lambda config, n, options: _euler_family("euler_a", config, n, options),
}


def make_sampler(name: str, scheduler_config: Mapping[str, Any], num_inference_steps: int, **options) -> Sampler:
    """The sampler ``name`` (one of ``SAMPLERS``) with ``num_inference_steps`` steps.

    ``scheduler_config`` is a diffusers scheduler config dict (its schedule and
    settings; keys other samplers use are ignored); ``options`` override its
    keys (see the module docstring for each sampler's). Raises ValueError for an
    unknown name or option, unsupported settings, or fewer than 1 step.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    return _BUILDERS[name](scheduler_config, int(num_inference_steps), options)


def noise_to_step(sampler: Sampler, x0: jax.Array, noise: jax.Array, i: int) -> jax.Array:
    """``x0`` noised to the level the sampler expects before step ``i`` (``i = num_steps``: after the last).

    Variance-preserving samplers (ddpm, ddim, dpm++2m) get
    ``(x0 + sigma_i noise) / sqrt(1 + sigma_i**2)``; the Euler family works on
    the unscaled ``x0 + sigma_i noise``. Used to start img2img part-way and to
    re-impose the known region when inpainting.
    """
    sigma = jnp.asarray(sampler.sigmas, jnp.float32)[i]
    x = x0 + sigma * noise
    if sampler.name not in ("euler", "euler_a"):
        x = jnp.where(jnp.isinf(sigma), noise, x / jnp.sqrt(1.0 + sigma**2))
    return x.astype(x0.dtype)


def sample_loop(sampler: Sampler, model_fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, *,
                start: int = 0, rng: jax.Array | None = None, noise: jax.Array | None = None,
                after_step: Callable[[jax.Array, jax.Array], jax.Array] | None = None) -> jax.Array:
    """Runs the sampler's steps ``start .. num_steps - 1`` with ``lax.scan`` and returns the final sample.

    ``x`` is the sample before step ``start``: ``noise * sampler.init_noise_sigma``
    for a full run, or :func:`noise_to_step` of a clean sample for a partial one.
    ``model_fn(x_in, t)`` returns the model output for the scaled input and the
    scalar timestep ``t``. Stochastic samplers take their per-step noise from
    ``noise`` [N, *x.shape] (indexed by step) or else draw it from ``rng`` with
    ``fold_in(rng, i)``; ValueError if they get neither. ``after_step(i, x)``,
    if given, edits the sample after step ``i`` (inpainting). Traceable under
    ``jax.jit``.
    """
    if sampler.needs_noise and noise is None and rng is None:
        raise ValueError(f"sampler {sampler.name!r} needs noise: pass rng or noise")
    if not 0 <= start < sampler.num_steps:
        raise ValueError(f"start must be in [0, {sampler.num_steps}), got {start}")

    def body(carry, i):
        """One step: model evaluation, then the sampler's update."""
        x, state = carry
        step_noise = None
        if sampler.needs_noise:
            step_noise = (noise[i] if noise is not None
                          else jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype))
        out = model_fn(sampler.scale_model_input(state, x, i), sampler.timestep(i))
        x, state = sampler.step(state, i, x, out, step_noise)
        if after_step is not None:
            x = after_step(i, x)
        return (x, state), None

    (x, _), _ = jax.lax.scan(body, (x, sampler.init_state(x)), jnp.arange(start, sampler.num_steps))
    return x
