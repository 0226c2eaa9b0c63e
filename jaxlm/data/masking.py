"""BERT pre-training examples: sentence pairs for next-sentence prediction (50% with a random next sentence from
another document) and masked-LM targets (15% of tokens; 80% [MASK], 10% random, 10% kept; optional whole words)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from jaxlm.data import encoder_inputs


def mask_tokens(input_ids: np.ndarray, candidates: np.ndarray, rng: np.random.Generator, *, probability: float,
                mask_id: int, vocab_size: int, word_starts: np.ndarray | None) -> dict[str, np.ndarray]:
  """Chooses round(probability * #candidates) (at least 1) positions among `candidates` (bool [L]) and corrupts them.

  word_starts (bool [vocab]) switches on whole-word masking: a word (a start piece and the pieces that continue it)
  is chosen or left whole. Returns the corrupted input_ids, mlm_targets (original id at chosen positions, 0
  elsewhere) and mlm_weights (1 at chosen positions).
  """
  positions = np.flatnonzero(candidates)
  targets = np.zeros_like(input_ids)
  weights = np.zeros(input_ids.shape, np.float32)
  if len(positions) == 0:
    return {"input_ids": input_ids, "mlm_targets": targets, "mlm_weights": weights}
  n_predict = max(1, int(round(len(positions) * probability)))
  if word_starts is None:
    chosen = rng.choice(positions, size=min(n_predict, len(positions)), replace=False)
  else:
    # Group candidate positions into words: a new word begins at a word-start piece or after a gap.
    starts = word_starts[input_ids[positions]] | np.r_[True, np.diff(positions) > 1]
    groups = np.split(positions, np.flatnonzero(starts)[1:])
    chosen_groups, count = [], 0
    for g in rng.permutation(len(groups)):
      if count >= n_predict:
        break
      if count + len(groups[g]) > n_predict:  # BERT skips a word that would overshoot the budget
        continue
      chosen_groups.append(groups[g])
      count += len(groups[g])
    chosen = np.concatenate(chosen_groups) if chosen_groups else positions[:0]
  corrupted = input_ids.copy()
  roll = rng.random(len(chosen))
  random_ids = rng.integers(0, vocab_size, len(chosen), dtype=input_ids.dtype)
  corrupted[chosen] = np.where(roll < 0.8, mask_id, np.where(roll < 0.9, input_ids[chosen], random_ids))
  targets[chosen] = input_ids[chosen]
  weights[chosen] = 1.0
  return {"input_ids": corrupted, "mlm_targets": targets, "mlm_weights": weights}


# A sentence ends at . ! or ? followed by space and what starts a sentence; abbreviations ("Mr. Smith") are cut
# too, which NSP tolerates. Lines are sentences already (BERT's pre-training text is one sentence per line).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


def sentences(text: str) -> list[str]:
  """A document's sentences: its non-blank lines, each split further at sentence ends."""
  return [s.strip() for line in text.split("\n") if line.strip() for s in _SENTENCE_END.split(line) if s.strip()]


@dataclasses.dataclass
class MlmNspExamples:
  """grain random map: (document record) -> list of MLM+NSP examples drawn from it.

  Follows BERT's create_instances_from_document: sentences are gathered until a target length, split at a random
  sentence boundary into A and B; B is replaced (nsp_probability) by sentences of another document of `documents`
  (nsp_labels=1) and the unused sentences are returned to the stream. With nsp_probability=0 each example is one
  segment of whole sentences and nsp_labels is 0.
  """
  tokenizer: object
  documents: object  # random-access records of this process's documents, for random next sentences
  seq_len: int
  mlm_probability: float
  nsp_probability: float
  short_seq_probability: float
  whole_word_mask: bool

  def __post_init__(self):
    self._word_starts = self.tokenizer.word_start_mask() if self.whole_word_mask else None

  def _encode(self, text: str) -> list[list[int]]:
    return [ids for ids in self.tokenizer.encode_batch(sentences(text)) if ids]

  def _random_next(self, own_index: int, target: int, rng: np.random.Generator) -> list[int]:
    n = len(self.documents)
    other = int(rng.integers(0, n - 1))
    other += other >= own_index  # any document but this one
    lines = self.documents[other]["text"].split("\n")
    out = []
    # From a random line on, split and encode only what is used: documents can be long.
    for line in lines[int(rng.integers(0, len(lines))):]:
      for sentence in _SENTENCE_END.split(line):
        out.extend(self.tokenizer.encode(sentence.strip()) if sentence.strip() else [])
        if len(out) >= target:
          return out
    return out

  def _example(self, a: list[int], b: list[int] | None, is_random: int, rng: np.random.Generator) -> dict:
    a, b = encoder_inputs.truncate_pair(a, b, self.seq_len - (3 if b is not None else 2), rng)
    out = encoder_inputs.encode_pair(a, b, self.seq_len, self.tokenizer)
    special = (out["input_ids"] == self.tokenizer.cls_id) | (out["input_ids"] == self.tokenizer.sep_id)
    candidates = (out["attention_mask"] > 0) & ~special
    out.update(mask_tokens(out["input_ids"], candidates, rng, probability=self.mlm_probability,
                           mask_id=self.tokenizer.mask_id, vocab_size=self.tokenizer.vocab_size,
                           word_starts=self._word_starts))
    out["nsp_labels"] = np.int32(is_random)
    out["example_weights"] = np.float32(1.0)
    return out

  def __call__(self, item, rng: np.random.Generator) -> list[dict]:
    index, record = item
    segs = self._encode(record["text"])
    nsp = self.nsp_probability > 0 and len(self.documents) > 1
    max_tokens = self.seq_len - (3 if nsp else 2)
    target = max_tokens
    if rng.random() < self.short_seq_probability:
      target = int(rng.integers(2, max_tokens + 1))
    examples, chunk, length, i = [], [], 0, 0
    while i < len(segs):
      chunk.append(segs[i])
      length += len(segs[i])
      if i == len(segs) - 1 or length >= target:
        if not nsp:
          examples.append(self._example([t for s in chunk for t in s], None, 0, rng))
        else:
          a_end = 1 if len(chunk) < 2 else int(rng.integers(1, len(chunk)))
          a = [t for s in chunk[:a_end] for t in s]
          if len(chunk) == 1 or rng.random() < self.nsp_probability:
            b = self._random_next(index, max(1, target - len(a)), rng)
            is_random = 1
            i -= len(chunk) - a_end  # the sentences not used as A go back into the stream
          else:
            b = [t for s in chunk[a_end:] for t in s]
            is_random = 0
          if a and b:
            examples.append(self._example(a, b, is_random, rng))
        chunk, length = [], 0
      i += 1
    return examples
