"""Run an ``ldm_jax`` command that interrupts itself at a chosen point, for tests/test_fault_tolerance.py.

    python tests/fault_injector.py FAULT AT MODULE [ARGS...]

FAULT and AT pick the point, so a test never races a signal against a poll:

    sigterm  SIGTERM once the training row of step AT is written to metrics.jsonl (the loop then stops at the
             next step it checks and checkpoints it)
    sigkill  SIGKILL once the training row of step AT is written, after every save in flight has finished
             (so the checkpoints on disk are exactly those of the steps before)
    commit   SIGKILL inside orbax at the operation that commits step AT: on a local disk the rename of its
             temporary folder (everything else of that save, ``commit_success.txt`` too, is on disk); on object
             storage, which has no rename, the write of the step's ``commit_success.txt`` (all items are written)
    shard    SIGKILL once latent-cache shard AT (1-based) of this process is written, before the manifest
"""

import os
import runpy
import signal
import sys

from orbax.checkpoint._src.path import atomicity

from ldm_jax.data import latents
from ldm_jax.training import checkpoints, metrics


def _die(signum: int) -> None:
    os.kill(os.getpid(), signum)


def _after_training_row(step: int, signum: int, wait_for_saves: bool) -> None:
    """Send ``signum`` to this process once ``MetricWriter.write`` has written the 'train/' row of ``step``."""
    managers, make_manager, write = [], checkpoints.checkpoint_manager, metrics.MetricWriter.write

    def recorded_manager(*args, **kwargs):
        managers.append(make_manager(*args, **kwargs))
        return managers[-1]

    def write_then_signal(self, at, values, *, prefix=""):
        written = write(self, at, values, prefix=prefix)
        if prefix == "train/" and at == step:
            for manager in managers if wait_for_saves else []:
                manager.wait_until_finished()
            _die(signum)
        return written

    checkpoints.checkpoint_manager = recorded_manager
    metrics.MetricWriter.write = write_then_signal


def _at_commit(step: int) -> None:
    """SIGKILL this process at the operation by which orbax commits ``step``'s folder (see the module docstring)."""
    rename, write_text = atomicity.async_path.rename, atomicity.async_path.write_text

    async def rename_or_die(source, target):
        if target.name == str(step):
            _die(signal.SIGKILL)
        return await rename(source, target)

    async def write_text_or_die(path, text):
        if path.name == atomicity.COMMIT_SUCCESS_FILE and path.parent.name == str(step):
            _die(signal.SIGKILL)
        return await write_text(path, text)

    atomicity.async_path.rename = rename_or_die
    atomicity.async_path.write_text = write_text_or_die


def _after_shard(shard: int) -> None:
    """SIGKILL this process once the latent cache writer has written its ``shard``-th shard."""
    write = latents._ShardWriter._write

    def write_then_die(self, count):
        write(self, count)
        if self.shards == shard:
            _die(signal.SIGKILL)

    latents._ShardWriter._write = write_then_die


def main() -> None:
    """Install the fault named on the command line, then run the module with the remaining arguments."""
    fault, at, module = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if fault in ("sigterm", "sigkill"):
        _after_training_row(at, signal.SIGTERM if fault == "sigterm" else signal.SIGKILL, fault == "sigkill")
    elif fault == "commit":
        _at_commit(at)
    elif fault == "shard":
        _after_shard(at)
    else:
        raise SystemExit(f"fault_injector: unknown fault {fault!r}")
    sys.argv = [module, *sys.argv[4:]]
    runpy.run_module(module, run_name="__main__")


if __name__ == "__main__":
    main()
