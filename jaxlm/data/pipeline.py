"""The generic input pipeline: one global stream of rows, the same whatever the number of processes, devices or grain
workers.

A split's records go through the task's row steps once, in record order, and the rows are stored (`prepare_rows`:
on disk beside the prepared records, or in memory). Global batch k is then a pure function of k: positions
[k*B, (k+1)*B) of the epoch-by-epoch order of the rows (a seeded permutation per epoch, optionally grouped by length),
so a process reads only the rows its devices hold, a resume on any process count continues the exact stream from the
step number, and an epoch is one pass over the rows actually produced (windows included). Random row steps at the end
of a task's list (masking, noise) run per row at read time, seeded by (seed, epoch, row).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Sequence

import grain
import numpy as np

from jaxlm.data import encoder_inputs, row_stream
from jaxlm.data.rows import RandomMap, RowContext

# Seeds of the row steps while rows are prepared: fixed, so the prepared rows do not depend on train.seed (eval rows of
# different runs compare; a train split is prepared once for all seeds).
PREPARE_SEED = 1234
_ROWS_VERSION = "1"  # bumped when the stored layout changes
_CHUNK_ROWS = 8192  # rows per stored file
# data.* keys that say how rows are made, not what they are: prepared rows are shared across their values
_HOST_KEYS = ("worker_count", "worker_buffer_size", "read_threads", "prefetch")


# ---- prepared rows ------------------------------------------------------------------------------------------------


class Rows:
  """Random-access rows of one split: `take(indices)` stacks them; `lengths` are their used lengths (tokens that are
  not padding), which length grouping and bucketing read without touching the rows."""

  def __init__(self, chunks: list[dict[str, np.ndarray]], lengths: np.ndarray, directory: str | None = None):
    self._chunks = chunks
    self._starts = np.cumsum([0] + [len(next(iter(c.values()))) for c in chunks])
    self.lengths = lengths
    self._directory = directory  # stored rows: pickled (for grain workers) as their location, not their contents

  def __getstate__(self):
    if self._directory is not None:
      return {"directory": self._directory}
    return {"chunks": self._chunks, "lengths": self.lengths}

  def __setstate__(self, state):
    if "directory" in state:
      self.__dict__.update(_load(state["directory"]).__dict__)
    else:
      self.__init__(state["chunks"], state["lengths"])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    which = np.searchsorted(self._starts, indices, side="right") - 1
    keys = self._chunks[0].keys()
    out = {k: np.empty((len(indices),) + self._chunks[0][k].shape[1:], self._chunks[0][k].dtype) for k in keys}
    for c in np.unique(which):
      sel = np.flatnonzero(which == c)
      local = indices[sel] - self._starts[c]
      for k in keys:
        out[k][sel] = self._chunks[c][k][local]
    return out


def row_length(row: dict[str, np.ndarray]) -> int:
  """Positions of a row up to its last token that is not padding (by attention_mask, else segment ids); the whole
  row when it has neither."""
  for key in ("attention_mask", "segment_ids", "encoder_segment_ids"):
    if key in row:
      return int(np.max(np.flatnonzero(row[key]), initial=-1)) + 1
  first = next((v for v in row.values() if np.ndim(v) >= 1), None)
  return int(np.shape(first)[0]) if first is not None else 1


def _split_steps(steps: list) -> tuple[list, list]:
  """(steps run while preparing, trailing random steps run per row at read time)."""
  cut = len(steps)
  while cut > 0 and isinstance(steps[cut - 1], RandomMap):
    cut -= 1
  return steps[:cut], steps[cut:]


def _collect(rows, write_chunk) -> np.ndarray:
  """Groups the row stream into chunks of stacked arrays for `write_chunk`; returns the rows' lengths."""
  lengths, pending, shapes = [], [], None
  for i, row in enumerate(rows):
    row = {k: np.array(v) for k, v in row.items()}  # a copy: worker outputs live in shared memory until released
    if shapes is None:
      shapes = {k: v.shape for k, v in row.items()}
    elif {k: v.shape for k, v in row.items()} != shapes:
      raise ValueError(f"row {i} has arrays {_shapes(row)} but the first row has {shapes}: a task's rows must have "
                       "fixed shapes")
    lengths.append(row_length(row))
    pending.append(row)
    if len(pending) == _CHUNK_ROWS:
      write_chunk({k: np.stack([r[k] for r in pending]) for k in shapes})
      pending = []
  if pending:
    write_chunk({k: np.stack([r[k] for r in pending]) for k in shapes})
  return np.asarray(lengths, np.int32)


