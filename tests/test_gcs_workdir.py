"""A run whose workdir is on object storage: gs:// on a GCS emulator on 127.0.0.1 (tests/gcs_emulator.py).

configs/tiny.py:run trains the autoencoder, the latent cache and the U-Net with a gs:// workdir, dies while
committing a U-Net checkpoint and resumes; it ends bit-identical to the same run on a local disk (checkpoints,
metrics, latent cache, sample grid), and `sample` and `evaluate` read it from gs://. A workdir in a bucket that
does not exist, or that the credentials may not use, fails before anything compiles, naming the path and the
storage client's error. The commands run as subprocesses with the emulator's environment.
"""

import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath
from PIL import Image

from gcs_emulator import FORBIDDEN_BUCKET, emulator_fixture
from ldm_jax import paths
from ldm_jax.data import latents
from ldm_jax.training import checkpoints
from ldm_jax.training.autoencoder.state import stage_dir
from tests.test_fault_tolerance import COMMAND_ENV, INJECTOR, ROOT, _assert_equal_trees, _logged, _saved

gcs = emulator_fixture()

AE_STEPS, STEPS, EVERY = 2, 6, 2
KILLED_COMMIT = 4  # a step only the U-Net stage saves (the autoencoder stops at AE_STEPS)
TIMEOUT = 900


def _train_args(workdir: str) -> list[str]:
    return ["--config", os.path.join(ROOT, "configs", "tiny.py") + ":run", "--workdir", workdir,
            f"--config.autoencoder.steps={AE_STEPS}", f"--config.autoencoder.checkpoint_every={EVERY}",
            "--config.autoencoder.keep=5", f"--config.diffusion.steps={STEPS}",
            f"--config.diffusion.checkpoint_every={EVERY}", "--config.diffusion.keep=5"]


class Commands:
    """Runs ldm_jax commands (`COMMAND_ENV`, with the emulator's environment) and keeps their logs."""

    def __init__(self, root: str):
        self.root = root
        self.env = {**os.environ, **COMMAND_ENV}

    def run(self, name: str, module: str, args: list[str], fault: tuple[str, int] | None = None) -> dict:
        """``module`` with ``args``, interrupted by ``fault`` (tests/fault_injector.py) if given: its exit status,
        log and wall time."""
        program = [INJECTOR, fault[0], str(fault[1]), module] if fault else ["-m", module]
        path = os.path.join(self.root, f"{name}.log")
        start = time.monotonic()
        with open(path, "w") as log:
            code = subprocess.run([sys.executable, *program, *args], env=self.env, stdout=log, stderr=log, cwd=ROOT,
                                  timeout=TIMEOUT).returncode
        with open(path) as log:
            return {"code": code, "log": log.read(), "seconds": time.monotonic() - start}


def _committed(folder: str) -> list[str]:
    """The step folders of a checkpoint folder that hold orbax's commit marker."""
    return sorted(p.name for p in epath.Path(folder).iterdir() if (p / "commit_success.txt").exists())


@pytest.fixture(scope="module")
def runs(gcs, tmp_path_factory) -> dict:
    """Every command to the end: {'local', 'remote': the two workdirs, name: {'code', 'log', 'seconds'}, ...}.

    One after the other: the local run compiles each program once, the gs:// runs find them in the cache.
    """
    root = str(tmp_path_factory.mktemp("gcs_workdir"))
    commands = Commands(root)
    local, remote = os.path.join(root, "local"), gcs.uri("run")
    out = {"local": local, "remote": remote}
    out["reference"] = commands.run("reference", "ldm_jax.train", _train_args(local))
    for name, bucket in (("missing", "ldm-jax-no-such-bucket"), ("forbidden", FORBIDDEN_BUCKET)):
        out[name] = commands.run(name, "ldm_jax.train", _train_args(f"gs://{bucket}/run"))
    forbidden = f"gs://{FORBIDDEN_BUCKET}/run"
    out["sample_forbidden"] = commands.run("sample_forbidden", "ldm_jax.sample", [
        "--checkpoint", forbidden, "--prompt", "a red circle", "--out", os.path.join(root, "grid.png")])
    out["evaluate_forbidden"] = commands.run("evaluate_forbidden", "ldm_jax.evaluate", ["--checkpoint", forbidden])

    folder = checkpoints.checkpoint_dir(remote)
    out["killed"] = commands.run("killed", "ldm_jax.train", _train_args(remote), fault=("commit", KILLED_COMMIT))
    out["listing_after_kill"] = sorted(p.name for p in epath.Path(folder).iterdir())
    out["committed_after_kill"] = _committed(folder)
    out["resumed"] = commands.run("resumed", "ldm_jax.train", _train_args(remote))
    out["grid"] = f"{remote}/grids/a red circle.png"
    out["sample"] = commands.run("sample", "ldm_jax.sample", [
        "--checkpoint", remote, "--prompt", "a red circle", "--num-images", "2", "--steps", "2", "--out", out["grid"]])
    out["evaluate"] = commands.run("evaluate", "ldm_jax.evaluate", [
        "--checkpoint", remote, "--count", "8", "--batch", "8", "--steps", "2"])
    return out


