"""Extractive QA task: SQuAD EM/F1 definitions, best-span search against brute force, the best window per example,
and a tiny model learning generated SQuAD-format data through document-stride windows."""

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


def _squad(seed, n):
  """SQuAD-format JSON: a context of random words where 'key' is followed by the two-word answer."""
  rng = np.random.default_rng(seed)
  paragraphs = []
  for i in range(n):
    words = [f"w{k}" for k in rng.integers(0, 200, size=40)]
    at = int(rng.integers(0, 38))
    words[at] = "key"
    context = " ".join(words)
    answer = " ".join(words[at + 1:at + 3])
    paragraphs.append({"context": context, "qas": [{"id": f"q{i}", "question": "what follows key",
                                                    "answers": [{"text": answer,
                                                                 "answer_start": context.index(" " + answer) + 1}]}]})
  return {"version": "1.1", "data": [{"title": "generated", "paragraphs": paragraphs}]}


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


def test_learns_generated_squad_through_windows():
  config = config_lib.load(BASE, TINY + ["train.batch_size=32", "optim.learning_rate=3e-3", *PLAIN_ADAM])
  task = make_task(config)
  train, _ = _featurize(_squad(1, 2000))  # enough contexts that memorising them does not pay
  dev, dev_records = _featurize(_squad(2, 48))
  assert np.any(train["start_positions"] == 0) and np.any(train["start_positions"] > 0)
  state, _ = train_steps(config, sampled_batches(train, 32), 550, task=task)
  pairs = [(dev, jax.device_get(jax.jit(task.predict)(state.params, dev)))]
  metrics = task.host_metrics(pairs, dev_records)
  print(f"generated SQuAD dev: {metrics}")
  assert metrics["exact_match"] > 0.8 and metrics["f1"] >= metrics["exact_match"], metrics


def test_bad_input():
  with pytest.raises(ValueError, match="task.head='crf' does not fit task.name='qa'"):
    _task("task.head=crf")
  with pytest.raises(ValueError, match="task.max_answer_len"):
    _task("task.max_answer_len=0")
