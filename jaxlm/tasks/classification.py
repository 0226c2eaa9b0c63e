"""Sequence classification (single sentences or pairs through token_type_ids) on the BERT encoder's pooled output:
cross-entropy, accuracy, and macro-F1 over the labels present (as sklearn's f1_score(average="macro")).

Batches: encoder inputs, `labels`, `example_weights` (0 on padding) and `example_ids` (-1 on padding), [B] with one
example a row; with data.pack_examples (jaxlm/data/example_packing.py) [B, M], each example classified from its own
[CLS] (at `example_starts` [B, M]), and the loss still a mean over examples.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data import classification, example_packing, records, rows, sources
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.models.encoder import INPUT_NAMES, dummy_inputs
from jaxlm.models.heads import SequenceClassifier
from jaxlm.tasks.common import (
  bert_source,
  check_head,
  check_label_ids,
  cross_entropy,
  encoder_config,
  fine_tuning_splits,
  resolved_labels,
)

HEADS = ("sequence",)


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
  kind = records.CLASSIFICATION
  labels_from_data = True

  def __init__(self, config):
    self.eval_splits, self.test_split = fine_tuning_splits(config)
    self.model_cfg, self.hf_path = encoder_config(config)
    self.head = check_head(self.name, config.task.head, HEADS)
    self.labels = resolved_labels(config)
    self.model = SequenceClassifier(self.model_cfg, len(self.labels), config.task.head_dropout)
    self.max_examples = example_packing.max_examples(config.data) if config.data.pack_examples else 0

  def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    per_row = (batch_size, self.max_examples) if self.max_examples else (batch_size,)  # [B, M] packed, else [B]
    out = {**dummy_inputs(batch_size, seq_len), "labels": np.zeros(per_row, np.int32),
           "example_weights": np.ones(per_row, np.float32)}
    if self.max_examples:
      out.update(example_packing.dummy_arrays(batch_size, seq_len, self.max_examples))
    return out

  def _inputs(self, batch) -> dict:
    """The model's keyword inputs beyond INPUT_NAMES: a packed batch's segments and each example's [CLS]."""
    packed = example_packing.encoder_inputs(batch)
    return {**packed, "cls_positions": batch["example_starts"]} if packed else {}

  def init_params(self, rng, batch):
    return self.model.init({"params": rng}, *(batch[k] for k in INPUT_NAMES), **self._inputs(batch))["params"]

  def pretrained_source(self):
    """init.hf_path's encoder (the head stays fresh), or None."""
    return bert_source(self.hf_path)

  def loss_fn(self, params, batch, rng, train: bool):
    logits = self.model.apply({"params": params}, *(batch[k] for k in INPUT_NAMES), deterministic=not train,
                              rngs={"dropout": rng} if train else None, **self._inputs(batch))  # [B, (M,) C]
    ce = cross_entropy(logits, batch["labels"], batch["example_weights"])
    return ce.loss / jnp.maximum(ce.count, 1.0), {"loss": (ce.loss, ce.count), "accuracy": (ce.correct, ce.count)}

  def predict(self, params, batch):
    logits = self.model.apply({"params": params}, *(batch[k] for k in INPUT_NAMES), **self._inputs(batch))
    return {"labels": jnp.argmax(logits, axis=-1).astype(jnp.int32), "probs": jax.nn.softmax(logits, axis=-1)}

  def host_metrics(self, pairs, records_) -> dict[str, float]:
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

  def row_steps(self, ctx):
    tokenizer_lib.require_ids(ctx.tokenizer, ("cls", "sep"), self.name)
    label_ids = {label: i for i, label in enumerate(self.labels)}
    return [rows.Map(classification.EncodeClassification(ctx.tokenizer, ctx.data_cfg.seq_len, label_ids)),
            *example_packing.steps(ctx.data_cfg, classification.LAYOUT, self.pad_values(ctx.tokenizer))]

  def pad_values(self, tokenizer):
    return {"input_ids": tokenizer.pad_id, **classification.PAD_VALUES, **example_packing.PAD_VALUES}

  def bucketed(self) -> bool:
    return True

  def read_predict_input(self, path, input_format):
    """A sentence per line (a tab between the two sentences of a pair); blank lines are skipped."""
    out = []
    for _, line in sources.read_lines(path):
      a, _, b = line.partition("\t")
      out.append({"text_a": a.strip(), "text_b": b.strip(), "label": self.labels[0]})
    return out

  def write_predictions(self, records_, pairs, out, jsonl: bool) -> int:
    """'label<TAB>text' lines, or JSON lines with the label's probability, in input order."""
    by_example = {}
    for batch, o in pairs:
      ids = np.asarray(batch["example_ids"])  # [B], or [B, M] packed: o["labels"] has its shape
      for at in zip(*np.nonzero(ids >= 0)):
        label = int(o["labels"][at])
        by_example[int(ids[at])] = (label, float(o["probs"][at][label]))
    for i, record in enumerate(records_):
      if i not in by_example:
        continue
      label, p = by_example[i]
      text = record["text_a"] + ("\t" + record["text_b"] if record["text_b"] else "")
      if jsonl:
        out.write(json.dumps({"text": text, "label": self.labels[label], "probability": round(p, 6)}) + "\n")
      else:
        out.write(f"{self.labels[label]}\t{text}\n")
    return len(by_example)


TASK = ClassificationTask
