"""Stopping a run cleanly: SIGTERM or SIGINT asks the loop to finish its current step, save a checkpoint, wait for
the write and return, so `jaxlm train` exits 0. With several processes, JAX's preemption sync point makes every
process stop at the same step."""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils


class StopRequest:
  """`stop(step) -> bool`: True at the step where the loop should save and stop. A context manager: the signal
  handlers are installed on entry and the previous ones put back on exit.

  One process: the handler only records the signal; the loop asks after every step. Several processes (after
  jax.distributed.initialize): JAX's preemption notifier owns SIGTERM and tells the coordination service, which
  picks a step every process reaches; `reached_preemption_sync_point` turns True there on all of them. SIGINT is
  passed on as SIGTERM to this process so that it takes the same path.
  """

  def __init__(self):
    self.received: str | None = None  # the first signal received, e.g. 'SIGTERM'
    self._previous: dict[int, object] = {}
    self._sync_point = False

  def __enter__(self) -> StopRequest:
    if threading.current_thread() is not threading.main_thread():
      return self  # Python delivers signals to the main thread only; the caller's own stop callable still applies
    self._sync_point = (jax.process_count() > 1 and jax.distributed.is_initialized()
                        and jax.config.jax_enable_preemption_service)
    # With the sync point, SIGTERM stays with JAX's notifier (a Python handler would replace it).
    for signum in (signal.SIGINT,) if self._sync_point else (signal.SIGINT, signal.SIGTERM):
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    name = signal.Signals(signum).name
    if self.received is not None:
      if signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now, unsaved
      return
    self.received = name
    print(f"received {name}: finishing the current step, then saving a checkpoint and stopping "
          "(Ctrl-C again stops at once, without saving)", file=sys.stderr, flush=True)
    if self._sync_point:
      os.kill(os.getpid(), signal.SIGTERM)

  def __call__(self, step: int) -> bool:
    if self._sync_point:
      # every process must ask at every step, from the same starting step, for the agreement to work
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received is not None

  def reason(self) -> str:
    if self.received:
      return self.received
    return "a preemption notice (SIGTERM to one of the processes)" if self._sync_point else "a stop request"
