"""How a task's row steps run over a split's records: one deterministic stream of rows, in record order, the same
whatever the number of grain worker processes (jaxlm/data/pipeline.py stores the rows it yields)."""

from __future__ import annotations

import dataclasses

import grain
import numpy as np
from absl import flags

from jaxlm.data.rows import FlatMap, Map, RandomMap, Stream


def _apply(ds, step, seed: int):
  """One row step: a leading Map / RandomMap on the records' MapDataset, or any step after a Stream."""
  if isinstance(step, Map):
    return ds.map(step.fn)
  if isinstance(step, RandomMap):
    return ds.random_map(step.fn, seed=seed)
  if isinstance(step, FlatMap):
    return grain.experimental.FlatMapIterDataset(ds, step.fn)
  return step.fn(ds)  # a Stream (stream() checked the kinds)


def _with_index(index: int, rec):
  return index, rec


_RECORDS_PER_CHUNK = 256  # records whose rows travel from a grain worker as one message


@dataclasses.dataclass(frozen=True)
class _Chunk:
  """Chunk c -> the rows of records [c * size, (c + 1) * size): `items` (records with their index, through the
  leading Map / RandomMap steps), then the per-record steps after them, in order. A RandomMap after a FlatMap draws
  from (seed, record, step, row of the record), so a row's draw never depends on the rows before it."""
  items: grain.MapDataset
  steps: tuple
  size: int
  seed: int

  def __call__(self, c: int) -> list:
    out = []
    for i in range(c * self.size, min((c + 1) * self.size, len(self.items))):
      rows = [self.items[i]]
      for k, step in enumerate(self.steps):
        if isinstance(step, FlatMap):
          rows = [r for row in rows for r in step.fn.flat_map(row)]
        elif isinstance(step, Map):
          rows = [step.fn(r) for r in rows]
        else:  # RandomMap
          rows = [step.fn(r, np.random.default_rng([self.seed, i, k, j])) for j, r in enumerate(rows)]
      out.extend(rows)
    return out


class _Unchunk(grain.experimental.FlatMapTransform):
  max_fan_out = 1 << 30

  def flat_map(self, rows: list) -> list:
    return rows


def stream(steps: list, records, data_cfg, seed: int):
  """The rows of `steps` over every record in order, one deterministic stream, the same whatever the worker count.

  The per-record steps (those before the first Stream) run on chunks of records, in grain worker processes when
  data.worker_count > 0: a chunk's rows come back as one pickled message (a message a row cost more than the
  tokenisation it carried; pickling a chunk's arrays rather than giving each its own shared memory took ~10% off the
  rest). Streams (packing, which depends on every row before) run here, on all the rows in record order."""
  for step in steps:
    if not isinstance(step, (Map, RandomMap, FlatMap, Stream)):
      raise TypeError(f"a row step must be Map, RandomMap, FlatMap or Stream, not {type(step).__name__}")
  cut = next((i for i, step in enumerate(steps) if isinstance(step, Stream)), len(steps))
  per_record, streams = steps[:cut], steps[cut:]
  # read threads map whole chunks ahead: two each, not the 256 records they once read ahead
  read = grain.ReadOptions(num_threads=data_cfg.read_threads, prefetch_buffer_size=2 * data_cfg.read_threads)
  items = grain.MapDataset.source(records).map_with_index(_with_index)
  lead = 0
  while lead < len(per_record) and isinstance(per_record[lead], (Map, RandomMap)):
    items = _apply(items, per_record[lead], seed)
    lead += 1
  num_chunks = -(-len(items) // _RECORDS_PER_CHUNK)
  chunk = _Chunk(items, tuple(per_record[lead:]), _RECORDS_PER_CHUNK, seed)
  ds = grain.MapDataset.range(num_chunks).map(chunk).to_iter_dataset(read)
  if data_cfg.worker_count > 0:
    allow_grain_workers()
    ds = grain.experimental.WithOptionsIterDataset(ds, grain.experimental.DatasetOptions(min_shm_size=1 << 40))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count,
                                                     per_worker_buffer_size=data_cfg.worker_buffer_size))
  ds = grain.experimental.FlatMapIterDataset(ds, _Unchunk())
  for step in streams:
    ds = _apply(ds, step, seed)
  return ds


def allow_grain_workers() -> None:
  # grain's worker start-up reads absl flags directly; jaxlm parses its own arguments, so absl's flags are declared
  # parsed here (they keep their defaults) instead of failing with UnparsedFlagAccessError.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
