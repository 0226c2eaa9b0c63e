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