def _shapes(row) -> dict:
  return {k: v.shape for k, v in row.items()}


def _in_memory(steps: list, records, data_cfg) -> Rows:
  chunks = []
  lengths = _collect(row_stream.stream(steps, records, data_cfg, PREPARE_SEED), chunks.append)
  if not chunks:
    raise ValueError("the split produced no rows")
  return Rows(chunks, lengths)


@contextlib.contextmanager
def _lock(path: str):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _on_disk(steps: list, records, data_cfg, directory: str) -> Rows:
  """Rows stored as chunked .npy files in `directory` (memory-mapped when read); built once, under a file lock, by
  whichever process on this file system gets there first."""
  done = os.path.join(directory, "rows.json")
  with _lock(directory.rstrip("/") + ".lock"):
    if not os.path.isfile(done):
      tmp = directory + f".tmp{os.getpid()}"
      os.makedirs(tmp, exist_ok=True)
      counter = [0]

      def write_chunk(chunk):
        for k, v in chunk.items():
          np.save(os.path.join(tmp, f"{counter[0]:05d}.{k}.npy"), v)
        counter[0] += 1

      lengths = _collect(row_stream.stream(steps, records, data_cfg, PREPARE_SEED), write_chunk)
      if not counter[0]:
        raise ValueError("the split produced no rows")
      np.save(os.path.join(tmp, "lengths.npy"), lengths)
      with open(os.path.join(tmp, "rows.json"), "w") as f:
        json.dump({"chunks": counter[0], "rows": int(len(lengths))}, f)
      if os.path.isdir(directory):  # an unfinished build from an earlier, interrupted run
        os.rename(directory, tmp + ".old")
      os.rename(tmp, directory)
  return _load(directory)


def _load(directory: str) -> Rows:
  with open(os.path.join(directory, "rows.json")) as f:
    chunks = json.load(f)["chunks"]
  names = sorted(os.listdir(directory))
  loaded = []
  for c in range(chunks):
    prefix = f"{c:05d}."
    loaded.append({n[len(prefix):-len(".npy")]: np.load(os.path.join(directory, n), mmap_mode="r")
                   for n in names if n.startswith(prefix)})
  return Rows(loaded, np.load(os.path.join(directory, "lengths.npy")), directory)


def prepare_rows(task, records, tokenizer, split: str, data_cfg, cache_dir: str | None = None,
                 fingerprint: str = "") -> tuple[Rows, list]:
  """The task's rows of a split, prepared once (stored under cache_dir when given, named by a hash of everything they
  depend on), and the random steps still to run per row at read time."""
  ctx = RowContext(tokenizer, data_cfg, split, PREPARE_SEED, records)
  steps, random_steps = _split_steps(task.row_steps(ctx))
  if cache_dir is None:
    return _in_memory(steps, records, data_cfg), random_steps
  rows_keys = {k: v for k, v in data_cfg.to_dict().items() if k not in _HOST_KEYS}
  key = json.dumps([_ROWS_VERSION, task.name, split, fingerprint, tokenizer.fingerprint(), rows_keys,
                    list(task.labels)], sort_keys=True, default=str)
  name = f"{task.name}_{split}_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
  return _on_disk(steps, records, data_cfg, os.path.join(cache_dir, name)), random_steps


# ---- the global order ---------------------------------------------------------------------------------------------


