"""The seq2seq task: its loss against a direct computation (label smoothing too), packed rows equal one-pair rows, a
tiny T5 learning to copy through the real train step and scored by sacreBLEU, metrics equal to sacreBLEU and
rouge-score called directly, the LEAD baseline, the train step on meshes, and `jaxlm train` / `predict` /
`generate` end to end."""

import io
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import grain
import jax
import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from jaxlm import config as config_lib
from jaxlm import text_metrics, train
from jaxlm.data import builders, rows
from jaxlm.data import seq2seq as pairs_lib
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.tasks import make_task, seq2seq
from tests.conftest import BASE, PLAIN_ADAM, REPO, child_env, devices_for, task_batches, train_steps

WORDS = [f"w{i}" for i in range(12)]
ANIMALS = ("zebra", "lion", "owl", "bear", "wolf", "tiger", "horse", "camel", "mouse", "snake", "eagle", "panda")
T5 = ["task.name=seq2seq", "model.family=encoder_decoder", "model.style=t5", "model.vocab_size=16", "model.d_model=32",
      "model.num_heads=4", "model.head_dim=8", "model.d_ff=64", "model.num_layers=2",
      "model.relative_attention_num_buckets=8", "model.relative_attention_max_distance=20", "model.dropout=0.0",
      "data.seq_len=16", "data.target_len=16", "data.prefetch=0", "train.batch_size=8"]


class WordTokenizer:
  """One id per word of WORDS: an independent tokenizer whose outputs read back exactly."""
  vocab_size, pad_id, unk_id, bos_id, eos_id = 16, 0, 1, 2, 3

  def encode(self, text):
    return [4 + WORDS.index(w) for w in text.split()]

  def decode(self, ids):
    return " ".join(WORDS[i - 4] for i in ids if i >= 4)

  def fingerprint(self):
    return "words"


def _pairs(n, seed, reverse=False, vocabulary=tuple(WORDS)):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    words = [vocabulary[i] for i in rng.integers(0, len(vocabulary), rng.integers(2, 5))]
    out.append({"source": " ".join(words), "target": " ".join(words[::-1] if reverse else words)})
  return out


def _config(tmp_path, *overrides, n_train=2000, n_dev=24):
  for name, n, seed in (("train", n_train, 0), ("dev", n_dev, 1)):
    path = tmp_path / f"{name}.jsonl"
    if not path.exists():
      path.write_text("".join(json.dumps(p) + "\n" for p in _pairs(n, seed)))
  return config_lib.load(BASE, T5 + ["data.source=pairs", f"data.train_files={tmp_path / 'train.jsonl'}",
                                     f"data.dev_files={tmp_path / 'dev.jsonl'}", f"data.tfds_data_dir={tmp_path}/tfds",
                                     *overrides])


def _rows(records, packed: bool, source_len=16, target_len=16):
  """The task's rows of `records` (one pair a row, or packed), as the pipeline makes them."""
  encode = pairs_lib.EncodePair(WordTokenizer(), "", source_len, target_len)
  encoded = [encode.map((i, r)) for i, r in enumerate(records)]
  if packed:
    ds = grain.MapDataset.source(encoded).to_iter_dataset()
    made = list(pairs_lib.pack_pairs(ds, source_len=source_len, target_len=target_len, num_bins=4, seed=0,
                                     shuffle_bins=False, pad_id=0, start_id=0))
  else:
    made = [pairs_lib.PadPair(source_len, target_len, 0, 0).map(e) for e in encoded]
  return {k: np.stack([r[k] for r in made]) for k in made[0]}


