"""Extractive question answering on the BERT encoder: start/end logits, the best span of at most task.max_answer_len
tokens inside the context, chosen per example over its document-stride windows, scored by SQuAD exact match / F1.

Unanswerable questions (SQuAD 2.0) train the [CLS] token as the answer. The null score of an example is the lowest
[CLS] start + end logit over its windows; the question is answered '' when the null score beats the best span's by
more than task.null_threshold. A split with unanswerable questions is scored as the official v2.0 script scores it
(HasAns / NoAns breakdowns, and the threshold that would maximise exact match and F1 on it); one without is scored
as v1.1 (the best span always answers).

Batches: encoder inputs, `start_positions` / `end_positions` [B] (token indices of the answer in the window, 0 = the
[CLS] token when the window does not hold it), `offsets` [B, L, 2] (each context token's character span in the
context, -1 elsewhere), `example_ids` [B] and `example_weights` [B]. The host-side metrics cut answers from each
example's context: the split's records, indexed by example id.
"""

from __future__ import annotations

import collections
import json
import re
import string

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data import qa, records, rows, sources
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.models.encoder import INPUT_NAMES, dummy_inputs
from jaxlm.models.heads import SpanExtractor
from jaxlm.tasks.common import bert_source, check_head, encoder_config, fine_tuning_splits

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


def f1_v2(prediction: str, truth: str) -> float:
  """The v2.0 script's F1: as v1.1's, except that an empty answer on either side scores 1 when both are empty."""
  if not normalize_answer(prediction) or not normalize_answer(truth):
    return float(normalize_answer(prediction) == normalize_answer(truth))
  return f1(prediction, truth)


