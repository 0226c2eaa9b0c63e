"""Per-process batch iterators for every task, built on grain's Dataset API: order, epochs, per-process sharding,
worker processes and resumable state (get_state / set_state, saved with the training checkpoint)."""

from __future__ import annotations

import grain
import numpy as np

from jaxlm.data import packing, sources


def local_batch_size(config, process_count: int) -> int:
  b = config.train.batch_size
  if b % process_count:
    raise ValueError(f"train.batch_size={b} is not divisible by the {process_count} processes")
  return b // process_count


class _ShardedBatchIterator(grain.DatasetIterator):
  """Takes rows `process_count * batch_size` at a time and keeps this process's block of `batch_size`; a short
  final group is padded with `pad_values` rows, so every process yields the same number of batches."""

  def __init__(self, parent, batch_size: int, process_index: int, process_count: int, pad_values: dict):
    super().__init__(parent)
    self._b, self._p, self._n = batch_size, process_index, process_count
    self._pad_values = pad_values

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
    mine = rows[self._p * self._b:(self._p + 1) * self._b]
    while len(mine) < self._b:
      mine.append({k: np.full_like(v, self._pad_values.get(k, 0)) for k, v in template.items()})
    return {k: np.stack([r[k] for r in mine]) for k in template}

  # Each batch consumes whole groups of rows, so the parent's state between batches is the whole state.
  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class ShardedBatchDataset(grain.IterDataset):
  """One deterministic pass cut into equal per-process batches (see _ShardedBatchIterator)."""

  def __init__(self, parent: grain.IterDataset, batch_size: int, process_index: int, process_count: int,
               pad_values: dict | None = None):
    super().__init__(parent)
    self._args = (batch_size, process_index, process_count, dict(pad_values or {}))

  def __iter__(self):
    return _ShardedBatchIterator(self._parent.__iter__(), *self._args)


def _finish_train(ds: grain.IterDataset, config, batch_size: int) -> grain.IterDataset:
  """Batches (full batches only) and runs the pipeline in worker processes or a prefetch thread."""
  ds = ds.batch(batch_size, drop_remainder=True)
  d = config.data
  if d.worker_count > 0:
    # Each worker runs the whole per-element pipeline (tokenise, pack, batch) on its slice of the documents.
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count,
                                                     per_worker_buffer_size=d.worker_buffer_size))
  elif d.prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=d.prefetch)
  return ds


def _documents(docs, config, split: str, process_index: int, process_count: int) -> grain.MapDataset:
  """Documents -> this process's documents, shuffled and repeated for train."""
  ds = grain.MapDataset.source(docs)
  if split == "train":
    ds = ds[process_index::process_count]  # each process reads only its own part
    if len(ds) == 0:
      raise sources.DataError(f"process {process_index} of {process_count} has no training documents "
                              f"({len(docs)} in all)")
    if config.data.shuffle:
      ds = ds.shuffle(seed=config.train.seed)
    ds = ds.repeat(config.data.num_epochs if config.data.num_epochs > 0 else None)
  return ds


def lm_batches(config, tokenizer, split: str, *, process_index: int = 0, process_count: int = 1):
  """A grain DatasetIterator (has get_state()/set_state()) of per-process batches, each a dict of numpy arrays:
  inputs, targets, segment_ids, positions: int32 [b, L]; weights: float32 [b, L];
  b = config.train.batch_size // process_count, L = config.data.seq_len.
  split 'train': shuffled with config.train.seed, repeats for config.data.num_epochs (0 = forever).
  split 'eval': one deterministic pass, no shuffle; the last partial batch is padded with weight-0 rows.

  Train documents are split between processes before anything is read from them. Every process runs the whole
  eval pass and keeps its block of each global batch: eval splits are small, and this gives every process the
  same number of batches (a process that ran out early would leave the others waiting in a collective).
  """
  b = local_batch_size(config, process_count)
  d = config.data
  docs = _documents(sources.text_documents(config, split), config, split, process_index, process_count)
  ids = docs.map(packing.EncodeDocument(tokenizer, d.add_eos)).to_iter_dataset()
  rows = packing.pack_lm(ids, seq_len=d.seq_len, method=d.packing, num_bins=d.pack_bins, seed=config.train.seed,
                         shuffle_bins=split == "train" and d.shuffle)
  if split == "train":
    return iter(_finish_train(rows, config, b))
  return iter(ShardedBatchDataset(rows, b, process_index, process_count))


def task_batches(config, tokenizer, split: str, *, process_index: int = 0, process_count: int = 1):
  """Batches of the encoder tasks (mlm_nsp, classification, ner, qa) and T5 span corruption."""
  raise NotImplementedError(f"task.name={config.task.name!r}: the input pipeline for this task is not built yet")
