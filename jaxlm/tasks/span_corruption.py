"""T5 span-corruption pretraining: the encoder reads a token chunk with noise spans replaced by sentinels, the decoder
predicts each sentinel and the tokens it replaced (jaxlm/data/span_corruption.py), trained with teacher-forced
cross-entropy on the decoder targets; evaluation reports loss and perplexity.

Batches: encoder_input_ids [B, S] (S = data.seq_len), decoder_input_ids / decoder_target_ids / decoder_weights [B, T]
(T from the chunk length and the noise settings) and the segment ids of both sides (1 on tokens, 0 on padding).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxlm.data import records, rows
from jaxlm.data import span_corruption as spans
from jaxlm.models.encdec import EncDec, EncDecConfig
from jaxlm.tasks.common import cross_entropy


@dataclasses.dataclass
class SegmentIds:
  """Adds the segment ids of a span-corruption row (1 on tokens, 0 on padding). A random step that draws nothing: it
  runs beside the corruption, after it."""
  pad_id: int

  def __call__(self, row: dict, rng: np.random.Generator) -> dict:
    del rng
    return {**row, "encoder_segment_ids": (row["encoder_input_ids"] != self.pad_id).astype(np.int32),
            "decoder_segment_ids": (row["decoder_weights"] > 0).astype(np.int32)}


class SpanCorruptionTask:
  name = "span_corruption"
  kind = records.TEXT  # documents; data.add_pydoc adds the pydoc topics to the files
  labels_from_data = False
  eval_splits = ("eval",)
  test_split = None
  labels = ()

  def __init__(self, config):
    d = config.data
    if config.init.hf_path:
      raise ValueError("task.name='span_corruption' starts from a jaxlm workdir: convert a Hugging Face T5 directory "
                       "with `jaxlm convert` and set init.checkpoint_dir to it")
    self.model_cfg = EncDecConfig.from_config(config.model)
    self.model = EncDec(self.model_cfg)
    _, self.targets_length = spans.chunk_lengths(d.seq_len, d.noise_density, d.mean_noise_span_length)
    self.z_loss = float(config.optim.z_loss)

  def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    enc = np.zeros((batch_size, seq_len), np.int32)
    dec = np.zeros((batch_size, self.targets_length), np.int32)
    return {"encoder_input_ids": enc, "encoder_segment_ids": enc + 1, "decoder_input_ids": dec,
            "decoder_target_ids": dec, "decoder_segment_ids": dec + 1,
            "decoder_weights": np.ones(dec.shape, np.float32)}

  def init_params(self, rng, batch):
    return self.model.init({"params": rng}, batch["encoder_input_ids"], batch["decoder_input_ids"])["params"]

  def pretrained_source(self):
    return None  # a jaxlm workdir (init.checkpoint_dir) is read by the run itself

  def loss_fn(self, params, batch, rng, train: bool):
    logits = self.model.apply(
        {"params": params}, batch["encoder_input_ids"], batch["decoder_input_ids"], batch["encoder_segment_ids"],
        batch["decoder_segment_ids"], deterministic=not train, rngs={"dropout": rng} if train else None)  # [B, T, V]
    ce = cross_entropy(logits, batch["decoder_target_ids"], batch["decoder_weights"], self.z_loss)
    stats = {"loss": (ce.ce, ce.count), "accuracy": (ce.correct, ce.count)}
    if self.z_loss:
      stats["z_loss"] = (ce.loss - ce.ce, ce.count)
    return ce.loss / jnp.maximum(ce.count, 1.0), stats

  def predict(self, params, batch):
    return None

  def host_metrics(self, pairs, records_):
    return {}

  def row_steps(self, ctx: rows.RowContext) -> list:
    return [*spans.row_steps(ctx), rows.RandomMap(SegmentIds(ctx.tokenizer.pad_id))]

  def pad_values(self, tokenizer):
    return {"encoder_input_ids": tokenizer.pad_id, "decoder_input_ids": tokenizer.pad_id,
            "decoder_target_ids": tokenizer.pad_id}

  def bucketed(self) -> bool:
    return False

  def read_predict_input(self, path, input_format):
    raise ValueError("task.name='span_corruption' has no `jaxlm predict`: fine-tune it (task.name=seq2seq), or fill "
                     "sentinels with `jaxlm generate --prompt 'text with <extra_id_0> in it'`")

  def write_predictions(self, records_, pairs, out, jsonl):
    raise ValueError("task.name='span_corruption' has no `jaxlm predict`")


TASK = SpanCorruptionTask