def _assert_exit(run: dict, code: int = 0) -> None:
    assert run["code"] == code, run["log"][-4000:]


def test_a_kill_while_committing_on_object_storage_leaves_a_step_that_is_never_restored(runs):
    _assert_exit(runs["killed"], -9)
    # Object storage has no rename: the step is written in place and committed by its marker, written last.
    assert runs["listing_after_kill"] == [str(s) for s in range(EVERY, KILLED_COMMIT + 1, EVERY)]
    assert runs["committed_after_kill"] == [str(s) for s in range(EVERY, KILLED_COMMIT, EVERY)]
    assert f"ignoring unfinished checkpoint save(s) ['{KILLED_COMMIT}']" in runs["resumed"]["log"]


def test_the_resumed_run_on_gcs_equals_the_uninterrupted_local_run(runs):
    _assert_exit(runs["reference"])
    _assert_exit(runs["resumed"])
    local, remote = runs["local"], runs["remote"]
    for stage, steps in ((stage_dir, AE_STEPS), (lambda w: w, STEPS)):
        assert checkpoints.available_steps(stage(remote))[-1] == steps
        _assert_equal_trees(_saved(stage(remote), steps), _saved(stage(local), steps))
        np.testing.assert_equal(_logged(stage(remote)), _logged(stage(local)))
    cache = {name: [(stem, count) for stem, count in split["shards"]]
             for name, split in latents.read_manifest(f"{remote}/latents")["splits"].items()}
    assert cache == {name: [(stem, count) for stem, count in split["shards"]]
                     for name, split in latents.read_manifest(f"{local}/latents")["splits"].items()}
    for stem, _ in cache["train"]:
        for field in ("mean", "logvar", "input_ids", "index"):
            np.testing.assert_array_equal(paths.load_npy(f"{remote}/latents/{stem}.{field}.npy"),
                                          paths.load_npy(f"{local}/latents/{stem}.{field}.npy"))
    grid = f"samples/step_{STEPS:06d}.png"
    np.testing.assert_array_equal(_image(f"{remote}/{grid}"), _image(f"{local}/{grid}"))


def _image(path: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(epath.Path(path).read_bytes())))


def test_sample_and_evaluate_read_the_run_from_gcs(runs):
    _assert_exit(runs["sample"])
    assert _image(runs["grid"]).shape == (32, 64, 3)  # two 32x32 images side by side
    _assert_exit(runs["evaluate"])
    reports = list(epath.Path(runs["remote"]).glob(f"eval_step_{STEPS}_*.json"))
    assert [p.name for p in reports] == [f"eval_step_{STEPS}_count_8_batch_8_steps_2.json"]
    report = json.loads(reports[0].read_text())
    assert report["step"] == STEPS, report


@pytest.mark.parametrize("name, status", [("missing", "404"), ("forbidden", "403")])
def test_a_bucket_that_cannot_be_written_fails_at_start_naming_path_and_error(runs, name, status):
    run = runs[name]
    _assert_exit(run, 1)
    error = run["log"].strip().splitlines()[-1]
    assert error.startswith("ldm_jax.train: error: --workdir gs://") and "/run is not a folder" in error, error
    assert f"HTTP response code {status}" in error
    assert "Traceback" not in run["log"] and "stage autoencoder" not in run["log"]
    assert run["seconds"] < 60


@pytest.mark.parametrize("name, program", [("sample_forbidden", "ldm_jax.sample"),
                                           ("evaluate_forbidden", "ldm_jax.evaluate")])
def test_sample_and_evaluate_name_a_bucket_they_may_not_read(runs, name, program):
    run = runs[name]
    _assert_exit(run, 1)
    error = run["log"].strip().splitlines()[-1]
    assert error.startswith(f"{program}: error: ") and f"gs://{FORBIDDEN_BUCKET}/run" in error, error
    assert "HTTP response code 403" in error and "Traceback" not in run["log"]
