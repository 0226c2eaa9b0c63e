"""Token classification: word-level tags aligned to subword tokens (the first subword of a word carries its tag, the
other subwords carry no loss), in overlapping windows over sentences longer than a row."""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from jaxlm.data import encoder_inputs
from jaxlm.data.example_packing import Layout


@dataclasses.dataclass
class AlignTags(grain.experimental.FlatMapTransform):
  """An (example id, {'tokens', 'tags'}) pair -> one row per window of the sentence: encoder inputs + labels,
  label_weights, word_index, word_context [L], example_ids [], num_words [].

  A sentence whose sub-words fit in seq_len is one row. A longer one is cut, at word boundaries, into overlapping
  windows that start `stride` sub-words apart (0 = half a window), so every word is in at least one window and every
  window trains. word_context scores how much of the sentence a word sees around it in this window (the fewer tokens
  on its poorer side, counting a side that reaches the sentence's end as complete); a word's prediction is taken from
  the window where it scores highest (jaxlm/tasks/ner.py).
  """
  tokenizer: object
  seq_len: int
  label_ids: dict
  stride: int = 0
  max_fan_out: int = 1 << 16

  def flat_map(self, item) -> list[dict[str, np.ndarray]]:
    index, record = item
    budget = self.seq_len - 2
    # A word that encodes to nothing (a lone control character) still needs a position to carry its tag; a word
    # longer than a whole window keeps the pieces that fit (its first piece carries the tag).
    pieces = [(p or [self.tokenizer.unk_id])[:budget] for p in self.tokenizer.encode_words(record["tokens"])]
    starts = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(int)  # sub-word offset of each word
    stride = self.stride or max(1, budget // 2)
    rows, first = [], 0
    while True:
      last = first  # the window holds words first .. last - 1
      while last < len(pieces) and starts[last + 1] - starts[first] <= budget:
        last += 1
      rows.append(self._row(index, record, pieces, starts, first, last))
      if last >= len(pieces):
        return rows
      # the next window starts at the first word `stride` sub-words on, and never after this one's end: no word is
      # skipped, and each window moves on by at least one word
      nxt = first + 1
      while nxt < last and starts[nxt] < starts[first] + stride:
        nxt += 1
      first = nxt

  def _row(self, index, record, pieces, starts, first: int, last: int) -> dict[str, np.ndarray]:
    ids = [i for p in pieces[first:last] for i in p]
    out = encoder_inputs.encode_pair(ids, None, self.seq_len, self.tokenizer)
    word_index = np.full(self.seq_len, -1, np.int32)
    word_context = np.zeros(self.seq_len, np.float32)
    complete = float(self.seq_len)  # the context score of a side that reaches the sentence's end
    for w in range(first, last):
      offset = starts[w] - starts[first]
      pos = 1 + offset  # position 0 is [CLS]
      word_index[pos] = w
      left = offset if first > 0 else complete
      right = len(ids) - 1 - offset if last < len(pieces) else complete
      word_context[pos] = min(left, right)
    taken = word_index >= 0
    labels = np.zeros(self.seq_len, np.int32)
    labels[taken] = [self.label_ids[record["tags"][w]] for w in word_index[taken]]
    out.update(labels=labels, label_weights=taken.astype(np.float32), word_index=word_index,
               word_context=word_context, example_ids=np.int32(index), num_words=np.int32(len(pieces)))
    return out


# Filler rows of an eval batch: no word, no example.
PAD_VALUES = {"word_index": -1, "example_ids": -1}
# AlignTags' rows for data.pack_examples (a window of a long sentence is one example)
LAYOUT = Layout(token_keys=("input_ids", "token_type_ids", "attention_mask", "labels", "label_weights", "word_index",
                            "word_context"), example_keys=("example_ids", "num_words"))
