"""`sample_fn` end to end against diffusers' pipelines (tiny random weights), and its own guarantees.

The reference is a diffusers StableDiffusionPipeline saved to a folder
(ldm_jax/testing/pipeline.py); ours is `sample_fn` on `Pipeline.from_pretrained`
of that folder. Both get the same token ids and the same standard normal
initial latents; where diffusers draws other random numbers (the VAE
posterior sample, img2img noise) the test patches them to ours.

Compiling `sample_fn` dominates the run time (several seconds per program on
a CPU), so the tests share programs: every run is a batch of 8 prompts at
16x16 (8x8 latents), and text-to-image with DDIM at guidance 7.5 serves the
diffusers comparison, the all-ones inpainting mask and the sharded run. Checks
that need programs of their own are marked slow (``pytest -m slow``): Euler
against diffusers, euler_a with latents drawn from the key (seeded and
sharded), and inpainting below strength 1 against diffusers.
"""

import re
import types

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint_module
from jax.extend.core import jaxprs_in_params
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax import Pipeline, sample_fn
from ldm_jax.diffusion.samplers import SAMPLERS
from ldm_jax.models.clip import tokenize
from ldm_jax.testing import max_rel_error
from ldm_jax.testing import pipeline as pipeline_refs

PROMPTS = [f"a {color} {shape}" for color in ("red", "green", "blue", "big") for shape in ("circle", "cat")]
BATCH = len(PROMPTS)  # 8: one per CPU device in the sharded run
HEIGHT = WIDTH = 16  # 8x8 latents with the f=2 VAE; diffusers wants multiples of 8
LATENT_SHAPE = (BATCH, HEIGHT // 2, WIDTH // 2, 4)
STEPS = 5
GUIDANCE = 7.5
STRENGTH = 0.6  # img2img: the last int(5 * 0.6) = 3 steps
IMAGE_TOL = 2e-5  # max abs difference of images in [0, 1]; measured at most 1.9e-6 (2-core AMD EPYC)
LATENT_TOL = 2e-5  # max_rel_error of the final latents (max |z| is 5-30 here); measured at most 1.7e-6
SCHEDULERS = {"ddim": diffusers.DDIMScheduler, "dpm++2m": diffusers.DPMSolverMultistepScheduler,
              "euler": diffusers.EulerDiscreteScheduler}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """diffusers' tiny runs take a fraction of a second on one thread, but can take seconds when torch's worker
    threads wait on each other on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> types.SimpleNamespace:
    """The torch pipeline and its folder, our Pipeline loaded from it, and inputs shared by both."""
    torch_pipe, folder = pipeline_refs.build(pipeline_refs.SMALL, str(tmp_path_factory.getbasetemp()))
    pipe = Pipeline.from_pretrained(folder)
    rng = np.random.default_rng(0)
    return types.SimpleNamespace(
        torch=torch_pipe, folder=folder, pipe=pipe,
        ids=tokenize(pipe.tokenizer, PROMPTS), uncond=tokenize(pipe.tokenizer, [""] * BATCH),
        latents=rng.standard_normal(LATENT_SHAPE).astype(np.float32),
        image=rng.uniform(0, 1, (BATCH, HEIGHT, WIDTH, 3)).astype(np.float32))


def ours(ref, *, ids=None, uncond="given", rng=0, latents="given", params=None, **kwargs) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
    """Our images and final latents (NHWC) for ref's inputs; keywords override them and sample_fn's arguments."""
    kwargs = {"sampler": "ddim", "steps": STEPS, "guidance_scale": GUIDANCE, "height": HEIGHT, "width": WIDTH,
              **kwargs}
    images, z = sample_fn(ref.pipe.params if params is None else params, ref.ids if ids is None else ids,
                          ref.uncond if isinstance(uncond, str) else uncond, jax.random.key(rng),
                          ref.latents if isinstance(latents, str) else latents,
                          models=ref.pipe.models, return_latents=True, **kwargs)
    return images, z


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def theirs(ref, pipeline_class=diffusers.StableDiffusionPipeline, sampler="ddim", **kwargs) -> tuple[np.ndarray,
                                                                                                      np.ndarray]:
    """diffusers' images and final latents (NHWC) for ref's prompts, from the same components.

    The scheduler is loaded from the saved folder, as our Pipeline reads it.
    """
    components = {**ref.torch.components,
                  "scheduler": SCHEDULERS[sampler].from_pretrained(ref.folder, subfolder="scheduler")}
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    final = {}

    def keep_latents(pipe, i, t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    kwargs = {"latents": nchw(ref.latents), "guidance_scale": GUIDANCE, **kwargs}
    with torch.no_grad():
        images = pipe(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, output_type="np",
                      callback_on_step_end=keep_latents, **kwargs).images
    return images, final["latents"].numpy().transpose(0, 2, 3, 1)


def assert_matches(mine: tuple, reference: tuple) -> dict:
    """Images within IMAGE_TOL and final latents within LATENT_TOL; the images must not be flat or saturated."""
    (images, z), (ref_images, ref_z) = (tuple(np.asarray(a) for a in pair) for pair in (mine, reference))
    assert images.shape == ref_images.shape == (BATCH, HEIGHT, WIDTH, 3) and z.shape == ref_z.shape == LATENT_SHAPE
    assert ref_images.std() > 0.05 and np.mean((ref_images > 0) & (ref_images < 1)) > 0.5
    errors = {"images": float(np.abs(images - ref_images).max()), "latents": max_rel_error(z, ref_z)}
    assert errors["images"] <= IMAGE_TOL and errors["latents"] <= LATENT_TOL, errors
    return errors


@pytest.fixture(scope="module")
def text_to_image(ref) -> tuple[np.ndarray, np.ndarray]:
    """Our DDIM text-to-image run at guidance 7.5 on ref's inputs: the program most tests share."""
    return tuple(np.asarray(a) for a in ours(ref))


# ----------------------------------------------------------------------------------------------------------------
# Text to image


@pytest.mark.parametrize("sampler", [pytest.param(name, marks=pytest.mark.slow) if name == "euler" else name
                                     for name in SCHEDULERS])
def test_text_to_image_matches_diffusers(ref, text_to_image, sampler):
    mine = text_to_image if sampler == "ddim" else ours(ref, sampler=sampler)
    assert_matches(mine, theirs(ref, sampler=sampler))


def test_same_inputs_give_identical_results_and_rng_matters(ref, text_to_image, keep_all):
    for mine, first in zip(ours(ref), text_to_image):
        np.testing.assert_array_equal(np.asarray(mine), first)
    # Inpainting samples the VAE posterior from rng (the slow test below checks drawn latents and step noise).
    for mine, first in zip(_inpaint(ref, _zeros()), keep_all):
        np.testing.assert_array_equal(mine, first)
    assert np.abs(_inpaint(ref, _zeros(), rng=1)[0] - keep_all[0]).max() > 0.05


def _unet_batch_sizes(jaxpr, in_loop: bool = False) -> list[int]:
    """Batch sizes of the convolutions inside ``lax.scan`` bodies (the U-Net's: the loop has no other convs)."""
    sizes = []
    for eqn in jaxpr.eqns:
        if in_loop and eqn.primitive.name == "conv_general_dilated":
            sizes.append(eqn.invars[0].aval.shape[0])  # NHWC input
        for sub in jaxprs_in_params(eqn.params):
            sizes += _unet_batch_sizes(sub, in_loop or eqn.primitive.name == "scan")
    return sizes


def test_guidance_one_skips_the_unconditional_half(ref, text_to_image):
    def unet_batches(uncond, guidance_scale):  # the same arguments as `ours`, so the call below reuses the trace
        traced = sample_fn.trace(ref.pipe.params, ref.ids, uncond, jax.random.key(0), ref.latents,
                                 models=ref.pipe.models, sampler="ddim", steps=STEPS, guidance_scale=guidance_scale,
                                 height=HEIGHT, width=WIDTH, return_latents=True)
        return _unet_batch_sizes(traced.jaxpr.jaxpr)

    guided, unguided = unet_batches(ref.uncond, GUIDANCE), unet_batches(None, 1.0)
    assert len(guided) == len(unguided) > 10
    assert set(guided) == {2 * BATCH} and set(unguided) == {BATCH}

    mine = ours(ref, uncond=None, guidance_scale=1.0)
    assert_matches(mine, theirs(ref, guidance_scale=1.0))
    assert np.abs(np.asarray(mine[0]) - text_to_image[0]).max() > 0.05  # guidance did matter at 7.5


def _sharded(ref) -> dict:
    """ref's token ids and latents split over 8 devices along the batch (params replicated), as `ours` keywords."""
    assert len(jax.devices()) >= BATCH, "tests/conftest.py should give 8 CPU devices"
    mesh = Mesh(np.array(jax.devices()[:BATCH]), ("data",))
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    return {"ids": jax.device_put(ref.ids, data), "uncond": jax.device_put(ref.uncond, data),
            "latents": jax.device_put(ref.latents, data), "params": jax.device_put(ref.pipe.params, replicated)}


def _assert_split(out: jax.Array) -> None:
    """One batch element on each device: the work was really split."""
    assert {shard.data.shape[0] for shard in out.addressable_shards} == {1}, out.sharding


def test_sharded_batch_matches_one_device(ref, text_to_image):
    images, z = ours(ref, **_sharded(ref))
    _assert_split(images)
    _assert_split(z)
    # Not bit-identical (~2e-6 apart): XLA's CPU kernels round differently for a batch of 1 than of 8.
    np.testing.assert_allclose(np.asarray(images), text_to_image[0], rtol=0, atol=1e-5)
    assert max_rel_error(z, text_to_image[1]) <= 1e-5


@pytest.mark.slow
def test_stochastic_sampler_with_drawn_latents_is_seeded_and_shardable(ref):
    """euler_a with latents drawn from rng, so every random number comes from the key (two more programs: slow)."""
    def run(seed, sharded=False):
        inputs = _sharded(ref) if sharded else {}
        images = sample_fn(inputs.get("params", ref.pipe.params), inputs.get("ids", ref.ids),
                           inputs.get("uncond", ref.uncond), jax.random.key(seed), models=ref.pipe.models,
                           sampler="euler_a", steps=STEPS, height=HEIGHT, width=WIDTH)
        if sharded:
            _assert_split(images)
        return np.asarray(images)

    first = run(0)
    np.testing.assert_array_equal(run(0), first)
    assert np.abs(run(1) - first).max() > 0.1
    assert np.abs(first[0] - first[1]).max() > 0.1  # each image has its own latents
    np.testing.assert_allclose(run(0, sharded=True), first, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# img2img and inpainting


def control_diffusers(monkeypatch, posterior: np.ndarray | None, noise: np.ndarray) -> None:
    """Make diffusers' img2img and inpaint pipelines encode images to ``posterior`` and draw ``noise``.

    ``posterior`` is an unscaled NHWC latent, or None for the posterior mode.
    """
    for module in (img2img_module, inpaint_module):
        original = module.retrieve_latents
        encode = ((lambda out, generator=None, sample_mode="sample": original(out, sample_mode="argmax"))
                  if posterior is None else (lambda out, generator=None, sample_mode="sample": nchw(posterior)))
        monkeypatch.setattr(module, "retrieve_latents", encode)
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **kwargs: nchw(noise))


def test_img2img_matches_diffusers(ref, text_to_image, monkeypatch):
    """With the posterior mode; the noise that takes the image to ``strength`` is ``latents``, diffusers' ``noise``."""
    mine = ours(ref, init_image=ref.image * 2 - 1, strength=STRENGTH, sample_posterior=False)
    control_diffusers(monkeypatch, None, ref.latents)
    assert_matches(mine, theirs(ref, diffusers.StableDiffusionImg2ImgPipeline, image=ref.image, strength=STRENGTH,
                                latents=None))
    # The image matters: a partial run from it is far from text-to-image from the same noise.
    assert np.abs(np.asarray(mine[0]) - text_to_image[0]).max() > 0.1


def _inpaint(ref, mask: np.ndarray, rng: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inpainting ref.image at ``mask`` (1: generate); the posterior is sampled from ``rng``, as by default."""
    return tuple(np.asarray(a) for a in ours(ref, init_image=ref.image * 2 - 1, mask=mask, rng=rng))


def _zeros() -> np.ndarray:
    """A mask that keeps everything."""
    return np.zeros(LATENT_SHAPE[:3] + (1,), np.float32)


def _half_mask() -> np.ndarray:
    """1 (generate) on the right half of the latents, 0 (keep) on the left."""
    mask = np.zeros(LATENT_SHAPE[:3] + (1,), np.float32)
    mask[:, :, LATENT_SHAPE[2] // 2:] = 1
    return mask


@pytest.fixture(scope="module")
def keep_all(ref) -> tuple[np.ndarray, np.ndarray]:
    """Inpainting with an all-zero mask: the final latents are the encoded image (a posterior sample, scaled)."""
    return _inpaint(ref, _zeros())


def test_inpainting_all_kept_is_a_posterior_sample_of_the_image(ref, keep_all):
    with torch.no_grad():  # diffusers' posterior (our VAE matches it to ~1e-5, see test_vae_parity.py)
        posterior = ref.torch.vae.encode(nchw(ref.image * 2 - 1)).latent_dist
    mean, std = (x.numpy().transpose(0, 2, 3, 1) for x in (posterior.mean, posterior.std))
    assert std.min() > 1e-2
    # keep_all = (mean + std * eps) * scale with eps standard normal, drawn from rng.
    eps = (keep_all[1] / ref.pipe.scale_factor - mean) / std
    assert abs(eps.mean()) < 0.1 and 0.9 < eps.std() < 1.1, (eps.mean(), eps.std())
    eps_other = (_inpaint(ref, _zeros(), rng=1)[1] / ref.pipe.scale_factor - mean) / std
    assert abs(np.corrcoef(eps.ravel(), eps_other.ravel())[0, 1]) < 0.2  # a new sample for a new key


def test_inpainting_all_generated_is_text_to_image(ref, text_to_image):
    generated = _inpaint(ref, np.ones(LATENT_SHAPE[:3] + (1,), np.float32))
    np.testing.assert_allclose(generated[1], text_to_image[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(generated[0], text_to_image[0], rtol=0, atol=1e-6)


def test_inpainting_keeps_the_masked_out_half(ref, keep_all):
    w = LATENT_SHAPE[2]
    half = _inpaint(ref, _half_mask())
    np.testing.assert_array_equal(half[1][:, :, :w // 2], keep_all[1][:, :, :w // 2])
    moved = np.abs(half[1][:, :, w // 2:] - keep_all[1][:, :, w // 2:])
    assert moved.min() > 0 and moved.max() > 0.5


def test_inpainting_matches_diffusers(ref, keep_all, monkeypatch):
    """diffusers' StableDiffusionInpaintPipeline with a 4-channel U-Net masks latents the same way.

    diffusers encodes the image to our posterior sample (read off the all-kept run).
    """
    mask = _half_mask()
    mask_image = nchw(np.repeat(np.repeat(mask, 2, axis=1), 2, axis=2))  # image resolution, 1: repaint
    control_diffusers(monkeypatch, keep_all[1] / ref.pipe.scale_factor, ref.latents)
    reference = theirs(ref, diffusers.StableDiffusionInpaintPipeline, image=ref.image, mask_image=mask_image,
                       strength=1.0)
    assert_matches(_inpaint(ref, mask), reference)


@pytest.mark.slow
def test_inpainting_part_way_matches_diffusers(ref, keep_all, monkeypatch):
    """Below strength 1 both start from the image noised with ``latents`` (diffusers: its randn_tensor noise)."""
    mask = _half_mask()
    mask_image = nchw(np.repeat(np.repeat(mask, 2, axis=1), 2, axis=2))
    control_diffusers(monkeypatch, keep_all[1] / ref.pipe.scale_factor, ref.latents)
    reference = theirs(ref, diffusers.StableDiffusionInpaintPipeline, image=ref.image, mask_image=mask_image,
                       strength=STRENGTH, latents=None)
    mine = ours(ref, init_image=ref.image * 2 - 1, mask=mask, strength=STRENGTH)
    assert_matches(mine, reference)
    assert np.abs(np.asarray(mine[0]) - _inpaint(ref, mask)[0]).max() > 0.05  # strength mattered


# ----------------------------------------------------------------------------------------------------------------
# Errors, raised before tracing


def test_invalid_arguments_are_named_before_tracing(ref):
    """Each bad input is a ValueError naming it, raised before jit sees the arguments: ``params`` here is an
    object jit cannot take (a TypeError had tracing started)."""
    image, mask = ref.image * 2 - 1, _half_mask()
    cases = [
        (dict(sampler="heun"), "unknown sampler 'heun'; valid: " + re.escape(", ".join(SAMPLERS))),
        (dict(steps=0), "steps must be a positive integer, got 0"),
        (dict(steps=-3), "steps must be a positive integer, got -3"),
        (dict(steps=2.5), "steps must be a positive integer, got 2.5"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number, got nan"),
        (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number, got inf"),
        (dict(ids=ref.ids[:0], uncond=ref.uncond[:0]), r"cond_ids holds no prompts \(shape \(0, 16\)\)"),
        (dict(ids=ref.ids.astype(np.float32)), "cond_ids must hold integer token ids, got dtype float32"),
        (dict(ids=ref.ids[0]), r"cond_ids must be token ids of shape \[batch, length\], got shape \(16,\)"),
        (dict(ids=ref.ids + 10**6), r"cond_ids holds token ids in \[\d+, \d+\], outside the text encoder's "
                                   r"vocabulary \[0, \d+\)"),
        (dict(ids=jnp.asarray(ref.ids) + 10**6), r"cond_ids holds token ids in \[\d+, \d+\], outside the text "
                                                r"encoder's vocabulary \[0, \d+\)"),
        (dict(uncond=jnp.asarray(ref.uncond) - 10**6), r"uncond_ids holds token ids in \[-\d+, -?\d+\], outside"),
        (dict(ids=ref.ids.tolist()), r"cond_ids must be an array of token ids \[batch, length\] \(numpy or jax\), "
                                     r"got list"),
        (dict(guidance_scale=-2.0), r"guidance_scale must be >= 0 \(0: the unconditional prediction, 1: no guidance"
                                    r", above 1: stronger guidance\), got -2.0"),
        (dict(latents=ref.latents.transpose(0, 3, 1, 2)),
         r"latents have shape \(8, 4, 8, 8\), expected \(8, 8, 8, 4\)"),
        (dict(latents=ref.latents[:2]), r"latents have shape \(2, 8, 8, 4\), expected \(8, 8, 8, 4\) for 8 "
                                        r"prompt\(s\)"),
        (dict(height=15), "image size 15x16 must be divisible by the VAE's downsampling factor 2"),
        (dict(height=0), "height must be a positive integer, got 0"),
        (dict(mask=mask), "inpainting needs init_image as well as mask"),
        (dict(uncond=None), "guidance_scale 7.5 needs uncond_ids"),
        (dict(uncond=ref.uncond[:1]), r"uncond_ids have shape \(1, 16\), cond_ids \(8, 16\)"),
        (dict(strength=0.5), "strength 0.5 needs init_image"),
        (dict(init_image=image, strength=0.0), r"strength must be in \(0, 1\]"),
        (dict(init_image=image, strength=0.1), "strength 0.1 with 5 steps leaves no step to run"),
        (dict(init_image=image[:, :8]), r"init_image has shape \(8, 8, 16, 3\), expected \(8, 16, 16, channels\)"),
        (dict(init_image=image, mask=mask[:, :4]), r"mask has shape \(8, 4, 8, 1\), expected \(8, 8, 8, 1\)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ours(ref, params=object(), **kwargs)
    with pytest.raises(ValueError, match=r"rng must be one key \(jax.random.key\(seed\)\), got int32 of shape "
                                         r"\(3,\)"):
        sample_fn.lower(ref.pipe.params, ref.ids, ref.uncond, np.zeros(3, np.int32), models=ref.pipe.models,
                        steps=STEPS, height=HEIGHT, width=WIDTH)
    with pytest.raises(TypeError):  # valid inputs do reach jit, which refuses the object
        ours(ref, params=object())


# ----------------------------------------------------------------------------------------------------------------
# sampler_options: a dict, frozen before jit


def test_sampler_options_dict_gives_the_pairs_result_from_one_program(ref, text_to_image):
    """A dict is frozen into sorted (name, value) pairs: any order and the pairs themselves share one program."""
    as_dict = ours(ref, sampler_options={"timestep_spacing": "trailing", "eta": 0.0})
    programs = sample_fn._cache_size()
    as_pairs = ours(ref, sampler_options=(("eta", 0.0), ("timestep_spacing", "trailing")))
    reordered = ours(ref, sampler_options={"eta": 0.0, "timestep_spacing": "trailing"})
    assert sample_fn._cache_size() == programs
    for mine, pairs, other in zip(as_dict, as_pairs, reordered):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(pairs))
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(other))
    assert np.abs(np.asarray(as_dict[0]) - text_to_image[0]).max() > 0.05  # the option was applied
    lowered = sample_fn.lower(ref.pipe.params, ref.ids, ref.uncond, jax.random.key(0), ref.latents,
                              models=ref.pipe.models, sampler="ddim", steps=STEPS, guidance_scale=GUIDANCE,
                              height=HEIGHT, width=WIDTH, sampler_options={"timestep_spacing": "trailing"})
    assert hasattr(lowered, "compile")


def test_bad_sampler_options_init_images_models_and_params_are_named_before_tracing(ref):
    """As `test_invalid_arguments_are_named_before_tracing`: ``params`` is an object jit would refuse."""
    image = ref.image * 2 - 1
    unet_factor = 2 ** (len(ref.pipe.unet.block_out_channels) - 1)
    assert unet_factor > 1
    cases = [
        (dict(sampler_options={"etaa": 0.0}),
         r"sampler 'ddim' with sampler_options \{'etaa': 0.0\}: sampler 'ddim' has no options \['etaa'\]"),
        (dict(sampler="euler", sampler_options={"eta": 0.5}), r"sampler 'euler' has no options \['eta'\]"),
        (dict(sampler_options={"eta": "abc"}),
         r"sampler 'ddim' with sampler_options \{'eta': 'abc'\}: could not convert string to float"),
        (dict(sampler_options={"timestep_spacing": "even"}), "unknown timestep spacing 'even'"),
        (dict(sampler_options={"eta": np.zeros(2)}),
         r"sampler_options\['eta'\] must be a plain value \(number, bool, string or None\), got ndarray"),
        (dict(sampler_options=("eta", 0.0)), "sampler_options must be a mapping of option names to values"),
        (dict(sampler_options={"clip_sample": "no"}), "sampler 'ddim': clip_sample must be True or False, got 'no'"),
        (dict(sampler_options=[("eta", 0.0), ("eta", 1.0)]), "sampler_options names an option twice"),
        (dict(init_image="cat.png"), "init_image must be an array of images .* got str"),
        (dict(init_image=np.concatenate([image, image[..., :1]], -1)), "init_image has 4 channels, the VAE takes 3"),
        (dict(init_image=(ref.image * 255).astype(np.uint8)), "init_image must hold float values in .* uint8"),
        (dict(init_image=ref.image * 255), r"init_image holds values in \[.*\], outside \[-1, 1\]"),
        (dict(height=HEIGHT + 2), rf"image size {HEIGHT + 2}x{WIDTH} must be divisible by {2 * unet_factor}: the "
                                  rf"VAE's downsampling factor 2 times the U-Net's {unet_factor}"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ours(ref, params=object(), **kwargs)
    with pytest.raises(ValueError, match=r"models must be the static Models bundle \(Pipeline.models or "
                                         r"Models.create\), got Pipeline"):
        sample_fn(ref.pipe.params, ref.ids, ref.uncond, jax.random.key(0), models=ref.pipe)
    with pytest.raises(ValueError, match=r"params must hold the 'unet', 'vae' and 'text_encoder' param trees "
                                         r"\(Pipeline.params\), got keys \['unet'\]"):
        ours(ref, params={"unet": ref.pipe.params["unet"]})


def test_a_param_tree_of_another_structure_names_the_model(ref):
    """Params that do not fit a model are a ValueError naming it and the parameter, raised while tracing."""
    wrapped = {**ref.pipe.params, "unet": {"unet": ref.pipe.params["unet"]}}
    with pytest.raises(ValueError, match=r"params\['unet'\] does not fit models.unet \(UNet2DConditionModel\): "
                                         r"Could not find parameter named .* in scope .*; load params and models "
                                         r"together \(Pipeline\)"):
        ours(ref, params=wrapped)


def test_ids_traced_by_an_outer_jit_flag_their_images_with_nan(ref):
    """Under an outer jit the ids cannot be checked before the run: the images of prompts with an id outside the
    vocabulary (a negative one would otherwise wrap around) come back all NaN, the others finite."""
    ids = np.asarray(ref.ids[:3]).copy()
    ids[1, 2], ids[2, 0] = -1, ref.pipe.models.text_encoder.vocab_size

    @jax.jit
    def generate(cond_ids):
        return sample_fn(ref.pipe.params, cond_ids, None, jax.random.key(0), models=ref.pipe.models, steps=1,
                         guidance_scale=1.0, height=HEIGHT, width=WIDTH)

    images = np.asarray(generate(ids))
    assert np.isfinite(images[0]).all() and np.isnan(images[1:]).all()
