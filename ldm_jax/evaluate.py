r"""Prompt following of a model trained on the built-in ldm_shapes data, scored from the images alone.

    python -m ldm_jax.evaluate --checkpoint WORKDIR [--step N] [--count 1000] [--guidance 4.0] [--steps 25]
                               [--strength 1.0]

Generates one image for each of the first ``--count`` test-split captions (by
default all 1,000 of the default build: with 200, the shape accuracy of one
model moved by up to 4 points between sampling seeds)
(half of them name colour-shape pairs that never occur in training), reads
colour, shape, size and position back with
``ldm_jax.evaluation.shapes_checker`` and reports the fraction right per
attribute, for all prompts, for the held-out pairs alone and for each shape
size, and per size which shape the checker read for each prompted one (of
the samples and of the reconstructions: "shape_confusion"). As a floor it
scores unconditional samples (guidance 1.0, empty prompts, same seeds)
against the same captions; as ceilings, the checker on the real test images
and on their reconstructions by the checkpoint's VAE (posterior mean, encoded
and decoded: no latent model can generate what its VAE cannot reproduce).
Prints a table and writes ``WORKDIR/eval_step_<step>.json`` (or ``--out``).
The checker reads only ldm_shapes images: a workdir whose latent cache
(``WORKDIR/latents/manifest.json``) was made from other data is refused, and
one without a cache gets a warning.

``--strength S`` below 1 starts every sample (conditional and unconditional)
from its real test image instead of from noise: img2img, the image noised to
the last ``int(steps * S)`` sampler steps and denoised. Scored against the
reconstructions, it shows at which noise levels a model loses an attribute
(docs/experiments.md); the report is then ``eval_step_<step>_strength_<S>.json``.

``--steering`` instead measures how far the shape word steers the model at
each of ``--steering_timesteps`` (``ldm_jax.evaluation.word_steering``:
one-step predictions from the real test images noised to t, under their own
caption, a caption with another shape word, and the empty prompt); the report
is ``eval_step_<step>_steering.json``.

Every setting that differs from its default is part of the report's name
(e.g. ``eval_step_3000_guidance_7.5_sampler_euler.json``), so a run with other
settings never overwrites an earlier report; the same settings give the same
report and name.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from etils import epath

from ldm_jax import cli, paths
from ldm_jax.data import latents, shapes
from ldm_jax.diffusion.sample_fn import sample_fn
from ldm_jax.diffusion.samplers import SAMPLERS
from ldm_jax.evaluation import shapes_checker, word_steering
from ldm_jax.images import from_uint8, to_uint8
from ldm_jax.models.clip import tokenize
from ldm_jax.training import checkpoints
from ldm_jax.weights.convert import WeightsMismatchError

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir (its checkpoints/ and tokenizer/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.", lower_bound=0)
_COUNT = flags.DEFINE_integer("count", 1000, "Test-split prompts to score (or test images for --steering).",
                              lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", 50, "Images per sampling call.", lower_bound=1)
# Guidance 4 followed the prompts best on configs/base.py's model: shape 42% at 4, 40.5% at 3, 36% at 2, 37.5% at
# 8, 35.5% at 12; colour 99.5% at 4, 97.5% at 8 and 80.5% at 16 (docs/experiments.md).
_GUIDANCE = flags.DEFINE_float("guidance", 4.0, "Classifier-free guidance scale.")
_STEPS = flags.DEFINE_integer("steps", 25, "Sampler steps.", lower_bound=1)
_SAMPLER = flags.DEFINE_enum("sampler", "ddim", SAMPLERS, "Sampler.")
_STRENGTH = flags.DEFINE_float("strength", 1.0, "Below 1: img2img from the real test images at this strength.",
                                upper_bound=1.0)
flags.register_validator("strength", lambda value: value > 0.0, message="--strength must be in (0, 1]")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the starting noise.")
_EMA = flags.DEFINE_bool("ema", True, "Use the EMA U-Net params when the checkpoint has them.")
_STEERING = flags.DEFINE_bool("steering", False, "Measure how far the shape word steers one-step predictions instead.")
_STEERING_TIMESTEPS = flags.DEFINE_list("steering_timesteps", [str(t) for t in range(100, 1000, 100)],
                                        "Noise levels of --steering.")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON report (default: WORKDIR/eval_step_<step>[_<settings "
                           "that differ from the defaults>].json).")
flags.register_validator("guidance", lambda value: math.isfinite(value) and value >= 0,
                         message="--guidance must be a finite number >= 0 (0: unconditional, 1: no guidance)")
flags.register_validator("steering_timesteps", lambda values: all(v.strip().lstrip("-").isdigit() for v in values),
                         message="--steering_timesteps must be integers")


PROGRAM = "ldm_jax.evaluate"
# The flags that change a report (besides the step), in the order they appear in its name.
SETTINGS = {"sample": ("count", "batch", "sampler", "steps", "guidance", "strength", "seed", "ema"),
            "steering": ("count", "batch", "guidance", "seed", "ema", "steering_timesteps")}


class InputError(ValueError):
    """Bad input found after the flags were parsed: reported as one line on stderr, exit status 1."""


def report_path(workdir: str, step: int) -> str:
    """--out, or ``WORKDIR/eval_step_<step>[_steering][_<name>_<value> ...].json`` naming every setting that
    differs from its default."""
    if _OUT.value:
        return _OUT.value
    name = f"eval_step_{step}" + ("_steering" if _STEERING.value else "")
    for setting in SETTINGS["steering" if _STEERING.value else "sample"]:
        flag = flags.FLAGS[setting]
        if flag.value != flag.default:
            value = "-".join(flag.value) if isinstance(flag.value, list) else flag.value
            name += f"_{setting}_{value:g}" if isinstance(value, float) else f"_{setting}_{value}"
    return str(epath.Path(workdir) / f"{name}.json")


def check_trained_on_shapes(workdir: str) -> None:
    """InputError when the workdir's latent cache was made from other data than ldm_shapes, whose images are all
    the checker can read; a warning when the workdir has no cache to tell."""
    manifest = latents.read_manifest(str(epath.Path(workdir) / "latents"))
    if manifest is None:
        if not epath.Path(workdir).exists():
            return  # nothing to tell: loading the checkpoint says the workdir is missing
        logging.warning("%s has no latent cache manifest to tell what data the model was trained on; the checker "
                        "reads only ldm_shapes images, so scores of a model trained on other data mean nothing",
                        workdir)
        return
    data = manifest["data"]
    if data["source"] != "shapes":
        raise InputError(f"{workdir} was trained on data.source {data['source']!r} ({data['name'] or data['data_dir']}"
                         f"); evaluate's checker reads only images of the built-in ldm_shapes data (one shape of a "
                         "known colour, size and position), so it cannot score this model")


def load(workdir: str, step: int | None):
    """Checkpoint ``step`` of ``workdir`` (the latest for None) as a Pipeline, and its step; it needs a tokenizer."""
    step = checkpoints.resolve_step(workdir, step)
    pipe = checkpoints.load_pipeline(workdir, step, use_ema=_EMA.value)
    if pipe.tokenizer is None:
        raise InputError(f"{workdir} has no tokenizer/ folder (a training workdir keeps one beside checkpoints/)")
    return pipe, step


def generate(pipe, prompts: list[str], guidance: float, seed: int, batch: int,
             init_images: np.ndarray | None = None, strength: float = 1.0) -> np.ndarray:
    """uint8 images [N, S, S, 3] for ``prompts`` (empty prompts as the negative ones); image ``i`` from seed (seed, i).

    With ``init_images`` (uint8 [N, H, W, 3], resized to the model's size) and ``strength`` < 1, image ``i`` is
    img2img from ``init_images[i]``.
    """
    size = pipe.configs["vae"].get("sample_size", shapes.IMAGE_SIZE)
    max_length = pipe.configs["text_encoder"]["max_position_embeddings"]
    models, images = pipe.models, []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        cond = tokenize(pipe.tokenizer, chunk + [""] * (batch - len(chunk)), max_length)
        uncond = tokenize(pipe.tokenizer, [""] * batch, max_length)
        rng = jax.random.fold_in(jax.random.key(seed), start)
        init = {}
        if init_images is not None and strength < 1.0:
            starts = from_uint8(init_images[start:start + batch])
            starts = jax.image.resize(starts, (len(chunk), size, size, 3), "linear")
            init = dict(init_image=jnp.pad(starts, ((0, batch - len(chunk)), (0, 0), (0, 0), (0, 0))),
                        strength=strength)
        out = sample_fn(pipe.params, cond, uncond, rng, models=models, sampler=_SAMPLER.value, steps=_STEPS.value,
                        guidance_scale=guidance, height=size, width=size, **init)
        images.append(np.round(np.asarray(out)[:len(chunk)] * 255.0).astype(np.uint8))
    return np.concatenate(images)


def reconstruct(pipe, images: np.ndarray, batch: int) -> np.ndarray:
    """uint8 ``images`` [N, S, S, 3] encoded to their posterior mean and decoded by the pipeline's VAE."""
    vae, params = pipe.models.vae, pipe.params["vae"]
    roundtrip = jax.jit(lambda p, x: vae.apply({"params": p}, x)[0])
    out = [np.asarray(roundtrip(params, from_uint8(images[i:i + batch])))
           for i in range(0, len(images), batch)]
    return to_uint8(np.concatenate(out))


# Subsets of the prompts scored besides all of them: the held-out colour-shape pairs, and each shape size (small
# shapes are a few latent pixels wide; they are where the shape is lost first).
SUBSETS = {"held_out": lambda target: target["held_out"],
           **{size: (lambda target, size=size: target["size"] == size) for size in shapes.SIZES}}


def score(predictions: list[dict], targets: list[dict]) -> dict[str, dict[str, float]]:
    """Accuracy per attribute of the checker's ``predictions`` on all images and on each of :data:`SUBSETS` that
    has images."""
    report = {"all": shapes_checker.accuracy(predictions, targets)}
    for name, member in SUBSETS.items():
        chosen = [i for i, target in enumerate(targets) if member(target)]
        if chosen:
            report[name] = shapes_checker.accuracy([predictions[i] for i in chosen], [targets[i] for i in chosen])
    return report


def shape_confusion(predictions: list[dict], targets: list[dict]) -> dict[str, dict[str, dict[str, int]]]:
    """Per shape size that occurs: how often each prompted shape was read as each shape."""
    by_size = {}
    for size in shapes.SIZES:
        chosen = [i for i, target in enumerate(targets) if SUBSETS[size](target)]
        if chosen:
            by_size[size] = shapes_checker.confusion([predictions[i] for i in chosen],
                                                     [targets[i] for i in chosen], "shape")
    return by_size


def evaluate(workdir: str, step: int | None = None) -> dict:
    """Generate, score and return the report (see the module docstring)."""
    pipe, step = load(workdir, step)
    examples = [shapes.example("test", i) for i in range(_COUNT.value)]
    targets = [{k: e[k] for k in (*shapes_checker.ATTRIBUTES, "held_out")} for e in examples]
    prompts = [e["caption"] for e in examples]
    real = np.stack([e["image"] for e in examples])
    images = {"conditional": generate(pipe, prompts, _GUIDANCE.value, _SEED.value, _BATCH.value, real,
                                      _STRENGTH.value),
              "unconditional": generate(pipe, [""] * len(prompts), 1.0, _SEED.value, _BATCH.value, real,
                                        _STRENGTH.value),
              "real_images": real, "vae_reconstructions": reconstruct(pipe, real, _BATCH.value)}
    predictions = {name: shapes_checker.classify_batch(batch) for name, batch in images.items()}
    return {"step": step, "count": len(prompts), "guidance": _GUIDANCE.value, "steps": _STEPS.value,
            "sampler": _SAMPLER.value, "strength": _STRENGTH.value,
            **{name: score(predicted, targets) for name, predicted in predictions.items()},
            "shape_confusion": {name: shape_confusion(predictions[name], targets)
                                for name in ("conditional", "vae_reconstructions")}}


def evaluate_steering(workdir: str, step: int | None = None) -> dict:
    """The --steering report: `word_steering.steering` on the first --count test images, --batch at a time."""
    pipe, step = load(workdir, step)
    try:
        timesteps = [int(t) for t in _STEERING_TIMESTEPS.value]
    except ValueError:
        raise InputError(f"--steering_timesteps must be integers, got {_STEERING_TIMESTEPS.value}") from None
    top = pipe.models.scheduler_config.get("num_train_timesteps", 1000)
    if not timesteps or not all(0 <= t < top for t in timesteps):
        raise InputError(f"--steering_timesteps must lie in [0, {top}), got {timesteps}")
    examples = [shapes.example("test", i) for i in range(_COUNT.value)]
    report = word_steering.steering(pipe, examples, timesteps, "shape", _GUIDANCE.value, _SEED.value, _BATCH.value)
    return {"step": step, "count": len(examples), "guidance": _GUIDANCE.value, "attribute": "shape",
            "steering": report}


def print_steering(report: dict) -> None:
    """The --steering report as a table: a row per subset and noise level."""
    print(f"{'shape word, step ' + str(report['step']):34s}" + "".join(f"{p:>10s}" for p in word_steering.PROMPTS))
    for subset, rows in report["steering"].items():
        for t, row in rows.items():
            print(f"{subset + ' / t = ' + t:34s}" + "".join(f"{100 * row[p]:9.1f}%" for p in word_steering.PROMPTS))


def print_table(report: dict) -> None:
    """The report as a table: rows are the image sets, columns the attributes."""
    columns = (*shapes_checker.ATTRIBUTES, "all")
    print(f"{'images (step ' + str(report['step']) + ')':34s}" + "".join(f"{c:>10s}" for c in columns))
    for name in ("conditional", "unconditional", "real_images", "vae_reconstructions"):
        for subset, row in report[name].items():
            print(f"{name + ' / ' + subset:34s}" + "".join(f"{100 * row[c]:9.1f}%" for c in columns))
    print("\nshapes read (columns) for each prompted shape (rows):")
    for name, by_size in report["shape_confusion"].items():
        for size, table in by_size.items():
            print(f"{name + ' / ' + size:34s}" + "".join(f"{read:>10s}" for read in shapes.SHAPES))
            for prompted, row in table.items():
                print(f"{'  ' + prompted:34s}" + "".join(f"{row[read]:10d}" for read in shapes.SHAPES))


def main(argv: list[str]) -> None:
    """Entry point of ``python -m ldm_jax.evaluate``: a missing or unusable checkpoint, data other than
    ldm_shapes and an output path that cannot be written are one line on stderr, before any sampling."""
    if len(argv) > 1:
        cli.fail(PROGRAM, f"unexpected arguments {argv[1:]}")
    workdir = _CHECKPOINT.value
    try:
        check_trained_on_shapes(workdir)
        step = checkpoints.resolve_step(workdir, _STEP.value)
        path = report_path(workdir, step)
        cli.check_output_file(path, "--out" if _OUT.value else "the report")
        report = evaluate_steering(workdir, step) if _STEERING.value else evaluate(workdir, step)
    except (FileNotFoundError, WeightsMismatchError, ValueError, *paths.storage_errors()) as error:
        cli.fail(PROGRAM, error)
    if _STEERING.value:
        print_steering(report)
    else:
        print_table(report)
    epath.Path(path).write_text(json.dumps(report, indent=1))
    logging.info("wrote %s", path)


if __name__ == "__main__":
    flags.mark_flag_as_required("checkpoint")
    app.run(main, flags_parser=cli.flags_parser(PROGRAM))
