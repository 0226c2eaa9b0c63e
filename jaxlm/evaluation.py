"""Evaluation of a run: one split's batches on the mesh, the task's stats and host metrics, the metrics.jsonl rows
and reports, the best-or-latest parameters restored onto this mesh (for eval, the test split, predict and
generate), and `jaxlm eval`."""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import numpy as np

from jaxlm import train
from jaxlm.checkpoint import Checkpointer
from jaxlm.data import builders, pipeline
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.metric_writer import MetricWriter, drop_rows
from jaxlm.warm_start import trained_only_target, with_frozen_base
from jaxlm.workdir import (
  SetupError,
  check_same_model,
  check_tokenizer,
  check_vocab,
  open_data,
  resolve_labels,
  saved_step,
)


TIMING_KEY = "_prediction_timing"  # (examples predicted, seconds) of a pass: for the log line, never a metrics row


def split_batches(setup: train.Setup, source: builders.Source, tokenizer, split: str, *, start: int = 0, rows=None):
  """This process's share of the global batches of one split, from global batch `start` on: the same global batches
  on any number of processes, devices or workers."""
  c = setup.config
  return pipeline.batches(setup.task, source.split(split).records, tokenizer, split, data_cfg=c.data,
                          batch_size=c.train.batch_size, seed=c.train.seed, local_rows=setup.local_rows, start=start,
                          cache_dir=source.rows_dir, fingerprint=source.fingerprint(split), rows=rows)


def local_batch(setup: train.Setup, local: dict):
  """A batch of this process's rows -> global arrays on the mesh."""
  return train.global_batch(local, setup.batch_shardings, setup.local_rows, setup.config.train.batch_size)


def evaluate(setup: train.Setup, params, batches, eval_fn, predict_fn, records, max_batches: int = 0) -> dict:
  """One eval pass: the task's stats averaged exactly (they are sums), perplexity from the loss, and the task's
  host-side metrics from its predictions and the split's records."""
  totals, pairs, predict_seconds, predicted_examples = None, [], 0.0, 0
  for i, local in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    batch = local_batch(setup, local)
    stats = jax.device_get(eval_fn(params, batch))
    totals = stats if totals is None else jax.tree.map(lambda a, b: a + b, totals, stats)
    start = time.perf_counter()
    predicted = predict_fn(params, batch)
    if predicted is not None:
      pairs.append((local, jax.device_get(predicted)))
      predict_seconds += time.perf_counter() - start
      ids = local.get("example_ids")
      predicted_examples += int(np.sum(np.asarray(ids) >= 0)) if ids is not None else len(next(iter(local.values())))
  if totals is None:
    raise ValueError("the eval split produced no batches")
  out = {k: float(s) / max(float(n), 1.0) for k, (s, n) in totals.items()}
  if "loss" in out:
    out["perplexity"] = float(math.exp(min(out["loss"], 80.0)))
  out.update(setup.task.host_metrics(pairs, records))
  if pairs:  # logged by write_eval, not a metric: rows stay comparable between runs
    out[TIMING_KEY] = (predicted_examples, predict_seconds)
  return out


@dataclasses.dataclass
class Evaluator:
  """Evaluates a split of one run: compiled steps, data and tokenizer, built once."""
  setup: train.Setup
  source: builders.Source
  tokenizer: object

  def __post_init__(self):
    self.eval_fn = train.compile_eval_step(self.setup)
    self.predict_fn = jax.jit(self.setup.task.predict)
    self._rows = {}  # split -> its prepared rows, looked up once per run

  def __call__(self, params, split: str, max_batches: int = 0) -> dict:
    if split not in self._rows:
      self._rows[split] = pipeline.prepare_rows(
          self.setup.task, self.source.split(split).records, self.tokenizer, split, self.setup.config.data,
          self.source.rows_dir, self.source.fingerprint(split))
    batches = split_batches(self.setup, self.source, self.tokenizer, split, rows=self._rows[split])
    records = self.source.split(split).records
    return evaluate(self.setup, params, batches, self.eval_fn, self.predict_fn, records, max_batches)


