"""Causal-LM input pipeline: documents, packing invariants, order, per-process sharding, resumption, tokenizers."""

import collections
import json
import random

import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.data import sources
from jaxlm.data import tokenizer as tokenizer_lib
from tests.conftest import REPO, documents, task_batches, train_tokenizer

SEQ = 32


class CharTokenizer:
  """One id per character: an independent tokenizer, so a packed row can be traced back to its document."""
  vocab_size, pad_id, unk_id, bos_id, eos_id = 256, 0, 1, 2, 3

  def encode(self, text):
    return [4 + (ord(ch) % 250) for ch in text]

  def decode(self, ids):
    return "".join(chr(i - 4) for i in ids if i >= 4)


def make_corpus(path, n_docs=60, seed=0):
  """Documents of 1..90 characters (some longer than a row), separated by blank lines; returns them in order."""
  rng = random.Random(seed)
  docs = []
  for i in range(n_docs):
    n = rng.choice([1, 2, 5, 11, 20, 31, 32, 33, 47, 64, 90])
    docs.append(("".join(rng.choice("abcdefghij ") for _ in range(n)).strip() or "x") + f"{i}")
  path.write_text("\n\n".join(docs) + "\n")
  return docs


def base_config(tmp_path, **overrides):
  c = config_lib.load_config_file(str(REPO / "configs" / "base.py"))
  c.data.tfds_data_dir = str(tmp_path / "tfds")
  c.data.seq_len = SEQ
  c.train.batch_size = 4
  c.data.pack_bins = 4
  c.data.prefetch = 0
  for key, value in overrides.items():
    group, name = key.split("__")
    c[group][name] = value
  return c


@pytest.fixture
def corpus(tmp_path):
  path = tmp_path / "corpus.txt"
  docs = make_corpus(path)
  return str(path), docs


def doc_chunks(docs, tok, seq_len):
  """Independent reference: every (inputs, targets) chunk the docs produce, as tuples."""
  out = []
  for doc in docs:
    ids = tok.encode(doc) + [tok.eos_id]
    inputs, targets = ids[:-1], ids[1:]
    for i in range(0, len(inputs), seq_len):
      out.append((tuple(inputs[i:i + seq_len]), tuple(targets[i:i + seq_len])))
  return out


def segments(batch):
  """The (inputs, targets) of every document segment in a batch, after checking the row invariants."""
  out = []
  for row in range(batch["inputs"].shape[0]):
    seg, pos, w = batch["segment_ids"][row], batch["positions"][row], batch["weights"][row]
    np.testing.assert_array_equal(w, (seg > 0).astype(np.float32))
    assert np.all(batch["inputs"][row][seg == 0] == 0) and np.all(batch["targets"][row][seg == 0] == 0)
    ids = [s for s in np.unique(seg) if s > 0]
    assert ids == list(range(1, len(ids) + 1)), "segments are numbered 1..n"
    for s in ids:
      where = np.flatnonzero(seg == s)
      assert np.all(np.diff(where) == 1), "a segment is contiguous"
      np.testing.assert_array_equal(pos[where], np.arange(len(where)))  # positions restart for each document
      x, y = batch["inputs"][row][where], batch["targets"][row][where]
      np.testing.assert_array_equal(x[1:], y[:-1])  # targets are the next inputs inside the document only
      out.append((tuple(x.tolist()), tuple(y.tolist())))
  return out


def test_documents_split_modes(tmp_path):
  path = tmp_path / "a.txt"
  path.write_text("one\ntwo\n\n\nthree\r\n  \nfour")
  assert sources.split_documents(path.read_text(), "blank_lines") == ["one\ntwo", "three", "four"]
  assert sources.split_documents(path.read_text(), "lines") == ["one", "two", "three", "four"]
  assert sources.split_documents(path.read_text(), "file") == ["one\ntwo\n\n\nthree\n  \nfour"]
  (tmp_path / "b.jsonl").write_text('{"text": "alpha"}\n\n{"text": "beta", "id": 2}\n')
  c = base_config(tmp_path, data__train_files=f"{tmp_path}/*.txt,{tmp_path}/b.jsonl",
                  data__eval_files=str(tmp_path / "b.jsonl"), data__doc_split="lines")
  assert documents(c, "train") == ["one", "two", "three", "four", "alpha", "beta"]
  assert documents(c, "eval") == ["alpha", "beta"]