def squad_v2_metrics(golds: dict, spans: dict, null_diffs: dict, threshold: float) -> dict[str, float]:
  """The official SQuAD 2.0 evaluation (evaluate-v2.0.py with a no-answer probability file), in [0, 1]:

  golds: id -> gold answers ([] = unanswerable); spans: id -> the best non-null span's text; null_diffs: id -> null
  score minus that span's score (the script's na_prob: above the threshold, the answer is ''). exact_match / f1 and
  the HasAns / NoAns breakdowns are at `threshold`; best_exact / best_f1 at the threshold that maximises each, found
  as the script finds it (questions turned answered in rising null_diff order; 0.0 when answering none is best).
  """
  has_ans = {i: bool(g) for i, g in golds.items()}
  exact_raw, f1_raw = {}, {}
  for i, answers in golds.items():
    answers = [a for a in answers if normalize_answer(a)] or [""]  # an unanswerable question's only answer is ''
    exact_raw[i] = max(exact_match(spans[i], a) for a in answers)
    f1_raw[i] = max(f1_v2(spans[i], a) for a in answers)

  def thresholded(raw):
    return {i: float(not has_ans[i]) if null_diffs[i] > threshold else raw[i] for i in raw}

  def best(raw):
    score = best_score = sum(not h for h in has_ans.values())  # every question answered '': the NoAns ones are right
    best_threshold = 0.0
    for i in sorted(null_diffs, key=lambda k: null_diffs[k]):
      score += raw[i] if has_ans[i] else (-1 if spans[i] else 0)
      if score > best_score:
        best_score, best_threshold = score, null_diffs[i]
    return best_score / len(raw), float(best_threshold)

  exact, f1s = thresholded(exact_raw), thresholded(f1_raw)
  out = {"exact_match": float(np.mean(list(exact.values()))), "f1": float(np.mean(list(f1s.values())))}
  for name, wanted in (("HasAns", True), ("NoAns", False)):
    ids = [i for i in golds if has_ans[i] == wanted]
    if ids:
      out.update({f"{name}_exact": float(np.mean([exact[i] for i in ids])),
                  f"{name}_f1": float(np.mean([f1s[i] for i in ids])), f"{name}_total": float(len(ids))})
  out["best_exact"], out["best_exact_thresh"] = best(exact_raw)
  out["best_f1"], out["best_f1_thresh"] = best(f1_raw)
  return out


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
  kind = records.QA
  labels_from_data = False
  labels = ()

  def __init__(self, config):
    self.eval_splits, self.test_split = fine_tuning_splits(config)
    self.model_cfg, self.hf_path = encoder_config(config)
    self.head = check_head(self.name, config.task.head, HEADS)
    self.max_answer_len = config.task.max_answer_len
    if self.max_answer_len < 1:
      raise ValueError(f"task.max_answer_len must be at least 1, got {self.max_answer_len}")
    self.squad_v2 = config.task.squad_v2
    self.null_threshold = config.task.null_threshold
    self.model = SpanExtractor(self.model_cfg)

  def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    ints = np.zeros((batch_size,), np.int32)
    return {**dummy_inputs(batch_size, seq_len), "start_positions": ints, "end_positions": ints.copy(),
            "offsets": np.full((batch_size, seq_len, 2), -1, np.int32),
            "example_ids": np.arange(batch_size, dtype=np.int32), "example_weights": np.ones((batch_size,), np.float32)}

  def init_params(self, rng, batch):
    return self.model.init({"params": rng}, *(batch[k] for k in INPUT_NAMES))["params"]

  def pretrained_source(self):
    """init.hf_path's encoder (the head stays fresh), or None."""
    return bert_source(self.hf_path)

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

  def predict(self, params, batch):
    start_logits, end_logits = self.model.apply({"params": params}, *(batch[k] for k in INPUT_NAMES))
    in_context = batch["offsets"][..., 0] >= 0
    start, end, score = best_spans(start_logits, end_logits, in_context, self.max_answer_len)
    # the null span: [CLS] (position 0) as both start and end
    return {"start": start, "end": end, "score": score, "null_score": start_logits[:, 0] + end_logits[:, 0]}

  def spans(self, pairs, records_) -> dict[int, tuple[str, float]]:
    """example id -> (the best-scoring span's text over the example's windows ('' when no window has one), its null
    score minus that span's score); `records_` are the split's records, indexed by example id. The null score is the
    lowest over the windows: the window that most holds the answer speaks for the example."""
    best: dict[int, tuple[float, int, int]] = {}
    null: dict[int, float] = {}
    for batch, out in pairs:
      ids, offsets = np.asarray(batch["example_ids"]), np.asarray(batch["offsets"])
      for row in np.flatnonzero(ids >= 0):
        i, score = int(ids[row]), float(out["score"][row])
        null[i] = min(null.get(i, np.inf), float(out["null_score"][row]) if "null_score" in out else -np.inf)
        if np.isfinite(score) and (i not in best or score > best[i][0]):
          best[i] = (score, int(offsets[row, out["start"][row], 0]), int(offsets[row, out["end"][row], 1]))
    return {i: (records_[i]["context"][best[i][1]:best[i][2]], null[i] - best[i][0]) if i in best else ("", np.inf)
            for i in sorted(null)}

  def answers(self, pairs, records_, allow_null: bool = False) -> dict[int, str]:
    """example id -> predicted answer text: the best span, or '' where `allow_null` and the null score beats it by
    more than task.null_threshold."""
    return {i: "" if allow_null and diff > self.null_threshold else text
            for i, (text, diff) in self.spans(pairs, records_).items()}

  def host_metrics(self, pairs, records_) -> dict[str, float]:
    """SQuAD exact_match and f1 (in [0, 1]), each the best over an example's gold answers, averaged over examples:
    v1.1's where every question of the split has an answer; else (or with task.squad_v2) the official v2.0
    evaluation (squad_v2_metrics), the null answer allowed at task.null_threshold."""
    spans = self.spans(pairs, records_)
    if not spans:
      return {}
    golds = {i: list(records_[i]["answers"]) for i in spans}
    if self.squad_v2 or not all(golds.values()):
      return squad_v2_metrics(golds, {i: t for i, (t, _) in spans.items()}, {i: d for i, (_, d) in spans.items()},
                              self.null_threshold)
    em, f = [], []
    for i, (text, _) in spans.items():
      em.append(max(exact_match(text, g) for g in golds[i]))
      f.append(max(f1(text, g) for g in golds[i]))
    return {"exact_match": float(np.mean(em)), "f1": float(np.mean(f))}

  def row_steps(self, ctx):
    tokenizer_lib.require_ids(ctx.tokenizer, ("cls", "sep"), self.name)
    d = ctx.data_cfg
    return [rows.FlatMap(qa.QAWindows(ctx.tokenizer, d.seq_len, d.doc_stride, d.max_query_length))]

  def pad_values(self, tokenizer):
    return {"input_ids": tokenizer.pad_id, **qa.PAD_VALUES}

  def bucketed(self) -> bool:
    return True

  def read_predict_input(self, path, input_format):
    """SQuAD JSON (v1.1 or v2.0 layout; answers, if any, are not read)."""
    if input_format not in ("auto", "squad"):
      raise sources.DataError(f"--input-format={input_format!r} does not fit task.name='qa': its input is SQuAD "
                              "JSON (--input-format squad)")
    return sources.read_squad(path)

  def write_predictions(self, records_, pairs, out, jsonl: bool) -> int:
    """JSON lines {id, question, answer, null_score_diff} whatever the output's name; with task.squad_v2 the answer
    is '' where the null score beats the best span's by more than task.null_threshold."""
    spans = self.spans(pairs, records_)
    for i, record in enumerate(records_):
      text, diff = spans.get(i, ("", np.inf))
      answer = "" if self.squad_v2 and diff > self.null_threshold else text
      out.write(json.dumps({"id": record["id"], "question": record["question"], "answer": answer,
                            "null_score_diff": round(float(diff), 4) if np.isfinite(diff) else None}) + "\n")
    return len(records_)


TASK = QATask
