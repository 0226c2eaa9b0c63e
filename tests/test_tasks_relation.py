"""Relation task: records and the stratified dev split through the generic builders (generated files and the real
SemEval-2010 Task 8 files), the entity-start head against a direct computation, the official score against its
definition, learning generated relations through the real pipeline and train step, marker embeddings from a
pretrained checkpoint, and `jaxlm train` + `jaxlm predict` end to end."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import predict, run
from jaxlm import workdir as workdir_lib
from jaxlm.data import relations
from jaxlm.data.sources import DataError
from jaxlm.data.wordpiece import WordPieceTokenizer
from jaxlm.hf import bert as hf_bert
from jaxlm.models.encoder import Encoder
from jaxlm.tasks import make_task, semeval_scorer
from tests.conftest import BASE, PLAIN_ADAM, TINY_ENCODER, open_split, task_batches, train_steps

# A clause's verb decides its label; the direction is part of it.
VERBS = {"causes": "Cause-Effect(e1,e2)", "follows": "Cause-Effect(e2,e1)", "holds": "Content-Container(e2,e1)",
         "inside": "Content-Container(e1,e2)", "beside": "Other"}
NOUNS = [f"n{i}" for i in range(12)]
FILLERS = ["the", "a", "then", "so", "we", "saw", "it", "and"]
SPECIALS = ["[PAD]", "[unused0]", "[unused1]", "[unused2]", "[unused3]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIALS + ["<", ">", "/", "e", "##1", "##2", ","] + NOUNS + FILLERS + list(VERBS)
TINY = ["task.name=relation", *TINY_ENCODER, f"model.vocab_size={len(VOCAB)}", "model.d_ff=64",
        "task.head_dropout=0.0", "data.source=semeval", "tokenizer.kind=wordpiece", "tokenizer.lowercase=true"]


def _sentence(rng) -> tuple[str, str]:
  """(tagged sentence, label): a marked clause 'x VERB y' after a distracting unmarked clause with another verb, so
  only the marked arguments' states tell the label."""
  verb, other = rng.choice(list(VERBS), size=2, replace=False)
  a, b, c, d = rng.choice(NOUNS, size=4, replace=False)
  prefix = " ".join(rng.choice(FILLERS, size=rng.integers(0, 3)))
  return f"{prefix} {c} {other} {d} , <e1>{a}</e1> {verb} <e2>{b}</e2> {rng.choice(FILLERS)}".strip(), VERBS[verb]


def _write_semeval(path, n, seed, first_id=1):
  """SemEval-2010 Task 8 layout: CRLF lines, quoted sentence, label, comment, blank."""
  rng = np.random.default_rng(seed)
  lines = []
  for i in range(n):
    sentence, label = _sentence(rng)
    lines += [f'{first_id + i}\t"{sentence}"', label, "Comment:", ""]
  path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
  return path


def _write_vocab(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(VOCAB) + "\n")
  return str(path)


def _config(tmp_path, *extra):
  return config_lib.load(BASE, TINY + [f"tokenizer.path={_write_vocab(tmp_path)}",
                                       f"data.tfds_data_dir={tmp_path / 'tfds'}", *extra])


def _relation(label: str) -> str:
  return label.split("(")[0]


def _official(gold: list[str], pred: list[str]) -> float:
  """The official score from its definition: per relation (direction dropped), correct = right label with the
  right direction, P = correct / predicted as the relation, R = correct / gold of the relation; macro-F1 over the
  key's relations, Other left out."""
  f1s = []
  for r in sorted({_relation(g) for g in gold} - {"Other"}):
    correct = sum(g == p and _relation(g) == r for g, p in zip(gold, pred))
    predicted = sum(_relation(p) == r for p in pred)
    total = sum(_relation(g) == r for g in gold)
    p = correct / predicted if predicted else 0.0
    rec = correct / total if total else 0.0
    f1s.append(2 * p * rec / (p + rec) if p + rec else 0.0)
  return float(np.mean(f1s))


# ---- records and the dev split -----------------------------------------------------------------------------------