def test_holdout_is_disjoint_and_covering(tmp_path, corpus):
  path, docs = corpus
  c = base_config(tmp_path, data__train_files=path, data__eval_fraction=0.1)
  train, held = documents(c, "train"), documents(c, "eval")
  assert len(held) == 6 and len(train) == 54
  assert sorted(train + held) == sorted(docs)
  c.train.seed = 5  # the held-out part does not move with the training seed
  assert documents(c, "eval") == held


@pytest.mark.parametrize("packing", ["first_fit", "concat"])
def test_eval_pass_packs_every_pair_once(tmp_path, corpus, packing):
  path, docs = corpus
  c = base_config(tmp_path, data__train_files=path, data__eval_files=path, data__packing=packing)
  tok = CharTokenizer()
  batches = list(task_batches(c, tok, "eval"))
  for batch in batches:
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "inputs": ((4, SEQ), np.int32), "targets": ((4, SEQ), np.int32), "segment_ids": ((4, SEQ), np.int32),
        "positions": ((4, SEQ), np.int32), "weights": ((4, SEQ), np.float32)}
  got = [s for b in batches for s in segments(b)]
  want = doc_chunks(docs, tok, SEQ)
  total_pairs = sum(len(x) for x, _ in want)
  assert sum(b["weights"].sum() for b in batches) == total_pairs
  if packing == "first_fit":  # documents stay whole (long ones cut only at multiples of the row length)
    assert collections.Counter(got) == collections.Counter(want)
  else:  # concat: the stream of pairs, cut at row ends, reassembles into exactly the documents' pairs
    assert collections.Counter(t for _, y in got for t in y) == collections.Counter(t for _, y in want for t in y)
  assert len(got) >= len(want)
  # every pair arrived (above), so the last partial batch was kept; its filler rows are the only empty ones
  assert all(b["weights"].sum(axis=1).min() > 0 for b in batches[:-1])


def test_first_fit_fills_rows(tmp_path, corpus):
  path, _ = corpus
  c = base_config(tmp_path, data__train_files=path, data__pack_bins=16, train__batch_size=8)
  it = task_batches(c, CharTokenizer(), "train")
  fill = np.mean([next(it)["weights"].mean() for _ in range(20)])
  assert fill > 0.8, fill


def test_deterministic_given_seed(tmp_path, corpus):
  path, _ = corpus
  tok = CharTokenizer()

  def first(seed, n=6):
    it = task_batches(base_config(tmp_path, data__train_files=path, train__seed=seed), tok, "train")
    return [next(it) for _ in range(n)]

  a, b, other = first(0), first(0), first(1)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, other))


def test_an_epoch_is_every_packed_pair_once(tmp_path, corpus):
  path, _ = corpus
  tok = CharTokenizer()
  c = base_config(tmp_path, data__train_files=path, data__eval_fraction=0.1, data__num_epochs=1, train__batch_size=1)
  train_docs = documents(c, "train")
  seen = collections.Counter(s for b in task_batches(c, tok, "train") for s in segments(b))
  assert seen == collections.Counter(doc_chunks(train_docs, tok, SEQ))


@pytest.mark.parametrize("split", ["train", "eval"])
def test_processes_hold_their_rows_of_the_same_global_batches(tmp_path, corpus, split):
  path, _ = corpus
  tok = CharTokenizer()
  c = base_config(tmp_path, data__train_files=path, data__eval_files=path, data__num_epochs=2, train__batch_size=4)
  whole = list(task_batches(c, tok, split))
  for layout in ([[0, 1], [2, 3]], [[0], [1], [2], [3]], [[1, 3], [0, 2]]):
    parts = [list(task_batches(c, tok, split, local_rows=rows)) for rows in layout]
    assert all(len(part) == len(whole) for part in parts)
    for k, batch in enumerate(whole):
      for rows, part in zip(layout, parts):
        for key in batch:
          np.testing.assert_array_equal(part[k][key], batch[key][rows])
  if split == "eval":  # only the last batch may be completed with empty rows
    assert all(b["weights"].sum(axis=1).min() > 0 for b in whole[:-1])


