"""Preemption: on SIGTERM a training loop finishes its step, saves a checkpoint there and the run exits 0.

Schedulers (Cloud TPU maintenance, SLURM, Kubernetes, ``kill``) send SIGTERM
some time before they take a machine away. `StopRequest` turns the signal into
a flag; the loops ask ``should_stop(step)`` after every step, save that step
and return, and ``ldm_jax.train`` starts no further stage. Re-running the
same command resumes from that checkpoint.

One process: a Python signal handler sets the flag (reading it costs no device
round trip). Several processes: JAX's preemption service (on by default
after ``jax.distributed.initialize``) already catches SIGTERM and agrees on a
step at which every process stops, so no handler is installed and
``should_stop`` asks ``multihost_utils.reached_preemption_sync_point``.
"""

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class StopRequest:
    """A context manager that catches SIGTERM for its duration (single-process runs, main thread only).

    ``received`` names the signal once it arrived; ``stopped_at`` is the step
    at which a loop stopped because of it (None while none did).
    """

    def __init__(self):
        """Nothing is caught until the context is entered."""
        self.received: str | None = None
        self.stopped_at: int | None = None
        self._previous = None

    def __enter__(self) -> "StopRequest":
        """Install the SIGTERM handler (when there is one process and this is the main thread)."""
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        """Put the previous SIGTERM handler back."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame) -> None:
        del frame
        self.received = signal.Signals(signum).name
        logging.warning("received %s: stopping after the current step, with a checkpoint", self.received)

    def should_stop(self, step: int) -> bool:
        """Whether the loop must save ``step`` (just completed) and stop; call it after every step.

        With several processes every one of them must call it at every step
        (JAX's preemption sync point); they all get True at the same step.
        """
        if jax.process_count() > 1:
            stop = multihost_utils.reached_preemption_sync_point(step)
        else:
            stop = self.received is not None
        if stop:
            self.stopped_at = step
        return stop
