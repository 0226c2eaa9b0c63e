"""Extractive QA task: SQuAD EM/F1 definitions, best-span search against brute force, the best window per example,
the SQuAD 2.0 metrics (HasAns / NoAns, best thresholds) against their definitions, and a tiny model learning generated
SQuAD-format data with unanswerable questions through document-stride windows."""

import io
import json

import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.tasks import make_task, qa
from tests.conftest import BASE, PLAIN_ADAM, TINY_ENCODER, sampled_batches, train_steps

LENGTH = 32
TINY = ["task.name=qa", *TINY_ENCODER, "model.d_ff=64", "task.max_answer_len=4"]
CLS, SEP = 2, 3


def _task(*extra):
  return make_task(config_lib.load(BASE, TINY + list(extra)))


def test_squad_definitions():
  assert qa.normalize_answer("  The  Eiffel-Tower, in  PARIS! ") == "eiffeltower in paris"
  assert qa.normalize_answer("an apple a day") == "apple day"
  assert qa.exact_match("the Cat.", "cat") == 1.0
  assert qa.exact_match("black cat", "cat") == 0.0
  # 'big cat' vs 'cat sat': one common token, precision 1/2, recall 1/2
  assert qa.f1("the big cat", "a cat sat") == pytest.approx(0.5)
  # 'cat cat' vs 'cat': common counts are clipped (one cat), precision 1/2, recall 1 -> 2/3
  assert qa.f1("cat cat", "cat") == pytest.approx(2 / 3)
  assert qa.f1("the", "a") == 0.0  # both normalise to nothing


def test_best_spans_match_brute_force():
  rng = np.random.default_rng(0)
  start, end = rng.normal(size=(2, 5, 12)).astype(np.float32)
  in_context = rng.random((5, 12)) < 0.7
  in_context[4] = False  # a window without context
  got_s, got_e, got_score = jax.device_get(qa.best_spans(start, end, in_context, 3))
  for row in range(5):
    candidates = [(start[row, i] + end[row, j], i, j) for i in range(12) for j in range(i, min(i + 3, 12))
                  if in_context[row, i] and in_context[row, j]]
    if not candidates:
      assert got_score[row] == -np.inf
      continue
    score, i, j = max(candidates)
    assert (got_s[row], got_e[row]) == (i, j)
    assert got_score[row] == pytest.approx(score)


def _squad(seed, n, unanswerable=0.0):
  """SQuAD-format JSON: a context of random words where 'key' is followed by the two-word answer; a share of the
  contexts (SQuAD 2.0 style) has no 'key', and its question no answer."""
  rng = np.random.default_rng(seed)
  paragraphs = []
  for i in range(n):
    words = [f"w{k}" for k in rng.integers(0, 200, size=40)]
    if rng.random() < unanswerable:
      paragraphs.append({"context": " ".join(words), "qas": [{"id": f"q{i}", "question": "what follows key",
                                                              "answers": [], "is_impossible": True}]})
      continue
    at = int(rng.integers(0, 38))
    words[at] = "key"
    context = " ".join(words)
    answer = " ".join(words[at + 1:at + 3])
    paragraphs.append({"context": context, "qas": [{"id": f"q{i}", "question": "what follows key",
                                                    "answers": [{"text": answer,
                                                                 "answer_start": context.index(" " + answer) + 1}]}]})
  return {"version": "2.0" if unanswerable else "1.1", "data": [{"title": "generated", "paragraphs": paragraphs}]}


def _token_id(word):
  if word == "key":
    return 10
  return 20 + int(word[1:]) if word[0] == "w" and word[1:].isdigit() else 5


def _featurize(squad, stride=12):
  """Whitespace tokens, [CLS] question [SEP] context-window [SEP], windows every `stride` context tokens."""
  rows, records = [], []
  for paragraph in squad["data"][0]["paragraphs"]:
    context = paragraph["context"]
    spans, pos = [], 0
    for word in context.split(" "):
      spans.append((pos, pos + len(word)))
      pos += len(word) + 1
    for q in paragraph["qas"]:
      example = len(records)
      records.append({"context": context, "answers": [a["text"] for a in q["answers"]]})
      a_start, a_end = -1, -1  # no answer: every window's target is [CLS]
      if q["answers"]:
        a_start = q["answers"][0]["answer_start"]
        a_end = a_start + len(q["answers"][0]["text"])
      question = [_token_id(w) for w in q["question"].split()]
      room = LENGTH - len(question) - 3
      for first in range(0, max(len(spans) - room, 0) + stride, stride):
        window = range(first, min(first + room, len(spans)))
        ids = [CLS] + question + [SEP] + [_token_id(context[s:e]) for s, e in (spans[k] for k in window)] + [SEP]
        offsets = np.full((LENGTH, 2), -1, np.int32)
        offset0 = len(question) + 2
        for j, k in enumerate(window):
          offsets[offset0 + j] = spans[k]
        inside = [offset0 + j for j, k in enumerate(window) if a_start <= spans[k][0] and spans[k][1] <= a_end]
        start, end = (inside[0], inside[-1]) if len(inside) == 2 else (0, 0)
        types = [0] * (len(question) + 2) + [1] * (len(window) + 1)
        rows.append({"input_ids": ids + [0] * (LENGTH - len(ids)), "token_type_ids": types + [0] * (LENGTH - len(ids)),
                     "attention_mask": [1] * len(ids) + [0] * (LENGTH - len(ids)), "start_positions": start,
                     "end_positions": end, "offsets": offsets, "example_ids": example, "example_weights": 1.0})
        if first + room >= len(spans):
          break
  dtypes = {"example_weights": np.float32}
  batch = {k: np.array([r[k] for r in rows], dtypes.get(k, np.int32)) for k in rows[0]}
  return batch, records


