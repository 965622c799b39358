"""`python -m ldm_jax.compile_check`: the stage-2 step compiled on fake CPU devices from abstract arrays, with its
FLOPs and per-device memory; config errors named before compiling."""

import os
import re
import subprocess
import sys

import jax
import pytest

from configs import tiny
from ldm_jax.parallel import parse_mesh
from ldm_jax.pipeline import abstract_params
from ldm_jax.training import compile_cost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBERS = ("flops_per_device", "flops_all_devices", "argument_bytes_per_device", "output_bytes_per_device",
           "temp_bytes_per_device", "total_bytes_per_device")


# configs/tiny.py shrunk on the command line (one U-Net level, one text-encoder layer): shorter compiles, and it
# shows config overrides reaching the tool.
SMALLER = {("unet", "down_block_types"): ("CrossAttnDownBlock2D",), ("unet", "up_block_types"): ("CrossAttnUpBlock2D",),
           ("unet", "block_out_channels"): (32,), ("text_encoder", "num_hidden_layers"): 1}


def _smaller_unet_params() -> int:
    """The parameter count of configs/tiny.py's U-Net with the SMALLER overrides, from its abstract params."""
    config = tiny.get_config()
    for (section, key), value in SMALLER.items():
        config[section][key] = value
    unet = compile_cost.build_stage2(config, {}, 8, "float32").task.unet
    return sum(x.size for x in jax.tree.leaves(abstract_params(unet, "unet", config.unet.to_dict())))


def _start(mesh: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "XLA_FLAGS": ""}
    overrides = [f"--config.{section}.{key}={value!r}" for (section, key), value in SMALLER.items()]
    return subprocess.Popen([sys.executable, "-m", "ldm_jax.compile_check", "--config", "configs/tiny.py", *overrides,
                             "--mesh", mesh, "--devices", "8", "--batch", "8"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # two compiles in subprocesses: 35-65 s of wall time (CI time budget); run with -m slow
def test_compile_check_prints_costs_and_fsdp_shrinks_arguments():
    """Both meshes compile at once (2 processes); fsdp=8 holds about an eighth of the state per device."""
    shapes = {"data=8": "{'data': 8, 'fsdp': 1, 'tensor': 1}", "data=1,fsdp=8": "{'data': 1, 'fsdp': 8, 'tensor': 1}"}
    procs = {mesh: _start(mesh) for mesh in shapes}
    unet_params = _smaller_unet_params()
    printed = {}
    for mesh, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert f"mesh {shapes[mesh]} on 8 cpu devices, batch 8" in out
        assert f"params unet (trained): {unet_params:,}" in out  # the overrides reached the tool
        printed[mesh] = {key: float(re.search(rf"^{key} (\S+)", out, re.M).group(1)) for key in NUMBERS}
        assert all(value > 0 for value in printed[mesh].values()), out
        assert printed[mesh]["flops_all_devices"] == pytest.approx(8 * printed[mesh]["flops_per_device"], rel=1e-3)
    data, fsdp = printed["data=8"], printed["data=1,fsdp=8"]
    assert fsdp["argument_bytes_per_device"] < data["argument_bytes_per_device"] / 4


@pytest.mark.parametrize("mesh,batch,message", [
    (dict(data=3), 8, r"mesh sizes \{'data': 3, 'fsdp': 1, 'tensor': 1\} make 3 devices, but there are 8 devices"),
    (dict(data=8), 6, r"batch size 6 is not divisible by the data-parallel size 8"),
    (dict(data=1, tensor=8), 8, r"6 of the frozen parameters do not fit the mesh \{'data': 1, 'fsdp': 1, 'tensor': 8\}: "
     r".*fc1/bias \(60,\): dimension 0 \('mlp' -> mesh tensor=8\) has size 60, not divisible by 8"),
])
def test_configs_that_cannot_work_fail_before_compiling(mesh, batch, message, monkeypatch):
    config = tiny.get_config()
    config.text_encoder.intermediate_size = 60  # the frozen text encoder's MLP width: 60 does not split 8 ways
    monkeypatch.setattr(jax.stages.Lowered, "compile", lambda self: pytest.fail("compiled a config that cannot work"))
    with pytest.raises(ValueError, match=message):
        compile_cost.compile_train_step(config, mesh, batch)


def test_parse_mesh():
    assert parse_mesh("data=2, fsdp=4,tensor=1") == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="mesh item .fsdp:4. is not NAME=SIZE"):
        parse_mesh("data=2,fsdp:4")


def test_a_mesh_that_cannot_work_is_one_line_on_stderr():
    """The command reports the mesh error in one line and exits non-zero, without a traceback."""
    done = subprocess.run([sys.executable, "-m", "ldm_jax.compile_check", "--config", "configs/tiny.py", "--mesh",
                           "data=3", "--devices", "8"], cwd=ROOT, env={**os.environ, "XLA_FLAGS": ""},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert ("ldm_jax.compile_check: error: mesh sizes {'data': 3, 'fsdp': 1, 'tensor': 1} make 3 devices, but there "
            "are 8 devices") in done.stderr
