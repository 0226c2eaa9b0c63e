"""T5 span corruption: random noise spans (density 0.15, mean length 3) of a token chunk become sentinels in the
encoder input, and the decoder predicts each sentinel followed by the tokens it replaced."""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np

from jaxlm.data import packing, rows
from jaxlm.data import tokenizer as tokenizer_lib


def _corrupted_lengths(tokens_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
  """(encoder length, decoder length) after corrupting `tokens_length` tokens, EOS included in both."""
  num_noise = int(round(tokens_length * noise_density))
  num_nonnoise = tokens_length - num_noise
  num_spans = int(round(num_noise / mean_span))
  return num_nonnoise + num_spans + 1, num_noise + num_spans + 1


def chunk_lengths(inputs_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
  """(raw tokens per chunk, decoder length): the longest chunk whose corrupted encoder input fits inputs_length.

  T5's random_spans_helper: the corrupted lengths are fixed by the chunk length, so every full chunk fills the
  encoder exactly and the decoder length is known in advance.
  """
  tokens_length = inputs_length
  while _corrupted_lengths(tokens_length + 1, noise_density, mean_span)[0] <= inputs_length:
    tokens_length += 1
  while tokens_length > 1 and _corrupted_lengths(tokens_length, noise_density, mean_span)[0] > inputs_length:
    tokens_length -= 1
  return tokens_length, _corrupted_lengths(tokens_length, noise_density, mean_span)[1]


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
  """Lengths of `num_segments` non-empty segments that sum to num_items, uniformly at random."""
  cuts = np.sort(rng.choice(np.arange(1, num_items), size=num_segments - 1, replace=False))
  return np.diff(np.r_[0, cuts, num_items])


def noise_mask(length: int, noise_density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
  """bool [length]: True on noise tokens, in round(length*density/mean) spans alternating with kept spans, starting
  with a kept span (T5's random_spans_noise_mask)."""
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(min(int(round(num_noise / mean_span)), num_noise, length - num_noise), 1)
  noise_lengths = _random_segmentation(num_noise, num_spans, rng)
  keep_lengths = _random_segmentation(length - num_noise, num_spans, rng)
  spans = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)
  return np.repeat(np.tile([False, True], num_spans), spans)


@dataclasses.dataclass
class SpanCorruption:
  """grain random map: a packed chunk {'tokens', 'tokens_segment_ids'} -> the four T5 arrays:
  encoder_input_ids [inputs_length], decoder_input_ids / decoder_target_ids / decoder_weights [targets_length]."""
  sentinel_ids: tuple[int, ...]
  eos_id: int
  pad_id: int
  inputs_length: int
  targets_length: int
  noise_density: float
  mean_span: float

  def __call__(self, chunk: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    tokens = chunk["tokens"][chunk["tokens_segment_ids"] > 0]
    inputs, targets = [], []
    if len(tokens) >= 2:
      noise = noise_mask(len(tokens), self.noise_density, self.mean_span, rng)
      span_starts = noise & ~np.r_[False, noise[:-1]]
      span_ids = np.cumsum(span_starts) - 1  # which span each noise token belongs to
      for t, is_noise, start, span in zip(tokens, noise, span_starts, span_ids):
        if not is_noise:
          inputs.append(t)
          continue
        if start:
          inputs.append(self.sentinel_ids[span])
          targets.append(self.sentinel_ids[span])
        targets.append(t)
    else:
      inputs = list(tokens)
    inputs.append(self.eos_id)
    targets.append(self.eos_id)
    enc = np.full(self.inputs_length, self.pad_id, np.int32)
    enc[:len(inputs)] = inputs
    dec_targets = np.full(self.targets_length, self.pad_id, np.int32)
    dec_targets[:len(targets)] = targets
    dec_inputs = np.full(self.targets_length, self.pad_id, np.int32)
    dec_inputs[1:len(targets)] = targets[:-1]  # teacher forcing: shifted right, starting from the pad id (T5)
    weights = np.zeros(self.targets_length, np.float32)
    weights[:len(targets)] = 1.0
    return {"encoder_input_ids": enc, "decoder_input_ids": dec_inputs, "decoder_target_ids": dec_targets,
            "decoder_weights": weights}


def _tokens(ids: np.ndarray) -> dict[str, np.ndarray]:
  return {"tokens": ids}


def _concat_then_split(ds: grain.IterDataset, tokens_length: int) -> grain.IterDataset:
  return grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": tokens_length})


def row_steps(ctx: rows.RowContext) -> list:
  """The rows of span-corruption pretraining: documents tokenised (+ EOS), concatenated and cut into chunks whose
  corrupted form fills data.seq_len encoder positions, then corrupted with fresh noise per chunk."""
  d, tok = ctx.data_cfg, ctx.tokenizer
  tokens_length, targets_length = chunk_lengths(d.seq_len, d.noise_density, d.mean_noise_span_length)
  num_spans = int(round(round(tokens_length * d.noise_density) / d.mean_noise_span_length))
  sentinels = tuple(tok.piece_to_id(tokenizer_lib.sentinel(i)) for i in range(max(num_spans, 1)))
  if tok.unk_id in sentinels:
    raise ValueError(f"span corruption of {tokens_length}-token chunks needs {num_spans} sentinel pieces "
                     f"<extra_id_0>..; set tokenizer.num_sentinels >= {num_spans} and retrain with `jaxlm tokenizer`")
  corrupt = SpanCorruption(sentinels, tok.eos_id, tok.pad_id, d.seq_len, targets_length, d.noise_density,
                           d.mean_noise_span_length)
  return [rows.Map(rows.record), rows.Map(packing.EncodeDocument(tok, d.add_eos)),
          rows.Stream(functools.partial(_split_stream, tokens_length=tokens_length)), rows.RandomMap(corrupt)]


def _split_stream(ds: grain.IterDataset, tokens_length: int) -> grain.IterDataset:
  return _concat_then_split(ds.map(_tokens), tokens_length)
