"""`sample_fn`: text to images in one jitted, pure function.

tokens -> CLIP -> classifier-free-guided sampler loop over latents
(``lax.scan``) -> VAE decode -> images. Everything that changes the compiled
program (the modules, the sampler, step count, guidance scale, image size) is
static (``sampler_options`` may be a dict: it is frozen into sorted pairs);
params, token ids, the rng key and optional starting latents / images are
traced, so a new prompt or seed reuses the compiled code. Its inputs are
checked (`check_inputs`) before tracing: a bad one is a ValueError naming it,
never an error inside XLA.

Token ids are range-checked too: numpy arrays on the host, concrete
``jax.Array`` ids by one small reduction whose [min, max] is read back (a
few bytes from the device per call, before the sampling program is
dispatched). Ids traced by an outer ``jax.jit`` cannot be checked before
the program runs; inside it, each image whose prompt or negative prompt has
an id outside the vocabulary comes back all NaN (never a plausible wrong
image): test ``jnp.isnan(images).any()`` where ids are traced.
"""

import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import samplers


def _frozen(value: Any) -> Any:
    """Lists (from JSON configs) to tuples, so a config can be part of a static argument."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def freeze_sampler_options(options: Any) -> tuple[tuple[str, Any], ...]:
    """``sampler_options`` in the hashable form jit's static arguments need: ``(name, value)`` pairs sorted by name.

    Takes a mapping (``{'use_karras_sigmas': True}``), pairs already, or None;
    lists in values become tuples. ValueError naming ``sampler_options`` for
    anything else, a repeated name or a value that is not hashable (an array).
    """
    if options is None:
        return ()
    if hasattr(options, "keys") and hasattr(options, "items"):
        items = list(options.items())
    elif isinstance(options, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in options):
        items = [tuple(p) for p in options]
    else:
        raise ValueError(f"sampler_options must be a mapping of option names to values, e.g. {{'eta': 0.0}}, or "
                         f"(name, value) pairs; got {options!r}")
    names = [name for name, _ in items]
    if not all(isinstance(name, str) for name in names):
        raise ValueError(f"sampler_options names must be strings, got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"sampler_options names an option twice: {names}")
    frozen = []
    for name, value in items:
        value = _frozen(value)
        try:
            hash(value)
        except TypeError:
            raise ValueError(f"sampler_options[{name!r}] must be a plain value (number, bool, string or None), "
                             f"got {type(value).__name__} {value!r}") from None
        frozen.append((name, value))
    return tuple(sorted(frozen, key=lambda pair: pair[0]))


@dataclasses.dataclass(frozen=True)
class Models:
    """The static half of `sample_fn`: the three Flax modules, the scheduler config and the latent scale.

    Hashable, so it is a static argument of the jitted function; build it with
    ``Pipeline.models`` or :meth:`create`.
    """
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    scheduler: tuple[tuple[str, Any], ...]
    scale_factor: float

    @classmethod
    def create(cls, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, scheduler_config: Mapping[str, Any],
               scale_factor: float) -> "Models":
        """Bundle modules with a diffusers scheduler config dict (frozen into sorted items)."""
        scheduler = tuple(sorted((k, _frozen(v)) for k, v in scheduler_config.items()))
        return cls(unet, vae, text_encoder, scheduler, float(scale_factor))

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The scheduler config as a dict."""
        return dict(self.scheduler)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """NHWC latent shape for images of ``height`` x ``width``; ValueError if the VAE and then the U-Net cannot
        downsample them evenly."""
        factor = 2 ** (len(self.vae.block_out_channels) - 1)
        if height % factor or width % factor:
            raise ValueError(f"image size {height}x{width} must be divisible by the VAE's downsampling factor "
                             f"{factor}")
        unet_factor = 2 ** (len(self.unet.block_out_channels) - 1)
        if (height // factor) % unet_factor or (width // factor) % unet_factor:
            raise ValueError(f"image size {height}x{width} must be divisible by {factor * unet_factor}: the VAE's "
                             f"downsampling factor {factor} times the U-Net's {unet_factor}")
        return batch, height // factor, width // factor, self.vae.latent_channels


def _apply(models: Models, name: str, params: Any, *args, **kwargs) -> Any:
    """``models.<name>.apply`` on ``params``; a param tree that does not fit the model is a ValueError naming
    ``params['<name>']`` and the missing or misshapen parameter (raised while tracing, before anything runs)."""
    module = getattr(models, name)
    try:
        return module.apply({"params": params}, *args, **kwargs)
    except (flax.errors.ScopeParamNotFoundError, flax.errors.ScopeParamShapeError) as error:
        message = str(error).split(" (https://", 1)[0].rstrip(".")
        raise ValueError(f"params[{name!r}] does not fit models.{name} ({type(module).__name__}): {message}; "
                         "load params and models together (Pipeline)") from None


def _encode_text(models: Models, params: Any, ids: jax.Array) -> jax.Array:
    hidden, _ = _apply(models, "text_encoder", params, ids)
    return hidden


def _guided_model(models: Models, unet_params: Any, context: jax.Array, guidance_scale: float) -> Callable:
    """``model_fn(x, t)`` with classifier-free guidance: both halves in one U-Net call.

    ``context`` is [uncond; cond] stacked on the batch axis when guidance is on,
    just cond when ``guidance_scale == 1``.
    """
    guided = guidance_scale != 1.0

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        x_in = jnp.concatenate([x, x]) if guided else x
        t_in = jnp.broadcast_to(t, (x_in.shape[0],))
        out = _apply(models, "unet", unet_params, x_in.astype(models.unet.dtype), t_in, context)
        out = out.astype(x.dtype)
        if not guided:
            return out
        uncond, cond = jnp.split(out, 2)
        return uncond + guidance_scale * (cond - uncond)

    return model_fn


def _start_step(num_steps: int, strength: float) -> int:
    """The first step of an img2img run at ``strength`` (diffusers' rule: the last ``int(N * strength)`` steps)."""
    return num_steps - min(int(num_steps * strength), num_steps)


@functools.partial(jax.jit, static_argnames=(
    "models", "sampler", "steps", "guidance_scale", "height", "width", "strength", "sampler_options",
    "sample_posterior", "return_latents"))
def _sample(params: Mapping[str, Any], cond_ids: jax.Array, uncond_ids: jax.Array | None, rng: jax.Array,
            latents: jax.Array | None = None, init_image: jax.Array | None = None, mask: jax.Array | None = None,
            *, models: Models, sampler: str = "ddim", steps: int = 50, guidance_scale: float = 7.5,
            height: int = 512, width: int = 512, strength: float = 1.0,
            sampler_options: tuple[tuple[str, Any], ...] = (), sample_posterior: bool = True,
            return_latents: bool = False):
    """Generate images for a batch of prompts; jitted and pure (``sample_fn``: inputs checked first).

    Args:
      params: ``{'unet', 'vae', 'text_encoder'}`` param trees.
      cond_ids: int token ids [B, L] of the prompts.
      uncond_ids: token ids [B, L] of the negative / empty prompts; unused (may
        be None) when ``guidance_scale == 1``.
      rng: key for the initial latents, stochastic samplers and the img2img
        posterior sample.
      latents: optional standard normal initial latents [B, h, w, C] (NHWC);
        drawn from ``rng`` when None.
      init_image: optional image [B, height, width, 3] in [-1, 1] to start from
        (img2img: it is encoded, noised with ``latents`` to ``strength`` and
        denoised over the last ``int(steps * strength)`` steps).
      mask: optional [B, h, w, 1] at latent resolution, 1 where to generate and 0
        where to keep ``init_image`` (inpainting by latent masking; needs
        ``init_image``). At ``strength`` 1 the run starts from pure noise, below
        it from the noised image, as diffusers' StableDiffusionInpaintPipeline
        does with a 4-channel U-Net.
      models: the static `Models` bundle (``Pipeline.models``).
      sampler: one of ``samplers.SAMPLERS``; ``sampler_options`` are its
        options (``samplers`` module docstring), a mapping such as
        ``{'use_karras_sigmas': True}`` or ``(name, value)`` pairs; `sample_fn`
        freezes a mapping into sorted pairs, so equal options share a program.
      steps, guidance_scale, height, width, strength: as in diffusers' pipelines
        (``strength`` needs ``init_image``). Unlike diffusers, a
        ``guidance_scale`` in [0, 1) still applies guidance (0: the
        unconditional prediction); only exactly 1 skips the unconditional half.
        Negative scales are refused: to steer away from a prompt, give it as
        ``uncond_ids``.
      sample_posterior: encode ``init_image`` to a sample of the VAE posterior
        (drawn from ``rng``, as diffusers does) or, if False, to its mode (the
        mean: diffusers' ``sample_mode="argmax"``), which makes img2img and
        inpainting deterministic given ``latents``.
      return_latents: also return the final latents, in the U-Net's space (VAE
        latents times ``scale_factor``, as diffusers' ``output_type="latent"``).

    Returns:
      images [B, height, width, 3] float32 in [0, 1], and the final latents if
      ``return_latents``; both all NaN for a prompt whose ids leave the
      vocabulary (reachable only when an outer jit traces the ids).
    """
    sampler_ = samplers.make_sampler(sampler, models.scheduler_config, steps, **dict(sampler_options))
    shape = models.latent_shape(cond_ids.shape[0], height, width)
    latents_key, noise_key, posterior_key = jax.random.split(rng, 3)
    if latents is None:
        latents = jax.random.normal(latents_key, shape, jnp.float32)

    context = _encode_text(models, params["text_encoder"], cond_ids)
    if guidance_scale != 1.0:
        context = jnp.concatenate([_encode_text(models, params["text_encoder"], uncond_ids), context])
    model_fn = _guided_model(models, params["unet"], context, guidance_scale)

    start, x0, after_step = 0, None, None
    x = latents * sampler_.init_noise_sigma
    if init_image is not None:
        posterior = _apply(models, "vae", params["vae"], init_image, method="encode")
        x0 = (posterior.sample(posterior_key) if sample_posterior else posterior.mode()) * models.scale_factor
        start = _start_step(sampler_.num_steps, strength)
        if mask is None or strength < 1.0:
            x = samplers.noise_to_step(sampler_, x0, latents, start)
        if mask is not None:
            after_step = _restore_known_region(sampler_, x0, latents, mask)

    z = samplers.sample_loop(sampler_, model_fn, x, start=start, rng=noise_key, after_step=after_step)
    if mask is not None:
        z = mask * z + (1.0 - mask) * x0
    images = _apply(models, "vae", params["vae"], z / models.scale_factor, method="decode")
    images = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    valid = _in_vocabulary(cond_ids, models.text_encoder.vocab_size)
    if guidance_scale != 1.0:
        valid &= _in_vocabulary(uncond_ids, models.text_encoder.vocab_size)
    images = jnp.where(valid[:, None, None, None], images, jnp.nan)
    z = jnp.where(valid[:, None, None, None], z, jnp.nan)
    return (images, z) if return_latents else images


def _in_vocabulary(ids: jax.Array, vocab_size: int) -> jax.Array:
    """bool [B]: whether every id of each row is in ``[0, vocab_size)`` (a negative id would otherwise wrap)."""
    return jnp.all((ids >= 0) & (ids < vocab_size), axis=1)


def _restore_known_region(sampler_: Any, x0: jax.Array, latents: jax.Array, mask: jax.Array) -> Callable:
    """The sample loop's ``after_step`` for inpainting: after step ``i``, where ``mask`` is 0 (the region kept
    from the image) the latents are put back from ``x0``, noised with ``latents`` to the level after step ``i``."""
    def after_step(i, x):
        known = samplers.noise_to_step(sampler_, x0, latents, i + 1)
        return mask * x + (1.0 - mask) * known

    return after_step


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _shape(value: Any) -> tuple[int, ...] | None:
    return None if value is None else tuple(np.shape(value))


def _check_ids(name: str, ids: Any, vocab_size: int) -> None:
    """Token ids: an int array [B, L]; values in range when they are host (numpy) arrays (`_check_id_values`
    checks concrete jax.Arrays)."""
    if not (hasattr(ids, "shape") and hasattr(ids, "dtype")):
        raise ValueError(f"{name} must be an array of token ids [batch, length] (numpy or jax), got "
                         f"{type(ids).__name__} (np.asarray(ids, np.int32) converts a list; ldm_jax.tokenize "
                         "makes one from text)")
    shape, dtype = _shape(ids), np.dtype(ids.dtype)
    if len(shape) != 2:
        raise ValueError(f"{name} must be token ids of shape [batch, length], got shape {shape}")
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {dtype}")
    if isinstance(ids, np.ndarray) and ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{name} holds token ids in [{ids.min()}, {ids.max()}], outside the text encoder's "
                         f"vocabulary [0, {vocab_size})")


