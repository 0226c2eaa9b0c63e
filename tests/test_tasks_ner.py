"""NER task: softmax and CRF heads learn a toy tagging task, the CRF loss is the word-level CRF, constrained decoding,
seqeval metrics over windows, overlapping windows over sentences longer than a row (every word tagged once and
scored, from the window where it sees most), and sub-word alignment on real CoNLL-2003 sentences."""

import io
import itertools
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

from jaxlm import config as config_lib
from jaxlm import evaluation, predict, run, train
from jaxlm import workdir as workdir_lib
from jaxlm.checkpoint import Checkpointer
from jaxlm.data import ner
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.wordpiece import WordPieceTokenizer
from jaxlm.tasks import make_task
from tests.conftest import (
  BASE,
  MINILM_VOCAB,
  PLAIN_ADAM,
  REPO,
  TINY_ENCODER,
  sampled_batches,
  task_batches,
  train_steps,
)

LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
TINY = ["task.name=ner", *TINY_ENCODER, "model.d_ff=64", "task.head_dropout=0.0", f"data.labels={LABELS!r}"]
CLS, SEP = 2, 3


def _task(*extra):
  return make_task(config_lib.load(BASE, TINY + list(extra)))


def _rows(sentences, length=32):
  """sentences: lists of (sub-word ids, tag id) words -> a batch in the pipeline's format, one row each."""
  b = len(sentences)
  batch = {"input_ids": np.zeros((b, length), np.int32), "token_type_ids": np.zeros((b, length), np.int32),
           "attention_mask": np.zeros((b, length), np.int32), "labels": np.zeros((b, length), np.int32),
           "label_weights": np.zeros((b, length), np.float32), "word_index": np.full((b, length), -1, np.int32),
           "word_context": np.zeros((b, length), np.float32),
           "example_ids": np.arange(b, dtype=np.int32), "num_words": np.array([len(w) for w in sentences], np.int32)}
  for row, words in enumerate(sentences):
    pos = 1
    batch["input_ids"][row, 0] = CLS
    for w, (pieces, tag) in enumerate(words):
      batch["input_ids"][row, pos:pos + len(pieces)] = pieces
      batch["labels"][row, pos], batch["label_weights"][row, pos], batch["word_index"][row, pos] = tag, 1.0, w
      pos += len(pieces)
    batch["input_ids"][row, pos] = SEP
    batch["attention_mask"][row, :pos + 1] = 1
  return batch


def _toy(seed, n):
  """A person is a word starting with a piece in 10..19 and may go on with one in 20..29; a location likewise with
  30..39 / 40..49; other words start in 50..255. Words have 1-3 pieces; later pieces are any of 50..255."""
  rng = np.random.default_rng(seed)
  sentences = []
  for _ in range(n):
    words = []
    while len(words) < rng.integers(4, 9):
      kind = rng.integers(0, 3)
      pieces = lambda first: [first] + list(rng.integers(50, 256, size=rng.integers(0, 3)))
      if kind == 0:
        words.append((pieces(rng.integers(50, 256)), 0))
      else:
        base, b_tag = (10, 1) if kind == 1 else (30, 3)
        words.append((pieces(rng.integers(base, base + 10)), b_tag))
        if rng.random() < 0.5:
          words.append((pieces(rng.integers(base + 10, base + 20)), b_tag + 1))
    sentences.append(words[:8])
  return _rows(sentences)


@pytest.mark.parametrize("head", ["softmax", "crf"])
def test_heads_learn_a_toy_tagging_task(head):
  config = config_lib.load(BASE, TINY + [f"task.head={head}", "train.batch_size=16", "optim.learning_rate=3e-3",
                                         *PLAIN_ADAM])
  task = make_task(config)
  state, losses = train_steps(config, sampled_batches(_toy(0, 256), 16), 120, task=task)
  assert losses[-1] < 0.3 * losses[0], losses
  dev = _toy(1, 32)
  out = jax.device_get(jax.jit(task.predict)(state.params, dev))
  assert np.all((out["tags"] >= 0) == (dev["word_index"] >= 0))  # a tag on every first sub-word, nowhere else
  metrics = task.host_metrics([(dev, out)], None)
  assert metrics["f1"] > 0.9 and metrics["accuracy"] > 0.9, metrics
  assert "PER" in metrics["report"] and "LOC" in metrics["report"]


