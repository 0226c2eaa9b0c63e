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


def span_text(context: str, offsets: np.ndarray, start: int, end: int) -> str:
  """The context characters covered by tokens start..end (inclusive) of one row."""
  return context[int(offsets[start, 0]):int(offsets[end, 1])]


def best_answers(pairs, contexts: dict[int, str], *, max_answer_tokens: int = 30, n_best: int = 20) -> dict[int, str]:
  """Per example id, the highest-scoring answer text over all of its windows.

  pairs: (batch, (start_logits [b, L], end_logits [b, L])) for an eval pass; contexts: example id -> context.
  A span must lie on context tokens, start <= end, and be at most max_answer_tokens long; its score is
  start_logit + end_logit. An example with no valid span gets ''.
  """
  best: dict[int, tuple[float, str]] = {}
  for batch, (start_logits, end_logits) in pairs:
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    for row in range(start_logits.shape[0]):
      example = int(batch["example_ids"][row])
      if example < 0:
        continue
      offsets = batch["offsets"][row]
      in_context = offsets[:, 0] >= 0
      starts = [i for i in np.argsort(-start_logits[row])[:n_best] if in_context[i]]
      ends = [i for i in np.argsort(-end_logits[row])[:n_best] if in_context[i]]
      for s in starts:
        for e in ends:
          if s <= e < s + max_answer_tokens:
            score = float(start_logits[row, s] + end_logits[row, e])
            if example not in best or score > best[example][0]:
              best[example] = (score, span_text(contexts[example], offsets, s, e))
  return {example: best.get(example, (0.0, ""))[1] for example in contexts}
