"""Fault tolerance of the training commands: real processes, real signals, real orbax checkpoints on disk.

One module fixture runs every process once; each test checks one outcome.
Every fault is injected at a deterministic point by the process itself
(tests/fault_injector.py: once step k's metrics row is written, at orbax's
rename that commits a step, once latent-cache shard k is written), never by
racing a poll. The data: an image folder (64 readable images in every colour
mode plus 4 broken files, and a small test split) whose latent cache, built by
``python -m ldm_jax.encode_latents``, has one NaN example, met at step 5. One
CPU device (on 2 or more cores the stage-2 step runs as concurrent slice
programs). Two lanes of runs go side by side:

    stage 2 (8 steps, checkpoints every 3, nan_policy='skip'): uninterrupted (the reference), then in another
        workdir SIGTERM once step 2 is logged (stops and saves at step 4)  ->  restart, SIGKILLed once step 6 is
        logged  ->  restart, SIGKILLed while committing the checkpoint of step 8  ->  the latest complete
        checkpoint (step 6) damaged  ->  restart to the end (from step 4)
    stage 1 (4 steps, checkpoints every 2): uninterrupted, then in another workdir SIGTERM once step 2 is logged
        (stops and saves at step 3)  ->  restart, SIGKILLed while committing step 4  ->  step 3's _METADATA
        deleted  ->  restart to the end (from step 2); then the latent cache SIGKILLed once its second shard is
        written  ->  the same command again; then stage 2 with nan_policy='stop'

Interrupted runs end bit-identical to their uninterrupted references: every
saved array (params, EMA, optimizer state) and every logged value.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import tiny
from ldm_jax.data import latents, shapes
from ldm_jax.pipeline import Pipeline, abstract_params, build_modules, init_inputs
from ldm_jax.training import checkpoints, damage
from ldm_jax.training.autoencoder.state import stage_dir
from ldm_jax.training.latent_cache import ensure_latents
from ldm_jax.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INJECTOR = os.path.join(ROOT, "tests", "fault_injector.py")
STEPS, EVERY, BATCH, IMAGES, TEST_IMAGES = 8, 3, 8, 64, 16  # 64 images: one epoch, so each example is met once
NAN_STEP, LAST_GOOD = 5, 3  # the NaN example is in the batch of step 5; the checkpoint before it is step 3
SIGTERM_ROW, SIGTERMED = 2, 4  # SIGTERM once row 2 is written (during step 3: rows are one step late): stops at 4
KILL_ROW = 6  # SIGKILL once row 6 is written, during step 7, past the complete checkpoint of step 6
DAMAGED_STEP = 6  # the latest complete checkpoint once the save of step 8 is killed: damaged before the restart
AE_STEPS, AE_EVERY, AE_SIGTERMED = 4, 2, 3  # stage 1 writes rows at once: SIGTERM at row 2 stops at step 3
SHARD_SIZE, KILL_SHARD = 16, 2  # the cache: 4 shards; the build is killed once the second is written
BROKEN = {"corrupt.png": b"\x89PNG\r\n\x1a\n not a png", "empty.png": b""}
COMPARED = ("train/loss", "train/mse", "train/grad_norm", "train/lr", "train/weight", "train/nonfinite_skips")
RATES = ("train/steps_per_sec", "train/images_per_sec")  # wall-clock rates: the only values that may differ
TIMEOUT = 900


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
    _write_captions(folder, records)


def _write_test_images(folder: str) -> None:
    """TEST_IMAGES test-split shapes images, for stage 1's evaluation."""
    os.makedirs(folder)
    for i in range(TEST_IMAGES):
        example = shapes.example("test", i)
        Image.fromarray(example["image"]).save(os.path.join(folder, f"{i:03d}.png"))
    _write_captions(folder, [{"file": f"{i:03d}.png", "caption": shapes.example("test", i)["caption"]}
                             for i in range(TEST_IMAGES)])


