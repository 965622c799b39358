"""Checkpoint steps damaged after they were committed: detect, describe and move aside.

A full disk, a bad copy or a storage fault leaves a committed orbax step with
a truncated, deleted or empty file, or without its ``_METADATA``. Reading such
a step raises TensorStore, JSON or ``None`` errors deep inside orbax;
`read_guarded` turns those (and only those: out of memory and other errors
pass unchanged) into a `DamagedCheckpointError` that names the step's folder,
its empty or missing files and the first line of the error. `move_aside`
renames a damaged step to ``<step>.damaged``, which orbax does not list as a
step; nothing is deleted. Paths go through ``etils.epath``, so local and
remote (``gs://``) checkpoints are handled alike.
"""

import json
from typing import Any, Callable

import orbax.checkpoint as ocp
from etils import epath

DAMAGED = ".damaged"
# TensorStore status codes of a read that found files missing, short or undecodable (not transient ones).
_READ_FAILURES = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS", "Encountered error while reading")


class DamagedCheckpointError(FileNotFoundError):
    """A committed step whose files do not read back whole: truncated, deleted or empty files, missing metadata.

    A FileNotFoundError, so the commands report it in one line like a missing checkpoint.
    """


def step_dir(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """The folder of ``step`` in ``manager``'s directory (local or remote)."""
    return epath.Path(manager.directory) / str(step)


def _is_read_failure(error: BaseException) -> bool:
    """Whether ``error`` (or one of its causes) is a file found missing, short or undecodable."""
    while error is not None:
        if isinstance(error, (FileNotFoundError, EOFError, json.JSONDecodeError, DamagedCheckpointError)):
            return True
        if str(error).startswith(_READ_FAILURES):
            return True
        error = error.__cause__ or error.__context__
    return False


def _reason(error: BaseException) -> str:
    """The innermost error's first line, without TensorStore's spec dump."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = str(error).split("[tensorstore_spec=")[0].split(" See full TensorStore")[0].strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else '(no message)'}"[:500]


def _files(folder: epath.Path) -> list[epath.Path]:
    """Every file under ``folder`` (one listing per folder: epath refuses recursive globs)."""
    found = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        found.extend(_files(path) if path.is_dir() else [path])
    return found


def _suspect_files(folder: epath.Path) -> list[str]:
    """The empty files of a step folder and the ``_METADATA`` its PyTree items (those with an OCDBT
    ``manifest.ocdbt``) lack, as relative paths."""
    files = _files(folder)
    empty = [str(p.relative_to(folder)) for p in files if p.stat().length == 0]
    items = sorted({p.parent for p in files if p.name == "manifest.ocdbt" and p.parent.parent == folder})
    missing = [f"{item.name}/_METADATA (missing)" for item in items if not (item / "_METADATA").exists()]
    return empty + missing


def damaged(manager: ocp.CheckpointManager, step: int, error: BaseException) -> DamagedCheckpointError:
    """The DamagedCheckpointError of ``step``: its folder, its empty or missing files and ``error``'s reason."""
    folder = step_dir(manager, step)
    suspects = _suspect_files(folder)
    files = f"; suspect file(s): {', '.join(suspects)}" if suspects else ""
    return DamagedCheckpointError(f"checkpoint step {step} in {folder} is damaged ({_reason(error)}){files}")


def read_guarded(manager: ocp.CheckpointManager, step: int, read: Callable[[], Any]) -> Any:
    """``read()``, with a failure to read ``step``'s files raised as a `DamagedCheckpointError` (other errors,
    such as out of memory, pass unchanged)."""
    try:
        return read()
    except DamagedCheckpointError:
        raise
    except Exception as error:
        if _is_read_failure(error):
            raise damaged(manager, step, error) from error
        raise


def move_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Rename ``step``'s folder to ``<step>.damaged`` (``.damaged-2``, ... if taken), where orbax no longer lists
    it once ``manager.reload()`` runs; nothing is deleted. Returns the new path."""
    folder = step_dir(manager, step)
    target, n = folder.with_name(folder.name + DAMAGED), 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}{DAMAGED}-{n}")
    folder.rename(target)
    return target
