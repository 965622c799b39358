"""ldm_jax.host_memory: when the entry points restart with glibc's huge-page tunable, and what it does to XLA:CPU."""

import os
import subprocess
import sys

import pytest

from ldm_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = (2, 36)


def test_restarts_with_the_tunable_where_it_applies():
    env = host_memory.huge_page_environment({"PATH": "/bin"}, GLIBC, "madvise")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "LDM_JAX_HUGE_PAGES": "applied"}


def test_keeps_the_users_other_tunables():
    env = host_memory.huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ, glibc, mode", [
    ({"LDM_JAX_HUGE_PAGES": "0"}, GLIBC, "madvise"),  # turned off
    ({"LDM_JAX_HUGE_PAGES": "applied"}, GLIBC, "madvise"),  # already restarted
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise"),  # the user's choice
    ({}, (2, 34), "madvise"),  # glibc without the tunable
    ({}, None, "madvise"),  # not glibc (musl, macOS)
    ({}, GLIBC, "always"),  # large mappings get huge pages already
    ({}, GLIBC, "never"),
    ({}, GLIBC, None),  # no THP in this kernel
])
def test_no_restart(environ, glibc, mode):
    assert host_memory.huge_page_environment(environ, glibc, mode) is None


def test_reads_the_bracketed_thp_mode(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert host_memory.thp_mode(str(path)) == "madvise"
    assert host_memory.thp_mode(str(tmp_path / "missing")) is None


# Restarts (when it applies), then runs a jitted function whose 128 MiB temporary buffer XLA:CPU allocates afresh
# at every call, and prints its process id, GLIBC_TUNABLES and the minor page faults of one warm call.
SCRIPT = """
import os, resource, sys
from ldm_jax import host_memory
print("pid", os.getpid(), flush=True)
host_memory.reexec_with_huge_pages()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.sin(x) * jnp.cos(x)[::-1]))
x = jnp.ones((16 * 2**20,), jnp.float32)
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x).block_until_ready()
print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print("tunables", os.environ.get("GLIBC_TUNABLES", ""))
"""


def run_script(switch: str) -> list[list[str]]:
    env = {**os.environ, "LDM_JAX_HUGE_PAGES": switch, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "PYTHONPATH": ROOT}
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                         check=True).stdout
    return [line.split(" ", 1) for line in out.splitlines()]


@pytest.mark.skipif(host_memory.huge_page_environment({}, host_memory.glibc_version(), host_memory.thp_mode())
                    is None, reason="needs glibc >= 2.35 and transparent huge pages in madvise mode")
def test_restart_keeps_the_process_and_cuts_xla_page_faults():
    restarted, plain = run_script("1"), run_script("0")
    # The restart ran the same command again in the same process, now with the tunable.
    assert [key for key, _ in restarted] == ["pid", "pid", "faults", "tunables"]
    assert restarted[0] == restarted[1]
    assert restarted[3][1] == "glibc.malloc.hugetlb=1"
    assert [key for key, _ in plain] == ["pid", "faults", "tunables"] and plain[2] == ["tunables", ""]
    # 128 MiB faulted in 4 KiB pages is ~33k faults; in 2 MiB pages, a few dozen.
    plain_faults, huge_faults = int(plain[1][1]), int(restarted[2][1])
    assert plain_faults > 4000
    assert huge_faults < plain_faults / 4
