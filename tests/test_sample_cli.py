"""`python -m ldm_jax.sample` and the training-workdir checkpoints it reads (ldm_jax.training.checkpoints).

A tiny random-weight diffusers pipeline (ldm_jax/testing/pipeline.py) is loaded
with ``--pretrained`` and, after `save_pipeline`, with ``--checkpoint``.
Only three runs go through a subprocess (each pays the JAX import); the other
CLI runs call ``sample.main`` in this process, where compiled code is reused.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import transformers
from absl import flags
from absl import logging as absl_logging
from PIL import Image

from ldm_jax import Pipeline, sample
from ldm_jax import images as images_lib
from ldm_jax.training import checkpoints
from ldm_jax.weights.convert import WeightsMismatchError
from ldm_jax.testing import pipeline as pipeline_refs

LONG_PROMPT = "a photo of a small red circle and a big blue square in the sky with a green tree and a house"
SIZE = 32  # the tiny U-Net's sample size 16 times the VAE factor 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """A diffusers folder with tiny random weights."""
    return pipeline_refs.build("sd1", str(tmp_path_factory.mktemp("ref")))[1]


@pytest.fixture(scope="module")
def pipe(folder) -> Pipeline:
    """The folder loaded by `Pipeline.from_pretrained`."""
    return Pipeline.from_pretrained(folder)


def ema_of(params):
    """A stand-in EMA: every U-Net param plus one (numpy, so no op-by-op compiles)."""
    return {k: ema_of(v) if isinstance(v, dict) else np.asarray(v) + 1 for k, v in params.items()}


@pytest.fixture(scope="module")
def workdir(pipe, tmp_path_factory) -> str:
    """Steps 1, 2, 3 saved with keep=2 (so 2 and 3 remain); only step 3 has EMA U-Net params."""
    path = str(tmp_path_factory.mktemp("workdir"))
    for step in (1, 2, 3):
        checkpoints.save_pipeline(path, step, pipe, ema_unet=ema_of(pipe.params["unet"]) if step == 3 else None,
                                  keep=2)
    return path


def assert_trees_equal(ours, theirs) -> None:
    """Same keys and bitwise-equal arrays in two nested dicts."""
    assert ours.keys() == theirs.keys()
    for key in ours:
        if isinstance(ours[key], dict):
            assert_trees_equal(ours[key], theirs[key])
        else:
            np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(theirs[key]), err_msg=key)


# ----------------------------------------------------------------------------- checkpoints

def test_round_trip_latest_step_pruning_and_ema(pipe, workdir):
    assert checkpoints.available_steps(workdir) == [2, 3]
    assert sorted(os.listdir(workdir)) == ["checkpoints", "tokenizer"]
    latest = checkpoints.load_pipeline(workdir)
    assert_trees_equal(latest.params["unet"], ema_of(pipe.params["unet"]))
    assert_trees_equal({k: latest.params[k] for k in ("vae", "text_encoder")},
                       {k: pipe.params[k] for k in ("vae", "text_encoder")})
    assert latest.configs == json.loads(json.dumps(pipe.configs))
    assert latest.scale_factor == pipe.scale_factor
    assert latest.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
    assert_trees_equal(checkpoints.load_pipeline(workdir, use_ema=False).params, pipe.params)
    assert_trees_equal(checkpoints.load_pipeline(workdir, step=2).params, pipe.params)


def test_checkpoint_errors(pipe, workdir, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no checkpoint in {tmp_path}: expected step folders "
                                                f"{tmp_path}/checkpoints/<step>/"):
        checkpoints.load_pipeline(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 1 in .*; available steps: 2, 3"):
        checkpoints.load_pipeline(workdir, step=1)
    with pytest.raises(ValueError, match="ema_unet does not have the tree structure"):
        checkpoints.save_pipeline(str(tmp_path), 0, pipe, ema_unet={"conv_in": pipe.params["unet"]["conv_in"]})
    text_config = {**pipe.configs["text_encoder"], "intermediate_size": 48}
    misfit = dataclasses.replace(pipe, configs={**pipe.configs, "text_encoder": text_config})
    checkpoints.save_pipeline(str(tmp_path), 0, misfit)
    with pytest.raises(WeightsMismatchError, match=r"'text_encoder' params of checkpoint step 0 in .* does not "
                                                   r"fit its model configs: 6 shape mismatch\(es\): "
                                                   r".*fc1/bias: expected shape \(48,\), found \(64,\)"):
        checkpoints.load_pipeline(str(tmp_path))


# ----------------------------------------------------------------------------- CLI

def test_make_grid_tiles_rows_and_pads():
    images = np.stack([np.full((2, 3, 3), v) for v in (0.0, 0.5, 1.0)])
    grid = np.asarray(images_lib.make_grid(images))
    assert grid.shape == (4, 6, 3)
    assert (grid[:2, :3] == 0).all() and (grid[:2, 3:] == 128).all() and (grid[2:, :3] == 255).all()
    assert (grid[2:, 3:] == 0).all()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m ldm_jax.sample ARGS`` in a subprocess, compiling as fast as this process (conftest.py)."""
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    return subprocess.run([sys.executable, "-m", "ldm_jax.sample", *args], capture_output=True, text=True,
                          env=env, timeout=600)


