"""Transparent huge pages for the host's malloc, so that XLA:CPU's per-step buffers do not fault in 4 KiB at a time.

XLA:CPU allocates each execution's temporary buffer with malloc: 125 MB for
configs/base.py's stage-2 step at batch 16. glibc serves an allocation that
large with a fresh ``mmap`` and unmaps it when the step ends, so every step
faults the whole buffer in again, one 4 KiB page at a time: about 30,600
page faults and 30 ms of kernel CPU time a step on the 2-core CPU of README
"Results". glibc's tunable ``glibc.malloc.hugetlb=1`` (glibc >= 2.35) makes
malloc ask the kernel for transparent huge pages (``madvise``), and the same
step takes about 500 faults of 2 MiB pages; the trainer's stage-2 steps ran
1.11-1.14x faster (stage 1's 1.09x; ``ldm_jax.evaluate``, whose sampling
loop is one execution per batch, no faster).

Tunables are read when a process starts, so ``python -m ldm_jax.train`` (and
``bench.train_bench``) calls :func:`reexec_with_huge_pages` first: it
restarts the same command (same process id, arguments and interpreter
options) with the tunable added to ``GLIBC_TUNABLES``, once, and only where
it applies: Linux with glibc >= 2.35 and transparent huge pages in
``madvise`` mode (in ``always`` mode large mappings get them already; in
``never`` mode they cannot). Setting ``LDM_JAX_HUGE_PAGES=0`` turns it off.
"""

import os
import re
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
SWITCH = "LDM_JAX_HUGE_PAGES"  # '0': never restart; 'applied': set by the restart itself
MIN_GLIBC = (2, 35)
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
    """The C library's (major, minor) version when it is glibc, else None."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    match = re.fullmatch(r"glibc (\d+)\.(\d+).*", name or "")
    return (int(match[1]), int(match[2])) if match else None


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode ('always', 'madvise' or 'never'); None where unreadable."""
    try:
        with open(path) as f:
            match = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return None
    return match[1] if match else None


def huge_page_environment(environ: Mapping[str, str], glibc: tuple[int, int] | None,
                          mode: str | None) -> dict[str, str] | None:
    """The environment to restart with so that malloc uses huge pages, or None where there is nothing to do:
    turned off or already restarted (``LDM_JAX_HUGE_PAGES``), no glibc >= 2.35, THP not in 'madvise' mode, or a
    ``glibc.malloc.hugetlb`` tunable already set by the user."""
    if environ.get(SWITCH) in ("0", "applied"):
        return None
    if glibc is None or glibc < MIN_GLIBC or mode != "madvise":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, TUNABLE))), SWITCH: "applied"}


def reexec_with_huge_pages() -> None:
    """Restart this command with :func:`huge_page_environment` where it applies (``os.execve``: the same
    process, so nothing outside notices); otherwise return."""
    environment = huge_page_environment(os.environ, glibc_version(), thp_mode())
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environment)