def test_records_labels_and_stratified_dev_split(tmp_path):
  train = _write_semeval(tmp_path / "train.txt", 120, 0)
  test = tmp_path / "test.jsonl"
  rng = np.random.default_rng(1)
  test.write_text("".join(json.dumps({"text": s, "label": lab, "id": f"t{i}"}) + "\n"
                          for i, (s, lab) in enumerate(_sentence(rng) for _ in range(10))))
  config = _config(tmp_path, f"data.train_files={train}", f"data.test_files={test}", "data.eval_fraction=0.25")
  source = workdir_lib.open_data(config)
  want = relations.read_semeval(str(train))
  want_train, want_dev = relations.dev_split(want, 0.25)
  got_train, got_dev = source.split("train").records, source.split("dev").records
  assert [r["id"] for r in got_dev] == [r["id"] for r in want_dev] and len(got_dev) == 30
  assert [r["id"] for r in got_train] == [r["id"] for r in want_train]
  for got, expected in zip(list(got_train) + list(got_dev), want_train + want_dev):
    assert (got["text"], got["e1"], got["e2"], got["label"]) == (expected["text"], expected["e1"], expected["e2"],
                                                                 expected["label"])
    assert got["where"] == f"{train}:{expected['line']}"
  # the split is stratified: each label's dev share is its share of the file, to the nearest example
  counts = {label: sum(r["label"] == label for r in want) for label in set(VERBS.values())}
  for label, n in counts.items():
    assert abs(sum(r["label"] == label for r in got_dev) - 0.25 * n) < 1
  assert source.labels == ("Other", *sorted(set(VERBS.values()) - {"Other"}))  # Other first, the rest sorted
  tests = source.split("test").records
  assert [r["id"] for r in tests] == [f"t{i}" for i in range(10)] and tests[0]["where"] == f"{test}:1"


def test_real_semeval_splits(shared_data, tmp_path):
  task8 = shared_data / "semeval2010_task8"
  config = _config(tmp_path, f"data.train_files={task8 / 'TRAIN_FILE.TXT'}", "data.eval_fraction=0.1",
                   f"data.test_files={task8 / 'TEST_FILE_FULL.TXT'}")
  source = workdir_lib.open_data(config)
  want_train, want_dev = relations.dev_split(relations.read_semeval(str(task8 / "TRAIN_FILE.TXT")), 0.1)
  assert [r["id"] for r in source.split("dev").records] == [r["id"] for r in want_dev]
  assert [r["id"] for r in source.split("train").records] == [r["id"] for r in want_train]
  assert len(want_train) == 7200 and len(want_dev) == 800
  assert len(source.split("test").records) == 2717
  assert source.labels == relations.SEMEVAL_LABELS  # resolved from the data: Other first, then sorted


# ---- head and metrics ----------------------------------------------------------------------------------------------

def test_entity_start_head_is_the_concatenated_marker_states(tmp_path):
  task = make_task(_config(tmp_path, "data.labels=('Other','A(e1,e2)','A(e2,e1)')"))
  rng = np.random.default_rng(0)
  batch = task.dummy_batch(4, 16)
  batch["input_ids"] = rng.integers(5, len(VOCAB), size=(4, 16)).astype(np.int32)
  batch["attention_mask"][:, 12:] = 0
  batch["e1_start"] = np.array([1, 3, 5, 2], np.int32)
  batch["e2_start"] = np.array([4, 9, 6, 11], np.int32)
  params = jax.jit(lambda r, b: nn.meta.unbox(task.init_params(r, b)))(jax.random.key(0), batch)
  logits = np.asarray(jax.jit(task.model.apply)({"params": params}, batch["input_ids"], batch["token_type_ids"],
                                                batch["attention_mask"], batch["e1_start"], batch["e2_start"]))
  hidden, _ = jax.jit(Encoder(task.model_cfg).apply)({"params": params["encoder"]}, batch["input_ids"],
                                                     batch["token_type_ids"], batch["attention_mask"])
  hidden = np.asarray(hidden)
  rows = np.arange(4)
  pair = np.concatenate([hidden[rows, batch["e1_start"]], hidden[rows, batch["e2_start"]]], axis=1)  # [4, 2D]
  want = pair @ np.asarray(params["classifier"]["kernel"]) + np.asarray(params["classifier"]["bias"])
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