@pytest.mark.parametrize("packing", ["first_fit", "concat"])
def test_resume_gives_identical_next_batches(tmp_path, corpus, packing):
  path, _ = corpus
  tok = CharTokenizer()
  c = base_config(tmp_path, data__train_files=path, data__packing=packing, data__prefetch=2)
  n = 7
  straight = task_batches(c, tok, "train")
  want = [next(straight) for _ in range(2 * n)]
  first = task_batches(c, tok, "train")
  for _ in range(n):
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # the checkpoint stores it as JSON
  resumed = task_batches(c, tok, "train")
  resumed.set_state(state)
  for w in want[n:]:
    got = next(resumed)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])


def test_epochs_end_the_iterator(tmp_path, corpus):
  path, _ = corpus
  c = base_config(tmp_path, data__train_files=path, data__num_epochs=1, data__packing="concat")
  one = len(list(task_batches(c, CharTokenizer(), "train")))
  c.data.num_epochs = 2
  two = len(list(task_batches(c, CharTokenizer(), "train")))
  assert one > 0 and two in (2 * one, 2 * one + 1)


def test_pydoc_source_and_trained_tokenizer(tmp_path):
  c = base_config(tmp_path, data__source="pydoc", tokenizer__vocab_size=384,
                  tokenizer__user_defined_symbols=("[MASK]",))
  path = train_tokenizer(c, str(tmp_path))
  assert path == str(tmp_path / "tokenizer" / "spm.model")
  tok = tokenizer_lib.load_tokenizer(c, str(tmp_path))
  assert (tok.vocab_size, tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (384, 0, 1, 2, 3)
  assert tok.piece_to_id("[MASK]") not in (tok.unk_id, tok.pad_id)
  assert tok.piece_to_id("[MASK]") in tok.encode("a [MASK] b")
  batch = next(task_batches(c, tok, "train"))
  assert batch["inputs"].max() < 384 and batch["weights"].sum() > 0
  eval_targets = np.concatenate([b["targets"][b["weights"] > 0] for b in task_batches(c, tok, "eval")])
  held_out = documents(c, "eval")
  assert np.sum(eval_targets == tokenizer_lib.EOS_ID) == len(held_out)  # one EOS closes each document


def test_tokenizer_on_tiny_shakespeare(tmp_path, shared_data):
  text = shared_data / "text" / "tinyshakespeare.txt"
  c = base_config(tmp_path, data__train_files=str(text), tokenizer__vocab_size=512, tokenizer__max_sentences=5000,
                  tokenizer__path=str(tmp_path / "tok" / "shakespeare.model"))
  assert train_tokenizer(c, str(tmp_path)) == str(tmp_path / "tok" / "shakespeare.model")
  tok = tokenizer_lib.load_tokenizer(c, str(tmp_path))
  assert tok.vocab_size == 512
  line = "First Citizen: Before we proceed any further, hear me speak."
  ids = tok.encode(line)
  assert tok.decode(ids) == line
  assert len(ids) < len(line) / 2, "a trained model should merge common English into pieces"
  assert "Citizen" in "".join(tok.encode_pieces("Citizen")).replace("\u2581", "")


def test_missing_tokenizer_names_path_and_command(tmp_path):
  c = base_config(tmp_path)
  with pytest.raises(FileNotFoundError) as e:
    tokenizer_lib.load_tokenizer(c, str(tmp_path))
  assert str(tmp_path / "tokenizer" / "spm.model") in str(e.value) and "jaxlm tokenizer" in str(e.value)


def test_bad_input_errors(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"text": "broken\n')
  c = base_config(tmp_path, data__train_files=str(bad))
  with pytest.raises(sources.DataError, match=r"bad\.jsonl:2: invalid JSON .*broken"):
    documents(c, "train")
  bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
  with pytest.raises(sources.DataError, match=r"bad\.jsonl:2: no field 'text'.*no text"):
    documents(c, "train")
  c.data.train_files = str(tmp_path / "nothing*.txt")
  with pytest.raises(sources.DataError, match="data.train_files.*matches no files"):
    documents(c, "train")
  (tmp_path / "empty.txt").write_text("\n\n  \n")
  c.data.train_files, c.data.eval_files = str(tmp_path / "empty.txt"), str(tmp_path / "empty.txt")
  with pytest.raises(sources.DataError, match="train split is empty"):
    task_batches(c, CharTokenizer(), "train")