def test_best_window_wins_and_text_comes_from_offsets():
  task = _task()
  batch, records = _featurize(_squad(0, 2))
  rows0 = np.flatnonzero(batch["example_ids"] == 0)
  assert len(rows0) >= 2  # example 0 spans several windows
  # predictions by hand: each window of example 0 proposes its first two context tokens, the last window scores best
  b = len(batch["example_ids"])
  out = {"start": np.zeros(b, np.int32), "end": np.zeros(b, np.int32), "score": np.zeros(b, np.float32)}
  for rank, row in enumerate(rows0):
    first = np.flatnonzero(batch["offsets"][row, :, 0] >= 0)[0]
    out["start"][row], out["end"][row], out["score"][row] = first, first + 1, float(rank)
  last = rows0[-1]
  first = np.flatnonzero(batch["offsets"][last, :, 0] >= 0)[0]
  want = records[0]["context"][batch["offsets"][last, first, 0]:batch["offsets"][last, first + 1, 1]]
  out["score"][batch["example_ids"] == 1] = -np.inf  # no span at all: the empty answer
  answers = task.answers([(batch, out)], records)
  assert answers == {0: want, 1: ""}
  assert len(want.split()) == 2
  metrics = task.host_metrics([(batch, out)], records)
  assert metrics["exact_match"] == float(want == records[0]["answers"][0]) / 2


def test_learns_generated_squad_with_unanswerable_questions_through_windows():
  config = config_lib.load(BASE, TINY + ["train.batch_size=32", "optim.learning_rate=3e-3", *PLAIN_ADAM])
  task = make_task(config)
  train, _ = _featurize(_squad(1, 2000, unanswerable=0.3))  # enough contexts that memorising them does not pay
  dev, dev_records = _featurize(_squad(2, 64, unanswerable=0.3))
  assert np.any(train["start_positions"] == 0) and np.any(train["start_positions"] > 0)
  state, _ = train_steps(config, sampled_batches(train, 32), 800, task=task)
  pairs = [(dev, jax.device_get(jax.jit(task.predict)(state.params, dev)))]
  # SQuAD 2.0: the null span answers the questions without 'key', at the default threshold and at the best one
  metrics = task.host_metrics(pairs, dev_records)
  print(f"generated SQuAD 2.0 dev: {metrics}")
  assert 10 <= metrics["NoAns_total"] <= 30 and metrics["HasAns_total"] + metrics["NoAns_total"] == 64
  assert metrics["NoAns_exact"] > 0.8 and metrics["HasAns_exact"] > 0.8, metrics
  # the best threshold's scores are at least the default's (summed in another order: equal up to rounding)
  assert metrics["best_f1"] >= metrics["f1"] - 1e-12 and metrics["f1"] > 0.8
  assert metrics["best_exact"] >= metrics["exact_match"] - 1e-12
  answers = task.answers(pairs, dev_records, allow_null=True)
  assert np.mean([(answers[i] == "") == (not r["answers"]) for i, r in enumerate(dev_records)]) > 0.8
  # SQuAD v1.1 (every question answered): the best span always answers, scored by the v1.1 metrics
  answerable = [i for i, r in enumerate(dev_records) if r["answers"]]
  rows = np.isin(dev["example_ids"], answerable)
  v1_pairs = [({k: v[rows] for k, v in dev.items()}, {k: v[rows] for k, v in pairs[0][1].items()})]
  v1 = task.host_metrics(v1_pairs, dev_records)
  assert set(v1) == {"exact_match", "f1"} and v1["exact_match"] > 0.8, v1
  spans = task.answers(v1_pairs, dev_records)
  assert v1["exact_match"] == pytest.approx(np.mean([qa.exact_match(spans[i], dev_records[i]["answers"][0])
                                                     for i in answerable]))


def test_bad_input():
  with pytest.raises(ValueError, match="task.head='crf' does not fit task.name='qa'"):
    _task("task.head=crf")
  with pytest.raises(ValueError, match="task.max_answer_len"):
    _task("task.max_answer_len=0")