def _brute_force_ll(emissions, tags, transitions, start, end):
  """log p(tags) by enumerating every path, in float64."""
  e, tr, s, en = (np.asarray(a, np.float64) for a in (emissions, transitions, start, end))

  def score(path):
    return s[path[0]] + en[path[-1]] + sum(e[i, t] for i, t in enumerate(path)) + sum(
        tr[a, b] for a, b in itertools.pairwise(path))

  all_scores = [score(p) for p in itertools.product(range(e.shape[1]), repeat=len(tags))]
  return score(tags) - np.logaddexp.reduce(all_scores)


def test_crf_loss_is_the_crf_over_words():
  task = _task("task.head=crf", "task.crf_constrained=false")
  batch = _toy(2, 3)
  for row in range(3):  # at most 5 words per sentence, so every tag path can be enumerated
    later = np.flatnonzero(batch["word_index"][row] >= 0)[5:]
    batch["word_index"][row, later], batch["label_weights"][row, later] = -1, 0.0
  batch["labels"][batch["label_weights"] == 0] = -100  # whatever fills the other positions is never read
  params = nn.meta.unbox(task.init_params(jax.random.key(0), batch))
  rng = np.random.default_rng(0)
  params["crf"] = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params["crf"].items()}
  loss_fn = jax.jit(task.loss_fn, static_argnums=3)
  loss, stats = loss_fn(params, batch, jax.random.key(0), False)
  logits, _ = jax.jit(task.model.apply)({"params": params}, batch["input_ids"], batch["token_type_ids"],
                                        batch["attention_mask"])
  want = 0.0
  for row in range(3):
    first = np.flatnonzero(batch["word_index"][row] >= 0)
    want -= _brute_force_ll(np.asarray(logits[row, first]), batch["labels"][row, first], params["crf"]["transitions"],
                            params["crf"]["start"], params["crf"]["end"])
  np.testing.assert_allclose(float(stats["loss"][0]), want, rtol=1e-4)
  assert float(stats["loss"][1]) == batch["label_weights"].sum()
  np.testing.assert_allclose(float(loss), want / batch["label_weights"].sum(), rtol=1e-4)
  # a padding row (example id -1) adds nothing
  padded = {k: np.concatenate([v, v[:1]]) for k, v in batch.items()}
  padded["example_ids"][-1] = -1
  padded["label_weights"][-1] = 0.0
  _, padded_stats = loss_fn(params, padded, jax.random.key(0), False)
  np.testing.assert_allclose(float(padded_stats["loss"][0]), float(stats["loss"][0]), rtol=1e-6)


def _valid_iob2(names):
  return all(not cur.startswith("I-") or (prev != "O" and prev[2:] == cur[2:]) for prev, cur in zip(["O"] + names,
                                                                                                      names))


def test_constrained_crf_only_decodes_valid_iob2():
  batch = _toy(3, 32)
  invalid = {}
  for head in ("crf", "softmax"):
    task = _task(f"task.head={head}", "task.crf_constrained=true")
    params = nn.meta.unbox(task.init_params(jax.random.key(5), batch))
    if head == "crf":  # transitions that favour I- tags everywhere: only the constraint keeps paths valid
      params["crf"]["transitions"] = params["crf"]["transitions"] + np.array([0, 0, 3, 0, 3], np.float32)
      params["crf"]["start"] = params["crf"]["start"] + np.array([0, 0, 3, 0, 3], np.float32)
    _, y_pred = task.sentences([(batch, jax.device_get(jax.jit(task.predict)(params, batch)))])
    invalid[head] = sum(not _valid_iob2(s) for s in y_pred)
  assert invalid["crf"] == 0
  assert invalid["softmax"] > 0  # an untrained softmax head does break the rules, so the check above means something


