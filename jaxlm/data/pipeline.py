"""The generic input pipeline on grain: a split's records -> the task's rows (its own transformations) -> per-process
batches, shuffled and repeated for training, one padded deterministic pass for evaluation, resumable through the
iterator state saved with each checkpoint. It knows tasks only through the rows they describe."""

from __future__ import annotations

import functools

import grain
import numpy as np
from absl import flags

from jaxlm.data import encoder_inputs
from jaxlm.data.rows import FlatMap, Map, RandomMap, RowContext, Stream
from jaxlm.data.sources import DataError

# Eval masks and spans do not move with train.seed, so eval losses of different runs compare.
EVAL_SEED = 1234


def _read_options(data_cfg, batch_size: int) -> grain.ReadOptions:
  """Threads that read and transform records ahead, in the main process or in each worker. The transforms are
  Python (the GIL), so threads beyond a few only contend; more help only when reads wait on remote storage."""
  return grain.ReadOptions(num_threads=data_cfg.read_threads, prefetch_buffer_size=4 * batch_size
                           if data_cfg.read_threads else 0)


def local_batch_size(batch_size: int, process_count: int) -> int:
  b = batch_size
  if b % process_count:
    raise ValueError(f"train.batch_size={b} is not divisible by the {process_count} processes")
  return b // process_count


def _identity(x):
  return x


class _ShardedBatchIterator(grain.DatasetIterator):
  """Takes rows `process_count * batch_size` at a time and keeps this process's block of `batch_size`; a short
  final group is padded with `pad_values` rows, so every process yields the same number of batches."""

  def __init__(self, parent, batch_size: int, process_index: int, process_count: int, pad_values: dict, finish):
    super().__init__(parent)
    self._b, self._p, self._n = batch_size, process_index, process_count
    self._pad_values = pad_values
    self._finish = finish

  def __next__(self):
    rows = []
    for _ in range(self._b * self._n):
      try:
        rows.append(next(self._parent))
      except StopIteration:
        break
    if not rows:
      raise StopIteration
    template = rows[0]
    while len(rows) < self._b * self._n:
      rows.append({k: np.full_like(v, self._pad_values.get(k, 0)) for k, v in template.items()})
    # The whole global batch is finished (e.g. bucketed) before the split, so every process agrees on its shape.
    group = self._finish({k: np.stack([r[k] for r in rows]) for k in template})
    return {k: v[self._p * self._b:(self._p + 1) * self._b] for k, v in group.items()}

  # Each batch consumes whole groups of rows, so the parent's state between batches is the whole state.
  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class ShardedBatchDataset(grain.IterDataset):
  """One deterministic pass cut into equal per-process batches (see _ShardedBatchIterator)."""

  def __init__(self, parent: grain.IterDataset, batch_size: int, process_index: int, process_count: int,
               pad_values: dict | None = None, finish=None):
    super().__init__(parent)
    self._args = (batch_size, process_index, process_count, dict(pad_values or {}), finish or _identity)

  def __iter__(self):
    return _ShardedBatchIterator(self._parent.__iter__(), *self._args)


class _LengthGroupedIterator(grain.DatasetIterator):
  """Reads a pool of rows, sorts it by length (attention_mask), cuts it into batch-sized runs and yields the runs'
  rows, the runs in a random order (train) or shortest first (eval, seed None). Each batch then holds rows of similar
  length, so a bucketed batch is mostly real tokens, while which lengths come when stays random."""

  def __init__(self, parent, pool_rows: int, batch_rows: int, seed, drop_remainder: bool):
    super().__init__(parent)
    self._pool_rows, self._batch_rows, self._seed, self._drop = pool_rows, batch_rows, seed, drop_remainder
    self._pool_state = parent.get_state()  # the parent's state before the current pool: where a resume refills from
    self._pools = 0  # pools read so far (with the seed, they fix each pool's order of runs)
    self._rows, self._taken = [], 0

  def _fill(self):
    self._pool_state = self._parent.get_state()
    rows = []
    for _ in range(self._pool_rows):
      try:
        rows.append(next(self._parent))
      except StopIteration:
        break
    if self._drop:  # whole batches only: a train batch never mixes two pools
      rows = rows[:len(rows) // self._batch_rows * self._batch_rows]
    if not rows:
      raise StopIteration
    order = np.argsort([int(r["attention_mask"].sum()) for r in rows], kind="stable")
    runs = [order[i:i + self._batch_rows] for i in range(0, len(order), self._batch_rows)]
    if self._seed is not None:
      perm = np.random.default_rng([self._seed, self._pools]).permutation(len(runs))
      runs = [runs[i] for i in perm]
    self._rows = [rows[i] for run in runs for i in run]
    self._pools += 1
    self._taken = 0

  def __next__(self):
    if self._taken >= len(self._rows):
      self._fill()
    self._taken += 1
    return self._rows[self._taken - 1]

  def get_state(self):
    return {"parent": self._pool_state, "pools": self._pools - (1 if self._rows else 0), "taken": self._taken}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._pools, self._rows, self._taken = state["pools"], [], 0
    if state["taken"]:
      self._fill()
      self._taken = state["taken"]


class LengthGroupedDataset(grain.IterDataset):
  """Rows grouped by length within pools of `pool_rows` (see _LengthGroupedIterator)."""

  def __init__(self, parent: grain.IterDataset, pool_rows: int, batch_rows: int, seed, drop_remainder: bool):
    super().__init__(parent)
    self._args = (pool_rows, batch_rows, seed, drop_remainder)

  def __iter__(self):
    return _LengthGroupedIterator(self._parent.__iter__(), *self._args)


def _finish_train(ds: grain.IterDataset, data_cfg, batch_size: int, seed: int, finish=None,
                  group_lengths: bool = False) -> grain.IterDataset:
  """Batches (full batches only) and runs the pipeline in worker processes or a prefetch thread."""
  groups = data_cfg.length_group_batches
  if group_lengths and groups > 0:
    ds = LengthGroupedDataset(ds, groups * batch_size, batch_size, seed, drop_remainder=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  if finish is not None:
    ds = ds.map(finish)
  d = data_cfg
  if d.worker_count > 0:
    # grain's worker start-up reads absl flags directly; jaxlm parses its own arguments, so absl's flags are
    # declared parsed here (they keep their defaults) instead of failing with UnparsedFlagAccessError.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    # Each worker runs the whole per-element pipeline (tokenise, pack, batch) on its slice of the documents.
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count,
                                                     per_worker_buffer_size=d.worker_buffer_size))
  elif d.prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=d.prefetch)
  return ds