def _v2_reference(golds, spans, diffs, threshold):
  """SQuAD 2.0 scores straight from their definitions: a question is answered '' when its null score beats the best
  span's by more than the threshold; '' is right exactly for the unanswerable ones."""
  def answer(i, t):
    return "" if diffs[i] > t else spans[i]

  def scores(t, metric):
    out = {}
    for i, g in golds.items():
      a = answer(i, t)
      if not g:
        out[i] = float(a == "" or not qa.normalize_answer(a))
      elif a == "":
        out[i] = 0.0
      else:
        out[i] = max(metric(a, x) for x in g)
    return out

  return scores


def test_squad_v2_metrics_against_their_definitions():
  rng = np.random.default_rng(0)
  words = ["oslo", "paris", "the city", "rome", "a river"]
  golds, spans, diffs = {}, {}, {}
  for i in range(40):
    golds[i] = [] if rng.random() < 0.4 else list(rng.choice(words, size=rng.integers(1, 3), replace=False))
    spans[i] = str(rng.choice(words + ["oslo paris"]))
    diffs[i] = float(np.round(rng.normal(), 3))
  ref = _v2_reference(golds, spans, diffs, 0.0)
  for threshold in (-0.5, 0.0, 0.7):
    got = qa.squad_v2_metrics(golds, spans, diffs, threshold)
    exact, f1s = ref(threshold, qa.exact_match), ref(threshold, qa.f1)
    has = [i for i in golds if golds[i]]
    no = [i for i in golds if not golds[i]]
    assert got["exact_match"] == pytest.approx(np.mean(list(exact.values())))
    assert got["f1"] == pytest.approx(np.mean(list(f1s.values())))
    assert got["HasAns_exact"] == pytest.approx(np.mean([exact[i] for i in has]))
    assert got["HasAns_f1"] == pytest.approx(np.mean([f1s[i] for i in has]))
    assert got["NoAns_exact"] == pytest.approx(np.mean([exact[i] for i in no]))
    assert got["NoAns_f1"] == got["NoAns_exact"]  # '' or not: F1 and EM agree on unanswerable questions
    assert (got["HasAns_total"], got["NoAns_total"]) == (len(has), len(no))
  # the best thresholds: no threshold does better (every distinct null_diff, and below them all), and the reported
  # one reaches the best score
  candidates = [min(diffs.values()) - 1] + sorted(set(diffs.values()))
  for metric, name in ((qa.exact_match, "exact"), (qa.f1, "f1")):
    best = max(np.mean(list(ref(t, metric).values())) for t in candidates)
    assert got[f"best_{name}"] == pytest.approx(best)
    assert np.mean(list(ref(got[f"best_{name}_thresh"], metric).values())) == pytest.approx(best)
    assert got[f"best_{name}_thresh"] in diffs.values()


def test_null_answers_in_predictions_and_v1_unchanged():
  batch, records = _featurize(_squad(3, 3, unanswerable=0.0))
  b = len(batch["example_ids"])
  out = {"start": np.zeros(b, np.int32), "end": np.zeros(b, np.int32), "score": np.zeros(b, np.float32),
         "null_score": np.zeros(b, np.float32)}
  for row in range(b):  # each window proposes its first context token, scored 1.0
    out["start"][row] = out["end"][row] = np.flatnonzero(batch["offsets"][row, :, 0] >= 0)[0]
    out["score"][row] = 1.0
  # example 0: one window's null score beats the span by 2.5 (the lowest null score counts); the others' by -1
  out["null_score"][:] = 0.0
  out["null_score"][batch["example_ids"] == 0] = 5.0
  out["null_score"][np.flatnonzero(batch["example_ids"] == 0)[0]] = 3.5
  spans = _task().spans([(batch, out)], records)
  assert [round(spans[i][1], 4) for i in range(3)] == [2.5, -1.0, -1.0]
  assert _task().answers([(batch, out)], records)[0] != ""  # v1.1: the best span always answers
  assert _task().answers([(batch, out)], records, allow_null=True)[0] == ""
  assert _task("task.null_threshold=3.0").answers([(batch, out)], records, allow_null=True)[0] != ""
  for squad_v2, want in ((False, spans[0][0]), (True, "")):
    written = io.StringIO()
    _task(f"task.squad_v2={squad_v2}").write_predictions(
        [{"id": f"q{i}", "question": "?", **r} for i, r in enumerate(records)], [(batch, out)], written, True)
    rows = [json.loads(line) for line in written.getvalue().splitlines()]
    assert rows[0]["answer"] == want and rows[0]["null_score_diff"] == 2.5 and rows[1]["answer"] == spans[1][0]
  # every question answerable: v1.1 metrics (no v2 keys), unless task.squad_v2 asks for v2
  assert set(_task().host_metrics([(batch, out)], records)) == {"exact_match", "f1"}
  assert "HasAns_f1" in _task("task.squad_v2=true").host_metrics([(batch, out)], records)
