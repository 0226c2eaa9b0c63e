"""Timing of the training loop: the clock of training seconds (evaluation left out, earlier runs' added), the time
budget that ends a run (train.time_limit_s), the tokens/s of each train row, and the profiler window
(train.profile)."""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils


class Profiler:
  """train.profile = "START:STOP": a jax.profiler trace of steps START..STOP-1 (counted from 0) in WORKDIR/profile,
  which TensorBoard's profile plugin and Perfetto (ui.perfetto.dev) open."""

  def __init__(self, spec: str, workdir: str, log):
    self.start, self.stop = (int(x) for x in spec.split(":")) if spec else (None, None)
    self.directory, self.log, self.active = os.path.join(workdir, "profile"), log, False

  def before(self, step: int) -> None:
    if self.start is not None and step == self.start and jax.process_index() == 0:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, state, last: bool = False) -> None:
    if self.active and (step >= self.stop or last):
      jax.block_until_ready(state)  # the traced steps finish inside the trace
      jax.profiler.stop_trace()
      self.active = False
      self.log(f"profile of steps {self.start}..{step - 1} written to {self.directory}")


class Clock:
  """Training seconds: wall time of this run's loop without evaluation, plus the earlier runs' (from checkpoints)."""

  def __init__(self, prior: float):
    self.prior, self.start, self.eval_seconds = prior, time.time(), 0.0

  def train_seconds(self) -> float:
    return self.prior + time.time() - self.start - self.eval_seconds


class TimeBudget:
  """train.time_limit_s: training ends at the last log row the budget allows, as if train.steps were that step (final
  dev pass, a ranked checkpoint, the test pass). Read at each log row, once its step is done: the run ends there when
  one more log interval (as long as the last one; at a resume, log_every steps at the mean pace so far) would pass
  the limit. With several processes, process 0's clock decides for all. 0 = no budget."""

  def __init__(self, limit: float, clock: Clock, log_every: int, log):
    self.limit, self.clock, self.log_every, self.log = float(limit), clock, log_every, log
    self.last: tuple[int, float] | None = None  # (step, train_seconds) at the previous log row

  def __bool__(self) -> bool:
    return self.limit > 0

  def spent(self, step: int) -> bool:
    if not self:
      return False
    seconds = self.clock.train_seconds()
    if self.last is not None:
      interval = seconds - self.last[1]
    else:
      interval = seconds / step * self.log_every if step else 0.0
    self.last = (step, seconds)
    over = seconds + interval > self.limit
    if jax.process_count() > 1:
      over = bool(multihost_utils.broadcast_one_to_all(np.array(over)))
    if over:
      self.log(f"time budget: {seconds:.1f} s of training at step {step}; one more log interval (~{interval:.1f} s) "
               f"would pass train.time_limit_s={self.limit:g}: training ends here")
    return over


class Throughput:
  """Token counts between train rows: slots run (bucketed batches vary) and, for fine-tuning batches that carry
  attention_mask, non-padding tokens, over the training seconds between the rows (Clock's: evaluation left out).
  The host dispatches up to a log interval ahead of the device, so a row is timed when its step's metrics come back
  from the device (the step is then done), not when the host dispatched it."""

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self.seen = 0.0  # train_seconds when the last row's step was seen done, or the first step
    self.real = self.slots = 0
    self.first: tuple[tuple[int, int], float] | None = None  # (token counts, seconds) of the first step

  def count(self, local: dict) -> None:
    if "attention_mask" in local:
      self.real += int(local["attention_mask"].sum())
      self.slots += local["attention_mask"].size
    else:
      self.slots += self.tokens_per_step // jax.process_count()

  def first_done(self, dispatched: float, done: float) -> None:
    """The first step has run. XLA:CPU finishes preparing a program on its first run (seconds on a small model, ten
    times its later steps), so the rows count from here, without the first step, unless a row is that step alone:
    it is then timed from its dispatch (after compiling)."""
    self.first = (self.cut(), done - dispatched)
    self.seen = done

  def cut(self) -> tuple[int, int]:
    """(slots, non-padding tokens) dispatched since the last cut: the tokens of the row at this step."""
    counts, self.real, self.slots = (self.slots, self.real), 0, 0
    return counts

  def rate(self, counts: tuple[int, int], train_seconds: float) -> tuple[float, dict]:
    """(tokens/s, extra row values) of a row whose step has just been seen done; starts the next interval."""
    elapsed = max(train_seconds - self.seen, 1e-9)
    self.seen = train_seconds
    if counts == (0, 0) and self.first is not None:  # the row of the first step alone
      counts, elapsed = self.first[0], max(self.first[1], 1e-9)
    slots, real = counts
    extra = {"nonpad_tokens_per_s": real * jax.process_count() / elapsed} if real else {}
    return slots * jax.process_count() / elapsed, extra
