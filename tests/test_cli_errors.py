"""The commands' errors before their work starts: ``--help``, config files and overrides, output paths, reports.

Every case runs the real command in a subprocess (``python -m ldm_jax.NAME``)
and expects exit status 0 for ``--help`` and otherwise 1 with one line on
stderr naming the problem, no traceback, and no sign that the work started
(no stage begun, nothing loaded or compiled) within seconds. The subprocesses
run from one module fixture, three at a time: each pays its imports (about
4 s) and nothing more; the cases marked slow repeat a mechanism that a
default case covers. ``sample``'s own path errors are in test_sample_cli.py,
in process.
"""

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time

import jax
import pytest

from configs import tiny
from ldm_jax import Pipeline
from ldm_jax.training import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("train", "sample", "evaluate", "encode_latents", "compile_check")
RUN_CONFIGS = re.escape("the run configs are configs/base.py, configs/base.py:quick, configs/base.py:f4, "
                        "configs/tiny.py:run, configs/vae.py, configs/vae.py:quick")
# Evaluate's report names for three sets of flags, printed without running anything (its flags clash with sample's,
# so it is imported only in a subprocess).
REPORT_NAMES = """
import sys
from absl import flags
from ldm_jax import evaluate
for args in ([], ["--guidance=7.5", "--sampler=euler", "--noema"], ["--steering", "--steering_timesteps=100,500"]):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["evaluate", "--checkpoint=W", *args])
    print(evaluate.report_path("W", 7))
"""


def cases(tmp: str, workdir: str) -> dict[str, tuple[list[str], str]]:
    """Each case's command line (after ``python``) and a regex of the last stderr line (for ``--help``, of
    stdout; for the report names, stdout itself)."""
    a_file = os.path.join(tmp, "a_file")
    tiny_run = ["-m", "ldm_jax.train", "--config", "configs/tiny.py:run"]
    help_cases = {f"{name} --help": (["-m", f"ldm_jax.{name}", "--help"], r"(?s).*--helpfull.*")
                  for name in COMMANDS}
    return {
        **help_cases,
        "train: missing config file": (
            ["-m", "ldm_jax.train", "--config", "configs/bsae.py"],
            r"ldm_jax.train: error: --config configs/bsae.py: no config file configs/bsae.py; did you mean "
            r"configs/base.py\? " + RUN_CONFIGS),
        "train: misspelt override": (
            [*tiny_run, "--config.diffusion.stepz=3"],
            r"ldm_jax.train: error: --config.diffusion.stepz: diffusion has no key 'stepz'; did you mean "
            r"diffusion.steps\?"),
        "train: misspelt section": (
            [*tiny_run, "--config.diffusio.steps=3"],
            r"ldm_jax.train: error: --config.diffusio.steps: the config has no key 'diffusio'; did you mean "
            r"diffusion\?"),
        "train: misspelt variant": (
            ["-m", "ldm_jax.train", "--config", "configs/tiny.py:rnu"],
            r"ldm_jax.train: error: --config configs/tiny.py:rnu: ValueError: unknown variant 'rnu' of "
            r"configs/tiny.py; the variant is 'run'"),
        "train: workdir is a file": (
            [*tiny_run, "--workdir", a_file],
            rf"ldm_jax.train: error: --workdir {re.escape(a_file)} is a file, not a folder"),
        "train: workdir cannot be made": (
            [*tiny_run, "--workdir", os.path.join(a_file, "run")],
            rf"ldm_jax.train: error: --workdir {re.escape(a_file)}/run is not a folder this process can write to "
            r"\(Not a directory\)"),
        "encode_latents: model config": (
            ["-m", "ldm_jax.encode_latents", "--config", "configs/tiny.py"],
            r"ldm_jax.encode_latents: error: --config configs/tiny.py: this is a model config .*configs/tiny.py:run"
            r".*"),
        "compile_check: missing config file": (
            ["-m", "ldm_jax.compile_check", "--config", "configs/sd51.py"],
            r"ldm_jax.compile_check: error: --config configs/sd51.py: no config file configs/sd51.py; did you mean "
            r"configs/sd\d\d.py\? " + RUN_CONFIGS),
        "evaluate: out under a file": (
            ["-m", "ldm_jax.evaluate", "--checkpoint", os.path.join(tmp, "shapes_run"), "--out",
             f"{a_file}/report.json"],
            rf"ldm_jax.evaluate: error: --out {re.escape(a_file)}/report.json: its folder {re.escape(a_file)} is a "
            r"file, not a folder"),
        "evaluate: model of other data": (
            ["-m", "ldm_jax.evaluate", "--checkpoint", workdir],
            rf"ldm_jax.evaluate: error: {re.escape(workdir)} was trained on data.source 'folder' \(/data/photos\); "
            r"evaluate's checker reads only images of the built-in ldm_shapes data .*"),
        "evaluate: report names": (["-c", REPORT_NAMES], "W/eval_step_7.json\nW/eval_step_7_sampler_euler_guidance_7.5_"
                                                          "ema_False.json\nW/eval_step_7_steering_steering_timesteps_"
                                                          "100-500.json"),
    }


