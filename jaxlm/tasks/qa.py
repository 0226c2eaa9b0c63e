"""Extractive question answering on the BERT encoder: start/end logits, the best span of at most task.max_answer_len
tokens inside the context, chosen per example over its document-stride windows, scored by SQuAD exact match / F1.

Batches: encoder inputs, `start_positions` / `end_positions` [B] (token indices of the answer in the window, 0 = the
[CLS] token when the window does not hold it), `offsets` [B, L, 2] (each context token's character span in the
context, -1 elsewhere), `example_ids` [B] and `example_weights` [B]. The host-side metrics need each example's
context and gold answers: `set_examples(records)` with records indexed by example id (the pipeline's QA records).
"""

from __future__ import annotations

import collections
import re
import string

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import convert, heads
from jaxlm.models.encoder import INPUT_NAMES, EncoderConfig, dummy_inputs
from jaxlm.tasks import fine_tuning_splits
from jaxlm.tasks.classification import check_head

HEADS = ("span",)


def normalize_answer(text: str) -> str:
  """The official SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
  text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def exact_match(prediction: str, truth: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(truth))


def f1(prediction: str, truth: str) -> float:
  pred_tokens, true_tokens = normalize_answer(prediction).split(), normalize_answer(truth).split()
  common = collections.Counter(pred_tokens) & collections.Counter(true_tokens)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred_tokens), same / len(true_tokens)
  return 2 * precision * recall / (precision + recall)


def best_spans(start_logits, end_logits, in_context, max_answer_len: int):
  """The best (start, end, score) per window [B] over start <= end < start + max_answer_len, both in the context.

  Scores are start_logit + end_logit, so windows of one example compare directly. A window without any context
  token gets score -inf.
  """
  length = start_logits.shape[-1]
  i, j = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
  valid = (j >= i) & (j < i + max_answer_len)  # [L(start), L(end)]
  valid = valid[None] & in_context[:, :, None] & in_context[:, None, :]  # [B, L, L]
  scores = jnp.where(valid, start_logits[:, :, None] + end_logits[:, None, :], -jnp.inf)  # [B, L, L]
  flat = jnp.argmax(scores.reshape(scores.shape[0], -1), axis=-1)
  return (flat // length).astype(jnp.int32), (flat % length).astype(jnp.int32), jnp.max(scores, axis=(1, 2))


class QATask:
  name = "qa"

  def __init__(self, config):
    self.eval_splits, self.test_split = fine_tuning_splits(config)
    self.model_cfg = EncoderConfig.from_config(config.model)
    self.head = check_head(self.name, config.task.head, HEADS)
    self.max_answer_len = config.task.max_answer_len
    if self.max_answer_len < 1:
      raise ValueError(f"task.max_answer_len must be at least 1, got {self.max_answer_len}")
    self.hf_path = config.init.hf_path
    if self.hf_path:
      convert.check_compatible(self.model_cfg, self.hf_path)
    self.model = heads.SpanExtractor(self.model_cfg)
    self.examples = None
    self.predict_fn = jax.jit(self._predict)

  def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    ints = np.zeros((batch_size,), np.int32)
    return {**dummy_inputs(batch_size, seq_len), "start_positions": ints, "end_positions": ints.copy(),
            "offsets": np.full((batch_size, seq_len, 2), -1, np.int32),
            "example_ids": np.arange(batch_size, dtype=np.int32), "example_weights": np.ones((batch_size,), np.float32)}

  def init_params(self, rng, batch):
    return self.model.init({"params": rng}, *(batch[k] for k in INPUT_NAMES))["params"]

  def pretrained_source(self) -> tuple[str, dict] | None:
    """(name, params tree) to start from (init.hf_path's encoder; the head stays fresh), or None."""
    return (self.hf_path, convert.source_tree(self.hf_path)) if self.hf_path else None

  def check_batch(self, batch: dict[str, np.ndarray]) -> None:
    length = batch["input_ids"].shape[1]
    for key in ("start_positions", "end_positions"):
      bad = batch[key][(batch["example_weights"] > 0) & ((batch[key] < 0) | (batch[key] >= length))]
      if bad.size:
        raise ValueError(f"batch '{key}': position {int(bad[0])} is outside the row of {length} tokens")

  def set_examples(self, records) -> None:
    """Records with 'context' and 'answers' (a list of gold texts), indexed by the batches' example_ids."""
    self.examples = records

  def loss_fn(self, params, batch, rng, train: bool):
    start, end = self.model.apply({"params": params}, *(batch[k] for k in INPUT_NAMES), deterministic=not train,
                                  rngs={"dropout": rng} if train else None)  # [B, L] each
    real = batch["attention_mask"] > 0

    def ce(logits, target):  # over the row's real tokens only: padding is never an answer
      logits = jnp.where(real, logits, -1e9)
      return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, target[:, None], -1)[:, 0]

    w = batch["example_weights"]
    total = jnp.sum(0.5 * (ce(start, batch["start_positions"]) + ce(end, batch["end_positions"])) * w)
    n = jnp.sum(w)
    return total / jnp.maximum(n, 1.0), {"loss": (total, n)}

  def _predict(self, params, batch):
    start_logits, end_logits = self.model.apply({"params": params}, *(batch[k] for k in INPUT_NAMES))
    in_context = batch["offsets"][..., 0] >= 0
    start, end, score = best_spans(start_logits, end_logits, in_context, self.max_answer_len)
    return {"start": start, "end": end, "score": score}

  def answers(self, pairs) -> dict[int, str]:
    """example id -> predicted answer text, from the best-scoring span over the example's windows."""
    if self.examples is None:
      raise ValueError("QATask.set_examples(records) must be called before host_metrics: the answer texts are "
                       "cut from each example's context")
    best: dict[int, tuple[float, int, int]] = {}
    for batch, out in pairs:
      ids, offsets = np.asarray(batch["example_ids"]), np.asarray(batch["offsets"])
      for row in np.flatnonzero(ids >= 0):
        score = float(out["score"][row])
        if np.isfinite(score) and (int(ids[row]) not in best or score > best[int(ids[row])][0]):
          best[int(ids[row])] = (score, int(offsets[row, out["start"][row], 0]), int(offsets[row, out["end"][row], 1]))
    seen = {int(i) for batch, _ in pairs for i in np.asarray(batch["example_ids"]) if i >= 0}
    return {i: self.examples[i]["context"][best[i][1]:best[i][2]] if i in best else "" for i in sorted(seen)}

  def host_metrics(self, pairs) -> dict[str, float]:
    """SQuAD exact_match and f1 (in [0, 1]), each the best over an example's gold answers, averaged over examples."""
    predicted = self.answers(pairs)
    if not predicted:
      return {}
    em, f = [], []
    for i, text in predicted.items():
      golds = list(self.examples[i]["answers"]) or [""]
      em.append(max(exact_match(text, g) for g in golds))
      f.append(max(f1(text, g) for g in golds))
    return {"exact_match": float(np.mean(em)), "f1": float(np.mean(f))}