def test_metrics_join_windows_and_match_seqeval():
  task = _task()
  # sentence 7 in two overlapping windows (words 0-3 and 2-5), sentence 9 in one, and a padding row
  gold7 = ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"]
  pred7 = ["B-PER", "I-PER", "O", "B-LOC", "O", "O"]
  gold9 = ["O", "B-LOC", "O"]
  pred9 = ["B-PER", "B-LOC", "O"]
  idx = {name: i for i, name in enumerate(LABELS)}
  windows = [(7, range(4)), (7, range(2, 6)), (9, range(3)), (-1, range(2))]
  length = 12
  batch = {"labels": np.zeros((4, length), np.int32), "word_index": np.full((4, length), -1, np.int32),
           "label_weights": np.zeros((4, length), np.float32),
           "example_ids": np.array([w[0] for w in windows], np.int32)}
  tags = np.full((4, length), -1, np.int32)
  for row, (example, words) in enumerate(windows):
    gold, pred = (gold7, pred7) if example == 7 else (gold9, pred9)
    for k, w in enumerate(words):
      pos = 1 + 2 * k  # every word has two pieces
      batch["word_index"][row, pos] = w
      batch["label_weights"][row, pos] = 1.0
      batch["labels"][row, pos] = idx[gold[w]] if example >= 0 else 0
      tags[row, pos] = idx[pred[w]] if example >= 0 else 1
  # split over two eval batches, as an eval pass delivers them
  pairs = [({k: v[:2] for k, v in batch.items()}, {"tags": tags[:2]}),
           ({k: v[2:] for k, v in batch.items()}, {"tags": tags[2:]})]
  y_true, y_pred = task.sentences(pairs)
  assert y_true == [gold7, gold9] and y_pred == [pred7, pred9]
  metrics = task.host_metrics(pairs, None)
  # 3 gold entities, 4 predicted (PER, LOC of one word; PER, LOC), 2 of them right: P = 1/2, R = 2/3, F1 = 4/7
  assert metrics["precision"] == pytest.approx(1 / 2) and metrics["recall"] == pytest.approx(2 / 3)
  assert metrics["f1"] == pytest.approx(4 / 7) == f1_score(y_true, y_pred)
  assert metrics["report"] == classification_report(y_true, y_pred, digits=4, zero_division=0)


def test_entities_for_prediction_output():
  tags = ["B-PER", "I-PER", "O", "B-LOC", "I-PER", "I-PER"]
  # conlleval rules: a stray I-PER opens an entity; strict IOB2: it does not
  assert _task().entities(tags) == [("PER", 0, 1), ("LOC", 3, 3), ("PER", 4, 5)]
  assert _task("task.seqeval_strict=true").entities(tags) == [("PER", 0, 1), ("LOC", 3, 3)]


def test_bad_input():
  task = _task()
  batch = _toy(0, 2)
  out = {"tags": np.where(batch["word_index"] >= 0, 0, -1)}
  task.host_metrics([(batch, out)], None)
  batch["labels"][0, 1] = 9
  with pytest.raises(ValueError, match="label id 9 is outside data.labels"):
    task.host_metrics([(batch, out)], None)
  with pytest.raises(ValueError, match="task.head='sequence' does not fit task.name='ner'; its heads: softmax, crf"):
    _task("task.head=sequence")
  with pytest.raises(ValueError, match="IOB2 rules only"):
    _task("task.head=crf", "data.tag_scheme=bioes")
  with pytest.raises(ValueError, match="'PER' is not an IOB2 tag"):
    _task("task.head=crf", "data.labels=('O','PER')")
  _task("task.head=crf", "data.tag_scheme=bioes", "task.crf_constrained=false")  # unconstrained: any scheme


def _read_conll(path, n):
  sentences, words = [], []
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  for line in lines:
    parts = line.split()
    if not parts:
      if words:
        sentences.append(words)
        words = []
      if len(sentences) == n:
        break
    elif parts[0] != "-DOCSTART-":
      words.append((parts[0], parts[-1]))
  return sentences


def test_first_subword_alignment_on_conll(shared_data, minilm):
  transformers = pytest.importorskip("transformers")
  tokenizer = transformers.BertTokenizerFast(MINILM_VOCAB, do_lower_case=True)
  conll_labels = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
  task = _task(f"data.labels={conll_labels!r}")
  sentences = _read_conll(shared_data / "conll2003" / "valid.txt", 64)
  enc = tokenizer([[w for w, _ in s] for s in sentences], is_split_into_words=True, padding="max_length",
                  max_length=128, truncation=True, return_tensors="np")
  length = enc["input_ids"].shape[1]
  batch = {"labels": np.zeros((64, length), np.int32), "label_weights": np.zeros((64, length), np.float32),
           "word_index": np.full((64, length), -1, np.int32), "example_ids": np.arange(64, dtype=np.int32)}
  for row, sentence in enumerate(sentences):
    previous = None
    for pos, word in enumerate(enc.word_ids(row)):
      if word is not None and word != previous:
        batch["word_index"][row, pos] = word
        batch["label_weights"][row, pos] = 1.0
        batch["labels"][row, pos] = conll_labels.index(sentence[word][1])
      previous = word
  gold = [[tag for _, tag in s] for s in sentences]
  assert sum(len(s) for s in gold) == batch["label_weights"].sum()  # no sentence was cut
  # a prediction that confuses ORG with MISC: metrics equal seqeval's on the file's own tag sequences
  swap = {"B-ORG": "B-MISC", "I-ORG": "I-MISC"}
  swapped = np.vectorize(lambda t: conll_labels.index(swap.get(conll_labels[t], conll_labels[t])))(batch["labels"])
  pred_tags = np.where(batch["word_index"] >= 0, swapped, -1)
  metrics = task.host_metrics([(batch, {"tags": pred_tags})], None)
  pred = [[swap.get(t, t) for t in s] for s in gold]
  assert metrics["precision"] == pytest.approx(precision_score(gold, pred))
  assert metrics["recall"] == pytest.approx(recall_score(gold, pred))
  assert metrics["f1"] == pytest.approx(f1_score(gold, pred)) and 0 < metrics["f1"] < 1
  assert task.host_metrics([(batch, {"tags": np.where(batch["word_index"] >= 0, batch["labels"], -1)})],
                           None)["f1"] == 1.0


