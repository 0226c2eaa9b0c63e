"""Causal language modelling: next-token cross-entropy over packed sequences, with optional z-loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.models.decoder import Decoder, DecoderConfig


def cross_entropy(logits, targets, weights, z_loss: float = 0.0):
  """Weighted token cross-entropy in float32. Returns (sum of losses incl. z-loss, sum of CE only, sum weights)."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  ce = (log_z - target_logit) * weights
  total = ce + z_loss * jnp.square(log_z) * weights if z_loss else ce
  return jnp.sum(total), jnp.sum(ce), jnp.sum(weights)


class LMTask:
  name = "lm"
  eval_splits = ("eval",)
  test_split = None

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
        deterministic=not train, rngs={"dropout": rng} if train else None)
    total, ce, count = cross_entropy(logits, batch["targets"], batch["weights"], self.z_loss)
    loss = total / jnp.maximum(count, 1.0)
    stats = {"loss": (ce, count)}
    if self.z_loss:
      stats["z_loss"] = (total - ce, count)
    return loss, stats

  predict_fn = None

  def host_metrics(self, pairs):
    return {}
