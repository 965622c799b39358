"""Fault tolerance of ``python -m ldm_jax.train``: real processes, real signals, real orbax checkpoints on disk.

Every run is the same command: stage 2 of ``configs/tiny.py:run`` on an image
folder (48 readable images in every colour mode plus 4 broken files) whose
latent cache has one NaN example, met at step 5; 6 steps, checkpoints every
3, ``nan_policy='skip'``, one CPU device (on 2 or more cores the step runs as
concurrent slice programs). The runs differ only in how they are
interrupted. Two lanes run side by side:

    interrupted:  SIGTERM after the first logged step  ->  restart, killed (SIGKILL) while committing the
                  checkpoint of the last step  ->  restart to the end
    reference:    uninterrupted  ->  the same with nan_policy='stop', in a fresh workdir  ->
                  SIGKILL from outside once step 3 is logged, in a fresh workdir  ->  restart to the end

The module fixture runs both lanes and records what happened; each test
checks one outcome. The kill mid-save is exact: the process SIGKILLs itself
inside orbax at the rename that commits the step folder, so everything else
of the save (items, ``commit_success.txt``) is on disk, as when a machine dies
at that instant. The killed run has logged steps up to STEPS - 1 or STEPS
(metrics are written one log interval late, the last row while the save
commits), past its latest complete checkpoint.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import tiny
from ldm_jax.data import latents, shapes
from ldm_jax.pipeline import Pipeline, abstract_params, build_modules, init_inputs
from ldm_jax.training import checkpoints
from ldm_jax.training.latent_cache import ensure_latents
from ldm_jax.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY, BATCH, IMAGES = 6, 3, 8, 48  # 48 images: one epoch, so each example is met once
NAN_STEP, LAST_GOOD = 5, 3  # the NaN example is in the batch of step 5; the checkpoint before it is step 3
BROKEN = {"corrupt.png": b"\x89PNG\r\n\x1a\n not a png", "empty.png": b""}
COMPARED = ("train/loss", "train/mse", "train/grad_norm", "train/lr", "train/weight", "train/nonfinite_skips")
TIMEOUT = 900
# Seven training processes, each compiling the tiny step: minutes on 2 cores, so outside the default suite.
pytestmark = pytest.mark.slow

# Runs ldm_jax.train with orbax's rename patched: the rename that commits step STEPS's folder kills the process.
KILL_AT_COMMIT = f"""
import os, runpy, signal, sys
from orbax.checkpoint._src.path import atomicity
rename = atomicity.async_path.rename
async def rename_or_die(source, target):
    if target.name == "{STEPS}":
        os.kill(os.getpid(), signal.SIGKILL)
    return await rename(source, target)
atomicity.async_path.rename = rename_or_die
sys.argv[0] = "ldm_jax.train"
runpy.run_module("ldm_jax.train", run_name="__main__")
"""


def _write_images(folder: str) -> None:
    """IMAGES shapes images in six colour modes with captions (two empty), and BROKEN files, in captions.jsonl."""
    os.makedirs(folder)
    records = []
    for i in range(IMAGES):
        example = shapes.example("train", i)
        image, name = Image.fromarray(example["image"]), f"{i:03d}.png"
        mode = i % 6
        if mode == 1:
            image = image.convert("L")
        elif mode == 2:
            image = image.convert("RGBA")
        elif mode == 3:
            image = Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257)  # 16-bit grey
        elif mode == 4:
            image, name = image.convert("CMYK"), f"{i:03d}.jpg"
        elif mode == 5:
            image = image.convert("P")
        image.save(os.path.join(folder, name))
        records.append({"file": name, "caption": None if i == 7 else "" if i == 8 else example["caption"]})
    png, jpeg = (pathlib.Path(folder, name).read_bytes() for name in ("000.png", "004.jpg"))
    broken = {**BROKEN, "truncated.png": png[:len(png) // 2], "truncated.jpg": jpeg[:200]}
    for name, content in broken.items():
        pathlib.Path(folder, name).write_bytes(content)
        records.insert(3 * len(records) // 4, {"file": name, "caption": "broken"})
    with open(os.path.join(folder, "captions.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _overrides(root: str) -> dict[str, object]:
    """The command-line overrides of configs/tiny.py:run that every run uses."""
    return {"stages": "diffusion", "vae_from": os.path.join(root, "vae"), "latents.dir": os.path.join(root, "latents"),
            "data.source": "folder", "data.name": "", "data.data_dir": os.path.join(root, "images"),
            "data.tokenizer": os.path.join(root, "tokenizer"),
            "diffusion.steps": STEPS, "diffusion.checkpoint_every": EVERY, "diffusion.keep": 5,
            "diffusion.nan_policy": "skip", "diffusion.sample_every": -1}


def _config(root: str):
    """configs/tiny.py:run with `_overrides`, as the command line sets them."""
    config = tiny.get_config("run")
    for key, value in _overrides(root).items():
        *parents, leaf = key.split(".")
        section = config
        for parent in parents:
            section = section[parent]
        section[leaf] = value
    return config


def _vae_pipeline(folder: str) -> None:
    """A diffusers pipeline folder of the tiny models for ``vae_from``: a random VAE (only it is read) and zero
    U-Net and text encoder params (zeros cost no compile)."""
    configs = {name: dict(value) for name, value in tiny.get_config().items() if name != "image_size"}
    modules = build_modules(configs)
    params = {name: jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                                 flax.linen.meta.unbox(abstract_params(modules[name], name, configs[name])))
              for name in ("unet", "text_encoder")}
    params["vae"] = jax.jit(modules["vae"].init)(jax.random.key(0), *init_inputs("vae", configs["vae"]))["params"]
    Pipeline(**modules, params=params, configs=configs).save_pretrained(folder)


def _poison(cache: str, step: int) -> None:
    """Set the cached mean of the first example of ``step``'s batch (1-based) to NaN."""
    index = next(latents.LatentIterator(cache, "train", BATCH, seed=0, start_step=step - 1))["index"][0]
    for stem, _ in latents.read_manifest(cache)["splits"]["train"]["shards"]:
        rows = np.flatnonzero(np.load(os.path.join(cache, f"{stem}.index.npy")) == index)
        if len(rows):
            mean = np.load(os.path.join(cache, f"{stem}.mean.npy"))
            mean[rows[0]] = np.nan
            np.save(os.path.join(cache, f"{stem}.mean.npy"), mean)
            return
    raise AssertionError(f"example {index} not in {cache}")