def _items(records, data_cfg, split: str, seed: int, process_index: int, process_count: int):
  """A split's records -> (this process's records, the (index, record) items to transform: shuffled and repeated
  for train). Train records are split between processes before anything is read from them; eval passes are whole
  on every process."""
  ds = grain.MapDataset.source(records)
  if split == "train":
    ds = ds[process_index::process_count]  # each process reads only its own part
    if len(ds) == 0:
      raise DataError(f"process {process_index} of {process_count} has no training records ({len(records)} in all)")
  items = ds.map_with_index(_with_index)
  if split == "train":
    if data_cfg.shuffle:
      items = items.shuffle(seed=seed)
    items = items.repeat(data_cfg.num_epochs if data_cfg.num_epochs > 0 else None)
  return ds, items


def _with_index(index: int, rec):
  return index, rec


def _apply(ds, step, read: grain.ReadOptions, seed: int):
  """One row step on a MapDataset (while the steps are per-item) or an IterDataset."""
  if isinstance(step, (FlatMap, Stream)) and isinstance(ds, grain.MapDataset):
    ds = ds.to_iter_dataset(read)
  if isinstance(step, Map):
    return ds.map(step.fn)
  if isinstance(step, RandomMap):
    return ds.random_map(step.fn, seed=seed)
  if isinstance(step, FlatMap):
    return grain.experimental.FlatMapIterDataset(ds, step.fn)
  if isinstance(step, Stream):
    return step.fn(ds)
  raise TypeError(f"a row step must be Map, RandomMap, FlatMap or Stream, not {type(step).__name__}")


def batches(task, records, tokenizer, split: str, *, data_cfg, batch_size: int, seed: int, process_index: int = 0,
            process_count: int = 1):
  """Per-process batches of `task`'s rows for one split, as a grain DatasetIterator (has get_state()/set_state()),
  each a dict of numpy arrays with a leading batch axis of batch_size // process_count.

  split 'train': records shuffled with `seed`, repeated for data.num_epochs (0 = forever), full batches only.
  Other splits: one deterministic pass; rows that complete the last batch carry the task's pad values (weight 0).
  Every process runs the whole eval pass and keeps its block of each global batch: eval splits are small, and this
  gives every process the same number of batches (a process that ran out early would leave the others waiting).

  A bucketed task's batches are cut to the smallest of data.bucket_lengths that fits: for eval on any number of
  processes (each sees the whole global batch), for train with one process (several could not agree on a length
  without exchanging it).
  """
  d = data_cfg
  b = local_batch_size(batch_size, process_count)
  train = split == "train"
  row_seed = seed if train else EVAL_SEED
  read = _read_options(d, batch_size)
  documents, items = _items(records, d, split, seed, process_index, process_count)
  ctx = RowContext(tokenizer, d, split, row_seed, documents)
  rows = items
  for step in task.row_steps(ctx):
    rows = _apply(rows, step, read, row_seed)
  if isinstance(rows, grain.MapDataset):
    rows = rows.to_iter_dataset(read)
  bucketed = task.bucketed()
  buckets = tuple(int(x) for x in d.bucket_lengths) if bucketed else ()
  if any(x <= 0 or x > d.seq_len for x in buckets):
    raise ValueError(f"data.bucket_lengths={d.bucket_lengths}: every bucket must be in 1..data.seq_len={d.seq_len}")
  finish = functools.partial(encoder_inputs.trim_to_bucket, buckets=buckets, seq_len=d.seq_len) if buckets else None
  if train:
    return iter(_finish_train(rows, d, b, seed, finish if process_count == 1 else None, group_lengths=bucketed))
  if bucketed and d.length_group_batches > 0:
    # eval rows are matched to their examples by example id, so their order is free: shortest first pads least
    rows = LengthGroupedDataset(rows, d.length_group_batches * b * process_count, b * process_count, None, False)
  pad_values = task.pad_values(tokenizer)
  return iter(ShardedBatchDataset(rows, b, process_index, process_count, pad_values, finish))
