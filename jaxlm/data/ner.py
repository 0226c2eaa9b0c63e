"""Token classification: word-level tags aligned to subword tokens (the first subword of a word carries its tag, the
other subwords carry no loss), and predictions mapped back to one tag per word."""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from jaxlm.data import encoder_inputs


@dataclasses.dataclass
class AlignTags(grain.transforms.Map):
  """An (example id, {'tokens', 'tags'}) pair -> encoder inputs + labels, label_weights, word_index [L],
  example_ids [], num_words [].

  Words that do not fit in seq_len are left out of the row (their tags are predicted as 'O' when mapping back).
  """
  tokenizer: object
  seq_len: int
  label_ids: dict

  def map(self, item) -> dict[str, np.ndarray]:
    index, record = item
    words, tags = record["tokens"], record["tags"]
    pieces = self.tokenizer.encode_words(words)
    ids, first = [], []  # first[i] = word number where piece i starts that word, else -1
    budget = self.seq_len - 2
    for w, word_pieces in enumerate(pieces):
      # A word that encodes to nothing (a lone control character) still needs a position to carry its tag.
      word_pieces = word_pieces or [self.tokenizer.unk_id]
      if len(ids) + len(word_pieces) > budget:
        break
      ids.extend(word_pieces)
      first.extend([w] + [-1] * (len(word_pieces) - 1))
    out = encoder_inputs.encode_pair(ids, None, self.seq_len, self.tokenizer)
    word_index = np.full(self.seq_len, -1, np.int32)
    word_index[1:1 + len(first)] = first  # position 0 is [CLS]
    starts = word_index >= 0
    labels = np.zeros(self.seq_len, np.int32)
    labels[starts] = [self.label_ids[tags[w]] for w in word_index[starts]]
    out.update(labels=labels, label_weights=starts.astype(np.float32), word_index=word_index,
               example_ids=np.int32(index), num_words=np.int32(len(words)))
    return out


# Filler rows of an eval batch: no word, no example.
PAD_VALUES = {"word_index": -1, "example_ids": -1}


def predictions_to_tags(batch: dict[str, np.ndarray], predicted: np.ndarray, label_names) -> dict[int, list[str]]:
  """Per example id, one tag per word of the sentence (label_names[predicted id] at each word's first subword).

  `predicted` is [b, L] tag ids. Words cut off by seq_len get 'O' so the list always matches the sentence.
  """
  out = {}
  for row in range(predicted.shape[0]):
    example = int(batch["example_ids"][row])
    if example < 0:
      continue
    tags = ["O"] * int(batch["num_words"][row])
    starts = np.flatnonzero(batch["word_index"][row] >= 0)
    for pos in starts:
      tags[int(batch["word_index"][row, pos])] = label_names[int(predicted[row, pos])]
    out[example] = tags
  return out


def collect_tags(pairs, label_names) -> list[list[str]]:
  """(batch, predicted ids) pairs of a whole eval pass -> tag lists in example order (seqeval's input)."""
  by_example = {}
  for batch, predicted in pairs:
    by_example.update(predictions_to_tags(batch, np.asarray(predicted), label_names))
  return [by_example[i] for i in sorted(by_example)]