def test_host_metrics_are_the_official_score(tmp_path):
  labels = relations.SEMEVAL_LABELS
  task = make_task(_config(tmp_path, f"data.labels={labels!r}"))
  rng = np.random.default_rng(0)
  n = 200
  gold = rng.integers(0, len(labels), size=n)
  pred = np.where(rng.random(n) < 0.6, gold, rng.integers(0, len(labels), size=n))
  flip = rng.random(n) < 0.1  # right relation, wrong direction
  pred[flip & (gold > 0)] = np.where(gold[flip & (gold > 0)] % 2, gold[flip & (gold > 0)] + 1,
                                     gold[flip & (gold > 0)] - 1)
  pairs = []
  for lo in range(0, n, 64):  # eval batches of 64 rows; the last one completed by padding rows
    ids = np.arange(lo, lo + 64)
    real = ids < n
    take = np.minimum(ids, n - 1)
    batch = {"labels": np.where(real, gold[take], 0).astype(np.int32),
             "example_ids": np.where(real, ids, -1).astype(np.int32)}
    probs = np.full((64, len(labels)), 1.0 / len(labels), np.float32)
    pairs.append((batch, {"labels": np.where(real, pred[take], 3).astype(np.int32), "probs": probs}))
  metrics = task.host_metrics(pairs, None)
  gold_names, pred_names = [labels[i] for i in gold], [labels[i] for i in pred]
  assert np.sum(flip & (gold > 0)) > 5
  assert metrics["macro_f1"] == pytest.approx(_official(gold_names, pred_names), abs=1e-12)
  assert metrics["accuracy"] == pytest.approx(np.mean(gold == pred))
  assert "confusion matrix" in metrics["report"] and "Cause-Effect" in metrics["report"]
  assert f"{100 * metrics['macro_f1']:.2f}%" in metrics["report"].splitlines()[0]


# ---- learning, pretrained start, end to end ------------------------------------------------------------------------

def test_learns_generated_relations_through_the_pipeline(tmp_path):
  train = _write_semeval(tmp_path / "train.txt", 640, 2)
  dev = _write_semeval(tmp_path / "dev.txt", 96, 3, first_id=1000)
  config = _config(tmp_path, f"data.train_files={train}", f"data.dev_files={dev}", "train.batch_size=32",
                   "optim.learning_rate=3e-3", "data.bucket_lengths=(16, 24)", "data.length_group_batches=4",
                   *PLAIN_ADAM)
  tokenizer = WordPieceTokenizer.from_file(config.tokenizer.path, lowercase=True)
  assert tokenizer.vocab_size == config.model.vocab_size
  workdir_lib.resolve_labels(config)
  task = make_task(config)
  batch = next(task_batches(config, tokenizer, "train"))
  first = batch["input_ids"][np.arange(32), batch["e1_start"]]
  assert np.all(first == tokenizer.piece_to_id("[unused0]"))  # e1_start points at [E1]
  assert np.all(batch["input_ids"][np.arange(32), batch["e2_start"]] == tokenizer.piece_to_id("[unused2]"))
  state, losses = train_steps(config, task_batches(config, tokenizer, "train"), 150, task=task)
  assert losses[-1] < 0.2 * losses[0], losses
  predict_fn = jax.jit(task.predict)
  pairs = [(b, jax.device_get(predict_fn(state.params, b))) for b in task_batches(config, tokenizer, "dev")]
  metrics = task.host_metrics(pairs, None)
  records = open_split(config, "dev").records
  got = task.predictions(pairs)
  assert sorted(got) == list(range(len(records)))  # every dev sentence once
  assert metrics["macro_f1"] == pytest.approx(_official([r["label"] for r in records],
                                                        [task.labels[got[i][1]] for i in range(len(records))]))
  assert metrics["macro_f1"] > 0.9 and metrics["accuracy"] > 0.9, metrics


def test_marker_embeddings_start_from_their_tags(minilm):
  config = config_lib.load(BASE, ["task.name=relation", "data.labels=('Other','A(e1,e2)')"])
  hf_bert.configure_from_hf(config, str(minilm))
  task = make_task(config)
  name, tree = task.pretrained_source()
  original = hf_bert.source_tree(str(minilm))["encoder"]["word_embeddings"]
  got = np.asarray(tree["encoder"]["word_embeddings"])
  vocab = (minilm / "vocab.txt").read_text(encoding="utf-8").splitlines()
  tags = {"[unused0]": ["<", "e", "##1", ">"], "[unused1]": ["<", "/", "e", "##1", ">"],
          "[unused2]": ["<", "e", "##2", ">"], "[unused3]": ["<", "/", "e", "##2", ">"]}
  for marker, pieces in tags.items():
    np.testing.assert_allclose(got[vocab.index(marker)], original[[vocab.index(p) for p in pieces]].mean(0),
                               rtol=1e-6)
  changed = np.flatnonzero(np.any(got != original, axis=1))
  assert sorted(changed) == sorted(vocab.index(m) for m in tags)  # nothing else moved
  assert name == str(minilm)