class Order:
  """Which row sits at each position of the stream. Train: epoch after epoch, each a permutation of the rows (seeded
  by (seed, epoch)), optionally grouped by length within pools of `group` batches (rows of a batch have similar
  lengths; the batches' order stays random; a pool's incomplete batch is left out). Eval: the rows once, in order (or
  shortest first when grouped), padded to whole batches."""

  def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, train: bool, shuffle: bool = True,
               group: int = 0, num_epochs: int = 0):
    self.lengths, self.batch_size, self.seed, self.train = np.asarray(lengths), batch_size, seed, train
    self.shuffle, self.group, self.num_epochs = shuffle, group, num_epochs
    self._epochs: dict[int, np.ndarray] = {}  # the last epochs' orders: a batch meets at most two
    self.epoch_length = len(self._epoch(0))

  def epoch(self, e: int) -> np.ndarray:
    """The rows of epoch `e` in stream order."""
    n = len(self.lengths)
    if not self.train:
      return np.argsort(self.lengths, kind="stable") if self.group else np.arange(n)
    order = np.random.default_rng([self.seed, e]).permutation(n) if self.shuffle else np.arange(n)
    if not self.group:
      return order
    pool = self.group * self.batch_size
    runs = []
    for p, start in enumerate(range(0, n, pool)):
      members = order[start:start + pool]
      members = members[np.argsort(self.lengths[members], kind="stable")]
      pool_runs = [members[i:i + self.batch_size] for i in range(0, len(members) - self.batch_size + 1,
                                                                 self.batch_size)]
      rng = np.random.default_rng([self.seed, e, p])
      runs.extend(pool_runs[i] for i in rng.permutation(len(pool_runs)))
    return np.concatenate(runs) if runs else np.zeros((0,), np.int64)

  def _epoch(self, e: int) -> np.ndarray:
    if e not in self._epochs:
      if len(self._epochs) >= 2:
        self._epochs.pop(min(self._epochs))
      self._epochs[e] = self.epoch(e)
    return self._epochs[e]

  def num_batches(self) -> int | None:
    """Batches in the stream; None for an endless train stream."""
    if not self.train:
      return -(-len(self.lengths) // self.batch_size)
    if self.num_epochs <= 0:
      return None
    return self.num_epochs * self.epoch_length // self.batch_size

  def rows_at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row index, epoch) at stream positions; row -1 past the end of an eval pass (padding)."""
    positions = np.asarray(positions, np.int64)
    if not self.train:
      order = self._epoch(0)
      rows = np.where(positions < len(order), order[np.minimum(positions, len(order) - 1)], -1)
      return rows, np.zeros_like(positions)
    length = self.epoch_length
    if length == 0:
      raise ValueError(f"the train split has {len(self.lengths)} rows: not one batch of {self.batch_size}")
    epochs = positions // length
    rows = np.empty_like(positions)
    for e in np.unique(epochs):
      sel = epochs == e
      rows[sel] = self._epoch(int(e))[positions[sel] - e * length]
    return rows, epochs


# ---- batches ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _BatchAt:
  """Global batch k -> this process's rows of it (a grain map: picklable, so workers can run it)."""
  rows: Rows
  order: Order
  local_rows: tuple[int, ...]  # positions within a global batch that this process's devices hold
  random_steps: tuple
  seed: int
  pad_values: dict
  buckets: tuple[int, ...]
  seq_len: int

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    b = self.order.batch_size
    positions = k * b + np.arange(b)
    rows, epochs = self.order.rows_at(positions)
    local = np.asarray(self.local_rows)
    picked = rows[local]
    real = picked >= 0
    out = self.rows.take(np.where(real, picked, 0))
    if self.random_steps:  # per row, seeded by (seed, epoch, row): the same noise on any number of processes
      made = []
      for i in range(len(local)):
        row = {key: v[i] for key, v in out.items()}
        for j, step in enumerate(self.random_steps):
          row = step.fn(row, np.random.default_rng([self.seed, int(epochs[local[i]]), int(max(picked[i], 0)), j]))
        made.append(row)
      out = {key: np.stack([r[key] for r in made]) for key in made[0]}
    if not real.all():  # eval padding: the task's fill values, weight 0
      for key, v in out.items():
        v[~real] = self.pad_values.get(key, 0)
    if self.buckets:
      # every process cuts to the same length: the longest row of the whole global batch decides
      used = int(max(self.rows.lengths[rows[rows >= 0]], default=1))
      out = encoder_inputs.trim_to_length(out, encoder_inputs.bucket_length(used, self.buckets, self.seq_len),
                                          self.seq_len)
    return out


