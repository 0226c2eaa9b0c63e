"""Causal language modelling: next-token cross-entropy over packed sequences (segment ids keep documents apart), with
optional z-loss. Reads text records; rows are documents tokenised (+ EOS) and packed to data.seq_len."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from jaxlm.data import packing, records, rows
from jaxlm.models.decoder import Decoder, DecoderConfig
from jaxlm.tasks.common import cross_entropy


class LMTask:
  name = "lm"
  kind = records.TEXT
  labels_from_data = False
  eval_splits = ("eval",)
  test_split = None
  labels = ()

  def __init__(self, config):
    self.model_cfg = DecoderConfig.from_config(config.model)
    self.model = Decoder(self.model_cfg)
    self.z_loss = float(config.optim.z_loss)
    if config.data.seq_len > self.model_cfg.max_len:
      raise ValueError(f"data.seq_len={config.data.seq_len} exceeds model.max_len={self.model_cfg.max_len}")

  def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    ints = np.zeros((batch_size, seq_len), np.int32)
    return {"inputs": ints, "targets": ints, "segment_ids": ints + 1,
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy(),
            "weights": np.ones((batch_size, seq_len), np.float32)}

  def init_params(self, rng, batch):
    return self.model.init({"params": rng}, batch["inputs"], batch["positions"], batch["segment_ids"])["params"]

  def loss_fn(self, params, batch, rng, train: bool):
    logits = self.model.apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
        deterministic=not train, rngs={"dropout": rng} if train else None)  # [B, T, V]
    ce = cross_entropy(logits, batch["targets"], batch["weights"], self.z_loss)
    stats = {"loss": (ce.ce, ce.count)}
    if self.z_loss:
      stats["z_loss"] = (ce.loss - ce.ce, ce.count)
    return ce.loss / jnp.maximum(ce.count, 1.0), stats

  def predict(self, params, batch):
    return None

  def host_metrics(self, pairs, records_):
    return {}

  def pretrained_source(self):
    return None

  def row_steps(self, ctx: rows.RowContext) -> list:
    d = ctx.data_cfg
    pack = functools.partial(packing.pack_lm, seq_len=d.seq_len, method=d.packing, num_bins=d.pack_bins,
                             seed=ctx.seed, shuffle_bins=ctx.train and d.shuffle)
    return [rows.Map(rows.record), rows.Map(packing.EncodeDocument(ctx.tokenizer, d.add_eos)),
            rows.Stream(pack)]

  def pad_values(self, tokenizer):
    return {}

  def bucketed(self) -> bool:
    return False

  def read_predict_input(self, path, input_format):
    raise ValueError("task.name='lm' has no `jaxlm predict`: use `jaxlm generate` to sample from it")

  def write_predictions(self, records_, pairs, out, jsonl):
    raise ValueError("task.name='lm' has no `jaxlm predict`")


TASK = LMTask