@pytest.mark.slow
def test_train_then_predict_writes_one_label_per_sentence(tmp_path):
  train = _write_semeval(tmp_path / "train.txt", 160, 4)
  test = _write_semeval(tmp_path / "test.txt", 24, 5, first_id=9001)
  workdir = tmp_path / "run"
  config = _config(tmp_path, f"data.train_files={train}", f"data.test_files={test}", "train.batch_size=16",
                   "train.steps=12", "train.eval_every=6", "train.eval_batches=0", "train.log_every=6",
                   "optim.warmup_steps=2", "checkpoint.every_steps=12", "checkpoint.async_save=false",
                   "checkpoint.best_metric=macro_f1", "data.eval_fraction=0.2")
  run.run(config, str(workdir))
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  test_row = [r for r in rows if r["split"] == "test"][-1]
  assert {"macro_f1", "accuracy"} <= set(test_row) and [r for r in rows if r["split"] == "dev"]
  assert list(workdir.glob("report_test_step*.txt"))

  # the SemEval layout: one 'ID<TAB>label' line per sentence, scored as the test split was
  answers = tmp_path / "answers.tsv"
  assert predict.predict(str(workdir), str(test), str(answers)) == 24
  key = {r["id"]: r["label"] for r in relations.read_semeval(str(test))}
  assert set(semeval_scorer.read_answers(str(answers))) == set(key)
  score = semeval_scorer.score_files(str(answers), _key_file(tmp_path, key))
  assert score.official / 100 == pytest.approx(test_row["macro_f1"])

  # tagged lines (a line's number is its id) and JSON lines, with the label's probability
  sentences = [_sentence(np.random.default_rng(7))[0] for _ in range(5)]
  lines = tmp_path / "lines.txt"
  lines.write_text("\n".join(sentences[:3]) + "\n\n" + "\n".join(sentences[3:]) + "\n")
  out = tmp_path / "lines.jsonl"
  assert predict.predict(str(workdir), str(lines), str(out)) == 5
  got = [json.loads(line) for line in out.read_text().splitlines()]
  assert [g["id"] for g in got] == ["1", "2", "3", "5", "6"] and [g["text"] for g in got] == sentences
  labels = make_task(workdir_lib.read_config(str(workdir))).labels
  assert all(g["label"] in labels and 0 < g["probability"] <= 1 for g in got)
  jsonl_in = tmp_path / "in.jsonl"
  jsonl_in.write_text("".join(json.dumps({"id": f"s{i}", "text": s}) + "\n" for i, s in enumerate(sentences)))
  tsv = tmp_path / "jsonl_out.tsv"
  assert predict.predict(str(workdir), str(jsonl_in), str(tsv)) == 5
  assert [line.split("\t")[0] for line in tsv.read_text().splitlines()] == [f"s{i}" for i in range(5)]
  assert [line.split("\t")[1] for line in tsv.read_text().splitlines()] == [g["label"] for g in got]

  bad = tmp_path / "bad.txt"
  bad.write_text(sentences[0] + "\nno markers here\n")
  with pytest.raises(DataError, match=rf"{bad}:2: no <e1> tag"):
    predict.predict(str(workdir), str(bad), str(tmp_path / "never.tsv"))


def _key_file(tmp_path, key: dict) -> str:
  path = tmp_path / "key.tsv"
  semeval_scorer.write_answers(str(path), list(key), list(key.values()))
  return str(path)


def test_bad_input(tmp_path):
  with pytest.raises(ValueError, match="task.head='crf' does not fit task.name='relation'"):
    make_task(_config(tmp_path, "task.head=crf", "data.labels=('Other',)"))
  with pytest.raises(ValueError, match="needs its label names"):
    make_task(_config(tmp_path))
  task = make_task(_config(tmp_path, "data.labels=('Other',)"))
  with pytest.raises(DataError, match="--input-format='conll' does not fit task.name='relation'"):
    task.read_predict_input(str(tmp_path / "x.txt"), "conll")
  train = _write_semeval(tmp_path / "train.txt", 20, 0)
  with pytest.raises(DataError, match=r"data.eval_fraction=0.01 .*gives 0 of 20 examples"):
    open_split(_config(tmp_path, f"data.train_files={train}", "data.eval_fraction=0.01"), "dev")
  # a vocabulary without [unused0..3] or [E1].. slots cannot mark the arguments
  plain = tmp_path / "plain.txt"
  plain.write_text("\n".join(v for v in VOCAB if not v.startswith("[unused")) + "\n")
  tokenizer = WordPieceTokenizer.from_file(str(plain), lowercase=True)
  config = _config(tmp_path, f"data.train_files={train}", "data.labels=" + repr(tuple(sorted(set(VERBS.values())))))
  with pytest.raises(ValueError, match=r"user_defined_symbols"):
    next(task_batches(config, tokenizer, "train"))
