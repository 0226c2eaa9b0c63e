"""BERT-style encoder inputs shared by every encoder task: [CLS] A [SEP] (B [SEP]) with token types, attention mask,
pair truncation and length bucketing of finished batches."""

from __future__ import annotations

import numpy as np


def truncate_pair(a: list[int], b: list[int] | None, max_tokens: int, rng: np.random.Generator | None = None):
  """Shortens a and b (right ends) so they fit in `max_tokens` together.

  Without rng: HF tokenizers' longest_first, so imported checkpoints see the inputs they were fine-tuned on: the
  shorter segment keeps min(its length, max_tokens // 2) tokens and the longer one the rest. With rng (BERT
  pre-training): tokens are dropped one at a time from the longer segment, at a random end, so the model sees
  sentence starts and ends alike.
  """
  a, b = list(a), (list(b) if b is not None else None)
  if rng is None:
    if b is None:
      return a[:max_tokens], None
    if len(a) + len(b) > max_tokens:
      short, long = sorted((len(a), len(b)))
      short = min(max_tokens // 2, short)
      long = max_tokens - short
      keep_a, keep_b = (short, long) if len(a) <= len(b) else (long, short)
      a, b = a[:keep_a], b[:keep_b]
    return a, b
  while len(a) + (len(b) if b is not None else 0) > max_tokens:
    longer = a if b is None or len(a) > len(b) else b
    if rng.random() < 0.5:
      del longer[0]
    else:
      longer.pop()
  return a, b


def encode_pair(a: list[int], b: list[int] | None, seq_len: int, tokenizer) -> dict[str, np.ndarray]:
  """[CLS] a [SEP] (b [SEP]) padded to seq_len; a and b must already fit (see truncate_pair)."""
  ids = [tokenizer.cls_id] + list(a) + [tokenizer.sep_id]
  types = [0] * len(ids)
  if b is not None:
    ids += list(b) + [tokenizer.sep_id]
    types += [1] * (len(b) + 1)
  n = len(ids)
  if n > seq_len:
    raise ValueError(f"encoded pair of {n} tokens exceeds seq_len={seq_len}; truncate first")
  out = {"input_ids": np.full(seq_len, tokenizer.pad_id, np.int32), "token_type_ids": np.zeros(seq_len, np.int32),
         "attention_mask": np.zeros(seq_len, np.int32)}
  out["input_ids"][:n] = ids  # [length]
  out["token_type_ids"][:n] = types
  out["attention_mask"][:n] = 1
  return out


def bucket_length(used: int, buckets: tuple[int, ...], seq_len: int) -> int:
  """The smallest bucket length that holds `used` positions; seq_len when none does."""
  fitting = [b for b in sorted(buckets) if used <= b < seq_len]
  return fitting[0] if fitting else seq_len


def trim_to_bucket(batch: dict[str, np.ndarray], buckets: tuple[int, ...], seq_len: int) -> dict[str, np.ndarray]:
  """Cuts the length axis of every [b, seq_len, ...] array to the bucket of the batch's longest row.

  Only padding is cut: the bucket holds every position where attention_mask is 1. Each distinct length compiles
  the train step once, so a few buckets cost a few compilations.
  """
  if not buckets:
    return batch
  mask = batch["attention_mask"]
  used = int(np.max(np.flatnonzero(mask.any(axis=0)), initial=-1)) + 1
  return trim_to_length(batch, bucket_length(used, buckets, seq_len), seq_len)


def trim_to_length(batch: dict[str, np.ndarray], length: int, seq_len: int) -> dict[str, np.ndarray]:
  """Cuts the length axis of every [b, seq_len, ...] array of a batch to `length`."""
  if length == seq_len:
    return batch
  return {k: v[:, :length] if v.ndim >= 2 and v.shape[1] == seq_len else v for k, v in batch.items()}
