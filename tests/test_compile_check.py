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
from ldm_jax.training import compile_cost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBERS = ("flops_per_device", "flops_all_devices", "argument_bytes_per_device", "output_bytes_per_device",
           "temp_bytes_per_device", "total_bytes_per_device")


def _start(mesh: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "XLA_FLAGS": ""}
    return subprocess.Popen([sys.executable, "-m", "ldm_jax.compile_check", "--config", "configs/tiny.py",
                             "--mesh", mesh, "--devices", "8", "--batch", "8"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_compile_check_prints_costs_and_fsdp_shrinks_arguments():
    """Both meshes compile at once (2 processes); fsdp=8 holds about an eighth of the state per device."""
    procs = {mesh: _start(mesh) for mesh in ("data=8", "data=1,fsdp=8")}
    printed = {}
    for mesh, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1} on 8 cpu devices" in out or mesh != "data=8"
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
