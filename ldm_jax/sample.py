r"""Text to a grid of images (its format from the suffix of --out) with a pretrained pipeline or a checkpoint.

  python -m ldm_jax.sample --pretrained DIR --prompt "a photo of a cat" --out grid.png
  python -m ldm_jax.sample --checkpoint WORKDIR [--step N] --prompt "..." [--negative-prompt ""]
      [--sampler ddim] [--steps 50] [--guidance 7.5] [--seed 0] [--num-images 4] [--height H --width W]
      [--dtype bfloat16] [--attention-impl auto|xla|cudnn|einsum|pallas_tpu]

--pretrained takes a diffusers folder or a single-file SD .safetensors (which
has no tokenizer: add --tokenizer DIR); --checkpoint a training workdir
(ldm_jax.training.checkpoints). The same flags and seed give the same file.
Progress goes to stderr; the last line on stdout is the path written.
"""

import contextlib
import math
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from absl import app, flags, logging
from etils import epath

from ldm_jax import cli, paths
from ldm_jax.diffusion.samplers import SAMPLERS
from ldm_jax.diffusion.sample_fn import sample_fn
from ldm_jax.images import make_grid
from ldm_jax.models.attention import ATTENTION_IMPLS
from ldm_jax.models.clip import load_tokenizer, tokenize
from ldm_jax.pipeline import Pipeline
from ldm_jax.training import checkpoints

_PRETRAINED = flags.DEFINE_string("pretrained", None, "A diffusers pipeline folder or single-file SD .safetensors.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A training workdir (its checkpoints/ and tokenizer/).")
_STEP = flags.DEFINE_integer("step", None, "With --checkpoint: the step to load (default: the latest).",
                             lower_bound=0)
