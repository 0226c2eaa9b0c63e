"""Metrics out of the loop: one JSON object per row in metrics.jsonl, the same scalars as TensorBoard events,
and a terminal progress bar. Only process 0 writes; other processes get a writer that does nothing."""

from __future__ import annotations

import json
import math
import os
import sys
import time


class MetricWriter:
  def __init__(self, workdir: str, *, enabled: bool, total_steps: int = 0, progress: bool = True):
    self.enabled = enabled
    self.total_steps = total_steps
    self.progress = progress and enabled and total_steps > 0
    self._tb = None
    self._jsonl = None
    self._start = time.time()
    self._start_step = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes events
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

  def write(self, step: int, split: str, values: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "split": split}
    for k, v in values.items():
      row[k] = v if isinstance(v, str) else float(v)
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for k, v in row.items():
      if k not in ("step", "split") and not isinstance(v, str) and math.isfinite(v):
        self._tb.add_scalar(f"{split}/{k}", v, int(step))

  def log(self, message: str) -> None:
    if self.enabled:
      if self.progress:
        sys.stderr.write("\r\033[K")
      print(message, flush=True)

  def progress_bar(self, step: int, loss: float, tokens_per_s: float) -> None:
    if not self.progress:
      return
    if self._start_step is None:
      self._start_step, self._start = step, time.time()
    done = step / self.total_steps
    rate = (step - self._start_step) / max(time.time() - self._start, 1e-9)
    eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
    width = 24
    bar = "#" * int(done * width) + "-" * (width - int(done * width))
    eta_text = f"{int(eta // 60)}m{int(eta % 60):02d}s" if math.isfinite(eta) else "?"
    sys.stderr.write(f"\r[{bar}] step {step}/{self.total_steps} loss {loss:.4f} {tokens_per_s:,.0f} tok/s ETA {eta_text}")
    sys.stderr.flush()

  def close(self) -> None:
    if self.progress:
      sys.stderr.write("\n")
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()