class Runner:
    """Starts ``ldm_jax.train`` processes (one CPU device, as fast compiles as the tests) and keeps their logs."""

    def __init__(self, root: str):
        self.root = root
        self.env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
                    "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}

    def start(self, name: str, workdir: str, *extra: str, kill_at_commit: bool = False) -> subprocess.Popen:
        """Start run ``name`` (its stderr goes to ROOT/name.log)."""
        args = ["--config", os.path.join(ROOT, "configs", "tiny.py") + ":run", "--workdir", workdir,
                *(f"--config.{key}={value}" for key, value in _overrides(self.root).items()), *extra]
        program = ["-c", KILL_AT_COMMIT] if kill_at_commit else ["-m", "ldm_jax.train"]
        with open(os.path.join(self.root, f"{name}.log"), "w") as log:
            return subprocess.Popen([sys.executable, *program, *args], env=self.env, stdout=log, stderr=log, cwd=ROOT)

    def finish(self, name: str, process: subprocess.Popen) -> tuple[int, str]:
        """Wait for ``process``; its exit status and log."""
        code = process.wait(timeout=TIMEOUT)
        with open(os.path.join(self.root, f"{name}.log")) as f:
            return code, f.read()

    def run(self, name: str, workdir: str, *extra: str, **kwargs) -> tuple[int, str]:
        """Start run ``name`` and wait for it."""
        return self.finish(name, self.start(name, workdir, *extra, **kwargs))


def _wait_for_logged_step(workdir: str, process: subprocess.Popen, step: int = 1) -> None:
    """Block until ``workdir``'s metrics.jsonl has training step ``step``; AssertionError if the process ends
    first or it is not logged within TIMEOUT seconds (a signal sent then would test something else)."""
    deadline = time.time() + TIMEOUT
    while process.poll() is None and time.time() < deadline:
        if any("train/loss" in r and r["step"] >= step for r in _records(workdir)):
            return
        time.sleep(0.05)
    raise AssertionError(f"training step {step} not logged in {workdir} within {TIMEOUT} s "
                         f"(exit status {process.poll()})")


def _complete_steps(workdir: str) -> list[int]:
    """The complete checkpoint steps of ``workdir`` ([] when there is none)."""
    try:
        return checkpoints.available_steps(workdir)
    except FileNotFoundError:
        return []


def _records(workdir: str) -> list[dict]:
    """metrics.jsonl records, tolerating a line being written right now."""
    try:
        return read_metrics(workdir)
    except ValueError:
        return []


