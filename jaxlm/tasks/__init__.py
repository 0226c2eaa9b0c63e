"""Tasks: the seam between the generic machinery (step library, loop, pipeline, predict) and one training objective.

A task is one module in this package named after `task.name`, whose `TASK` attribute builds it from the run config;
`register` adds one from anywhere else (a research script, a test). The loop, the pipeline, predict and bench use a task
only through the `Task` protocol below, so adding a task touches no other module.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TextIO

import flax.linen as nn
import numpy as np

from jaxlm.data.rows import RowContext

if TYPE_CHECKING:  # the records module imports tensorflow-datasets; the step library must not
  from jaxlm.data.records import RecordKind

Batch = dict[str, np.ndarray]
Stats = dict[str, tuple[Any, Any]]  # name -> (sum, count): averaged exactly over micro-batches, batches and hosts


class Task(Protocol):
  """Everything the loop, the pipeline, predict and bench ask of a task."""

  name: ClassVar[str]
  kind: ClassVar[RecordKind]  # the records it reads (jaxlm/data/records.py)
  labels_from_data: ClassVar[bool]  # its head is sized by label names resolved from the train split

  model: nn.Module
  eval_splits: tuple[str, ...]  # evaluated during training ("eval"; "dev" for fine-tuning)
  test_split: str | None  # evaluated once at the end with the best checkpoint
  labels: tuple[str, ...]  # label names in id order; () for unlabelled tasks

  # ---- model, loss, metrics ----
  def dummy_batch(self, batch_size: int, seq_len: int) -> Batch:
    """Arrays with the batch's names, shapes and dtypes (for init and tracing)."""

  def init_params(self, rng, batch: Batch):
    """Boxed (logically partitioned) parameters."""

  def loss_fn(self, params, batch: Batch, rng, train: bool) -> tuple[Any, Stats]:
    """(loss, stats); stats["loss"] = (sum, count) weights micro-batches."""

  def predict(self, params, batch: Batch) -> dict | None:
    """Jittable predictions for host-side metrics and `jaxlm predict`; None when the task has none."""

  def host_metrics(self, pairs: list[tuple[Batch, dict]], records: Sequence[dict]) -> dict:
    """Metrics over an eval pass from (batch, predictions) pairs and the split's records; may hold a text "report"."""

  def pretrained_source(self) -> tuple[str, dict] | None:
    """(name, parameter tree) a fresh run starts from (e.g. init.hf_path converted), or None."""

  # ---- input pipeline ----
  def row_steps(self, ctx: RowContext) -> list:
    """Transformations from (index, record) items to rows: grain transforms (Map, RandomMap, FlatMap) or functions
    IterDataset -> IterDataset (packing), applied in order."""

  def pad_values(self, tokenizer) -> dict[str, int]:
    """Fill values of the rows that complete a batch (0 for every other array)."""

  def bucketed(self) -> bool:
    """Fine-tuning rows of varying length: length-grouped train batches (data.length_group_batches) and batches cut
    to data.bucket_lengths."""

  # ---- jaxlm predict ----
  def read_predict_input(self, path: str, input_format: str) -> list[dict]:
    """A file of new inputs -> records of the task's kind (placeholder gold labels, never read)."""

  def write_predictions(self, records: list[dict], pairs: list[tuple[Batch, dict]], out: TextIO,
                        jsonl: bool) -> int:
    """Writes one output per record; returns how many were written."""


_REGISTERED: dict[str, type] = {}


def register(cls: type) -> type:
  """Makes task.name=cls.name build `cls(config)`: for tasks defined outside this package. Usable as a decorator."""
  _REGISTERED[cls.name] = cls
  return cls


def known_tasks() -> list[str]:
  return sorted(set(_REGISTERED) | {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")
                                    and m.name not in _HELPER_MODULES})


# Modules of this package that hold shared pieces rather than a task.
_HELPER_MODULES = ("common", "semeval_scorer")


def task_class(name: str) -> type:
  """The factory of task.name=`name`: a registered one, else jaxlm/tasks/<name>.py's TASK."""
  if name in _REGISTERED:
    return _REGISTERED[name]
  if name.isidentifier() and name not in _HELPER_MODULES:
    try:
      # imported by name: a task is found by its module, so no table here needs an edit when one is added
      module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"{__name__}.{name}":
        raise
    else:
      return module.TASK
  raise ValueError(f"task.name='{name}' is not a task; known: {', '.join(known_tasks())}")


def make_task(config) -> Task:
  """The task config.task.name names, built from the run config."""
  return task_class(config.task.name)(config)