def _loop_losses(mesh, steps=3):
  """Losses of the train loop's own step (jaxlm.train) with the CRF head on a mesh."""
  config = config_lib.load(BASE, TINY + ["task.head=crf", "train.batch_size=8", "data.seq_len=32",
                                         "optim.warmup_steps=1", "optim.learning_rate=3e-3", f"mesh.data={mesh[0]}",
                                         f"mesh.fsdp={mesh[1]}", f"mesh.tensor={mesh[2]}"])
  setup = train.build(config, jax.devices()[:int(np.prod(mesh))])
  state = train.init_state(setup, 0)
  step_fn = train.compile_train_step(setup)
  batch = _toy(4, 8)
  batch["example_ids"][-1] = -1  # a padding row
  batch["label_weights"][-1] = 0.0
  losses = []
  for _ in range(steps):
    state, metrics = step_fn(state, train.global_batch(batch, setup.batch_shardings))
    losses.append(float(metrics["loss"]))
  return np.array(losses)


def test_crf_head_in_the_train_step_sharded_equals_one_device():
  base = _loop_losses((1, 1, 1))
  assert np.all(np.isfinite(base)) and base[-1] < base[0]  # step 0 has learning rate 0 (warmup)
  np.testing.assert_allclose(_loop_losses((2, 2, 2)), base, rtol=1e-5)


# ---- sentences longer than a row ----------------------------------------------------------------------------------

def _long_sentence(n, seed=0):
  """n words of 1-3 pieces each ('w3', 'w3a' -> w3 ##a, 'w3ab' -> w3 ##a ##b) with random tags; the vocabulary."""
  rng = np.random.default_rng(seed)
  words = [f"w{rng.integers(10)}" + "".join(rng.choice(["a", "b"], size=rng.integers(0, 3))) for _ in range(n)]
  tags = [str(t) for t in rng.choice(LABELS, size=n)]
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(10)] + ["##a", "##b"]
  return words, tags, vocab


def _context(window_words, pieces, w, complete_left, complete_right):
  """How much of the sentence word w sees in a window of `window_words`: the sub-words before and after its first
  piece, the poorer side counting (a side that reaches the sentence's end sees all of it)."""
  before = sum(len(pieces[v]) for v in window_words if v < w)
  after = sum(len(pieces[v]) for v in window_words if v >= w) - 1
  return min(np.inf if complete_left else before, np.inf if complete_right else after)


