"""Test setup: 8 fake CPU devices and fast compiles, set before JAX is imported."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent compilation cache per test run (subprocesses inherit it): identical programs compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="ldm_jax_xla_cache_"))

import hypothesis  # noqa: E402
import jax  # noqa: E402

# The same examples on every run (seeded from each test), so a failure reproduces and CI cannot flake on a new draw.
hypothesis.settings.register_profile("derandomized", derandomize=True, database=None, print_blob=True)
hypothesis.settings.load_profile("derandomized")

jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_disable_most_optimizations", True)

import orbax.checkpoint as ocp  # noqa: E402
from orbax.checkpoint._src.metadata import array_metadata_store  # noqa: E402

# With 8 fake devices every replicated array has 8 replicas, and orbax's default replica-parallel save compiles a
# slicing program per array shape and replica: the first save of 320 small arrays took 14.6 s, 0.2 s without. In
# one process it buys nothing (all replicas are in the same host memory), so in-process tests save without it;
# the multi-process tests (subprocesses, tests/test_parallel.py) keep orbax's default and cover it.
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False,
                                              array_metadata_store=array_metadata_store.Store()), override=True)


# The modules that run for minutes (subprocess runs of the trainer), first: with `--dist loadfile` each is one
# unit of work, and started last they would leave one worker running alone at the end of the suite.
LONG_MODULES = ("test_fault_tolerance.py", "test_gcs_workdir.py", "test_parallel.py")


def pytest_collection_modifyitems(items):
    """Run LONG_MODULES' tests before the others, each module's tests in their own order."""
    items.sort(key=lambda item: item.path.name not in LONG_MODULES)