def write_eval(writer: MetricWriter, workdir: str, step: int, split: str, result: dict, write_report: bool) -> dict:
  """An eval result -> a metrics.jsonl row and a log line; a text report (seqeval's) is printed and written to
  WORKDIR/report_{split}_step{step}.txt. Returns the numeric metrics."""
  result = dict(result)
  report = result.pop("report", None)
  timing = result.pop(TIMING_KEY, None)
  writer.write(step, split, result)
  writer.log(f"step {step} {split}: " + " ".join(f"{k}={v:.4f}" for k, v in result.items()))
  if timing:
    writer.log(_timing_line(step, split, timing))
  if report and write_report:
    writer.log(report)
    with open(os.path.join(workdir, f"report_{split}_step{step}.txt"), "w") as f:
      f.write(report)
  return result


def _timing_line(step: int, split: str, timing: tuple[int, float]) -> str:
  examples, seconds = timing
  return (f"step {step} {split}: predictions for {examples} examples in {seconds:.1f} s "
          f"({examples / max(seconds, 1e-9):.1f} a second, this process's rows)")


def best_or_latest_step(ckpt: Checkpointer, config) -> int | None:
  """The checkpoint predictions and the test split use: the best by checkpoint.best_metric, else the latest."""
  ckpt.wait()
  step = ckpt.best_step() if config.checkpoint.best_metric else None
  return step if step is not None else ckpt.latest_step()


def restore_params(setup: train.Setup, ckpt: Checkpointer, *, log=None, tokenizer=None) -> tuple[int, object]:
  """(step, parameters) of the best (by checkpoint.best_metric) else latest checkpoint, restored onto this run's
  mesh; a damaged step is named and skipped for the newest intact one before it. For eval, test, predict and
  generate alike. The config must agree with the checkpoint's on the keys that give its arrays their shapes and
  meaning, and `tokenizer` (if given) must be the one it was trained with."""
  step = best_or_latest_step(ckpt, setup.config)
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: run `jaxlm train` first")
  saved = saved_step(ckpt.step_path(step))
  check_same_model(setup.config, saved)
  if tokenizer is not None:
    check_tokenizer(saved, tokenizer)
  kwargs = {"log": log} if log is not None else {}
  target = trained_only_target(train.abstract_state(setup).params, setup.trainable, params_only=True)
  step, params = ckpt.restore_params_falling_back(step, target, **kwargs)
  return step, with_frozen_base(setup, ckpt.step_path(step), params, log)


def run_eval_only(config, workdir: str) -> dict:
  """`jaxlm eval`: evaluates the best (by checkpoint.best_metric) else the latest checkpoint in workdir on the task's
  eval splits and its test split."""
  if not os.path.isdir(workdir):
    raise SetupError(f"--workdir {workdir} is a file, not a jaxlm workdir" if os.path.exists(workdir) else
                     f"--workdir {workdir} does not exist")
  source = open_data(config)
  resolve_labels(config, source)
  setup = train.build(config)
  tokenizer = load_tokenizer(config, workdir)
  check_vocab(config, tokenizer)
  ckpt = Checkpointer(workdir, config.checkpoint, read_only=True)
  step, params = restore_params(setup, ckpt, tokenizer=tokenizer)
  ckpt.close()
  evaluator = Evaluator(setup, source, tokenizer)
  test_split = setup.task.test_split
  splits = setup.task.eval_splits + ((test_split,) if test_split else ())
  results = {split: evaluator(params, split) for split in splits}
  if jax.process_index() == 0:  # rows of this step written by training are replaced: each (step, split) once
    drop_rows(os.path.join(workdir, "metrics.jsonl"), step, splits)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0, progress=False)
  metrics = {split: write_eval(writer, workdir, step, split, result, jax.process_index() == 0)
             for split, result in results.items()}
  writer.close()
  return {"step": step, **metrics}