def _params(task, batch, seed=0):
  """Parameters of the task's model drawn in numpy from their shapes (no init program to compile): weights
  N(0, 1/fan_in), embeddings N(0, 1), norm scales near 1."""
  shapes = jax.eval_shape(lambda: nn.meta.unbox(task.init_params(jax.random.key(0), batch)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      return 1 + 0.1 * rng.standard_normal(leaf.shape, np.float32)
    fan_in = 1 if "embedding" in name else leaf.shape[0] * (leaf.shape[1] if name == "o" else 1)
    return rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def test_loss_and_label_smoothing_match_a_direct_computation(tmp_path):
  task = make_task(_config(tmp_path, "task.label_smoothing=0.1"))
  batch = _rows(_pairs(8, 3), packed=False)
  batch["decoder_weights"][-1] = 0.0  # a padding row
  params = _params(task, batch)
  logits, *losses = jax.jit(lambda p, b: (task.logits(p, b), task.loss_fn(p, b, jax.random.key(0), True),
                                          task.loss_fn(p, b, jax.random.key(0), False)))(params, batch)
  logp = _log_softmax(logits)
  w, t = batch["decoder_weights"], batch["decoder_target_ids"]
  nll = -np.take_along_axis(logp, t[..., None], -1)[..., 0]
  smooth = 0.9 * nll - 0.1 * logp.mean(-1)
  for train_mode, (loss, stats) in zip((True, False), losses):
    want = smooth if train_mode else nll
    np.testing.assert_allclose(float(loss), np.sum(want * w) / np.sum(w), rtol=1e-5)
    np.testing.assert_allclose(float(stats["loss"][0]) / float(stats["loss"][1]), np.sum(nll * w) / np.sum(w),
                               rtol=1e-5)  # perplexity comes from the plain cross-entropy
    np.testing.assert_allclose(float(stats["accuracy"][0]), np.sum((logp.argmax(-1) == t) * w))


def test_packed_rows_give_each_pair_its_own_logits(tmp_path):
  task = make_task(_config(tmp_path))
  records = _pairs(12, 4)
  packed, alone = _rows(records, packed=True), _rows(records, packed=False)
  assert len(packed["encoder_input_ids"]) < len(records) / 2
  params = _params(task, alone, seed=1)
  both = jax.jit(lambda p, b: (task.logits(p, b), task.loss_fn(p, b, jax.random.key(0), False)[1]["loss"]))
  (packed_logits, packed_sum), (alone_logits, alone_sum) = both(params, packed), both(params, alone)
  by_target = {tuple(alone["decoder_target_ids"][i][alone["decoder_weights"][i] > 0]): i for i in range(len(records))}
  matched = 0
  for r in range(len(packed["encoder_input_ids"])):
    for seg in range(1, int(packed["decoder_segment_ids"][r].max()) + 1):
      d = packed["decoder_segment_ids"][r] == seg
      i = by_target[tuple(packed["decoder_target_ids"][r][d])]
      np.testing.assert_allclose(np.asarray(packed_logits[r])[d], np.asarray(alone_logits[i])[:d.sum()], atol=2e-5)
      matched += 1
  assert matched == len(records)
  np.testing.assert_allclose(float(packed_sum[0]), float(alone_sum[0]), rtol=1e-5)
  assert float(packed_sum[1]) == float(alone_sum[1])


def _predict_pass(task, config, params, tokenizer, split="dev"):
  setup = train.build(config, devices_for(config), task=task)  # where train_steps put the parameters
  predict = jax.jit(task.predict)
  return [(b, jax.device_get(predict(params, train.global_batch(b, setup.batch_shardings))))
          for b in task_batches(config, tokenizer, split, task=task)]


def test_a_tiny_t5_learns_to_copy_and_its_outputs_score_with_sacrebleu(tmp_path):
  config = _config(tmp_path, *PLAIN_ADAM, "optim.learning_rate=5e-3", "train.batch_size=32", "model.d_model=64",
                   "model.head_dim=16", "model.d_ff=128", "task.max_decode_len=6", "task.metrics=bleu,chrf")
  task = make_task(config)
  tok = WordTokenizer()
  state, losses = train_steps(config, task_batches(config, tok, "train", task=task), 400, task=task)
  assert losses[-1] < 0.15 * losses[0]
  records = builders.open_source(task.kind, config.data).split("dev").records
  refs = [r["target"] for r in records]
  for beams in (1, 3):
    task.beam_size = beams
    pairs = _predict_pass(task, config, state.params, tok)
    outputs = task.outputs(pairs, records)
    assert sorted(outputs) == list(range(len(records)))
    hyps = [outputs[i] for i in range(len(records))]
    metrics = task.host_metrics(pairs, records)
    assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert metrics["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert metrics["bleu"] > 60, metrics["report"]  # copied, mostly: 2000 pairs of 2-4 words seen 6.4 times
    assert "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" in metrics["report"]
    if beams == 1:
      greedy = hyps
  # the copies repeat the words the sources repeat; with no 1-gram repeated, no output holds a word twice
  assert any(len(set(h.split())) < len(h.split()) for h in greedy)
  task.beam_size, task.no_repeat = 1, 1
  banned = task.outputs(_predict_pass(task, config, state.params, tok), records)
  assert all(len(set(h.split())) == len(h.split()) for h in banned.values())
  assert sum(banned[i] == greedy[i] for i in banned) >= len(records) // 2  # sources without repeats: copied still


def test_metrics_equal_sacrebleu_and_rouge_score_called_directly():
  hyps = ["The cat sat on the mat.", "A dog runs in the park! It is happy.", "nothing here", ""]
  refs = ["The cat is sitting on the mat.", "A dog is running through a park. It looks happy.", "something else",
          "an empty output"]
  names = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "bleu1", "bleu2", "distinct1", "distinct2")
  scores, lines = text_metrics.score(hyps, refs, names)
  assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
  assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
  for n in (1, 2):
    assert scores[f"bleu{n}"] == pytest.approx(sacrebleu.metrics.BLEU(max_ngram_order=n).corpus_score(
        hyps, [refs]).score)
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
  split = {hyps[1]: "A dog runs in the park!\nIt is happy.",  # rougeLsum reads a sentence a line
           refs[1]: "A dog is running through a park.\nIt looks happy."}
  direct = [scorer.score(split.get(r, r), split.get(h, h)) for h, r in zip(hyps, refs)]
  for t in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
    assert scores[t] == pytest.approx(100 * np.mean([d[t].fmeasure for d in direct]))
  tokens = [Tokenizer13a()(h).split() for h in hyps]
  for n in (1, 2):
    grams = [tuple(t[i:i + n]) for t in tokens for i in range(len(t) - n + 1)]
    assert scores[f"distinct{n}"] == pytest.approx(100 * len(set(grams)) / len(grams))
  assert any(line.startswith("bleu: BLEU = ") for line in lines)
  with pytest.raises(ValueError, match="unknown metric 'blue'"):
    text_metrics.check_names(["blue"])


def test_lead_baseline_and_report_from_the_records(tmp_path):
  config = _config(tmp_path, "task.metrics=rouge1,rouge2,rougeL", "task.lead_turns=3", "task.report_examples=1")
  task = make_task(config)
  task.row_steps(rows.RowContext(WordTokenizer(), config.data, "dev", 0, []))  # the task decodes with this tokenizer
  records = [{"source": "w1 w2\nw3\nw4 w5\nw6 w7", "target": "w2 w3 w7", "where": "f:1"},
             {"source": "w8\nw9", "target": "w8 w9", "where": "f:2"}]
  out = {"tokens": np.asarray([[6, 7, 3, 0], [12, 3, 0, 0]]), "lengths": np.asarray([3, 2])}
  batch = {"example_ids": np.asarray([0, 1])}
  metrics = task.host_metrics([(batch, out)], records)
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  leads = ["w1 w2 w3 w4 w5", "w8 w9"]  # the first three turns, or all there are
  for t in ("rouge1", "rouge2", "rougeL"):
    assert metrics[f"lead3_{t}"] == pytest.approx(100 * np.mean([scorer.score(r["target"], h)[t].fmeasure
                                                                 for r, h in zip(records, leads)]))
    assert metrics[t] == pytest.approx(100 * np.mean([scorer.score(r["target"], h)[t].fmeasure
                                                      for r, h in zip(records, ["w2 w3", "w8"])]))
  assert "LEAD-3" in metrics["report"] and "output:    w2 w3" in metrics["report"] and "[f:2]" not in metrics["report"]


class TagTokenizer(WordTokenizer):
  """WordTokenizer over a few dialogue words and the speaker-tag pieces (or without them)."""
  def __init__(self, words=("Ann", "Bob", ":", "hi", "<speaker_1>", "<speaker_2>")):
    self.words = list(words)

  def encode(self, text):
    return [4 + self.words.index(w) for w in text.split()]

  def decode(self, ids):
    return " ".join(self.words[i - 4] for i in ids if i >= 4)

  def piece_to_id(self, piece):
    return 4 + self.words.index(piece) if piece in self.words else self.unk_id


def test_speaker_tags_in_rows_and_names_in_outputs(tmp_path):
  """task.speaker_tags: the rows hold the tag pieces where the speakers' names stood (input and target), and the
  outputs, scored and written, carry the names again."""
  records = [{"source": "Ann : hi Bob\nBob : hi", "target": "Bob hi Ann"}]
  (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  config = _config(tmp_path, "task.speaker_tags=2", "task.metrics=rouge1", "train.batch_size=1")
  tok = TagTokenizer()
  ids = lambda text: [tok.encode(text)[0] for text in text.split()]
  batch = next(iter(task_batches(config, tok, "dev", task=(task := make_task(config)))))
  assert list(batch["encoder_input_ids"][0, :8]) == ids("<speaker_1> : hi <speaker_2> <speaker_2> : hi") + [3]
  assert list(batch["decoder_target_ids"][0, :4]) == ids("<speaker_2> hi <speaker_1>") + [3]
  out = {"tokens": batch["decoder_target_ids"][:, :5], "lengths": np.asarray([4])}
  records = builders.open_source(task.kind, config.data).split("dev").records
  metrics = task.host_metrics([(batch, out)], records)
  assert metrics["rouge1"] == pytest.approx(100.0) and "output:    Bob hi Ann" in metrics["report"]
  with pytest.raises(ValueError, match=r"task.speaker_tags=2 needs the tokenizer pieces <speaker_1> .. <speaker_2>"):
    make_task(config).row_steps(rows.RowContext(TagTokenizer(("Ann", "Bob")), config.data, "dev", 0, []))


def test_a_trained_tokenizer_has_the_speaker_tags(tmp_path):
  config = _config(tmp_path, "task.speaker_tags=3", "tokenizer.vocab_size=44", "tokenizer.num_sentinels=2")
  texts = [f"{a}: {b} {c}\n{c}: {a}" for a in ANIMALS for b in ANIMALS[:4] for c in WORDS[:3]]
  tok = tokenizer_lib.SentencePieceTokenizer.from_file(tokenizer_lib.train_tokenizer(config, str(tmp_path), texts))
  tags = [tok.piece_to_id(f"<speaker_{i}>") for i in (1, 2, 3)]
  assert tok.unk_id not in tags and len(set(tags)) == 3 and tok.piece_to_id("<speaker_4>") == tok.unk_id
  assert tags[1] in tok.encode("<speaker_2>: zebra") and tok.decode(tok.encode("<speaker_3> owl")) == "<speaker_3> owl"


def test_lead_baseline_of_a_split_without_a_model(tmp_path):
  rows = [{"source": "w1: w2 w3\r\nw4: w5\r\nw6: w7", "target": "w1 w5"},
          {"source": "w8: w9\nw10: w11", "target": "w9"}]
  (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  config = _config(tmp_path, "task.metrics=rouge1,rougeL")
  scores, report = seq2seq.lead_baseline(config, "dev", 2)
  scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
  leads = ["w1: w2 w3 w4: w5", "w8: w9 w10: w11"]
  for t in ("rouge1", "rougeL"):
    assert scores[t] == pytest.approx(100 * np.mean([scorer.score(r["target"], h)[t].fmeasure
                                                     for r, h in zip(rows, leads)]))
  assert report.startswith("LEAD-2 on the dev split (2 examples)")


def _loop_losses(tmp_path, mesh, steps=2):
  config = _config(tmp_path, "optim.warmup_steps=0", "optim.learning_rate=3e-3", "task.label_smoothing=0.1",
                   "model.scan_layers=true", f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}", f"mesh.tensor={mesh[2]}")
  setup = train.build(config, jax.devices()[:int(np.prod(mesh))])
  state = train.init_state(setup, 0)
  step_fn = train.compile_train_step(setup)
  batch = _rows(_pairs(48, 5), packed=True)
  batch = {k: v[:8] for k, v in batch.items()}
  losses = []
  for _ in range(steps):
    state, metrics = step_fn(state, train.global_batch(batch, setup.batch_shardings))
    losses.append(float(metrics["loss"]))
  return np.array(losses)


def test_train_step_on_meshes_gives_the_single_device_losses(tmp_path):
  base = _loop_losses(tmp_path, (1, 1, 1))
  assert np.all(np.isfinite(base)) and base[1] < base[0]
  for mesh in [(2, 2, 2), (1, 1, 8), (8, 1, 1)]:
    np.testing.assert_allclose(_loop_losses(tmp_path, mesh), base, rtol=1e-5, err_msg=str(mesh))


def test_predict_input_and_output_formats(tmp_path):
  config = _config(tmp_path, "data.input_field=text")
  task = make_task(config)
  (tmp_path / "in.txt").write_text("w1  w2\n\nw3\n")
  (tmp_path / "in.jsonl").write_text('{"text": "w4\\r\\nw5"}\n{"source": "w6"}\n')
  assert [r["source"] for r in task.read_predict_input(str(tmp_path / "in.txt"), "auto")] == ["w1 w2", "w3"]
  records = task.read_predict_input(str(tmp_path / "in.jsonl"), "auto")
  assert [r["source"] for r in records] == ["w4\nw5", "w6"] and records[1]["where"].endswith("in.jsonl:2")
  task.row_steps(rows.RowContext(WordTokenizer(), config.data, "dev", 0, []))  # the task decodes with this tokenizer
  pairs = [({"example_ids": np.asarray([1, 0, -1])},
            {"tokens": np.asarray([[5, 3, 0], [6, 7, 3], [8, 8, 8]]), "lengths": np.asarray([2, 3, 3])})]
  out = io.StringIO()
  assert task.write_predictions(records, pairs, out, jsonl=False) == 2
  assert out.getvalue() == "w2 w3\nw1\n"
  out = io.StringIO()
  task.write_predictions(records, pairs, out, jsonl=True)
  assert [json.loads(line) for line in out.getvalue().splitlines()] == [{"source": "w4\nw5", "output": "w2 w3"},
                                                                        {"source": "w6", "output": "w1"}]
  with pytest.raises(ValueError, match="does not fit task.name='seq2seq'"):
    task.read_predict_input(str(tmp_path / "in.txt"), "conll")


def _jaxlm(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "jaxlm", *args], capture_output=True, text=True, timeout=timeout,
                        env=child_env(2), cwd=REPO, check=False)


@pytest.mark.slow
def test_train_predict_generate_end_to_end(tmp_path):
  """`jaxlm train` on a toy reversal task (sentencepiece trained on first use, dev BLEU during training, the best
  checkpoint on test), then `jaxlm predict` and `jaxlm generate` from the workdir."""
  data = tmp_path / "data"
  data.mkdir()
  for name, n, seed in (("train", 200, 0), ("dev", 12, 1), ("test", 12, 2)):
    (data / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in _pairs(n, seed, True, ANIMALS)))
  wd = str(tmp_path / "run")
  common = ["--workdir", wd, "--config.train.progress_bar=false"]
  overrides = [f"--config.{o}" for o in T5 if not o.startswith("model.vocab_size")] + [
      "--config.model.vocab_size=32", "--config.tokenizer.vocab_size=32", "--config.data.source=pairs",
      f"--config.data.train_files={data / 'train.jsonl'}", f"--config.data.dev_files={data / 'dev.jsonl'}",
      f"--config.data.test_files={data / 'test.jsonl'}", f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
      "--config.train.steps=12", "--config.train.eval_every=6", "--config.checkpoint.every_steps=6",
      "--config.checkpoint.best_metric=bleu", "--config.task.beam_size=2", "--config.task.max_decode_len=8",
      "--config.task.prefix=reverse: ", "--config.mesh.data=2"]
  r = _jaxlm("train", "--config", BASE, *common, *overrides)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    metrics = [json.loads(line) for line in f]
  dev = [row for row in metrics if row["split"] == "dev"]
  assert [row["step"] for row in dev] == [6, 12] and all({"bleu", "chrf", "perplexity"} <= set(row) for row in dev)
  test = [row for row in metrics if row["split"] == "test"]
  best = [row["step"] for row in dev if row["bleu"] == max(d["bleu"] for d in dev)]
  assert len(test) == 1 and test[0]["step"] in best and "bleu" in test[0]
  assert os.path.isfile(os.path.join(wd, f"report_test_step{test[0]['step']}.txt"))
  # the decoding speed of each pass is logged (12 pairs each), not written as a metric
  for step, split in ((6, "dev"), (12, "dev"), (test[0]["step"], "test")):
    assert re.search(rf"step {step} {split}: predictions for 12 examples in [0-9.]+ s \([0-9.]+ a second", r.stdout), \
        r.stdout[-3000:]
  assert not any(k.startswith("_") for row in metrics for k in row)
  # `jaxlm eval` rescores the tested checkpoint: its rows replace training's, its reports are written again
  for name in os.listdir(wd):
    if name.startswith("report_"):
      os.remove(os.path.join(wd, name))
  r = _jaxlm("eval", "--config", BASE, *common, *overrides)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(r.stdout.strip().splitlines()[-1])
  assert result["step"] == test[0]["step"] and result["test"]["bleu"] == pytest.approx(test[0]["bleu"])
  assert sorted(n for n in os.listdir(wd) if n.startswith("report_")) == [
      f"report_dev_step{result['step']}.txt", f"report_test_step{result['step']}.txt"]

  (tmp_path / "in.txt").write_text("zebra lion owl\nbear wolf\n")
  r = _jaxlm("predict", "--workdir", wd, "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.jsonl"))
  assert r.returncode == 0, r.stderr[-3000:]
  outputs = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert [o["source"] for o in outputs] == ["zebra lion owl", "bear wolf"]
  # generate reads the prompt as predict reads an input (task.prefix first): with the same search, the same output
  r = _jaxlm("generate", "--workdir", wd, "--prompt", "zebra lion owl", "--beam-size", "2", "--max-new-tokens", "8")
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.rstrip("\n").split("\n")[-1] == outputs[0]["output"]
  r = _jaxlm("generate", "--workdir", wd, "--prompt", "zebra lion owl", "--beam-size", "2", "--max-new-tokens", "8",
             "--no-repeat-ngram-size", "1")
  assert r.returncode == 0, r.stderr[-3000:]
  words = r.stdout.rstrip("\n").split("\n")[-1].split()
  assert len(set(words)) == len(words)
