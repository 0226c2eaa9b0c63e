"""Fine-tuning rows that hold several examples: whole encoder examples ([CLS] ... [SEP], encoded one a row by their
task) packed first-fit into rows of data.seq_len with segment ids and per-example positions, their per-example values
gathered into arrays of a fixed size (data.pack_max_examples), so the pipeline stores packed rows like any other."""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np

from jaxlm.data.rows import Stream

# The arrays every packed row gains ([L] = data.seq_len positions, [M] = data.pack_max_examples slots):
#   segment_ids [L]: 1..n for the row's n examples, 0 on padding; attention stays inside a segment
#   positions [L]: position of each token within its example (what the encoder's position embedding reads)
#   example_starts [M]: where each example begins in the row (its [CLS]); 0 in empty slots
#   position_example_ids [L]: the example id of each position, -1 on padding (rows that carry example_ids)
PAD_VALUES = {"position_example_ids": -1}  # fills of padding rows of an eval batch, beside the task's own


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a task's one-example rows hold, for packing."""
  token_keys: tuple[str, ...]  # [seq_len] arrays over the row's positions; the example's tokens are its prefix
  example_keys: tuple[str, ...]  # scalars of the example -> [M] arrays, slot k = the row's k-th example
  offset_keys: tuple[str, ...] = ()  # example keys that are positions within the example -> positions in the row


def max_examples(data_cfg) -> int:
  """data.pack_max_examples, checked against data.seq_len: an example takes at least its [CLS] and [SEP], and the
  [M] arrays must not be mistaken for [seq_len] ones when a batch is cut to its bucket length."""
  m, seq_len = int(data_cfg.pack_max_examples), int(data_cfg.seq_len)
  if not 1 <= m <= seq_len // 2:
    raise ValueError(f"data.pack_max_examples={m}: a row of data.seq_len={seq_len} holds 1..{seq_len // 2} examples "
                     "(each has at least [CLS] and [SEP])")
  return m


def steps(data_cfg, layout: Layout, pad_values: dict) -> list:
  """The row step that packs a task's encoded examples when data.pack_examples is on; none otherwise."""
  if not data_cfg.pack_examples:
    return []
  return [Stream(functools.partial(pack_examples, layout=layout, seq_len=int(data_cfg.seq_len),
                                   max_examples=max_examples(data_cfg), num_bins=int(data_cfg.pack_bins),
                                   pad_values=dict(pad_values)))]


def pack_examples(ds: grain.IterDataset, *, layout: Layout, seq_len: int, max_examples: int, num_bins: int,
                  pad_values: dict) -> grain.IterDataset:
  """IterDataset of one-example rows -> IterDataset of packed rows of `seq_len` positions.

  First fit over `num_bins` open rows (grain's FirstFitPackIterDataset, bins emitted in order, not shuffled: the
  pipeline shuffles rows per epoch): each example goes whole into the first row with room for its tokens and a free
  slot among `max_examples`; an example as long as a row fills one alone. Token arrays keep their names (padding
  filled from `pad_values`, else 0), example values become [max_examples] arrays (empty slots likewise), and every
  row gains segment_ids, positions, example_starts and, with example_ids, position_example_ids.
  """
  lengths = {**{k: seq_len for k in layout.token_keys}, **{k: max_examples for k in layout.example_keys}}
  packed = grain.experimental.FirstFitPackIterDataset(
      ds.map(_Cut(layout)), length_struct=lengths, num_packing_bins=num_bins, shuffle_bins=False,
      max_sequences_per_bin=max_examples)
  return packed.map(_PackedRow(layout, max_examples, pad_values))


@dataclasses.dataclass
class _Cut(grain.transforms.Map):
  """A one-example row -> its token arrays cut to its tokens (by attention_mask), its values as 1-element arrays."""
  layout: Layout

  def map(self, row: dict) -> dict[str, np.ndarray]:
    n = int(np.sum(row["attention_mask"]))
    out = {k: np.asarray(row[k])[:n] for k in self.layout.token_keys}
    out.update({k: np.asarray(row[k]).reshape(1) for k in self.layout.example_keys})
    return out


@dataclasses.dataclass
class _PackedRow(grain.transforms.Map):
  """grain's packed features -> the packed row (see pack_examples)."""
  layout: Layout
  max_examples: int
  pad_values: dict

  def map(self, p: dict) -> dict[str, np.ndarray]:
    first = self.layout.token_keys[0]
    segment_ids = p[f"{first}_segment_ids"].astype(np.int32)
    positions = p[f"{first}_positions"].astype(np.int32)
    real = segment_ids > 0
    out = {k: np.where(real, p[k], np.asarray(self.pad_values.get(k, 0), p[k].dtype)) for k in self.layout.token_keys}
    # examples lie whole and in slot order, so the k-th start of a segment is the k-th example's [CLS]
    starts = np.zeros(self.max_examples, np.int32)
    found = np.flatnonzero(real & (positions == 0))
    starts[:len(found)] = found
    for k in self.layout.example_keys:
      used = p[f"{k}_segment_ids"] > 0
      value = p[k] + starts.astype(p[k].dtype) if k in self.layout.offset_keys else p[k]
      out[k] = np.where(used, value, np.asarray(self.pad_values.get(k, 0), p[k].dtype))
    out.update(segment_ids=segment_ids, positions=np.where(real, positions, 0).astype(np.int32),
               example_starts=starts)
    if "example_ids" in self.layout.example_keys:
      ids = out["example_ids"]
      out["position_example_ids"] = np.where(real, ids[np.maximum(segment_ids - 1, 0)], -1).astype(ids.dtype)
    return out


def dummy_arrays(batch_size: int, seq_len: int, max_examples: int) -> dict[str, np.ndarray]:
  """The arrays packing adds to a batch, with their shapes and dtypes (one example a row), for init and tracing."""
  ints = np.zeros((batch_size, seq_len), np.int32)
  return {"segment_ids": np.ones_like(ints), "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                                                           ints.shape).copy(),
          "example_starts": np.zeros((batch_size, max_examples), np.int32), "position_example_ids": ints.copy()}


def encoder_inputs(batch) -> dict:
  """The encoder's keyword inputs of a packed batch (segment_ids, positions); {} for one example a row."""
  return {k: batch[k] for k in ("segment_ids", "positions") if k in batch}
