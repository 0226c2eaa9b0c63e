"""BERT pretraining: masked-language-model cross-entropy over the masked positions plus next-sentence prediction
(head "mlm_nsp"), or MLM alone (head "mlm"); MLM and NSP accuracy come with the loss.

Batches: encoder inputs, `mlm_targets` [B, L] (the original token at masked positions), `mlm_weights` [B, L]
(1 there), `nsp_labels` [B] (1 = the second segment is a random one) and `example_weights` [B].
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxlm import convert, heads
from jaxlm.crf import compact, gather
from jaxlm.models.encoder import INPUT_NAMES, EncoderConfig, dummy_inputs
from jaxlm.tasks.classification import check_head, cross_entropy

HEADS = ("mlm_nsp", "mlm")


class MlmNspTask:
  name = "mlm_nsp"
  eval_splits = ("eval",)
  test_split = None

  def __init__(self, config):
    self.model_cfg = EncoderConfig.from_config(config.model)
    self.head = check_head(self.name, config.task.head, HEADS)
    self.max_predictions = config.task.mlm_max_predictions
    if self.max_predictions < 0:
      raise ValueError(f"task.mlm_max_predictions must be 0 (every position) or positive, got {self.max_predictions}")
    self.hf_path = config.init.hf_path
    if self.hf_path:
      convert.check_compatible(self.model_cfg, self.hf_path)
    self.model = heads.PreTrainingModel(self.model_cfg, nsp=self.head == "mlm_nsp")

  def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    ints = np.zeros((batch_size, seq_len), np.int32)
    return {**dummy_inputs(batch_size, seq_len), "mlm_targets": ints, "mlm_weights": np.zeros_like(ints, np.float32),
            "nsp_labels": np.zeros((batch_size,), np.int32), "example_weights": np.ones((batch_size,), np.float32)}

  def init_params(self, rng, batch):
    return self.model.init({"params": rng}, *(batch[k] for k in INPUT_NAMES))["params"]

  def pretrained_source(self) -> tuple[str, dict] | None:
    """(name, params tree) to start from: init.hf_path's encoder and, where it has them, its MLM/NSP heads; or None."""
    return (self.hf_path, convert.source_tree(self.hf_path, with_heads=True)) if self.hf_path else None

  def check_batch(self, batch: dict[str, np.ndarray]) -> None:
    targets = batch["mlm_targets"][batch["mlm_weights"] > 0]
    bad = targets[(targets < 0) | (targets >= self.model_cfg.vocab_size)]
    if bad.size:
      raise ValueError(f"batch 'mlm_targets': token id {int(bad[0])} is outside model.vocab_size="
                       f"{self.model_cfg.vocab_size}")
    if self.head == "mlm_nsp":
      labels = batch["nsp_labels"][batch["example_weights"] > 0]
      if np.any((labels != 0) & (labels != 1)):
        raise ValueError("batch 'nsp_labels': next-sentence labels must be 0 or 1")

  def loss_fn(self, params, batch, rng, train: bool):
    targets, weights = batch["mlm_targets"], batch["mlm_weights"]
    positions = None
    if self.max_predictions:
      # the vocabulary projection is the largest matmul: compute it only at (up to) max_predictions masked positions
      order, _ = compact(weights > 0)
      positions = order[:, :self.max_predictions]  # [B, P]
      targets, weights = gather(targets, positions), gather(weights, positions)
    mlm_logits, nsp_logits = self.model.apply(
        {"params": params}, *(batch[k] for k in INPUT_NAMES), deterministic=not train,
        rngs={"dropout": rng} if train else None, mlm_positions=positions)  # [B, P, V], [B, 2]
    mlm_total, mlm_correct = cross_entropy(mlm_logits, targets, weights)
    n_mlm = jnp.sum(weights)
    loss = mlm_total / jnp.maximum(n_mlm, 1.0)
    stats = {"mlm_loss": (mlm_total, n_mlm), "mlm_accuracy": (mlm_correct, n_mlm)}
    if nsp_logits is not None:
      w = batch["example_weights"]
      nsp_total, nsp_correct = cross_entropy(nsp_logits, batch["nsp_labels"], w)
      n = jnp.sum(w)
      loss = loss + nsp_total / jnp.maximum(n, 1.0)
      stats.update({"nsp_loss": (nsp_total, n), "nsp_accuracy": (nsp_correct, n)})
    # the loop weights micro-batches by the loss count: here, masked tokens
    stats["loss"] = (loss * n_mlm, n_mlm)
    return loss, stats

  predict_fn = None

  def host_metrics(self, pairs) -> dict[str, float]:
    return {}
