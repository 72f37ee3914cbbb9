"""Preemption: SIGTERM (what TPU, GCE and SLURM send before taking the machines) asks the run
to save a checkpoint and stop cleanly.

With several processes only one may receive the signal, yet all must stop at the same step to
save together: JAX's preemption sync manager (started by ``jax.distributed.initialize``) owns
the signal and picks that step. A single process needs no agreement, so a Python handler does.
"""

from __future__ import annotations

import signal
import threading

import jax


class Preemption:
    """``reached(step)``: whether to save and stop after ``step``. Call it every step, on every
    process; use as a context manager so the previous SIGTERM handler comes back."""

    def __init__(self):
        self._requested = False
        self._previous = None

    def __enter__(self):
        # Signal handlers can only be set from the main thread (a notebook's run is not).
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_signal(self, signum, frame):
        self._requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self._requested
        from jax.experimental import multihost_utils
        return multihost_utils.reached_preemption_sync_point(step)
