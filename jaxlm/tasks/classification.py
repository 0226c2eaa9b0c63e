"""Sequence classification (single sentences or pairs through token_type_ids) on the BERT encoder's pooled output:
cross-entropy, accuracy, and macro-F1 over the labels present (as sklearn's f1_score(average="macro"))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import convert, heads
from jaxlm.models.encoder import INPUT_NAMES, EncoderConfig, dummy_inputs
from jaxlm.tasks import fine_tuning_splits

HEADS = ("sequence",)


def check_head(task_name: str, head: str, allowed: tuple[str, ...]) -> str:
  """task.head '' means the task's own head (the first allowed); anything else must be one the task has."""
  head = head or allowed[0]
  if head not in allowed:
    raise ValueError(f"task.head='{head}' does not fit task.name='{task_name}'; its heads: {', '.join(allowed)}")
  return head


def resolved_labels(config) -> tuple[str, ...]:
  labels = tuple(config.data.labels)
  if not labels:
    raise ValueError(f"task.name='{config.task.name}' needs its label names to size the head: set data.labels, or "
                     "resolve them from the train split (jaxlm.data.builders.open_split(config, 'train').labels) first")
  if len(set(labels)) != len(labels):
    raise ValueError(f"data.labels lists a label more than once: {labels}")
  return labels


def check_label_ids(values: np.ndarray, weights: np.ndarray, labels, where: str) -> None:
  """Label ids of weighted entries must index data.labels: catches data encoded with another label set."""
  used = values[weights > 0]
  bad = used[(used < 0) | (used >= len(labels))]
  if bad.size:
    raise ValueError(f"{where}: label id {int(bad[0])} is outside data.labels ({len(labels)} labels: "
                     f"{', '.join(labels)})")


def cross_entropy(logits, labels, weights):
  """Weighted cross-entropy sum and correct-prediction sum; logits [..., C], labels/weights [...]."""
  log_z = jax.nn.logsumexp(logits, axis=-1)
  gold = jnp.take_along_axis(logits, jnp.clip(labels, 0, logits.shape[-1] - 1)[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return jnp.sum((log_z - gold) * weights), jnp.sum(correct * weights)


def macro_f1(gold: np.ndarray, pred: np.ndarray) -> float:
  """Unweighted mean of per-class F1 over the classes in gold or pred (0 for a class never predicted right)."""
  scores = []
  for k in np.union1d(gold, pred):
    tp = np.sum((pred == k) & (gold == k))
    denom = np.sum(pred == k) + np.sum(gold == k)
    scores.append(2.0 * tp / denom if denom else 0.0)
  return float(np.mean(scores)) if scores else 0.0


class ClassificationTask:
  name = "classification"

  def __init__(self, config):
    self.eval_splits, self.test_split = fine_tuning_splits(config)
    self.model_cfg = EncoderConfig.from_config(config.model)
    self.head = check_head(self.name, config.task.head, HEADS)
    self.labels = resolved_labels(config)
    self.hf_path = config.init.hf_path
    if self.hf_path:
      convert.check_compatible(self.model_cfg, self.hf_path)
    self.model = heads.SequenceClassifier(self.model_cfg, len(self.labels), config.task.head_dropout)
    self.predict_fn = jax.jit(self._predict)

  def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    return {**dummy_inputs(batch_size, seq_len), "labels": np.zeros((batch_size,), np.int32),
            "example_weights": np.ones((batch_size,), np.float32)}

  def init_params(self, rng, batch):
    return self.model.init({"params": rng}, *(batch[k] for k in INPUT_NAMES))["params"]

  def pretrained_source(self) -> tuple[str, dict] | None:
    """(name, params tree) to start from (init.hf_path's encoder; the head stays fresh), or None."""
    return (self.hf_path, convert.source_tree(self.hf_path)) if self.hf_path else None

  def check_batch(self, batch: dict[str, np.ndarray]) -> None:
    check_label_ids(batch["labels"], batch["example_weights"], self.labels, "batch 'labels'")

  def loss_fn(self, params, batch, rng, train: bool):
    logits = self.model.apply({"params": params}, *(batch[k] for k in INPUT_NAMES), deterministic=not train,
                              rngs={"dropout": rng} if train else None)  # [B, C]
    w = batch["example_weights"]
    total, correct = cross_entropy(logits, batch["labels"], w)
    n = jnp.sum(w)
    return total / jnp.maximum(n, 1.0), {"loss": (total, n), "accuracy": (correct, n)}

  def _predict(self, params, batch):
    logits = self.model.apply({"params": params}, *(batch[k] for k in INPUT_NAMES))
    return {"labels": jnp.argmax(logits, axis=-1).astype(jnp.int32), "probs": jax.nn.softmax(logits, axis=-1)}

  def host_metrics(self, pairs) -> dict[str, float]:
    """accuracy and f1 (macro-F1) over the weighted rows of an eval pass."""
    gold, pred = [], []
    for batch, out in pairs:
      keep = np.asarray(batch["example_weights"]) > 0
      gold.append(np.asarray(batch["labels"])[keep])
      pred.append(np.asarray(out["labels"])[keep])
    if not gold:
      return {}
    gold, pred = np.concatenate(gold), np.concatenate(pred)
    check_label_ids(gold, np.ones_like(gold), self.labels, "eval 'labels'")
    return {"accuracy": float(np.mean(gold == pred)) if gold.size else 0.0, "f1": macro_f1(gold, pred)}