_EMA = flags.DEFINE_bool("ema", True, "With --checkpoint: use the EMA U-Net params when saved (--noema: the raw ones).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "A tokenizer folder (default: the pipeline's tokenizer/).")
_PROMPT = flags.DEFINE_string("prompt", None, "The text prompt.", required=True)
_NEGATIVE_PROMPT = flags.DEFINE_string("negative-prompt", "", "What to steer away from (the unconditional prompt).")
_SAMPLER = flags.DEFINE_enum("sampler", "ddim", SAMPLERS, "The sampling algorithm.")
_STEPS = flags.DEFINE_integer("steps", 50, "Number of sampling steps.", lower_bound=1)
_GUIDANCE = flags.DEFINE_float("guidance", 7.5, "Classifier-free guidance scale (1: no guidance).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed: the same seed gives the same images.")
_NUM_IMAGES = flags.DEFINE_integer("num-images", 4, "Number of images in the grid.", lower_bound=1)
_HEIGHT = flags.DEFINE_integer("height", None, "Image height (default: the model's native size).", lower_bound=1)
_WIDTH = flags.DEFINE_integer("width", None, "Image width (default: the model's native size).", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (params stay float32).")
_ATTENTION = flags.DEFINE_enum("attention-impl", "auto", list(ATTENTION_IMPLS),
                               "The attention kernel (ldm_jax/models/attention.py): cudnn on NVIDIA GPUs, pallas_tpu "
                               "on TPUs.")
_OUT = flags.DEFINE_string("out", "grid.png", "Where to write the grid; its suffix picks the format (.png, .jpg, ...).")
flags.register_validator("guidance", lambda value: math.isfinite(value) and value >= 0,
                         message="--guidance must be a finite number >= 0 (0: unconditional, 1: no guidance)")
flags.register_multi_flags_validator(
    ["pretrained", "checkpoint"], lambda values: (values["pretrained"] is None) != (values["checkpoint"] is None),
    message="give exactly one of --pretrained DIR or --checkpoint WORKDIR")


class InputError(Exception):
    """Bad input: reported as one line on stderr, exit status 1."""


PROGRAM = "ldm_jax.sample"
# Parses ``argv`` into the flags: --help exits 0, a bad flag exits with one line instead of the usage text.
parse_flags = cli.flags_parser(PROGRAM)


@contextlib.contextmanager
def progress(what: str):
    """Print ``what ...`` to stderr, then the seconds the block took (just a line break if it raised)."""
    print(f"{what} ...", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        print(file=sys.stderr, flush=True)
        raise
    print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def load() -> Pipeline:
    """The pipeline named by --pretrained or --checkpoint, with the tokenizer of --tokenizer if given.

    The params are placed on the first local device either way (a checkpoint
    restores them there), so both sources give the same compiled program.
    """
    if _TOKENIZER.value is not None and not epath.Path(_TOKENIZER.value).is_dir():
        raise InputError(f"--tokenizer {_TOKENIZER.value} is not a folder: give a CLIP tokenizer folder "
                         "(vocab.json, merges.txt), e.g. a diffusers pipeline's tokenizer/")
    dtype = jnp.dtype(_DTYPE.value)
    if _PRETRAINED.value is not None:
        pipe = Pipeline.from_pretrained(_PRETRAINED.value, dtype=dtype, attention_impl=_ATTENTION.value)
        pipe.params = jax.device_put(pipe.params, jax.local_devices()[0])
    else:
        pipe = checkpoints.load_pipeline(_CHECKPOINT.value, _STEP.value, use_ema=_EMA.value, dtype=dtype,
                                         attention_impl=_ATTENTION.value)
    if _TOKENIZER.value is not None:
        pipe.tokenizer = load_tokenizer(_TOKENIZER.value)
    if pipe.tokenizer is None:
        raise InputError(f"{_PRETRAINED.value or _CHECKPOINT.value} has no tokenizer/: pass --tokenizer DIR")
    return pipe


def token_ids(pipe: Pipeline, prompt: str, n: int) -> np.ndarray:
    """``prompt`` tokenized and padded to the text encoder's length, repeated ``n`` times; warnings to stderr."""
    max_length = pipe.configs["text_encoder"].get("max_position_embeddings", pipe.tokenizer.model_max_length)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tokenize(pipe.tokenizer, prompt, max_length)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    return np.repeat(ids, n, axis=0)


def image_size(pipe: Pipeline) -> tuple[int, int]:
    """--height/--width, or the model's native size (U-Net sample size times the VAE factor) where not given."""
    factor = 2 ** (len(pipe.vae.block_out_channels) - 1)
    size = pipe.configs["unet"]["sample_size"] * factor
    height, width = _HEIGHT.value or size, _WIDTH.value or size
    multiple = factor * 2 ** (len(pipe.unet.block_out_channels) - 1)
    if height % multiple or width % multiple:
        raise InputError(f"--height {height} and --width {width} must be multiples of {multiple} (the VAE's "
                         f"factor {factor} times the U-Net's {multiple // factor})")
    return height, width


def generate(pipe: Pipeline, cond: np.ndarray, uncond: np.ndarray, height: int, width: int) -> np.ndarray:
    """Compile and run `sample_fn` for the flags' sampler settings; images [N, H, W, 3] in [0, 1]."""
    settings = dict(models=pipe.models, sampler=_SAMPLER.value, steps=_STEPS.value,
                    guidance_scale=_GUIDANCE.value, height=height, width=width)
    args = (pipe.params, cond, uncond, jax.random.key(_SEED.value))
    with progress(f"compiling ({_SAMPLER.value}, {_STEPS.value} steps, {len(cond)} x {height}x{width})"):
        compiled = sample_fn.lower(*args, **settings).compile()
    with progress("sampling"):
        return np.asarray(jax.block_until_ready(compiled(*args)))


def check_out(path: str) -> str:
    """The image format of --out ``path``; InputError unless it is a writable file name with an image suffix."""
    if epath.Path(path).is_dir():
        raise InputError(f"--out {path} is a folder: give the PNG file to write, e.g. {epath.Path(path) / 'grid.png'}")
    image_format = cli.image_format(path, "--out")
    cli.check_writable_folder(str(epath.Path(path).parent), f"--out {path}: its folder")
    return image_format


def run() -> str:
    """Load, tokenize, sample and write the grid as the flags say; returns the path written."""
    image_format = check_out(_OUT.value)  # before loading and compiling: a bad path fails in the first second
    with progress(f"loading {_PRETRAINED.value or _CHECKPOINT.value}"):
        pipe = load()
    cond = token_ids(pipe, _PROMPT.value, _NUM_IMAGES.value)
    uncond = token_ids(pipe, _NEGATIVE_PROMPT.value, _NUM_IMAGES.value)
    images = generate(pipe, cond, uncond, *image_size(pipe))
    with progress(f"saving {_OUT.value}"):
        with epath.Path(_OUT.value).open("wb") as f:
            make_grid(images).save(f, format=image_format)
    return _OUT.value


def quiet_logs() -> None:
    """Show only warnings and errors of libraries (``-v 0`` brings back INFO logs).

    transformers' own too-long-sequence message is silenced: `token_ids`
    reports the truncation more precisely.
    """
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    transformers.logging.set_verbosity_error()


def main(argv: list[str]) -> None:
    """Entry point under ``absl.app.run``: bad input exits with one line on stderr, no traceback."""
    if len(argv) > 1:
        cli.fail(PROGRAM, f"unexpected arguments {argv[1:]}")
    quiet_logs()
    jax.config.update("jax_threefry_partitionable", True)
    try:
        path = run()
    except (InputError, ValueError, *paths.storage_errors()) as error:
        cli.fail(PROGRAM, error)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