@jax.jit
def _id_ranges(ids: tuple[jax.Array, ...]) -> jax.Array:
    """int [len(ids), 2]: [min, max] of each token id array, in one small program."""
    return jnp.stack([jnp.stack([jnp.min(a), jnp.max(a)]) for a in ids])


def _check_id_values(named_ids: dict[str, Any], vocab_size: int) -> None:
    """ValueError naming the argument when a concrete jax.Array of token ids leaves ``[0, vocab_size)``.

    One reduction over all of them and one read of its few bytes back to the
    host; traced ids (under an outer jit) have no values yet and are skipped.
    """
    concrete = {name: ids for name, ids in named_ids.items()
                if isinstance(ids, jax.Array) and not isinstance(ids, jax.core.Tracer) and ids.size}
    if not concrete:
        return
    for name, (low, high) in zip(concrete, np.asarray(_id_ranges(tuple(concrete.values())))):
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name} holds token ids in [{low}, {high}], outside the text encoder's vocabulary "
                             f"[0, {vocab_size})")


def _check_image(image: Any, shape: tuple[int, int, int, int]) -> None:
    """``init_image``: a float array of ``shape`` (values in [-1, 1] checked for host arrays)."""
    if not (hasattr(image, "shape") and hasattr(image, "dtype")):
        raise ValueError(f"init_image must be an array of images {list(shape)} in [-1, 1], got {type(image).__name__}"
                         f" (load and convert the file first, e.g. ldm_jax.images.from_uint8(np.asarray(pil_image)))")
    if len(_shape(image)) != 4 or _shape(image)[:3] != shape[:3]:
        raise ValueError(f"init_image has shape {_shape(image)}, expected ({shape[0]}, {shape[1]}, {shape[2]}, "
                         "channels)")
    if _shape(image)[3] != shape[3]:
        raise ValueError(f"init_image has {_shape(image)[3]} channels, the VAE takes {shape[3]} (RGB: drop an alpha "
                         "channel)")
    if not np.issubdtype(np.dtype(image.dtype), np.floating):
        raise ValueError(f"init_image must hold float values in [-1, 1], got dtype {np.dtype(image.dtype)} "
                         "(ldm_jax.images.from_uint8 converts uint8 images)")
    if isinstance(image, np.ndarray) and image.size and (image.min() < -1.001 or image.max() > 1.001):
        raise ValueError(f"init_image holds values in [{image.min():g}, {image.max():g}], outside [-1, 1] "
                         "(ldm_jax.images.from_uint8 maps 0..255 to [-1, 1])")


