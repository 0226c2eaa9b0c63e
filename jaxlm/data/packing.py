"""Causal-LM examples: documents -> next-token (input, target) pairs -> packed rows of a fixed length with segment
ids and positions, so attention and the loss never cross documents."""

from __future__ import annotations

import dataclasses

import grain
import numpy as np


@dataclasses.dataclass
class EncodeDocument(grain.transforms.Map):
  """A text record -> int32 token ids (+ EOS). Runs wherever grain runs it, in worker processes too."""
  tokenizer: object
  add_eos: bool

  def map(self, record: dict) -> np.ndarray:
    ids = self.tokenizer.encode(record["text"])
    if self.add_eos:
      ids = ids + [self.tokenizer.eos_id]
    return np.asarray(ids, np.int32)


@dataclasses.dataclass
class NextTokenPairs(grain.experimental.FlatMapTransform):
  """Token ids of one document -> (inputs, targets) chunks of at most `seq_len` pairs each.

  A document longer than a row is cut into consecutive chunks; every other document stays whole. A document of
  fewer than 2 tokens has no pair and yields nothing.
  """
  seq_len: int
  max_fan_out: int = 1 << 20  # the iterator flat-map does not bound fan-out; documents may be long

  def flat_map(self, ids: np.ndarray) -> list[dict[str, np.ndarray]]:
    inputs, targets = ids[:-1], ids[1:]
    return [{"inputs": inputs[i:i + self.seq_len], "targets": targets[i:i + self.seq_len]}
            for i in range(0, len(inputs), self.seq_len)]


def to_lm_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """grain's packed features -> the causal-LM batch row."""
  segment_ids = packed["inputs_segment_ids"].astype(np.int32)
  return {
      "inputs": packed["inputs"].astype(np.int32),  # [length]
      "targets": packed["targets"].astype(np.int32),
      "segment_ids": segment_ids,  # 1..n per document in the row, 0 = padding
      "positions": packed["inputs_positions"].astype(np.int32),  # restart at 0 for each document (or chunk)
      "weights": (segment_ids > 0).astype(np.float32),
  }


def pack_lm(ds: grain.IterDataset, *, seq_len: int, method: str, num_bins: int, seed: int,
            shuffle_bins: bool) -> grain.IterDataset:
  """IterDataset of token-id arrays -> IterDataset of packed causal-LM rows of length `seq_len`.

  first_fit: documents go whole into the first of `num_bins` open rows with room (more bins, less padding; rows of
  one group are emitted together, optionally shuffled). concat: the token stream is cut every `seq_len` pairs; a
  document cut at a row boundary continues in the next row with positions restarting at 0.
  """
  lengths = {"inputs": seq_len, "targets": seq_len}
  if method == "first_fit":
    pairs = grain.experimental.FlatMapIterDataset(ds, NextTokenPairs(seq_len))
    packed = grain.experimental.FirstFitPackIterDataset(
        pairs, length_struct=lengths, num_packing_bins=num_bins, seed=seed, shuffle_bins=shuffle_bins)
  elif method == "concat":
    pairs = ds.filter(lambda ids: len(ids) >= 2).map(lambda ids: {"inputs": ids[:-1], "targets": ids[1:]})
    packed = grain.experimental.ConcatThenSplitIterDataset(pairs, length_struct=lengths)
  else:
    raise ValueError(f"data.packing={method!r}: expected first_fit or concat")
  return packed.map(to_lm_row)