# Cases outside the default suite (``pytest -m slow``): each subprocess pays about 4 s of imports, and these
# repeat a mechanism a default case already covers (the shared flag parser, config loader or path check).
SLOW = {"encode_latents --help", "compile_check --help", "train: misspelt section", "train: misspelt variant",
        "train: workdir cannot be made", "encode_latents: model config", "compile_check: missing config file",
        "evaluate: out under a file"}


def _params(names) -> list:
    """``names`` as pytest params, the `SLOW` ones marked slow."""
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in names]


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict[str, tuple[list[str], str, subprocess.CompletedProcess, float]]:
    """Every selected case run (three at a time): its arguments, expected line, result and wall seconds."""
    run = request.node.listchain()[0]  # the root node: the whole test run, which holds the selected items
    params = [getattr(getattr(item, "callspec", None), "params", {}) for item in run.items
              if item.module is request.module]
    selected = {p["name"] for p in params if "name" in p}
    tmp = str(tmp_path_factory.mktemp("cli"))
    with open(os.path.join(tmp, "a_file"), "w") as f:
        f.write("not a folder")
    workdir = os.path.join(tmp, "run")  # a run whose latent cache came from an image folder (its manifest is enough)
    os.makedirs(os.path.join(workdir, "latents"))
    with open(os.path.join(workdir, "latents", "manifest.json"), "w") as f:
        json.dump({"data": {"source": "folder", "name": "", "data_dir": "/data/photos"}}, f)
    if "evaluate: out under a file" in selected:  # a checkpoint of the tiny models, the shapes data
        checkpoints.save_pipeline(os.path.join(tmp, "shapes_run"), 1,
                                  Pipeline.from_config(tiny.get_config(), jax.random.key(0)))
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}

    def run(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        return done, time.perf_counter() - start

    table = {name: case for name, case in cases(tmp, workdir).items() if name in selected}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(run, args) for name, (args, _) in table.items()}
    return {name: (*table[name], *futures[name].result()) for name in table}


@pytest.mark.parametrize("name", _params(f"{c} --help" for c in COMMANDS))
def test_help_exits_0(runs, name):
    _, expected, done, _ = runs[name]
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.fullmatch(expected, done.stdout) and "Traceback" not in done.stderr


@pytest.mark.parametrize("name", ["evaluate --help"])
def test_evaluate_help_lists_the_samplers(runs, name):
    assert "--sampler: <ddpm|ddim|dpm++2m|euler|euler_a>" in runs[name][2].stdout


ERRORS = ("train: missing config file", "train: misspelt override", "train: misspelt section",
          "train: misspelt variant", "train: workdir is a file", "train: workdir cannot be made",
          "encode_latents: model config", "compile_check: missing config file", "evaluate: out under a file",
          "evaluate: model of other data")


@pytest.mark.parametrize("name", _params(ERRORS))
def test_error_is_one_line_before_any_work(runs, name):
    _, expected, done, seconds = runs[name]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert re.fullmatch(expected, done.stderr.splitlines()[-1]), done.stderr[-3000:]
    for sign_of_work in ("stage autoencoder in", "loading ", "compiling (", "Restoring"):
        assert sign_of_work not in done.stderr
    assert seconds < 30  # the imports alone (3-6 s); a run that started would compile for longer


@pytest.mark.parametrize("name", ["evaluate: report names"])
def test_evaluate_names_its_report_by_the_settings_that_differ(runs, name):
    _, expected, done, _ = runs[name]
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == expected