def _interrupted_lane(runner: Runner, out: dict) -> None:
    workdir = os.path.join(runner.root, "interrupted")
    first = runner.start("sigterm", workdir)
    _wait_for_logged_step(workdir, first)
    first.send_signal(signal.SIGTERM)
    out["sigterm"] = runner.finish("sigterm", first)
    out["after_sigterm"] = checkpoints.available_steps(workdir)
    out["rows_after_sigterm"] = [r["step"] for r in read_metrics(workdir) if "train/loss" in r]
    out["killed"] = runner.run("killed", workdir, kill_at_commit=True)
    folder = checkpoints.checkpoint_dir(workdir)
    out["listing_after_kill"] = sorted(os.listdir(folder))
    out["markers_after_kill"] = sorted(name for name in out["listing_after_kill"]
                                       if os.path.exists(os.path.join(folder, name, "commit_success.txt")))
    out["rows_after_kill"] = [r["step"] for r in read_metrics(workdir) if "train/loss" in r]
    out["resumed"] = runner.run("resumed", workdir)


def _sigkill_lane(runner: Runner, out: dict) -> None:
    workdir = os.path.join(runner.root, "sigkilled")
    first = runner.start("sigkill", workdir)
    _wait_for_logged_step(workdir, first, EVERY)  # past the first checkpoint (unless its save is still running)
    first.kill()  # SIGKILL from outside, wherever the trainer is: in a step, a save, a metrics write
    out["sigkill"] = runner.finish("sigkill", first)
    out["after_sigkill"] = _complete_steps(workdir)
    out["sigkill_resumed"] = runner.run("sigkill_resumed", workdir)


def _reference_lane(runner: Runner, out: dict) -> None:
    out["reference"] = runner.run("reference", os.path.join(runner.root, "reference"))
    nan_run = os.path.join(runner.root, "nan_stop")
    out["nan_stop"] = runner.run("nan_stop", nan_run, "--config.diffusion.nan_policy=stop")
    out["after_nan_stop"] = checkpoints.available_steps(nan_run)
    _sigkill_lane(runner, out)  # in this thread: two lanes of runs at a time are enough for the CPUs


def _in_thread(lane, runner: Runner, out: dict) -> threading.Thread:
    def target():
        try:
            lane(runner, out)
        except BaseException as error:  # re-raised by the fixture
            out.setdefault("errors", []).append(error)
    thread = threading.Thread(target=target)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Both lanes, run to the end: {'root', name: (exit status, log) per run, plus what was on disk between}."""
    root = str(tmp_path_factory.mktemp("faults"))
    _write_images(os.path.join(root, "images", "train"))
    shapes.write_tokenizer(os.path.join(root, "tokenizer"), model_max_length=16)
    _vae_pipeline(os.path.join(root, "vae"))
    ensure_latents(_config(root), os.path.join(root, "unused"))
    _poison(os.path.join(root, "latents"), NAN_STEP)
    runner, out = Runner(root), {"root": root}
    for thread in [_in_thread(_interrupted_lane, runner, out), _in_thread(_reference_lane, runner, out)]:
        thread.join()
    if out.get("errors"):
        raise out["errors"][0]
    return out


def _saved(workdir: str, step: int) -> dict:
    """Every array saved at ``step``: params (U-Net, text encoder, VAE, EMA) and state (step, optimizer state)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with checkpoints.checkpoint_manager(workdir, keep=None, create=False) as manager:
        metadata = manager.item_metadata(step)
        targets = {item: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                                      metadata[item].tree) for item in (checkpoints.PARAMS, checkpoints.STATE)}
        restored = manager.restore(step, args=ocp.args.Composite(**{
            item: ocp.args.PyTreeRestore(tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree))
            for item, tree in targets.items()}))
        return {item: restored[item] for item in targets}  # a dict: orbax's Composite is no pytree


def _assert_equal_trees(a, b) -> None:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)


def test_sigterm_saves_the_current_step_and_exits_zero(runs):
    code, log = runs["sigterm"]
    assert code == 0, log[-3000:]
    stopped = runs["after_sigterm"][-1]
    assert runs["after_sigterm"] == [*range(EVERY, stopped, EVERY), stopped]  # the step it stopped at is saved
    assert 1 <= stopped < STEPS and runs["rows_after_sigterm"][-1] == stopped
    assert "received SIGTERM" in log and f"stage 2: stopped at step {stopped} of {STEPS} on SIGTERM" in log


def test_restart_resumes_from_the_sigterm_checkpoint(runs):
    assert f"stage 2: resumed from step {runs['after_sigterm'][-1]} in" in runs["killed"][1]


def test_kill_during_a_save_leaves_an_unfinished_checkpoint_that_is_never_restored(runs):
    code, log = runs["killed"]
    complete = sorted({*runs["after_sigterm"], *range(EVERY, STEPS, EVERY)})  # the killed run's saves too
    assert code == -signal.SIGKILL, log[-3000:]
    unfinished = f"{STEPS}.orbax-checkpoint-tmp"
    assert runs["listing_after_kill"] == sorted([*map(str, complete), unfinished])
    assert runs["markers_after_kill"] == runs["listing_after_kill"]  # all whole but for orbax's rename
    # the last step's row is written while its save commits in the background: before or after the kill
    assert runs["rows_after_kill"] in (list(range(1, STEPS)), list(range(1, STEPS + 1)))
    resumed = runs["resumed"][1]
    assert f"ignoring unfinished checkpoint save(s) ['{unfinished}']" in resumed
    assert f"stage 2: resumed from step {complete[-1]} in" in resumed


