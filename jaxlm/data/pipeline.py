"""Per-process batch iterators for every task, built on grain's Dataset API: order, epochs, per-process sharding,
worker processes and resumable state (get_state / set_state, saved with the training checkpoint)."""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np
from absl import flags

from jaxlm.data import builders, classification, encoder_inputs, masking, ner, packing, qa, span_corruption
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.sources import DataError


def _read_options(config) -> grain.ReadOptions:
  """Threads that read and transform records ahead, in the main process or in each worker. The transforms are
  Python (the GIL), so threads beyond a few only contend; more help only when reads wait on remote storage."""
  return grain.ReadOptions(num_threads=config.data.read_threads, prefetch_buffer_size=4 * config.train.batch_size
                           if config.data.read_threads else 0)


def local_batch_size(config, process_count: int) -> int:
  b = config.train.batch_size
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


def _finish_train(ds: grain.IterDataset, config, batch_size: int, finish=None, group_lengths: bool = False
                  ) -> grain.IterDataset:
  """Batches (full batches only) and runs the pipeline in worker processes or a prefetch thread."""
  groups = config.data.length_group_batches
  if group_lengths and groups > 0:
    ds = LengthGroupedDataset(ds, groups * batch_size, batch_size, config.train.seed, drop_remainder=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  if finish is not None:
    ds = ds.map(finish)
  d = config.data
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


def _records(records, config, split: str, process_index: int, process_count: int, *, with_index: bool = False):
  """A split's records -> (this process's records, the items to transform: shuffled and repeated for train).

  with_index makes each item (index in this process's records, record): examples keep their identity (NER, QA)
  and MLM finds the other documents it draws random next sentences from.
  """
  ds = grain.MapDataset.source(records)
  if split == "train":
    ds = ds[process_index::process_count]  # each process reads only its own part
    if len(ds) == 0:
      raise DataError(f"process {process_index} of {process_count} has no training records ({len(records)} in all)")
  items = ds.map_with_index(_with_index) if with_index else ds
  if split == "train":
    if config.data.shuffle:
      items = items.shuffle(seed=config.train.seed)
    items = items.repeat(config.data.num_epochs if config.data.num_epochs > 0 else None)
  return ds, items


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
  _, docs = _records(builders.open_split(config, split).records, config, split, process_index, process_count)
  ids = docs.map(packing.EncodeDocument(tokenizer, d.add_eos)).to_iter_dataset(_read_options(config))
  rows = packing.pack_lm(ids, seq_len=d.seq_len, method=d.packing, num_bins=d.pack_bins, seed=config.train.seed,
                         shuffle_bins=split == "train" and d.shuffle)
  if split == "train":
    return iter(_finish_train(rows, config, b))
  return iter(ShardedBatchDataset(rows, b, process_index, process_count))


def _with_index(index: int, record):
  return index, record


@dataclasses.dataclass
class _Flatten(grain.experimental.FlatMapTransform):
  """A list of examples made from one record -> the examples."""
  max_fan_out: int = 1 << 16

  def flat_map(self, examples):
    return examples


def _tokens(ids: np.ndarray) -> dict[str, np.ndarray]:
  return {"tokens": ids}


# Eval masks and spans do not move with train.seed, so eval losses of different runs compare.
_EVAL_SEED = 1234


def task_batches(config, tokenizer, split: str, *, process_index: int = 0, process_count: int = 1):
  """Per-process batches of the encoder tasks and T5 span corruption, as a grain DatasetIterator (resumable).

  mlm_nsp: input_ids, token_type_ids, attention_mask, mlm_targets [b, L]; mlm_weights [b, L]; nsp_labels [b];
  example_weights [b]. classification: encoder inputs + labels [b], example_weights [b]. ner: encoder inputs +
  labels, label_weights, word_index [b, L], example_ids, num_words [b]. qa: encoder inputs + start_positions,
  end_positions, example_ids, example_weights [b], offsets [b, L, 2]. span_corruption: encoder_input_ids [b, L],
  decoder_input_ids, decoder_target_ids, decoder_weights [b, T] (T from span_corruption.chunk_lengths).
  Rows that complete an eval batch have attention_mask 0, weights 0 and example_ids -1.

  data.bucket_lengths cuts the length axis of fine-tuning batches to the smallest bucket that fits: for eval on
  any number of processes (each sees the whole global batch), for train with one process. With several
  training processes the rows stay at seq_len: they could not agree on a length without exchanging it.
  """
  name = config.task.name
  d = config.data
  b = local_batch_size(config, process_count)
  data = builders.open_split(config, split)
  train = split == "train"
  seed = config.train.seed if train else _EVAL_SEED
  read = _read_options(config)
  # MLM draws random next sentences from this process's documents only.
  documents, items = _records(data.records, config, split, process_index, process_count, with_index=True)
  label_ids = {label: i for i, label in enumerate(data.labels)}
  pad_values = {"input_ids": tokenizer.pad_id}
  buckets = tuple(int(x) for x in d.bucket_lengths)
  if any(x <= 0 or x > d.seq_len for x in buckets):
    raise ValueError(f"data.bucket_lengths={d.bucket_lengths}: every bucket must be in 1..data.seq_len={d.seq_len}")

  if name == "mlm_nsp":
    tokenizer_lib.require_ids(tokenizer, ("cls", "sep", "mask"), name)
    make = masking.MlmNspExamples(tokenizer, documents, d.seq_len, d.mlm_probability, d.nsp_probability,
                                  d.short_seq_probability, d.whole_word_mask)
    rows = grain.experimental.FlatMapIterDataset(items.random_map(make, seed=seed).to_iter_dataset(read), _Flatten())
    buckets = ()
  elif name == "span_corruption":
    tokens_length, targets_length = span_corruption.chunk_lengths(d.seq_len, d.noise_density, d.mean_noise_span_length)
    num_spans = int(round(round(tokens_length * d.noise_density) / d.mean_noise_span_length))
    sentinels = tuple(tokenizer.piece_to_id(tokenizer_lib.sentinel(i)) for i in range(max(num_spans, 1)))
    if tokenizer.unk_id in sentinels:
      raise ValueError(f"span corruption of {tokens_length}-token chunks needs {num_spans} sentinel pieces "
                       f"<extra_id_0>..; set tokenizer.num_sentinels >= {num_spans} and retrain with `jaxlm tokenizer`")
    ids = items.map(_second).map(packing.EncodeDocument(tokenizer, d.add_eos)).to_iter_dataset(read).map(_tokens)
    chunks = grain.experimental.ConcatThenSplitIterDataset(ids, length_struct={"tokens": tokens_length})
    corrupt = span_corruption.SpanCorruption(sentinels, tokenizer.eos_id, tokenizer.pad_id, d.seq_len,
                                             targets_length, d.noise_density, d.mean_noise_span_length)
    rows = chunks.random_map(corrupt, seed=seed)
    pad_values, buckets = {}, ()
  elif name == "classification":
    tokenizer_lib.require_ids(tokenizer, ("cls", "sep"), name)
    rows = items.map(_second).map(classification.EncodeClassification(tokenizer, d.seq_len, label_ids))
    rows = rows.to_iter_dataset(read)
  elif name == "ner":
    tokenizer_lib.require_ids(tokenizer, ("cls", "sep"), name)
    rows = items.map(ner.AlignTags(tokenizer, d.seq_len, label_ids)).to_iter_dataset(read)
    pad_values.update(ner.PAD_VALUES)
  elif name == "qa":
    tokenizer_lib.require_ids(tokenizer, ("cls", "sep"), name)
    windows = qa.QAWindows(tokenizer, d.seq_len, d.doc_stride, d.max_query_length)
    rows = grain.experimental.FlatMapIterDataset(items.to_iter_dataset(read), windows)
    pad_values.update(qa.PAD_VALUES)
  else:
    raise ValueError(f"task.name={name!r} has no input pipeline; expected lm, mlm_nsp, span_corruption, "
                     "classification, ner or qa")

  finish = functools.partial(encoder_inputs.trim_to_bucket, buckets=buckets, seq_len=d.seq_len) if buckets else None
  fine_tuning = name in ("classification", "ner", "qa")
  if train:
    return iter(_finish_train(rows, config, b, finish if process_count == 1 else None, group_lengths=fine_tuning))
  if fine_tuning and d.length_group_batches > 0:
    # eval rows are matched to their examples by example id, so their order is free: shortest first pads least
    rows = LengthGroupedDataset(rows, d.length_group_batches * b * process_count, b * process_count, None, False)
  return iter(ShardedBatchDataset(rows, b, process_index, process_count, pad_values, finish))


def _second(item):
  return item[1]
