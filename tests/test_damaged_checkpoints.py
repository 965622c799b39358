"""Checkpoints damaged after they were committed: real orbax steps on disk, damaged as a full disk, a bad copy or a
storage fault leaves them, then read by the loader, the trainer's resume and the sampling commands.

Two steps of the tiny pipeline (different weights) are saved once; each test
copies them and damages step 2. The trainer's path through the real command
(stage 2 resuming from the intact step, equal to an uninterrupted run) is in
tests/test_fault_tolerance.py, which shares its runs.
"""

import logging
import os
import pathlib
import shutil
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

from configs import tiny
from ldm_jax.pipeline import Pipeline
from ldm_jax.training import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _chunk(step: pathlib.Path) -> pathlib.Path:
    """The largest data file of the step's params item (orbax's OCDBT chunks)."""
    return max((p for p in (step / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def _truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# What a full disk, a bad copy or a storage fault leaves in a committed step, and the file the error names.
DAMAGE = {
    "truncated chunk": (lambda step: _truncate(_chunk(step)), None),
    "deleted chunk": (lambda step: _chunk(step).unlink(), None),
    "empty chunk": (lambda step: _chunk(step).write_bytes(b""), "params/ocdbt.process_0/d/"),
    "missing _METADATA": (lambda step: (step / "params" / "_METADATA").unlink(), "params/_METADATA (missing)"),
    "empty _METADATA": (lambda step: (step / "params" / "_METADATA").write_bytes(b""), "params/_METADATA"),
    "empty config": (lambda step: (step / "config" / "metadata").write_bytes(b""), "config/metadata"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[str, dict[int, Pipeline]]:
    """A workdir with checkpoint steps 1 and 2 of the tiny pipeline (other weights at each), and the pipelines."""
    workdir = str(tmp_path_factory.mktemp("saved"))
    pipelines = {step: Pipeline.from_config(tiny.get_config(), jax.random.key(step)) for step in (1, 2)}
    for step, pipe in pipelines.items():
        checkpoints.save_pipeline(workdir, step, pipe, keep=None)
    return workdir, pipelines


def _damaged_copy(saved, tmp_path, kind: str) -> tuple[str, pathlib.Path, list[str]]:
    """A copy of the saved workdir with step 2 damaged as ``kind``: (workdir, step 2's folder, its files after)."""
    workdir = str(tmp_path / "run")
    shutil.copytree(saved[0], workdir)
    step = pathlib.Path(checkpoints.checkpoint_dir(workdir), "2")
    DAMAGE[kind][0](step)
    return workdir, step, _listing(step)


def _listing(folder: pathlib.Path) -> list[str]:
    """Every file under ``folder`` with its size."""
    return sorted(f"{p.relative_to(folder)}:{p.stat().st_size}" for p in folder.rglob("*") if p.is_file())


def _assert_equal_trees(a, b) -> None:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", DAMAGE)
def test_load_pipeline_names_the_damaged_step_and_the_other_steps(saved, tmp_path, kind):
    workdir, step, files = _damaged_copy(saved, tmp_path, kind)
    with pytest.raises(FileNotFoundError, match=r"checkpoint step 2 in .*checkpoints/2 is damaged \(.+\).*"
                                                r"the other saved steps are 1 \(.*--step N") as error:
        checkpoints.load_pipeline(workdir)
    if DAMAGE[kind][1]:
        assert f"suspect file(s): {DAMAGE[kind][1]}" in str(error.value)
    assert _listing(step) == files  # the loader moves nothing
    _assert_equal_trees(checkpoints.load_pipeline(workdir, 1).params, saved[1][1].params)  # step=N still loads


def _resume(workdir: str, pipe: Pipeline) -> tuple[int, dict]:
    """``restore_latest_intact`` of ``workdir`` restoring the U-Net params (of ``pipe``'s shapes) and config."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = {"unet": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                     flax.linen.meta.unbox(pipe.params["unet"]))}
    with checkpoints.checkpoint_manager(workdir, keep=None, create=False) as manager:
        return checkpoints.restore_latest_intact(manager, "stage 2", lambda step: (
            checkpoints.read_config(manager, step),
            checkpoints.restore_params(manager, step, abstract, checkpoints.params_metadata(manager, step))))


@pytest.mark.parametrize("kind", DAMAGE)
def test_resume_moves_a_damaged_step_aside_and_restores_the_intact_one(saved, tmp_path, kind, caplog):
    workdir, step, files = _damaged_copy(saved, tmp_path, kind)
    caplog.set_level(logging.ERROR)
    start, restored = _resume(workdir, saved[1][1])
    assert start == 1
    _assert_equal_trees(restored[1]["unet"], saved[1][1].params["unet"])
    aside = step.with_name("2.damaged")
    assert not step.exists() and _listing(aside) == files  # renamed as it was: nothing deleted
    assert checkpoints.available_steps(workdir) == [1]
    assert f"stage 2: checkpoint step 2 in {step} is damaged" in caplog.text
    assert f"stage 2: moved checkpoint step 2 aside to {aside}; trying the step before it" in caplog.text


def test_a_step_damaged_again_is_moved_aside_beside_the_first(saved, tmp_path):
    workdir, step, files = _damaged_copy(saved, tmp_path, "truncated chunk")
    earlier = step.with_name("2.damaged")
    shutil.copytree(step, earlier)
    assert _resume(workdir, saved[1][1])[0] == 1
    assert _listing(step.with_name("2.damaged-2")) == files and _listing(earlier) == files


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` in a subprocess."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)


@pytest.mark.parametrize("module", ["ldm_jax.sample", "ldm_jax.evaluate"])
def test_commands_name_the_damaged_step_and_the_steps_to_pass(saved, tmp_path, module):
    workdir, step, files = _damaged_copy(saved, tmp_path, "truncated chunk")
    extra = ["--prompt", "a red circle", "--out", str(tmp_path / "grid.png")] if module.endswith("sample") else []
    result = _cli(module, "--checkpoint", workdir, *extra)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"{module}: error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"{module}: error: checkpoint step 2 in {step} is damaged (") \
        and "the other saved steps are 1 (" in errors[0] and "--step N" in errors[0], result.stderr[-3000:]
    # no traceback through ldm_jax (TensorStore's threads may still print orbax's abandoned reads)
    assert f'File "{os.path.join(ROOT, "ldm_jax")}' not in result.stderr, result.stderr[-3000:]
    assert _listing(step) == files


def test_a_truncated_safetensors_file_is_named(saved, tmp_path):
    folder = tmp_path / "pipeline"
    saved[1][1].save_pretrained(str(folder))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    _truncate(weights)
    with pytest.raises(ValueError, match=f"{weights} is not a readable safetensors file"):
        Pipeline.from_pretrained(str(folder))