def check_inputs(params: Mapping[str, Any], cond_ids: Any, uncond_ids: Any, rng: Any, latents: Any = None,
                 init_image: Any = None, mask: Any = None, *, models: Models, sampler: str = "ddim", steps: int = 50,
                 guidance_scale: float = 7.5, height: int = 512, width: int = 512, strength: float = 1.0,
                 sampler_options: Any = (), sample_posterior: bool = True, return_latents: bool = False) -> None:
    """ValueError naming the argument and its value for any input `sample_fn` cannot run on.

    Checks the settings (sampler name, step count, guidance, size, strength)
    and the shapes and dtypes of the arrays, plus the token id range of
    concrete arrays (numpy, and jax.Arrays by a small device reduction);
    `sample_fn` runs it before tracing, so no bad input reaches XLA.
    """
    del sample_posterior, return_latents
    if not isinstance(models, Models):
        raise ValueError(f"models must be the static Models bundle (Pipeline.models or Models.create), got "
                         f"{type(models).__name__}")
    if isinstance(params, Mapping) and not {"unet", "vae", "text_encoder"} <= set(params):
        raise ValueError(f"params must hold the 'unet', 'vae' and 'text_encoder' param trees (Pipeline.params), got "
                         f"keys {sorted(params)}")
    if sampler not in samplers.SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(samplers.SAMPLERS)}")
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    options = dict(freeze_sampler_options(sampler_options))
    try:  # the sampler's own checks of option names and values, plus bad values' numpy / float() errors
        samplers.make_sampler(sampler, models.scheduler_config, steps, **options)
    except Exception as error:  # any failure here comes from a bad option or scheduler config value
        where = f"sampler_options {options}" if options else "the scheduler config"
        raise ValueError(f"sampler {sampler!r} with {where}: {error}") from None
    if not _is_real(guidance_scale) or not np.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0 (0: the unconditional prediction, 1: no guidance, above 1: "
                         f"stronger guidance), got {guidance_scale!r}; to steer away from a prompt, give it as "
                         "uncond_ids")
    for name, size in (("height", height), ("width", width)):
        if not _is_int(size) or size < 1:
            raise ValueError(f"{name} must be a positive integer, got {size!r}")
    if not _is_real(strength) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    _check_ids("cond_ids", cond_ids, models.text_encoder.vocab_size)
    batch = _shape(cond_ids)[0]
    if batch == 0:
        raise ValueError(f"cond_ids holds no prompts (shape {_shape(cond_ids)}): give at least one")
    if uncond_ids is not None:
        _check_ids("uncond_ids", uncond_ids, models.text_encoder.vocab_size)
        if _shape(uncond_ids) != _shape(cond_ids):
            raise ValueError(f"uncond_ids have shape {_shape(uncond_ids)}, cond_ids {_shape(cond_ids)}: they must "
                             "match")
    elif guidance_scale != 1.0:
        raise ValueError(f"guidance_scale {guidance_scale} needs uncond_ids (the negative or empty prompts); "
                         "only guidance_scale=1 runs without them")
    _check_id_values({"cond_ids": cond_ids, "uncond_ids": uncond_ids}, models.text_encoder.vocab_size)
    typed = hasattr(rng, "dtype") and jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    if not ((typed and _shape(rng) == ()) or (hasattr(rng, "dtype") and rng.dtype == np.uint32
                                                  and _shape(rng) == (2,))):
        raise ValueError(f"rng must be one key (jax.random.key(seed)), got {getattr(rng, 'dtype', type(rng))} of "
                         f"shape {_shape(rng)}")
    shape = models.latent_shape(batch, height, width)
    if latents is not None and _shape(latents) != shape:
        raise ValueError(f"latents have shape {_shape(latents)}, expected {shape} for {batch} prompt(s) and "
                         f"{height}x{width} images")
    if init_image is None and strength != 1.0:
        raise ValueError(f"strength {strength} needs init_image (img2img or inpainting)")
    if int(steps * strength) < 1:
        raise ValueError(f"strength {strength} with {steps} steps leaves no step to run")
    if mask is not None and init_image is None:
        raise ValueError("inpainting needs init_image as well as mask")
    if init_image is not None:
        _check_image(init_image, (batch, height, width, models.vae.in_channels))
    if mask is not None and not (len(_shape(mask)) == 4 and all(m in (1, n) for m, n in zip(_shape(mask),
                                                                                         shape[:3] + (1,)))):
        raise ValueError(f"mask has shape {_shape(mask)}, expected {shape[:3] + (1,)} (latent resolution) or one "
                         "that broadcasts to it")


