"""Extractive QA: question + context windows with a document stride, start/end token labels, character offsets of
context tokens, and the post-processing that turns predicted (start, end) logits back into answer text."""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from jaxlm.data import encoder_inputs


def _answer_tokens(offsets: list[tuple[int, int]], char_start: int, char_end: int) -> tuple[int, int] | None:
  """First and last context token overlapping the answer's characters [char_start, char_end)."""
  overlapping = [i for i, (s, e) in enumerate(offsets) if s < char_end and e > char_start and e > s]
  return (overlapping[0], overlapping[-1]) if overlapping else None


@dataclasses.dataclass
class QAWindows(grain.experimental.FlatMapTransform):
  """An (example id, SQuAD record) pair -> one row per window of the context:
  encoder inputs, start_positions/end_positions [] (0 = [CLS] when the answer is not inside the window),
  offsets [L, 2] (character span in the context for context tokens, -1 elsewhere), example_ids [],
  example_weights []."""
  tokenizer: object
  seq_len: int
  doc_stride: int
  max_query_length: int
  max_fan_out: int = 1 << 16

  def flat_map(self, item) -> list[dict[str, np.ndarray]]:
    index, record = item
    tok = self.tokenizer
    question = tok.encode(record["question"])[:self.max_query_length]
    context_ids, context_offsets = tok.encode_with_offsets(record["context"])
    room = self.seq_len - len(question) - 3  # [CLS] question [SEP] window [SEP]
    if room <= 0:
      raise ValueError(f"seq_len={self.seq_len} leaves no room for context after a {len(question)}-token question; "
                       "raise data.seq_len or lower data.max_query_length")
    answer = None
    if record["answers"]:  # training uses the first answer; eval scores against all of them
      start = record["answer_starts"][0]
      answer = _answer_tokens(context_offsets, start, start + len(record["answers"][0]))
    rows = []
    window_start = 0
    while True:
      window_ids = context_ids[window_start:window_start + room]
      out = encoder_inputs.encode_pair(question, window_ids, self.seq_len, tok)
      first = len(question) + 2  # position of the window's first token
      offsets = np.full((self.seq_len, 2), -1, np.int32)
      if window_ids:
        offsets[first:first + len(window_ids)] = context_offsets[window_start:window_start + len(window_ids)]
      start_pos = end_pos = 0
      if answer is not None and window_start <= answer[0] and answer[1] < window_start + len(window_ids):
        start_pos, end_pos = first + answer[0] - window_start, first + answer[1] - window_start
      out.update(start_positions=np.int32(start_pos), end_positions=np.int32(end_pos), offsets=offsets,
                 example_ids=np.int32(index), example_weights=np.float32(1.0))
      rows.append(out)
      if window_start + room >= len(context_ids):
        return rows
      window_start += min(self.doc_stride, room)


# Filler rows of an eval batch: no example, no context tokens.
PAD_VALUES = {"offsets": -1, "example_ids": -1}
