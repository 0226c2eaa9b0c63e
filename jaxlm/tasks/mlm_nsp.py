"""BERT pretraining: masked-language-model cross-entropy over the masked positions plus next-sentence prediction
(head "mlm_nsp"), or MLM alone (head "mlm"); MLM and NSP accuracy come with the loss.

Batches: encoder inputs, `mlm_targets` [B, L] (the original token at masked positions), `mlm_weights` [B, L]
(1 there), `nsp_labels` [B] (1 = the second segment is a random one) and `example_weights` [B].
"""

from __future__ import annotations

import dataclasses

import grain
import jax.numpy as jnp
import numpy as np

from jaxlm.data import masking, records, rows
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.models.encoder import INPUT_NAMES, dummy_inputs
from jaxlm.models.heads import PreTrainingModel
from jaxlm.models.layers import compact, gather
from jaxlm.tasks.common import bert_source, check_head, cross_entropy, encoder_config

HEADS = ("mlm_nsp", "mlm")


@dataclasses.dataclass
class _Flatten(grain.experimental.FlatMapTransform):
  """The list of examples made from one document -> the examples."""
  max_fan_out: int = 1 << 16

  def flat_map(self, examples):
    return examples


class MlmNspTask:
  name = "mlm_nsp"
  kind = records.TEXT
  labels_from_data = False
  eval_splits = ("eval",)
  test_split = None
  labels = ()

  def __init__(self, config):
    self.model_cfg, self.hf_path = encoder_config(config)
    self.head = check_head(self.name, config.task.head, HEADS)
    self.max_predictions = config.task.mlm_max_predictions
    if self.max_predictions < 0:
      raise ValueError(f"task.mlm_max_predictions must be 0 (every position) or positive, got {self.max_predictions}")
    self.model = PreTrainingModel(self.model_cfg, nsp=self.head == "mlm_nsp")

  def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    ints = np.zeros((batch_size, seq_len), np.int32)
    return {**dummy_inputs(batch_size, seq_len), "mlm_targets": ints, "mlm_weights": np.zeros_like(ints, np.float32),
            "nsp_labels": np.zeros((batch_size,), np.int32), "example_weights": np.ones((batch_size,), np.float32)}

  def init_params(self, rng, batch):
    return self.model.init({"params": rng}, *(batch[k] for k in INPUT_NAMES))["params"]

  def pretrained_source(self):
    """init.hf_path's encoder and, where it has them, its MLM/NSP heads; or None."""
    return bert_source(self.hf_path, with_heads=True)

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
    mlm = cross_entropy(mlm_logits, targets, weights)
    mlm_total, mlm_correct, n_mlm = mlm.loss, mlm.correct, mlm.count
    loss = mlm_total / jnp.maximum(n_mlm, 1.0)
    stats = {"mlm_loss": (mlm_total, n_mlm), "mlm_accuracy": (mlm_correct, n_mlm)}
    if nsp_logits is not None:
      nsp = cross_entropy(nsp_logits, batch["nsp_labels"], batch["example_weights"])
      nsp_total, nsp_correct, n = nsp.loss, nsp.correct, nsp.count
      loss = loss + nsp_total / jnp.maximum(n, 1.0)
      stats.update({"nsp_loss": (nsp_total, n), "nsp_accuracy": (nsp_correct, n)})
    # the loop weights micro-batches by the loss count: here, masked tokens
    stats["loss"] = (loss * n_mlm, n_mlm)
    return loss, stats

  def predict(self, params, batch):
    return None

  def host_metrics(self, pairs, records_):
    return {}

  def row_steps(self, ctx):
    tokenizer_lib.require_ids(ctx.tokenizer, ("cls", "sep", "mask"), self.name)
    d = ctx.data_cfg
    make = masking.MlmNspExamples(ctx.tokenizer, ctx.documents, d.seq_len, d.mlm_probability, d.nsp_probability,
                                  d.short_seq_probability, d.whole_word_mask)
    return [rows.RandomMap(make), rows.FlatMap(_Flatten())]

  def pad_values(self, tokenizer):
    return {"input_ids": tokenizer.pad_id}

  def bucketed(self) -> bool:
    return False

  def read_predict_input(self, path, input_format):
    raise ValueError("task.name='mlm_nsp' has no `jaxlm predict`: fine-tune it for a task first")

  def write_predictions(self, records_, pairs, out, jsonl):
    raise ValueError("task.name='mlm_nsp' has no `jaxlm predict`")


TASK = MlmNspTask