SAMPLE_ARGS = ("--prompt", LONG_PROMPT, "--steps", "2", "--num-images", "2", "--seed", "0")


@pytest.fixture(scope="module")
def first_grid(folder, tmp_path_factory) -> tuple[subprocess.CompletedProcess, str]:
    """The subprocess run with --pretrained and the grid it wrote."""
    out = str(tmp_path_factory.mktemp("out") / "a.png")
    return run_cli("--pretrained", folder, *SAMPLE_ARGS, "--out", out), out


def test_pretrained_writes_grid_and_warns_of_truncation(first_grid):
    result, out = first_grid
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"wrote {out}"
    assert "warning: prompt 'a photo of a small" in result.stderr and "truncated to the limit of 16" in result.stderr
    for phase in ("loading", "compiling", "sampling", "saving"):
        assert phase in result.stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (2 * SIZE, SIZE)


@pytest.fixture
def in_process():
    """``main`` of the CLI called in this process: returns the exit code (0 or the message); restores global state."""
    verbosity = transformers.logging.get_verbosity(), absl_logging.get_verbosity()

    def call(*args: str):
        flags.FLAGS.unparse_flags()
        try:
            sample.main(sample.parse_flags(["ldm_jax.sample", *args]))
        except SystemExit as exit_:
            return exit_.code
        return 0

    yield call
    flags.FLAGS.unparse_flags()
    transformers.logging.set_verbosity(verbosity[0])
    absl_logging.set_verbosity(verbosity[1])


def test_same_seed_same_file_other_seed_differs(first_grid, folder, in_process, tmp_path):
    assert in_process("--pretrained", folder, *SAMPLE_ARGS, "--out", str(tmp_path / "same.png")) == 0
    assert in_process("--pretrained", folder, *SAMPLE_ARGS, "--seed", "1", "--out", str(tmp_path / "other.png")) == 0
    with open(first_grid[1], "rb") as f:
        first = f.read()
    assert (tmp_path / "same.png").read_bytes() == first
    assert (tmp_path / "other.png").read_bytes() != first


def test_out_suffix_picks_the_format(first_grid, folder, in_process, tmp_path):
    """``--out x.jpg`` writes JPEG data: the PNG run's grid, JPEG-encoded with PIL's defaults."""
    assert in_process("--pretrained", folder, *SAMPLE_ARGS, "--out", str(tmp_path / "grid.jpg")) == 0
    with Image.open(first_grid[1]) as png:
        png.save(tmp_path / "expected.jpg", format="JPEG")
    with Image.open(tmp_path / "grid.jpg") as jpeg, Image.open(tmp_path / "expected.jpg") as expected:
        assert jpeg.format == "JPEG"
        np.testing.assert_array_equal(np.asarray(jpeg), np.asarray(expected))


def test_checkpoint_gives_the_same_file(first_grid, workdir, in_process, tmp_path):
    assert in_process("--checkpoint", workdir, "--noema", *SAMPLE_ARGS, "--out", str(tmp_path / "b.png")) == 0
    with open(first_grid[1], "rb") as f:
        assert (tmp_path / "b.png").read_bytes() == f.read()


BAD_INPUTS = ("unknown sampler", "steps < 1", "steps not an integer", "NaN guidance", "num-images < 1",
              "missing pretrained", "missing checkpoint", "missing step", "neither", "both", "tokenizer not a folder",
              "out is a folder", "out without an image suffix", "out under a file", "negative guidance",
              "size not a U-Net multiple")


