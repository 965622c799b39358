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
(README "Results").
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.data import shapes
from ldm_jax.diffusion import schedule as sched
from ldm_jax.evaluation import shapes_checker
from ldm_jax.models.clip import tokenize

_VALUES = dict(zip(shapes_checker.ATTRIBUTES, (shapes.COLOURS, shapes.SHAPES, shapes.SIZES, shapes.POSITIONS)))
PROMPTS = ("prompted", "swapped", "empty")


def swap_word(example: dict, attribute: str, rng: np.random.Generator) -> tuple[str, str]:
    """``example``'s caption with its ``attribute`` value replaced by another one drawn by ``rng``, and that value."""
    if attribute not in _VALUES:
        raise ValueError(f"unknown attribute {attribute!r}; known: {list(_VALUES)}")
    others = [v for v in _VALUES[attribute] if v != example[attribute]]
    value = others[rng.integers(len(others))]
    return shapes.caption(**{a: example[a] for a in _VALUES} | {attribute: value}), value


@functools.partial(jax.jit, static_argnums=(0, 1))
def _one_step(models, guidance: float, params, pixels: jax.Array, ids: jax.Array, empty_ids: jax.Array | None,
              t: jax.Array, rng: jax.Array) -> jax.Array:
    schedule = sched.NoiseSchedule.from_config(models.scheduler_config)
    z0 = models.vae.apply({"params": params["vae"]}, pixels, method="encode").mean * models.scale_factor
    steps = jnp.full((pixels.shape[0],), t, jnp.int32)
    z_t = sched.add_noise(schedule, z0, jax.random.normal(rng, z0.shape, z0.dtype), steps)

    def output(token_ids: jax.Array) -> jax.Array:
        context = models.text_encoder.apply({"params": params["text_encoder"]}, token_ids)[0]
        return models.unet.apply({"params": params["unet"]}, z_t, steps, context)

    out = output(ids)
    if empty_ids is not None:
        empty = output(empty_ids)
        out = empty + guidance * (out - empty)
    x0 = sched.predict_x0(schedule, z_t, steps, out)
    return models.vae.apply({"params": params["vae"]}, x0 / models.scale_factor, method="decode")


def one_step_images(pipe, images: np.ndarray, captions: Sequence[str], t: int, rng: jax.Array,
                    guidance: float) -> np.ndarray:
    """uint8 decoded one-step clean-image predictions for uint8 ``images`` [N, S, S, 3] noised to timestep ``t``.

    The prediction is guided with scale ``guidance`` against the empty prompt
    (scale 1 or empty ``captions``: the conditional output alone).
    """
    length = pipe.configs["text_encoder"]["max_position_embeddings"]
    ids = tokenize(pipe.tokenizer, list(captions), length)
    guided = guidance != 1.0 and any(captions)
    empty_ids = tokenize(pipe.tokenizer, [""] * len(captions), length) if guided else None
    out = _one_step(pipe.models, float(guidance) if guided else 1.0, pipe.params,
                    images.astype(np.float32) / 127.5 - 1.0, ids, empty_ids, jnp.int32(t), rng)
    return np.round(np.clip((np.asarray(out) + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(np.uint8)


def steering(pipe, examples: Sequence[dict], timesteps: Sequence[int], attribute: str = "shape",
             guidance: float = 4.0, seed: int = 0) -> dict[str, dict[str, dict[str, float]]]:
    """{subset: {t: {prompt: fraction}}} for ``examples`` (dicts of ``shapes.example``), per the module docstring.

    Subsets: 'all' and each shape size present. The noise at ``t`` is drawn from (``seed``, t), the swapped words
    from ``seed``; all three prompts see the same noisy latents.
    """
    rng = np.random.default_rng(seed)
    swapped = [swap_word(e, attribute, rng) for e in examples]
    images = np.stack([e["image"] for e in examples])
    prompts = {"prompted": [e["caption"] for e in examples], "swapped": [c for c, _ in swapped],
               "empty": [""] * len(examples)}
    wanted = {"prompted": [e[attribute] for e in examples], "swapped": [v for _, v in swapped],
              "empty": [e[attribute] for e in examples]}
    subsets = {"all": np.ones(len(examples), bool),
               **{s: np.array([e["size"] == s for e in examples]) for s in shapes.SIZES
                  if any(e["size"] == s for e in examples)}}
    report = {name: {} for name in subsets}
    for t in timesteps:
        key = jax.random.fold_in(jax.random.key(seed), t)
        hits = {}
        for prompt in PROMPTS:
            read = shapes_checker.classify_batch(one_step_images(pipe, images, prompts[prompt], t, key, guidance))
            hits[prompt] = np.array([r[attribute] == w for r, w in zip(read, wanted[prompt])])
        for name, member in subsets.items():
            report[name][str(t)] = {p: float(np.mean(hits[p][member])) for p in PROMPTS}
    return report
