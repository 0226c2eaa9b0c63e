"""Metrics out of the loop: one JSON object per row in metrics.jsonl, the same scalars as TensorBoard events,
and progress on stderr: a tqdm bar on a terminal, one plain line every `progress_every` steps elsewhere (CI, nohup,
SLURM logs), where a bar's carriage returns would pile up. Only process 0 writes; other processes get a writer that
does nothing."""

from __future__ import annotations

import json
import math
import os
import sys
import time

from tqdm import tqdm


def truncate_metrics(path: str, step: int) -> int:
  """Keeps the rows of metrics.jsonl up to `step` and drops the rest (a run resumed from `step` logs them again, so
  each (step, split) appears once) along with any partial line a killed process left; rewrites the file atomically.
  Returns how many lines were dropped."""
  return _keep_rows(path, lambda row: row["step"] <= step)


def drop_rows(path: str, step: int, splits) -> int:
  """Drops the rows of `splits` at `step` (`jaxlm eval` writes them anew: each (step, split) appears once)."""
  return _keep_rows(path, lambda row: not (row["step"] == step and row.get("split") in set(splits)))


def _keep_rows(path: str, keep) -> int:
  if not os.path.isfile(path):
    return 0
  kept, dropped, changed = [], 0, False
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        row = None
      if isinstance(row, dict) and isinstance(row.get("step"), int) and keep(row):
        changed = changed or not line.endswith("\n")  # a last row cut off before its line end: the next is appended
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  if dropped or changed:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return dropped


class MetricWriter:
  def __init__(self, workdir: str, *, enabled: bool, total_steps: int = 0, progress: bool = True,
               resume_step: int | None = None, progress_every: int = 0, stream=None):
    """`resume_step`: a run that continues from that step (0: from the start) first drops the rows after it.
    `progress_every`: steps between plain progress lines when `stream` (default stderr) is not a terminal; 0 = one at
    every call of progress_bar."""
    self.enabled = enabled
    self.total_steps = total_steps
    self.progress = progress and enabled and total_steps > 0
    self.progress_every = progress_every
    self._stream = stream
    self._bar = None  # the tqdm bar, made at the first progress on a terminal
    self._tb = None
    self._jsonl = None
    self._created = self._start = time.time()
    self._start_step = None
    self._last_line = None  # the step of the last plain progress line
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      if resume_step is not None:
        truncate_metrics(os.path.join(workdir, "metrics.jsonl"), resume_step)
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

  @property
  def stream(self):
    return self._stream or sys.stderr  # looked up late: a test's (or pytest's) replacement of sys.stderr counts

  def log(self, message: str) -> None:
    if self.enabled:
      if self._bar is not None:
        self._bar.clear()  # the message takes the bar's line; the bar is drawn again below it
      print(message, flush=True)
      if self._bar is not None:
        self._bar.refresh()

  def progress_bar(self, step: int, loss: float, tokens_per_s: float) -> None:
    """Progress at `step` (called at each train log row)."""
    if not self.progress:
      return
    if self._start_step is None:
      self._start_step, self._start = step, time.time()
    isatty = getattr(self.stream, "isatty", None)
    if isatty is not None and isatty():
      if self._bar is None:
        # mininterval 0: each call is a train row already, seconds apart; redraw at every one
        self._bar = tqdm(total=self.total_steps, initial=step, file=self.stream, unit="step", dynamic_ncols=True,
                         mininterval=0, leave=True)
      self._bar.set_postfix_str(f"loss {loss:.4f}, {tokens_per_s:,.0f} tok/s", refresh=False)
      self._bar.update(step - self._bar.n)
      return
    if self._last_line is not None and step < self.total_steps and step - self._last_line < self.progress_every:
      return
    self._last_line = step
    rate = (step - self._start_step) / max(time.time() - self._start, 1e-9)
    eta = f"{_duration((self.total_steps - step) / rate)}" if rate > 0 else "?"
    self.stream.write(f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%) loss {loss:.4f} "
                      f"{tokens_per_s:,.0f} tok/s, elapsed {_duration(time.time() - self._created)}, ETA {eta}\n")
    self.stream.flush()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()


def _duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s"
