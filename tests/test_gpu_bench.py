"""bench/gpu_bench.py end to end at the tiny config on the CPU: both frameworks' workers run every part and the
JSON record and the table hold their numbers; the GPU tools beside it (state layouts, step profile) run too."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("train", "sample_latency", "sample_throughput")


@pytest.mark.slow
def test_tiny_run_records_every_part_of_both_frameworks(tmp_path):
    out = tmp_path / "tiny.json"
    # One torch thread: on a loaded CPU torch's OpenMP threads wait on each other (minutes per tiny step).
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "bench.gpu_bench", "--config", "tiny", "--out", str(out),
                             "--budget-s", "1200"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    ours, theirs = record["ldm_jax"], record["diffusers"]
    for side in (ours, theirs):
        assert "worker_exit" not in side
        for part in PARTS:
            assert "error" not in side[part] and "skipped" not in side[part], (side["framework"], side[part])

    train = ours["train"]
    assert train["batch"] == 2 and train["latent_shape"] == [8, 8, 4]
    assert train["compile_s"] > 0 and train["step_s"] > 0 and train["model_flops_per_step"] > 1e6
    assert train["achieved_flops_per_s"] == pytest.approx(train["model_flops_per_step"] / train["step_s"])
    assert train["peak_flops"] is None and train["mfu"] is None  # a CPU's peak is unknown
    assert train["xla_memory_bytes"] > 0 and ours["device_kind"] == "cpu" and ours["attention_impl"] == "auto"
    assert train["batch_slices"] == 1 and train["programs"] == ["train_step"]  # conftest.py's 8 fake CPU devices
    assert theirs["train"]["batch"] == 2 and theirs["train"]["step_s"] > 0
    for part, batch in (("sample_latency", 1), ("sample_throughput", 8)):
        for side in (ours, theirs):
            assert side[part]["batch"] == batch and side[part]["steps"] == 50 and side[part]["guidance"] == 7.5
            assert side[part]["seconds"] > 0 and side[part]["images_per_s"] == pytest.approx(batch / side[part]["seconds"])
        assert ours[part]["compile_s"] > 0

    speedup = record["speedup"]
    assert speedup["train"] == pytest.approx(train["images_per_s"] / theirs["train"]["images_per_s"])
    assert speedup["sample_latency"] == pytest.approx(theirs["sample_latency"]["seconds"] /
                                                      ours["sample_latency"]["seconds"])
    assert speedup["sample_throughput"] == pytest.approx(ours["sample_throughput"]["images_per_s"] /
                                                         theirs["sample_throughput"]["images_per_s"])
    assert f"{train['step_s']:.4f}" in result.stdout and "sample 1 image s" in result.stdout


@pytest.mark.slow
def test_state_layout_bench_and_step_profile_run_at_tiny(tmp_path):
    """The two single-framework GPU tools end to end on the CPU: both state layouts step to the same loss (a
    CPU keeps row-major layouts), and the profile accounts the step's kernels by kind."""
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    layouts = tmp_path / "layouts.json"
    result = subprocess.run([sys.executable, "-m", "bench.state_layout_bench", "--config", "tiny", "--out",
                             str(layouts), "--rounds", "2", "--steps-per-round", "2"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(layouts.read_text())
    assert record["default"]["first_loss"] == record["auto"]["first_loss"]
    assert record["first_step_params_max_abs_diff"] == 0.0 and record["auto_non_row_major_arrays"] == 0
    assert record["auto_checkpoint_reads_back"] is True
    assert record["speedup_auto_over_default"] == pytest.approx(record["default"]["step_s"] / record["auto"]["step_s"])

    profile = tmp_path / "profile.json"
    result = subprocess.run([sys.executable, "-m", "bench.step_profile", "--config", "tiny", "--out", str(profile),
                             "--top", "10"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(profile.read_text())
    assert record["state_layout"] == "auto" and len(record["top_kernels"]) == 10
    assert record["compute_dtype"] == "float32" and 0 <= record["idle_ms"] < record["step_ms"]
    assert record["kind_ms"]["convolution"] > 0 and record["kind_ms"]["matmul"] > 0
    assert sum(record["kind_ms"].values()) == pytest.approx(record["kernel_ms"])
    assert record["batch_slices"] == 1 and record["programs"] == ["train_step"]  # conftest.py's 8 fake CPU devices

    # On one CPU device the trainer's step is its concurrent slice programs: each kernel read from its program.
    result = subprocess.run([sys.executable, "-m", "bench.step_profile", "--config", "tiny", "--out", str(profile),
                             "--top", "200"], cwd=REPO, env={**env, "XLA_FLAGS": ""}, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(profile.read_text())
    assert record["batch_slices"] == 2 and record["programs"] == ["prepare", "slice_gradients", "update"]
    slice_kernels = [k for k in record["top_kernels"] if k["program"] == "jit__slice_gradients"]
    assert {k["kind"] for k in slice_kernels} >= {"convolution", "matmul"}
    assert all(k["launches"] == 2 for k in slice_kernels)  # one call per slice, every step
    assert {k["program"] for k in record["top_kernels"]} >= {"jit__slice_gradients", "jit__update"}
