"""Training metrics: the console, a ``metrics.jsonl`` file and TensorBoard event files (on process 0 only)."""

import json
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from etils import epath

from ldm_jax import paths


def _scalar(value: Any) -> float:
    return float(np.asarray(value))


class MetricWriter:
    """Writes scalar metrics and image grids of one training stage under ``folder``.

    ``folder/metrics.jsonl`` gets one JSON object per `write` call ({'step': ..., name: value});
    ``folder/tensorboard`` gets the TensorBoard events. On processes other than 0
    every call is a no-op.
    """

    def __init__(self, folder: str):
        """Open (append to) the metric files under ``folder``."""
        self.folder = folder
        self.active = jax.process_index() == 0
        self._summary = None
        if self.active:
            epath.Path(folder).mkdir(parents=True, exist_ok=True)

    def _writer(self):
        if self._summary is None:
            import tensorflow as tf  # the data pipeline imports it already; loaded lazily for the rest
            self._summary = tf.summary.create_file_writer(str(epath.Path(self.folder) / "tensorboard"))
        return self._summary

    def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "") -> dict[str, float]:
        """Log ``metrics`` (scalars, fetched to host here) at ``step``; returns them as floats."""
        values = {f"{prefix}{name}": _scalar(value) for name, value in metrics.items()}
        if not self.active:
            return values
        logging.info("step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in sorted(values.items())))
        _append_line(epath.Path(self.folder) / "metrics.jsonl", json.dumps({"step": int(step), **values}))
        import tensorflow as tf
        with self._writer().as_default(step=int(step)):
            for name, value in values.items():
                tf.summary.scalar(name, value)
        return values

    def restart_at(self, step: int) -> int:
        """Drop the metrics.jsonl records after ``step``, the step a run resumes from (all of them at 0).

        A run that stopped after its last checkpoint (killed, preempted
        mid-interval) logged steps that the resumed run logs again; without this
        they would appear twice. A line cut short by a kill is dropped too.
        Returns how many lines were dropped. The TensorBoard events are left as
        they are (TensorBoard shows the newest value of a step).
        """
        path = epath.Path(self.folder) / "metrics.jsonl"
        if not self.active or not path.exists():
            return 0
        lines = [line for line in path.read_text().splitlines(keepends=True) if line.strip()]
        kept = [line for line in lines if step and _step_of(line) is not None and _step_of(line) <= step]
        if len(kept) < len(lines):
            paths.replace_text(path, "".join(line if line.endswith("\n") else line + "\n" for line in kept))
            logging.info("metrics: dropped %d record(s) after step %d from %s", len(lines) - len(kept), step, path)
        return len(lines) - len(kept)

    def write_images(self, step: int, name: str, images: np.ndarray) -> None:
        """Log uint8 images [N, H, W, 3] (e.g. one grid) to TensorBoard."""
        if not self.active:
            return
        import tensorflow as tf
        with self._writer().as_default(step=int(step)):
            tf.summary.image(name, np.asarray(images), max_outputs=len(images))

    def flush(self) -> None:
        """Flush the TensorBoard events to disk."""
        if self._summary is not None:
            self._summary.flush()


class DeferredWriter:
    """Writes each record of scalar metrics one record late, so that the training loop never waits for the device.

    ``push(step, metrics)`` takes device arrays (the step's outputs), starts
    their copy to the host and writes the record pushed before it, whose
    arrays are long computed by then; ``flush()`` writes the last one. The
    values written are exactly those pushed.
    """

    def __init__(self, writer: MetricWriter, prefix: str = ""):
        """Write through ``writer``, each name prefixed with ``prefix``."""
        self.writer, self.prefix = writer, prefix
        self._pending: tuple[int, dict[str, Any]] | None = None

    def push(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float] | None:
        """Hold ``metrics`` of ``step``; write the previous record and return it as floats (None if there was none)."""
        for value in metrics.values():
            if isinstance(value, jax.Array):
                value.copy_to_host_async()
        written = self.flush()
        self._pending = (step, dict(metrics))
        return written

    def flush(self) -> dict[str, float] | None:
        """Write the held record now and return it as floats (None if none is held)."""
        if self._pending is None:
            return None
        step, metrics = self._pending
        self._pending = None
        return self.writer.write(step, metrics, prefix=self.prefix)


def _append_line(path: epath.Path, line: str) -> None:
    """Add ``line`` to the end of the text file ``path``.

    Local files are appended to in place; remote stores have no append, so the
    file is rewritten whole there (metrics.jsonl stays small: one line a log step).
    """
    if paths.is_local(path):
        with path.open("a") as f:
            f.write(line + "\n")
    else:
        paths.replace_text(path, (path.read_text() if path.exists() else "") + line + "\n")


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line, None for a line that is not a whole record."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(folder: str) -> list[dict[str, float]]:
    """The records of ``folder/metrics.jsonl`` in order ([] when absent)."""
    path = epath.Path(folder) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
