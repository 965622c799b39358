"""How far a caption's word steers a trained model's denoising, noise level by noise level.

For real ``ldm_shapes`` test images, each noised to timestep ``t``: the
model's one-step prediction of the clean image (``predict_x0`` of its output,
classifier-free guided against the empty prompt), decoded by the VAE and read
by ``shapes_checker``, under three prompts:

    prompted   the image's own caption: fraction read as the caption's value of the attribute
    swapped    the caption with that attribute's word replaced by another value (one per image, seeded):
               fraction read as the swapped-in value; at chance the checker's bias, near 1 when the word rules
    empty      the empty prompt, unguided: fraction read as the image's value (what the noisy image still shows)

At low ``t`` all three keep what the image shows; where the word steers,
``swapped`` rises towards 1 and ``prompted`` stays above ``empty``. On the
zero-terminal-SNR ``configs/base.py:f2`` runs the shape word governs large
shapes from t = 500 up and does nothing to small ones at any ``t``
(docs/experiments.md).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.data import shapes
from ldm_jax.diffusion import schedule as sched
from ldm_jax.evaluation import shapes_checker
from ldm_jax.images import from_uint8, to_uint8
from ldm_jax.models.clip import tokenize

PROMPTS = ("prompted", "swapped", "empty")


def swap_word(example: dict, attribute: str, rng: np.random.Generator) -> tuple[str, str]:
    """``example``'s caption with its ``attribute`` value replaced by another one drawn by ``rng``, and that value."""
    values = shapes_checker.VALUES
    if attribute not in values:
        raise ValueError(f"unknown attribute {attribute!r}; known: {list(values)}")
    others = [v for v in values[attribute] if v != example[attribute]]
    value = others[rng.integers(len(others))]
    return shapes.caption(**{a: example[a] for a in values} | {attribute: value}), value


@functools.partial(jax.jit, static_argnums=0)
def _encode(models, params, pixels: jax.Array) -> jax.Array:
    return models.vae.apply({"params": params["vae"]}, pixels, method="encode").mean * models.scale_factor


@functools.partial(jax.jit, static_argnums=0)
def _one_step(models, params, z0: jax.Array, ids: jax.Array, t: jax.Array, rng: jax.Array,
              guidance: jax.Array) -> jax.Array:
    """Decoded one-step predictions [P + 1, N, ...] for ``ids`` [P + 1, N, L], the last row the empty prompt."""
    schedule = sched.NoiseSchedule.from_config(models.scheduler_config)
    prompts, count = ids.shape[0], z0.shape[0]
    steps = jnp.full((count,), t, jnp.int32)
    z_t = sched.add_noise(schedule, z0, jax.random.normal(rng, z0.shape, z0.dtype), steps)
    context = models.text_encoder.apply({"params": params["text_encoder"]}, ids.reshape(prompts * count, -1))[0]
    tiled = lambda x: jnp.tile(x, (prompts,) + (1,) * (x.ndim - 1))
    out = models.unet.apply({"params": params["unet"]}, tiled(z_t), tiled(steps), context)
    out = out.reshape(prompts, count, *out.shape[1:])
    empty = out[-1:]
    guided = jnp.concatenate([empty + guidance * (out[:-1] - empty), empty])
    x0 = sched.predict_x0(schedule, tiled(z_t), tiled(steps), guided.reshape(prompts * count, *out.shape[2:]))
    decoded = models.vae.apply({"params": params["vae"]}, x0 / models.scale_factor, method="decode")
    return decoded.reshape(prompts, count, *decoded.shape[1:])


def one_step_images(pipe, latents: jax.Array, caption_sets: Sequence[Sequence[str]], t: int, rng: jax.Array,
                    guidance: float) -> np.ndarray:
    """uint8 [P + 1, N, S, S, 3]: decoded one-step clean-image predictions from ``latents`` (scaled VAE means,
    ``encode``) noised to timestep ``t`` with the noise of ``rng``, under each of the P ``caption_sets`` (guided
    with scale ``guidance`` against the empty prompt) and, last, under the empty prompt alone.
    """
    length = pipe.configs["text_encoder"]["max_position_embeddings"]
    sets = [*caption_sets, [""] * latents.shape[0]]
    ids = np.stack([tokenize(pipe.tokenizer, list(captions), length) for captions in sets])
    return to_uint8(_one_step(pipe.models, pipe.params, latents, ids, jnp.int32(t), rng, jnp.float32(guidance)))


def encode(pipe, images: np.ndarray) -> jax.Array:
    """The scaled posterior means of uint8 ``images`` [N, S, S, 3]: the latents `one_step_images` noises."""
    return _encode(pipe.models, pipe.params, from_uint8(images))


def _hits(pipe, examples: Sequence[dict], timesteps: Sequence[int], attribute: str, guidance: float,
          seed: int) -> dict[int, dict[str, np.ndarray]]:
    """{t: {prompt: whether each example's prediction was read as wanted}} for one batch of ``examples``."""
    rng = np.random.default_rng(seed)
    swapped = [swap_word(e, attribute, rng) for e in examples]
    latents = encode(pipe, np.stack([e["image"] for e in examples]))
    captions = [[e["caption"] for e in examples], [c for c, _ in swapped]]
    wanted = [[e[attribute] for e in examples], [v for _, v in swapped], [e[attribute] for e in examples]]
    hits = {}
    for t in timesteps:
        images = one_step_images(pipe, latents, captions, t, jax.random.fold_in(jax.random.key(seed), t), guidance)
        reads = [shapes_checker.classify_batch(batch) for batch in images]
        hits[t] = {p: np.array([r[attribute] == w for r, w in zip(read, want)])
                   for p, read, want in zip(PROMPTS, reads, wanted)}
    return hits


def steering(pipe, examples: Sequence[dict], timesteps: Sequence[int], attribute: str = "shape",
             guidance: float = 4.0, seed: int = 0, batch: int = 50) -> dict[str, dict[str, dict[str, float]]]:
    """{subset: {t: {prompt: fraction}}} for ``examples`` (dicts of ``shapes.example``), per the module docstring.

    Subsets: 'all' and each shape size present. ``examples`` go ``batch`` at
    a time; the batch starting at example ``i`` draws its swapped words from
    ``seed + i`` and its noise at ``t`` from (``seed + i``, t), the same noise
    for all three prompts.
    """
    parts = [_hits(pipe, examples[i:i + batch], timesteps, attribute, guidance, seed + i)
             for i in range(0, len(examples), batch)]
    subsets = {"all": np.ones(len(examples), bool),
               **{s: np.array([e["size"] == s for e in examples]) for s in shapes.SIZES
                  if any(e["size"] == s for e in examples)}}
    report = {name: {} for name in subsets}
    for t in timesteps:
        hits = {p: np.concatenate([part[t][p] for part in parts]) for p in PROMPTS}
        for name, member in subsets.items():
            report[name][str(t)] = {p: float(np.mean(hits[p][member])) for p in PROMPTS}
    return report