def _write_captions(folder: str, records: list[dict]) -> None:
    with open(os.path.join(folder, "captions.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _overrides(root: str, stage: str) -> dict[str, object]:
    """The command-line overrides of configs/tiny.py:run for ``stage`` ('diffusion', 'autoencoder', 'latents')."""
    data = {"data.source": "folder", "data.name": "", "data.data_dir": os.path.join(root, "images"),
            "data.tokenizer": os.path.join(root, "tokenizer")}
    if stage == "autoencoder":
        return {"stages": stage, **data, "autoencoder.steps": AE_STEPS, "autoencoder.checkpoint_every": AE_EVERY,
                "autoencoder.keep": 5}
    return {"stages": stage, "vae_from": os.path.join(root, "vae"), "latents.dir": os.path.join(root, "latents"),
            "latents.shard_size": SHARD_SIZE, **data,
            "diffusion.steps": STEPS, "diffusion.checkpoint_every": EVERY, "diffusion.keep": 5,
            "diffusion.nan_policy": "skip", "diffusion.sample_every": -1}


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


def _cache_arrays(cache: str) -> dict[str, np.ndarray]:
    """Every array of a latent cache's train split, by file name."""
    return {path.name: np.load(path) for path in sorted(pathlib.Path(cache, "train").glob("*.npy"))}


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


def _truncate_largest_chunk(step: pathlib.Path) -> None:
    """Truncate the largest data file of a checkpoint step's params item to half its size (a bad copy)."""
    chunk = max((p for p in (step / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
                key=lambda p: p.stat().st_size)
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])


# The commands the tests start: one CPU device and fast compiles. They compile the same tiny programs, so every
# compile goes to the run's compilation cache (tests/conftest.py), not only slow ones: a warm cache takes a
# run of configs/tiny.py:run from 74.9 s to 39.5 s.
COMMAND_ENV = {"XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
               "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


class Runner:
    """Starts ldm_jax commands (`COMMAND_ENV`) and keeps their logs."""

    def __init__(self, root: str):
        self.root = root
        self.env = {**os.environ, **COMMAND_ENV}

    def run(self, name: str, stage: str, workdir: str, *extra: str, fault: tuple[str, int] | None = None,
            module: str = "ldm_jax.train") -> tuple[int, str]:
        """Run ``module`` on ``stage`` of configs/tiny.py:run in ``workdir``, interrupted by ``fault`` (FAULT, AT
        of tests/fault_injector.py) if given; its exit status and log (also in ROOT/name.log)."""
        args = ["--config", os.path.join(ROOT, "configs", "tiny.py") + ":run", "--workdir", workdir,
                *(f"--config.{key}={value}" for key, value in _overrides(self.root, stage).items()), *extra]
        program = [INJECTOR, fault[0], str(fault[1]), module] if fault else ["-m", module]
        path = os.path.join(self.root, f"{name}.log")
        with open(path, "w") as log:
            code = subprocess.run([sys.executable, *program, *args], env=self.env, stdout=log, stderr=log, cwd=ROOT,
                                  timeout=TIMEOUT).returncode
        return code, pathlib.Path(path).read_text()


def _rows(folder: str) -> list[int]:
    """The steps of ``folder``'s logged training rows."""
    return [r["step"] for r in read_metrics(folder) if "train/steps_per_sec" in r]


def _listing(folder: str) -> list[str]:
    """The names in a checkpoint directory."""
    return sorted(os.listdir(folder))


def _stage2_lane(runner: Runner, out: dict) -> None:
    out["reference"] = runner.run("reference", "diffusion", os.path.join(runner.root, "reference"))
    workdir = os.path.join(runner.root, "interrupted")
    folder = checkpoints.checkpoint_dir(workdir)
    out["sigterm"] = runner.run("sigterm", "diffusion", workdir, fault=("sigterm", SIGTERM_ROW))
    out["after_sigterm"], out["rows_after_sigterm"] = checkpoints.available_steps(workdir), _rows(workdir)
    out["sigkill"] = runner.run("sigkill", "diffusion", workdir, fault=("sigkill", KILL_ROW))
    out["after_sigkill"], out["rows_after_sigkill"] = _listing(folder), _rows(workdir)
    out["killed"] = runner.run("killed", "diffusion", workdir, fault=("commit", STEPS))
    out["listing_after_kill"] = _listing(folder)
    out["markers_after_kill"] = sorted(name for name in out["listing_after_kill"]
                                       if os.path.exists(os.path.join(folder, name, "commit_success.txt")))
    out["rows_after_kill"] = _rows(workdir)
    _truncate_largest_chunk(pathlib.Path(folder, str(DAMAGED_STEP)))
    out["resumed"] = runner.run("resumed", "diffusion", workdir)


def _stage1_and_cache_lane(runner: Runner, out: dict) -> None:
    # stage 1 first: each lane compiles its own stage's step while the other lane compiles the other one
    out["ae_reference"] = runner.run("ae_reference", "autoencoder", os.path.join(runner.root, "ae_reference"))
    workdir = os.path.join(runner.root, "stage1")
    folder = checkpoints.checkpoint_dir(stage_dir(workdir))
    out["ae_sigterm"] = runner.run("ae_sigterm", "autoencoder", workdir, fault=("sigterm", SIGTERM_ROW))
    out["ae_after_sigterm"] = checkpoints.available_steps(stage_dir(workdir))
    out["ae_killed"] = runner.run("ae_killed", "autoencoder", workdir, fault=("commit", AE_STEPS))
    out["ae_listing_after_kill"] = _listing(folder)
    os.remove(os.path.join(folder, str(AE_SIGTERMED), "params", "_METADATA"))
    out["ae_resumed"] = runner.run("ae_resumed", "autoencoder", workdir)
    cache = os.path.join(runner.root, "latents_killed")
    out["cache_killed"] = runner.run("cache_killed", "latents", runner.root, f"--config.latents.dir={cache}",
                                     fault=("shard", KILL_SHARD), module="ldm_jax.encode_latents")
    out["cache_after_kill"] = sorted(os.listdir(os.path.join(cache, "train")))
    out["manifest_after_kill"] = os.path.exists(os.path.join(cache, latents.MANIFEST))
    out["cache_rebuilt"] = runner.run("cache_rebuilt", "latents", runner.root, f"--config.latents.dir={cache}",
                                      module="ldm_jax.encode_latents")
    nan_run = os.path.join(runner.root, "nan_stop")
    out["nan_stop"] = runner.run("nan_stop", "diffusion", nan_run, "--config.diffusion.nan_policy=stop")
    out["after_nan_stop"] = checkpoints.available_steps(nan_run)


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
    """Every run, to the end: {'root', name: (exit status, log) per run, plus what was on disk between}."""
    root = str(tmp_path_factory.mktemp("faults"))
    _write_images(os.path.join(root, "images", "train"))
    _write_test_images(os.path.join(root, "images", "test"))
    shapes.write_tokenizer(os.path.join(root, "tokenizer"), model_max_length=16)
    _vae_pipeline(os.path.join(root, "vae"))
    runner, out = Runner(root), {"root": root}
    out["cache"] = runner.run("cache", "latents", root, module="ldm_jax.encode_latents")
    assert out["cache"][0] == 0, out["cache"][1][-3000:]
    out["cache_arrays"] = _cache_arrays(os.path.join(root, "latents"))
    _poison(os.path.join(root, "latents"), NAN_STEP)
    for thread in [_in_thread(_stage2_lane, runner, out), _in_thread(_stage1_and_cache_lane, runner, out)]:
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


def _logged(folder: str) -> list[dict]:
    """Every metrics record of ``folder`` but the wall-clock rates."""
    return [{k: v for k, v in r.items() if k not in RATES} for r in read_metrics(folder)]


def _assert_same_as_the_reference(workdir: str, reference: str, steps: int) -> None:
    """``workdir`` (a stage's folder) ended at ``steps`` with every saved array and logged value equal to the
    uninterrupted ``reference``'s."""
    saved = checkpoints.available_steps(workdir)
    assert saved[-1] == steps
    listing = [name for name in _listing(checkpoints.checkpoint_dir(workdir)) if damage.DAMAGED not in name]
    assert listing == sorted(map(str, saved))  # no unfinished save
    _assert_equal_trees(_saved(workdir, steps), _saved(reference, steps))
    assert _rows(workdir) == list(range(1, steps + 1))  # each step once: no stale rows left
    np.testing.assert_equal(_logged(workdir), _logged(reference))  # losses, norms, lr, skip counts (NaN = NaN here)


def test_sigterm_saves_the_current_step_and_exits_zero(runs):
    code, log = runs["sigterm"]
    assert code == 0, log[-3000:]
    assert runs["after_sigterm"] == [EVERY, SIGTERMED]  # the step it stopped at is saved
    assert runs["rows_after_sigterm"] == list(range(1, SIGTERMED + 1))
    assert "received SIGTERM" in log and f"stage 2: stopped at step {SIGTERMED} of {STEPS} on SIGTERM" in log


def test_sigkill_mid_run_leaves_the_checkpoints_before_it(runs):
    code, log = runs["sigkill"]
    assert code == -signal.SIGKILL, log[-3000:]
    assert f"stage 2: resumed from step {SIGTERMED} in" in log
    assert runs["after_sigkill"] == ["3", "4", "6"]  # killed during step 7
    assert runs["rows_after_sigkill"] == list(range(1, KILL_ROW + 1))


def test_kill_during_a_save_leaves_an_unfinished_checkpoint_that_is_never_restored(runs):
    code, log = runs["killed"]
    assert code == -signal.SIGKILL, log[-3000:]
    assert f"stage 2: resumed from step {KILL_ROW} in" in log
    unfinished = f"{STEPS}.orbax-checkpoint-tmp"
    assert runs["listing_after_kill"] == ["3", "4", "6", unfinished]
    assert runs["markers_after_kill"] == runs["listing_after_kill"]  # all whole but for orbax's rename
    # the last step's row is written while its save commits in the background: before or after the kill
    assert runs["rows_after_kill"] in (list(range(1, STEPS)), list(range(1, STEPS + 1)))
    assert f"ignoring unfinished checkpoint save(s) ['{unfinished}']" in runs["resumed"][1]


def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(runs):
    code, log = runs["resumed"]
    assert code == 0, log[-3000:]
    step = os.path.join(checkpoints.checkpoint_dir(os.path.join(runs["root"], "interrupted")), str(DAMAGED_STEP))
    assert f"stage 2: checkpoint step {DAMAGED_STEP} in {step} is damaged (" in log
    assert f"stage 2: moved checkpoint step {DAMAGED_STEP} aside to {step}.damaged; trying the step before" in log
    assert f"stage 2: resumed from step {SIGTERMED} in" in log
    assert os.path.isdir(f"{step}.damaged")  # kept, never deleted


def test_interrupted_run_equals_the_uninterrupted_one(runs):
    code, log = runs["resumed"]
    assert code == 0, log[-3000:]
    if len(os.sched_getaffinity(0)) >= 2:  # the step these runs take on one CPU device with cores to spare
        assert "stage 2: the U-Net runs on 2 slice(s) of each device's batch, as concurrent programs" in log
    _assert_same_as_the_reference(os.path.join(runs["root"], "interrupted"),
                                  os.path.join(runs["root"], "reference"), STEPS)


def test_stage1_sigterm_sigkill_mid_save_and_damage_then_equals_the_uninterrupted_run(runs):
    code, log = runs["ae_sigterm"]
    assert code == 0 and f"stage 1: stopped at step {AE_SIGTERMED} of {AE_STEPS} on SIGTERM" in log, log[-3000:]
    assert runs["ae_after_sigterm"] == [AE_EVERY, AE_SIGTERMED]
    code, log = runs["ae_killed"]
    assert code == -signal.SIGKILL and f"stage 1: resumed from step {AE_SIGTERMED} in" in log, log[-3000:]
    assert runs["ae_listing_after_kill"] == ["2", "3", f"{AE_STEPS}.orbax-checkpoint-tmp"]
    code, log = runs["ae_resumed"]
    assert code == 0, log[-3000:]
    assert f"stage 1: checkpoint step {AE_SIGTERMED} in " in log and "params/_METADATA (missing)" in log
    assert f"stage 1: resumed from step {AE_EVERY} in" in log
    _assert_same_as_the_reference(stage_dir(os.path.join(runs["root"], "stage1")),
                                  stage_dir(os.path.join(runs["root"], "ae_reference")), AE_STEPS)


def test_a_killed_latent_cache_build_is_rebuilt_equal_to_an_uninterrupted_one(runs):
    code, log = runs["cache_killed"]
    assert code == -signal.SIGKILL, log[-3000:]
    assert not runs["manifest_after_kill"]  # an interrupted build: no manifest, so it is rebuilt
    assert runs["cache_after_kill"] == sorted(f"00000-{shard:05d}.{field}.npy" for shard in range(KILL_SHARD)
                                              for field in (*latents.FIELDS, "input_ids"))
    code, log = runs["cache_rebuilt"]
    assert code == 0, log[-3000:]
    cache, reference = (os.path.join(runs["root"], name) for name in ("latents_killed", "latents"))
    rebuilt = _cache_arrays(cache)
    assert sorted(rebuilt) == sorted(runs["cache_arrays"]) and len(rebuilt) == 4 * (len(latents.FIELDS) + 1)
    for name, array in runs["cache_arrays"].items():
        np.testing.assert_array_equal(rebuilt[name], array)
    assert latents.read_manifest(cache) == latents.read_manifest(reference)


def _config(root: str, **changes):
    """configs/tiny.py:run with stage 2's `_overrides` and ``changes``, as the command line sets them."""
    config = tiny.get_config("run")
    for key, value in {**_overrides(root, "diffusion"), **changes}.items():
        *parents, leaf = key.split(".")
        section = config
        for parent in parents:
            section = section[parent]
        section[leaf] = value
    return config


def test_a_damaged_latent_cache_shard_is_named(runs, tmp_path):
    cache = str(tmp_path / "latents")
    shutil.copytree(os.path.join(runs["root"], "latents"), cache)
    shard = os.path.join(cache, "train", "00000-00001.logvar.npy")
    pathlib.Path(shard).write_bytes(pathlib.Path(shard).read_bytes()[:1000])
    with pytest.raises(latents.CacheDamagedError, match=f"latent cache file {shard} is damaged .* to rebuild"):
        ensure_latents(_config(runs["root"], **{"latents.dir": cache}), str(tmp_path))  # what train calls first
    assert latents.read_manifest(cache) is not None  # refused, not rebuilt: the manifest says it is complete
    with pytest.raises(latents.CacheDamagedError, match=f"latent cache file {shard} is damaged .* to rebuild"):
        latents.LatentIterator(cache, "train", BATCH, seed=0)
    os.remove(shard)
    with pytest.raises(latents.CacheDamagedError, match=f"latent cache file {shard} is damaged"):
        latents.LatentIterator(cache, "train", BATCH, seed=0)


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