class _CheckedJit:
    """A jitted function whose arguments `check_inputs` checks before every call, ``lower`` and ``trace``.

    ``sampler_options`` reaches jit frozen into sorted ``(name, value)`` pairs, so a dict is a valid static
    argument and ``{'a': 1, 'b': 2}``, ``{'b': 2, 'a': 1}`` and ``(('a', 1), ('b', 2))`` share one program.
    """

    def __init__(self, jitted: Any):
        self._jitted = jitted
        self._signature = inspect.signature(check_inputs)
        functools.update_wrapper(self, jitted)
        self.__name__ = self.__qualname__ = "sample_fn"

    def _check(self, args: tuple, kwargs: dict) -> dict:
        """Check the inputs; returns ``kwargs`` with ``sampler_options`` frozen (`freeze_sampler_options`)."""
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"sample_fn: {error}") from None
        check_inputs(*bound.args, **bound.kwargs)
        if "sampler_options" in kwargs:
            kwargs = {**kwargs, "sampler_options": freeze_sampler_options(kwargs["sampler_options"])}
        return kwargs

    def __call__(self, *args, **kwargs):
        """Check the inputs, then run the jitted sampler."""
        return self._jitted(*args, **self._check(args, kwargs))

    def lower(self, *args, **kwargs):
        """Check the inputs, then lower the jitted sampler (``.compile()`` the result)."""
        return self._jitted.lower(*args, **self._check(args, kwargs))

    def trace(self, *args, **kwargs):
        """Check the inputs, then trace the jitted sampler."""
        return self._jitted.trace(*args, **self._check(args, kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._jitted, name)


sample_fn = _CheckedJit(_sample)