def _rows(workdir: str) -> np.ndarray:
    """[steps, 1 + len(COMPARED)]: each logged training step and its COMPARED values."""
    return np.asarray([[r["step"], *(r[k] for k in COMPARED)] for r in read_metrics(workdir) if "train/loss" in r])


def _assert_same_as_the_reference(root: str, name: str) -> None:
    """Run ``name`` ended at STEPS with every saved array and logged value equal to the uninterrupted run's."""
    workdir, reference = os.path.join(root, name), os.path.join(root, "reference")
    steps = checkpoints.available_steps(workdir)
    assert steps[-1] == STEPS
    assert sorted(os.listdir(checkpoints.checkpoint_dir(workdir))) == sorted(map(str, steps))  # no unfinished save
    _assert_equal_trees(_saved(workdir, STEPS), _saved(reference, STEPS))
    rows = _rows(workdir)
    np.testing.assert_array_equal(rows[:, 0], np.arange(1, STEPS + 1))  # each step once: no stale rows left
    np.testing.assert_array_equal(rows, _rows(reference))  # losses, norms, lr, skip counts (NaN = NaN here)


def test_interrupted_run_equals_the_uninterrupted_one(runs):
    code, log = runs["resumed"]
    assert code == 0, log[-3000:]
    if len(os.sched_getaffinity(0)) >= 2:  # the step these runs take on one CPU device with cores to spare
        assert "stage 2: the U-Net runs on 2 slice(s) of each device's batch, as concurrent programs" in log
    _assert_same_as_the_reference(runs["root"], "interrupted")


def test_sigkill_at_any_step_then_the_same_command_equals_the_uninterrupted_run(runs):
    code, log = runs["sigkill"]
    assert code == -signal.SIGKILL, log[-3000:]
    assert not runs["after_sigkill"] or runs["after_sigkill"][-1] < STEPS  # killed before the end
    code, log = runs["sigkill_resumed"]
    assert code == 0, log[-3000:]
    if runs["after_sigkill"]:
        assert f"stage 2: resumed from step {runs['after_sigkill'][-1]} in" in log
    else:  # killed before the first checkpoint was complete: a fresh start
        assert "resumed from step" not in log
    _assert_same_as_the_reference(runs["root"], "sigkilled")


def test_broken_images_are_skipped_and_counted_in_the_metrics(runs):
    manifest = latents.read_manifest(os.path.join(runs["root"], "latents"))
    assert manifest["splits"]["train"]["count"] == IMAGES and manifest["skipped"]["train"] == 4
    for workdir in ("interrupted", "reference"):
        data_rows = [r for r in read_metrics(os.path.join(runs["root"], workdir)) if "data/skipped_images" in r]
        assert data_rows == [{"step": 0, "data/skipped_images": 4}]


def test_nan_policy_skip_skips_the_update_and_counts_it(runs):
    code, log = runs["reference"]
    assert code == 0, log[-3000:]
    reference = os.path.join(runs["root"], "reference")
    rows = [r for r in read_metrics(reference) if "train/loss" in r]
    assert [r["train/nonfinite_skips"] for r in rows] == [0.0] * (NAN_STEP - 1) + [1.0] * (STEPS - NAN_STEP + 1)
    assert [np.isfinite(r["train/loss"]) for r in rows] == [step != NAN_STEP for step in range(1, STEPS + 1)]
    assert f"skipped 1 non-finite update(s) since the last check, the first at step {NAN_STEP}" in log
    for step in checkpoints.available_steps(reference):  # the NaN never reached params, optimizer state or EMA
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(_saved(reference, step)))


def test_nan_policy_stop_names_the_step_and_keeps_the_last_good_checkpoint(runs):
    code, log = runs["nan_stop"]
    assert code != 0 and "NonFiniteError" in log
    assert f"stage 2: non-finite loss or gradient at step {NAN_STEP}" in log
    assert f"the latest checkpoint, step {LAST_GOOD}, is kept" in log
    assert runs["after_nan_stop"] == [LAST_GOOD]  # nothing saved at or after the bad step
    _assert_equal_trees(_saved(os.path.join(runs["root"], "nan_stop"), LAST_GOOD),
                        _saved(os.path.join(runs["root"], "reference"), LAST_GOOD))