@pytest.mark.parametrize("stride", [0, 5, 40])
def test_windows_cover_a_long_sentence_and_every_word_is_scored_once(tmp_path, stride):
  words, tags, vocab = _long_sentence(400)
  (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
  tokenizer = WordPieceTokenizer.from_file(str(tmp_path / "vocab.txt"), lowercase=True)
  pieces = tokenizer.encode_words(words)
  assert sum(map(len, pieces)) > 600 and max(map(len, pieces)) == 3
  task = _task()
  label_ids = {t: i for i, t in enumerate(LABELS)}
  rows = ner.AlignTags(tokenizer, 32, label_ids, stride).flat_map((0, {"tokens": words, "tags": tags}))
  windows = []
  for row in rows:
    kept = [int(w) for w in row["word_index"][row["word_index"] >= 0]]
    windows.append(kept)
    assert kept == list(range(kept[0], kept[-1] + 1))  # whole consecutive words
    # the row is [CLS], the words' pieces, [SEP]: nothing cut inside a word
    assert list(row["input_ids"][row["attention_mask"] > 0]) == [tokenizer.cls_id] + [
        i for w in kept for i in pieces[w]] + [tokenizer.sep_id]
    assert [LABELS[row["labels"][p]] for p in np.flatnonzero(row["word_index"] >= 0)] == [tags[w] for w in kept]
    assert row["example_ids"] == 0 and row["num_words"] == 400
  assert windows[0][0] == 0 and windows[-1][-1] == 399
  offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
  step = stride or 15  # half of the 30 sub-words a row holds
  for a, b in itertools.pairwise(windows):
    assert a[0] < b[0] <= a[-1] + 1  # each window moves on, and no word falls between two windows
    # the next window starts at the first word `step` sub-words on (or at the word after this one's last)
    want = next((w for w in range(a[0] + 1, a[-1] + 1) if offsets[w] >= offsets[a[0]] + step), a[-1] + 1)
    assert b[0] == want
    if step < 20:
      assert b[0] <= a[-1]  # windows overlap
  # predictions: a word's id in every window, so each row shows which window a word's tag came from
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  window_of = np.where(batch["word_index"] >= 0, np.arange(len(rows))[:, None], -1)
  merged = task.words([(batch, {"tags": window_of})])
  assert sorted(merged) == [0] and sorted(merged[0]) == list(range(400))  # every word exactly once
  for w in range(400):
    holding = [k for k, kept in enumerate(windows) if w in kept]
    scores = [_context(windows[k], pieces, w, windows[k][0] == 0, windows[k][-1] == 399) for k in holding]
    assert merged[0][w] == (label_ids[tags[w]], holding[int(np.argmax(scores))])  # the best-placed window's tag
  # every gold word counts: wrong tags on 7 words give a word accuracy of exactly 393/400
  pred = batch["labels"].copy()
  wrong = [3, 50, 51, 120, 200, 333, 399]
  for w in wrong:
    pred[(batch["word_index"] == w)] = (pred[batch["word_index"] == w] + 1) % len(LABELS)
  pred = np.where(batch["word_index"] >= 0, pred, -1)
  metrics = task.host_metrics([(batch, {"tags": pred})], None)
  assert metrics["accuracy"] == pytest.approx(393 / 400)
  y_true, _ = task.sentences([(batch, {"tags": pred})])
  assert y_true == [tags]
  out = io.StringIO()
  record = {"tokens": words, "tags": tags}
  assert task.write_predictions([record], [(batch, {"tags": pred})], out, jsonl=True) == 1
  written = json.loads(out.getvalue())
  assert len(written["tags"]) == 400 and sum(a != b for a, b in zip(written["tags"], tags)) == len(wrong)


@pytest.mark.slow
def test_conll_at_32_tokens_every_test_word_predicted_and_scored(shared_data, minilm, tmp_path):
  """CoNLL-2003 test with data.seq_len=32 (many sentences need several windows): `jaxlm predict` writes a tag for
  every word of the file, and evaluation scores every gold word and entity."""
  test_file = shared_data / "conll2003" / "test.txt"
  workdir = tmp_path / "run"
  config = config_lib.load(str(REPO / "configs" / "bert_tiny_ner.py"), [
      f"data.train_files={test_file}", f"data.dev_files={test_file}", "data.test_files=", "data.seq_len=32",
      "data.bucket_lengths=()", f"data.tfds_data_dir={tmp_path / 'tfds'}", "train.steps=2", "train.eval_every=0",
      "train.eval_batches=1", "train.batch_size=64", "checkpoint.every_steps=2", "checkpoint.best_metric="])
  run.run(config, str(workdir))
  sentences = _read_conll(test_file, 10 ** 6)
  n_words = sum(len(s) for s in sentences)
  assert len(sentences) == 3453 and n_words == 46435

  out = tmp_path / "test.conll"
  assert predict.predict(str(workdir), str(test_file), str(out), "conll") == len(sentences)
  written = [line.split("\t") for line in out.read_text().splitlines() if line]
  assert [w for w, _ in written] == [w for s in sentences for w, _ in s]  # a tag for every word, in order
  config = workdir_lib.read_config(str(workdir))
  assert {t for _, t in written} <= set(config.data.labels)

  # evaluation of that file as a split: every gold word and entity counts
  tokenizer = tokenizer_lib.load_tokenizer(config, str(workdir))
  task = make_task(config)
  batches = list(task_batches(config, tokenizer, "dev", task=task))
  assert sum(int(b["label_weights"].sum()) for b in batches) > n_words  # overlapping windows repeat words
  _, params = evaluation.restore_params(train.build(config), Checkpointer(str(workdir), config.checkpoint, read_only=True))
  predict_fn = jax.jit(task.predict)
  pairs = [(b, jax.device_get(predict_fn(params, b))) for b in batches]
  y_true, y_pred = task.sentences(pairs)
  assert y_true == [[t for _, t in s] for s in sentences]
  assert sum(map(len, y_pred)) == n_words
  metrics = task.host_metrics(pairs, None)
  assert metrics["recall"] == pytest.approx(recall_score(y_true, y_pred))  # over all 5,648 gold entities
  assert "5648" in metrics["report"].replace(",", "")
