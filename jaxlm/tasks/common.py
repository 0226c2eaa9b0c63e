"""Pieces every task shares: the softmax cross-entropy, head and label checks, the fine-tuning splits, and starting an
encoder task from a Hugging Face BERT directory."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.hf import bert as hf_bert
from jaxlm.models.encoder import EncoderConfig


class CrossEntropy(NamedTuple):
  """Sums over the weighted entries of a batch; divide by `count` for means."""
  loss: jax.Array  # cross-entropy plus z-loss
  ce: jax.Array  # cross-entropy alone
  correct: jax.Array  # entries whose argmax is the label
  count: jax.Array  # sum of the weights


def cross_entropy(logits, labels, weights, z_loss: float = 0.0) -> CrossEntropy:
  """Weighted softmax cross-entropy in float32: logits [..., C], labels and weights [...].

  z_loss adds z_loss * log(Z)^2 per entry, which keeps the log-partition near 0 (PaLM). Labels outside [0, C) are
  clipped for the lookup; give them weight 0. Unused sums (`correct` in a language model) cost nothing under jit.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  gold = jnp.take_along_axis(logits, jnp.clip(labels, 0, logits.shape[-1] - 1)[..., None], axis=-1)[..., 0]
  ce = jnp.sum((log_z - gold) * weights)
  loss = ce + z_loss * jnp.sum(jnp.square(log_z) * weights) if z_loss else ce
  correct = jnp.sum(is_argmax(logits, labels, gold).astype(jnp.float32) * weights)
  return CrossEntropy(loss, ce, correct, jnp.sum(weights))


def is_argmax(logits, labels, gold) -> jax.Array:
  """argmax(logits, -1) == labels (the first of tied maxima wins), without the argmax: XLA:CPU runs the variadic
  (value, index) reduce of an argmax over [1024, 8000] logits in ~15 ms, and this one boolean reduce in ~2.5 ms."""
  c = logits.shape[-1]
  index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  at = labels[..., None]
  beaten = jnp.where(index < at, logits >= gold[..., None], logits > gold[..., None])  # an entry argmax picks first
  return ~jnp.any(beaten, axis=-1) & (labels >= 0) & (labels < c)


def check_head(task_name: str, head: str, allowed: tuple[str, ...]) -> str:
  """task.head '' means the task's own head (the first allowed); anything else must be one the task has."""
  head = head or allowed[0]
  if head not in allowed:
    raise ValueError(f"task.head='{head}' does not fit task.name='{task_name}'; its heads: {', '.join(allowed)}")
  return head


def resolved_labels(config) -> tuple[str, ...]:
  """data.labels, which must be set (from the config, or resolved from the train split) and distinct."""
  labels = tuple(config.data.labels)
  if not labels:
    raise ValueError(f"task.name='{config.task.name}' needs its label names to size the head: set data.labels, or "
                     "resolve them from the train split first (jaxlm.workdir.resolve_labels)")
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


def fine_tuning_splits(config) -> tuple[tuple[str, ...], str | None]:
  """A fine-tuning task's splits: dev during training, and test at the end when the config names one."""
  d = config.data
  has_test = bool(d.tfds_test_split if d.source == "tfds" else d.test_files)
  return ("dev",), ("test" if has_test else None)


def encoder_config(config) -> tuple[EncoderConfig, str]:
  """The BERT encoder's config and init.hf_path, checked against each other before any work."""
  model_cfg = EncoderConfig.from_config(config.model)
  hf_path = config.init.hf_path
  if hf_path:
    hf_bert.check_compatible(model_cfg, hf_path)
  return model_cfg, hf_path


def bert_source(hf_path: str, with_heads: bool = False) -> tuple[str, dict] | None:
  """(name, params tree) a BERT task starts from: init.hf_path's encoder (and pretraining heads), or None."""
  return (hf_path, hf_bert.source_tree(hf_path, with_heads=with_heads)) if hf_path else None
