"""Host-memory settings for XLA:CPU's per-step buffers: transparent huge pages for glibc's malloc, and a heap that
keeps them between steps.

XLA:CPU allocates each execution's temporary buffer with malloc: 122-125 MB
for configs/base.py's stage-2 step at batch 16. glibc serves an allocation
that large with a fresh ``mmap`` and unmaps it when the step ends, so every
step faults the whole buffer in again, one 4 KiB page at a time: about 30,000
page faults and 60-90 ms of kernel CPU time a step on the 2-core CPUs of
README "Results". Two remedies, both applied by ``python -m ldm_jax.train``
and ``bench.train_bench``:

- :func:`reexec_with_huge_pages`: glibc's tunable ``glibc.malloc.hugetlb=1``
  (glibc >= 2.35) makes malloc ask the kernel for transparent huge pages
  (``madvise``): about 190-500 faults of 2 MiB pages a step, and still ~20 ms
  of kernel time zeroing them. Tunables are read when a process starts, so it
  restarts the same command (same process id, arguments and interpreter
  options) with the tunable added to ``GLIBC_TUNABLES``, once, and only where
  it applies: Linux with glibc >= 2.35 and transparent huge pages in
  ``madvise`` mode (in ``always`` mode large mappings get them already; in
  ``never`` mode they cannot). ``LDM_JAX_HUGE_PAGES=0`` turns it off.
- :func:`keep_step_buffers`: glibc's ``mallopt`` raises the main heap's
  mmap and trim thresholds to 2 GiB, so that a buffer below that is carved
  from the heap and stays there when freed, and the next step reuses it: no
  faults at all. Only the main thread's heap can grow that large (the other
  threads' heaps are at most 64 MiB each), and XLA:CPU allocates on the
  thread that runs the computation, a dispatch thread by default, so it also
  turns off JAX's CPU async dispatch: one-device computations then run on
  the calling thread (multi-device ones are dispatched as before). The base
  stage-2 step took 197-199 ms with it against 217-236 ms with huge pages
  alone (0.2 ms of kernel time a step against 20). ``LDM_JAX_KEEP_BUFFERS=0``
  turns it off.
"""

import ctypes
import os
import re
import sys
from typing import Mapping

import jax

TUNABLE = "glibc.malloc.hugetlb=1"
SWITCH = "LDM_JAX_HUGE_PAGES"  # '0': never restart; 'applied': set by the restart itself
MIN_GLIBC = (2, 35)
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
KEEP_SWITCH = "LDM_JAX_KEEP_BUFFERS"  # '0': leave malloc and JAX's dispatch as they are
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
HEAP_LIMIT = 2**31 - 1  # the largest value mallopt takes (an int): buffers up to 2 GiB stay in the heap


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


def keep_step_buffers() -> bool:
    """Keep XLA:CPU's per-step buffers in the main thread's malloc heap (module docstring): raise glibc's
    mmap and trim thresholds and run one-device CPU computations on the calling thread. Call it before JAX's
    CPU backend starts (before the first computation). Returns whether it applied: not with
    ``LDM_JAX_KEEP_BUFFERS=0``, nor without glibc."""
    if os.environ.get(KEEP_SWITCH) == "0" or glibc_version() is None:
        return False
    mallopt = ctypes.CDLL(None).mallopt
    if not (mallopt(M_MMAP_THRESHOLD, HEAP_LIMIT) and mallopt(M_TRIM_THRESHOLD, HEAP_LIMIT)):
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True