def bad_input(case: str, folder: str, workdir: str) -> tuple[list[str], str]:
    """The CLI arguments of a bad-input case and a regex of the error line it must give."""
    pretrained = ["--pretrained", folder, "--prompt", "a cat"]
    cases = {
        "unknown sampler": ([*pretrained, "--sampler", "plms"],
                            r"flag --sampler=plms: value should be one of <ddpm\|ddim\|dpm\+\+2m\|euler\|euler_a>"),
        "steps < 1": ([*pretrained, "--steps", "0"], "flag --steps=0: 0 is not a positive integer"),
        "steps not an integer": ([*pretrained, "--steps", "2.5"],
                                 r"flag --steps=2.5: invalid literal for int\(\) with base 10: .2.5."),
        "NaN guidance": ([*pretrained, "--guidance", "nan"], "flag --guidance=nan: --guidance must be a finite number"),
        "num-images < 1": ([*pretrained, "--num-images", "0"], "flag --num-images=0: 0 is not a positive integer"),
        "missing pretrained": (["--pretrained", "/nonexistent/sd", "--prompt", "a cat"],
                               "no pretrained pipeline at /nonexistent/sd: expected a diffusers folder"),
        "missing checkpoint": (["--checkpoint", "/nonexistent/run", "--prompt", "a cat"],
                               "no checkpoint in /nonexistent/run: expected step folders"),
        "missing step": (["--checkpoint", workdir, "--step", "7", "--prompt", "a cat"],
                         "no checkpoint for step 7 in .*; available steps: 2, 3"),
        "neither": (["--prompt", "a cat"], "flags pretrained=None, checkpoint=None: give exactly one of "
                                           "--pretrained DIR or --checkpoint WORKDIR"),
        "both": ([*pretrained, "--checkpoint", workdir], "flags pretrained=.*, checkpoint=.*: give exactly one of "
                                                         "--pretrained DIR or --checkpoint WORKDIR"),
        "tokenizer not a folder": ([*pretrained, "--tokenizer", "/nonexistent/tokenizer"],
                                   "--tokenizer /nonexistent/tokenizer is not a folder: give a CLIP tokenizer folder"),
        "out is a folder": ([*pretrained, "--out", folder], f"--out {folder} is a folder: give the PNG file to write"),
        "out without an image suffix": ([*pretrained, "--out", f"{folder}.pgn"],
                                        rf"--out {re.escape(folder)}.pgn: cannot tell the image format from the "
                                        r"suffix '.pgn'; use one of .*\.jpg.*\.png.*"),
        "out under a file": ([*pretrained, "--out", f"{folder}/model_index.json/grid.png"],
                             rf"--out {re.escape(folder)}/model_index.json/grid.png: its folder "
                             rf"{re.escape(folder)}/model_index.json is a file, not a folder"),
        "negative guidance": ([*pretrained, "--guidance", "-2"],
                              r"flag --guidance=-2.0: --guidance must be a finite number >= 0 \(0: unconditional, "
                              r"1: no guidance\)"),
        "size not a U-Net multiple": ([*pretrained, "--height", "6"],
                                      r"--height 6 and --width 32 must be multiples of 4 \(the VAE's factor 2 times "
                                      r"the U-Net's 2\)"),
    }
    args, message = cases[case]
    return args, "ldm_jax.sample: error: " + message + ".*"


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_one_line_error(case, folder, workdir, in_process):
    args, message = bad_input(case, folder, workdir)
    code = in_process(*args)
    assert isinstance(code, str) and "\n" not in code and re.fullmatch(message, code), code


@pytest.mark.parametrize("case", ["unknown sampler", "missing checkpoint"])
def test_bad_input_exits_without_traceback(case, folder, workdir):
    args, message = bad_input(case, folder, workdir)
    result = run_cli(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert re.fullmatch(message, result.stderr.splitlines()[-1]), result.stderr


def test_evaluate_on_a_missing_checkpoint_exits_with_one_line(tmp_path):
    """``python -m ldm_jax.evaluate`` (whose flags clash with this CLI's, so only in a subprocess)."""
    result = subprocess.run([sys.executable, "-m", "ldm_jax.evaluate", "--checkpoint", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.fullmatch(f"ldm_jax.evaluate: error: no checkpoint in {tmp_path}: expected step folders .*",
                        result.stderr.splitlines()[-1])