class BatchIterator:
  """This process's batches, from global batch `start` on; get_state()/set_state() hold the next batch number, which
  means the same on any number of processes."""

  def __init__(self, make, num_batches: int | None, data_cfg, start: int = 0, workers: int = 0):
    self._make, self._num, self._cfg, self._workers = make, num_batches, data_cfg, workers
    self._next = start
    self._it = None

  @property
  def batches_per_epoch(self) -> int:
    """Whole batches in one pass over the rows actually produced (windows, packed rows), at least 1."""
    order = self._make.order
    return max(1, order.epoch_length // order.batch_size)

  def _open(self):
    stop = self._num if self._num is not None else 1 << 40
    ds = grain.MapDataset.range(self._next, max(stop, self._next)).map(self._make).to_iter_dataset()
    if self._workers > 0:
      row_stream.allow_grain_workers()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers,
                                                       per_worker_buffer_size=self._cfg.worker_buffer_size))
    elif self._cfg.prefetch > 0:
      ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=self._cfg.prefetch)
    self._it = iter(ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._open()
    batch = next(self._it)
    self._next += 1
    return batch

  def get_state(self) -> dict:
    return {"next_batch": self._next}

  def set_state(self, state: dict) -> None:
    self.close()
    self._next = int(state["next_batch"])

  def close(self) -> None:
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self._it = None


def batches(task, records, tokenizer, split: str, *, data_cfg, batch_size: int, seed: int,
            local_rows: Sequence[int] | None = None, start: int = 0, cache_dir: str | None = None,
            fingerprint: str = "", rows: tuple[Rows, list] | None = None) -> BatchIterator:
  """This process's batches of `task`'s rows of one split: dicts of numpy arrays holding the `local_rows` positions
  (default: all) of each global batch of `batch_size` rows, from global batch `start` on.

  split 'train': epochs of the rows shuffled with `seed`, data.num_epochs of them (0 = forever), whole batches; a
  bucketed task's train batches are grouped by length (data.length_group_batches). Other splits: one pass in order
  (shortest first when grouped); positions past the last row carry the task's pad values (weight 0). A bucketed
  task's batches are cut to the smallest of data.bucket_lengths that fits the whole global batch. Train batches whose
  rows get random steps at read time are made in data.worker_count grain worker processes (when > 0), the others
  in a data.prefetch thread.
  """
  d = data_cfg
  train = split == "train"
  prepared, random_steps = rows if rows is not None else prepare_rows(task, records, tokenizer, split, d, cache_dir,
                                                                       fingerprint)
  bucketed = task.bucketed()
  buckets = tuple(int(x) for x in d.bucket_lengths) if bucketed else ()
  if any(x <= 0 or x > d.seq_len for x in buckets):
    raise ValueError(f"data.bucket_lengths={d.bucket_lengths}: every bucket must be in 1..data.seq_len={d.seq_len}")
  order = Order(prepared.lengths, batch_size, seed, train, shuffle=d.shuffle,
                group=d.length_group_batches if bucketed else 0, num_epochs=d.num_epochs if train else 1)
  local = tuple(range(batch_size)) if local_rows is None else tuple(int(r) for r in local_rows)
  make = _BatchAt(prepared, order, local, tuple(random_steps), seed, task.pad_values(tokenizer), buckets, d.seq_len)
  # workers make batches only where rows get work at read time (a train split's noise): elsewhere a batch is a gather
  # of prepared rows, cheaper than the workers started for every eval pass and resume (52 small eval batches took ~8 s
  # with 2 workers starting, 0.04 s without)
  workers = d.worker_count if train and random_steps else 0
  return BatchIterator(make, order.num_batches(), d, start, workers=workers)
