"""Fine-tuning through `jaxlm train` on slices of the real data: dev evaluation at an interval, best-by-metric
checkpoints, the test split evaluated once with the best checkpoint, seqeval reports, labels recorded in config.json,
training seconds in train rows, and clean errors for input that cannot be trained on."""

import json

import numpy as np
import pytest
from seqeval import metrics as seqeval_metrics

from jaxlm import checkpoint, cli, loop_timing, run
from jaxlm import config as config_lib
from jaxlm.data import pipeline, sources
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.tasks import make_task
from tests.conftest import REPO

CONFIGS = REPO / "configs"


def conll_slice(src, dst, sentences: int) -> str:
  """The first `sentences` sentences of a CoNLL file (a -DOCSTART- line counts as one)."""
  out, n = [], 0
  with open(src) as f:
    for line in f:
      out.append(line)
      if not line.strip():
        n += 1
        if n >= sentences:
          break
  dst.write_text("".join(out))
  return str(dst)


def tsv_slice(src, dst, rows: int) -> str:
  with open(src) as f:
    dst.write_text("".join(line for _, line in zip(range(rows + 1), f)))
  return str(dst)


def rows_of(workdir) -> list[dict]:
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def train_cli(config: str, workdir, *overrides: str) -> None:
  cli.main(["train", "--config", str(CONFIGS / config), "--workdir", str(workdir)]
           + [f"--config.{o}" for o in overrides])


def check_dev_and_test(rows, metric: str, test_expected: bool):
  """Dev rows at every eval step; the one test row (if any) is at the step with the best dev metric."""
  dev = {r["step"]: r for r in rows if r["split"] == "dev"}
  assert sorted(dev) == [10, 20, 30]
  test = [r for r in rows if r["split"] == "test"]
  if not test_expected:
    assert not test
    return dev, None
  assert len(test) == 1
  best = max(r[metric] for r in dev.values())
  assert dev[test[0]["step"]][metric] == best
  return dev, test[0]


@pytest.mark.slow
def test_ner_dev_best_test_report_and_predict(shared_data, tmp_path):
  src = shared_data / "conll2003"
  files = {split: conll_slice(src / f"{name}.txt", tmp_path / f"{name}.txt", n)
           for split, name, n in (("train", "train", 300), ("dev", "valid", 60), ("test", "test", 60))}
  workdir = tmp_path / "run"
  train_cli("bert_tiny_ner.py", workdir, f"data.train_files={files['train']}", f"data.dev_files={files['dev']}",
            f"data.test_files={files['test']}", "model.max_len=160", "data.seq_len=160", "data.bucket_lengths=(32,64)")
  rows = rows_of(workdir)
  dev, test = check_dev_and_test(rows, "f1", test_expected=True)
  for r in list(dev.values()) + [test]:
    assert {"precision", "recall", "f1", "accuracy", "loss"} <= set(r)
  # seqeval's per-type report is written at each eval, and for the test split
  for step in dev:
    assert "micro avg" in (workdir / f"report_dev_step{step}.txt").read_text()
  assert "micro avg" in (workdir / f"report_test_step{test['step']}.txt").read_text()

  # the labels were resolved from the train split and recorded for eval / predict
  config = json.loads((workdir / "config.json").read_text())
  tags = {line.split()[-1] for line in open(files["train"]) if line.strip() and not line.startswith("-DOCSTART-")}
  assert config["data"]["labels"] == ["O"] + sorted(tags - {"O"})

  train_rows = [r for r in rows if r["split"] == "train"]
  seconds = [r["train_seconds"] for r in train_rows]
  assert all(b > a for a, b in zip(seconds, seconds[1:])) and all(r["nonpad_tokens_per_s"] > 0 for r in train_rows)
  # token slots per second count the bucket actually run (32 or 64 here), padding included, not data.seq_len (160):
  # about 2 slots per real token with these buckets, where full 160-slot rows would make it 5 to 10
  for r in train_rows:
    assert r["nonpad_tokens_per_s"] <= r["tokens_per_s"] < 3.5 * r["nonpad_tokens_per_s"], r

  # predictions on the test file (its tag column is ignored) score what the test row says
  out = tmp_path / "pred.conll"
  cli.main(["predict", "--workdir", str(workdir), "--input", files["test"], "--output", str(out)])
  predicted = [s.splitlines() for s in out.read_text().strip("\n").split("\n\n")]
  gold = [s.splitlines() for s in open(files["test"]).read().strip("\n").split("\n\n") if "-DOCSTART-" not in s]
  assert [[w.split("\t")[0] for w in s] for s in predicted] == [[w.split()[0] for w in s] for s in gold]
  y_pred = [[w.split("\t")[1] for w in s] for s in predicted]
  y_true = [[w.split()[-1] for w in s] for s in gold]
  assert seqeval_metrics.f1_score(y_true, y_pred) == pytest.approx(test["f1"], abs=1e-9)

  # one sentence per line -> JSON lines with typed spans that read the tags as the metrics do
  sentences = tmp_path / "sentences.txt"
  sentences.write_text("\n".join(" ".join(w.split()[0] for w in s) for s in gold[:5]) + "\n")
  out = tmp_path / "pred.jsonl"
  cli.main(["predict", "--workdir", str(workdir), "--input", str(sentences), "--output", str(out)])
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert [x["tags"] for x in lines] == y_pred[:5]
  for x in lines:
    spans = [(e["type"], e["start"], e["end"]) for e in x["entities"]]
    expected = [(t, s, e + 1) for t, s, e in seqeval_metrics.sequence_labeling.get_entities(x["tags"])]
    assert spans == expected
    assert all(e["text"] == " ".join(x["tokens"][e["start"]:e["end"]]) for e in x["entities"])


@pytest.mark.slow
def test_sst2_dev_only_best_checkpoint_and_predict(shared_data, tmp_path):
  train = tsv_slice(shared_data / "sst2" / "train.tsv", tmp_path / "train.tsv", 400)
  dev = tsv_slice(shared_data / "sst2" / "dev.tsv", tmp_path / "dev.tsv", 96)
  workdir = tmp_path / "run"
  train_cli("bert_tiny_sst2.py", workdir, f"data.train_files={train}", f"data.dev_files={dev}")
  dev_rows, _ = check_dev_and_test(rows_of(workdir), "accuracy", test_expected=False)
  assert all({"accuracy", "f1", "loss"} <= set(r) for r in dev_rows.values())

  # predict reads the best checkpoint: its labels on the dev sentences give the best dev accuracy
  lines = open(dev).read().splitlines()[1:]
  sentences = tmp_path / "sentences.txt"
  sentences.write_text("".join(line.split("\t")[0] + "\n" for line in lines))
  out = tmp_path / "pred.tsv"
  cli.main(["predict", "--workdir", str(workdir), "--input", str(sentences), "--output", str(out)])
  predicted = [line.split("\t")[0] for line in out.read_text().splitlines()]
  gold = [line.split("\t")[1].strip() for line in lines]
  assert len(predicted) == len(gold)
  accuracy = float(np.mean([p == g for p, g in zip(predicted, gold)]))
  assert accuracy == pytest.approx(max(r["accuracy"] for r in dev_rows.values()), abs=1e-9)


@pytest.mark.slow
def test_a_stops_checkpoint_is_ranked_by_the_dev_pass_of_the_resume(shared_data, tmp_path, capsys):
  """A stop (SIGTERM) saves its step before any evaluation; resumed with no steps left, the run's final dev pass
  ranks that checkpoint for checkpoint.best_metric, and the test split is evaluated with it when it is the best."""
  src = shared_data / "conll2003"
  files = {split: conll_slice(src / f"{name}.txt", tmp_path / f"{name}.txt", n)
           for split, name, n in (("train", "train", 200), ("dev", "valid", 40), ("test", "test", 40))}
  overrides = [f"data.{split}_files={path}" for split, path in files.items()] + [
      "train.steps=40", "checkpoint.every_steps=10", "checkpoint.best_metric=loss", "checkpoint.best_mode=min"]
  workdir = tmp_path / "run"
  run.run(config_lib.load(str(CONFIGS / "bert_tiny_ner.py"), overrides), str(workdir),
          stop_requested=lambda step: step == 25)
  dev = {r["step"]: r for r in rows_of(workdir) if r["split"] == "dev"}
  assert sorted(dev) == [10, 20] and not [r for r in rows_of(workdir) if r["split"] == "test"]
  capsys.readouterr()
  run.run(config_lib.load(str(CONFIGS / "bert_tiny_ner.py"), overrides + ["train.steps=25"]), str(workdir))
  rows = rows_of(workdir)
  dev = {r["step"]: r for r in rows if r["split"] == "dev"}
  assert sorted(dev) == [10, 20, 25]
  assert dev[25]["loss"] < min(dev[10]["loss"], dev[20]["loss"])  # the premise: the stop's step is the best
  assert f"checkpoint {workdir}/checkpoints/25 ranked by this dev pass (loss)" in capsys.readouterr().out
  [test] = [r for r in rows if r["split"] == "test"]
  assert test["step"] == 25
  ckpt = checkpoint.Checkpointer(str(workdir), config_lib.load(str(CONFIGS / "bert_tiny_ner.py"), overrides).checkpoint,
                                 read_only=True)
  assert ckpt.best_step() == 25
  assert ckpt.manager.metrics(25)["loss"] == pytest.approx(dev[25]["loss"])
  ckpt.close()


@pytest.mark.slow
def test_a_time_budget_ends_training_as_its_last_step_would(shared_data, tmp_path, capsys, monkeypatch):
  """train.time_limit_s: the run ends at the last log row before one more log interval would pass the budget, with
  the final dev pass, a ranked checkpoint and the test pass; a resume trains on only under a larger budget."""
  src = shared_data / "conll2003"
  files = {split: conll_slice(src / f"{name}.txt", tmp_path / f"{name}.txt", n)
           for split, name, n in (("train", "train", 200), ("dev", "valid", 40), ("test", "test", 40))}
  overrides = [f"data.{split}_files={path}" for split, path in files.items()] + ["train.steps=1000",
                                                                                 "train.time_limit_s=45"]
  seconds = [0.0]  # a clock of 2 s a step, read by the run's training clock
  monkeypatch.setattr(loop_timing.Clock, "train_seconds", lambda self: seconds[0])

  def tick(step):
    seconds[0] = 2.0 * step
    return False

  workdir = tmp_path / "run"
  run.run(config_lib.load(str(CONFIGS / "bert_tiny_ner.py"), overrides), str(workdir), stop_requested=tick)
  # log rows every 5 steps read 8, 18, 28, 38 s (the clock ticks after each row); at step 20 one more interval
  # (10 s) would pass 45 s
  out = capsys.readouterr().out
  assert ("time budget: 38.0 s of training at step 20; one more log interval (~10.0 s) would pass "
          "train.time_limit_s=45: training ends here") in out
  rows = rows_of(workdir)
  assert [r["step"] for r in rows if r["split"] == "train"] == [5, 10, 15, 20]
  dev = {r["step"]: r for r in rows if r["split"] == "dev"}
  assert sorted(dev) == [10, 20]
  [test] = [r for r in rows if r["split"] == "test"]
  assert dev[test["step"]]["f1"] == max(r["f1"] for r in dev.values())
  ckpt = checkpoint.Checkpointer(str(workdir), config_lib.load(str(CONFIGS / "bert_tiny_ner.py"), overrides).checkpoint,
                                 read_only=True)
  assert 20 in ckpt.all_steps() and ckpt.manager.metrics(20)["f1"] == pytest.approx(dev[20]["f1"])
  assert ckpt.metadata(20)["train_seconds"] == 40.0  # saved after the step's stop request (the clock's tick)
  ckpt.close()

  # the same budget again: nothing more to train; a larger one trains on from step 20
  run.run(config_lib.load(str(CONFIGS / "bert_tiny_ner.py"), overrides), str(workdir), stop_requested=tick)
  assert ("time budget: 40.0 s of training at step 20; one more log interval (~10.0 s) would pass "
          "train.time_limit_s=45: training ends here") in capsys.readouterr().out
  assert [r["step"] for r in rows_of(workdir) if r["split"] == "train"] == [5, 10, 15, 20]
  run.run(config_lib.load(str(CONFIGS / "bert_tiny_ner.py"), overrides + ["train.time_limit_s=70"]), str(workdir),
          stop_requested=tick)
  # at step 20 the mean pace (2 s a step) makes the next interval 10 s: 50 <= 70. Rows at 25, 30 and 35 read 48, 58
  # and 68 s; at 35, 68 + 10 would pass 70 s
  assert [r["step"] for r in rows_of(workdir) if r["split"] == "train"] == [5, 10, 15, 20, 25, 30, 35]
  assert 35 in {r["step"] for r in rows_of(workdir) if r["split"] == "dev"}


def _squad(path, seed: int, n: int) -> str:
  """Generated SQuAD v1 data: who lives where, one or two facts per paragraph."""
  rng = np.random.default_rng(seed)
  people = ["anna", "boris", "carla", "dmitri", "elena", "farid", "greta", "hugo"]
  places = ["paris", "lima", "oslo", "cairo", "delhi", "quito", "rome", "tokyo"]
  paragraphs = []
  for i in range(n):
    a, b = rng.choice(people, 2, replace=False)
    pa, pb = rng.choice(places, 2, replace=False)
    context = f"{a} lives in {pa} . {b} works in {pb} ."
    qas = [{"id": f"{seed}-{i}-a", "question": f"where does {a} live ?",
            "answers": [{"text": pa, "answer_start": context.index(pa)}]},
           {"id": f"{seed}-{i}-b", "question": f"where does {b} work ?",
            "answers": [{"text": pb, "answer_start": context.index(f"in {pb}") + 3}]}]
    paragraphs.append({"context": context, "qas": qas})
  path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": paragraphs}]}))
  return str(path)


@pytest.mark.slow
def test_qa_dev_test_and_predict(tmp_path):
  files = {s: _squad(tmp_path / f"{s}.json", seed, n) for s, seed, n in (("train", 0, 120), ("dev", 1, 16),
                                                                         ("test", 2, 16))}
  workdir = tmp_path / "run"
  train_cli("bert_tiny_qa.py", workdir, f"data.train_files={files['train']}", f"data.dev_files={files['dev']}",
            f"data.test_files={files['test']}")
  _, test = check_dev_and_test(rows_of(workdir), "f1", test_expected=True)
  assert {"exact_match", "f1"} <= set(test)

  out = tmp_path / "pred.jsonl"
  cli.main(["predict", "--workdir", str(workdir), "--input", files["test"], "--output", str(out)])
  answers = [json.loads(line) for line in out.read_text().splitlines()]
  questions = [q for p in json.loads(open(files["test"]).read())["data"][0]["paragraphs"] for q in p["qas"]]
  assert [a["id"] for a in answers] == [q["id"] for q in questions]
  exact = np.mean([a["answer"] == q["answers"][0]["text"] for a, q in zip(answers, questions)])
  assert exact == pytest.approx(test["exact_match"], abs=1e-9)


def _error(*argv) -> str:
  with pytest.raises(SystemExit) as e:
    cli.main(list(argv))
  return str(e.value.code)


def test_bad_input_stops_with_a_clean_message(shared_data, tmp_path):
  train = conll_slice(shared_data / "conll2003" / "train.txt", tmp_path / "train.txt", 20)
  common = ["train", "--config", str(CONFIGS / "bert_tiny_ner.py"), "--workdir", str(tmp_path / "run"),
            f"--config.data.train_files={train}", f"--config.data.dev_files={train}", "--config.data.test_files="]
  # a tag the config does not know: named with the file and line
  message = _error(*common, "--config.data.labels=('O','B-PER','I-PER')")
  assert message.startswith("jaxlm: error: ") and "train.txt:" in message and "unknown tag" in message
  # a head that is not the task's
  message = _error(*common, "--config.task.head=sequence")
  assert message.startswith("jaxlm: error: ") and "task.head='sequence' does not fit task.name='ner'" in message
  # a model whose vocabulary is not the tokenizer's
  message = _error(*common, "--config.model.vocab_size=1000")
  assert message.startswith("jaxlm: error: ") and "the tokenizer has 30522 tokens but model.vocab_size=1000" in message
  # a pretrained checkpoint of another shape than the configured model
  minilm = config_lib.load(str(CONFIGS / "bert_conll2003.py")).init.hf_path
  message = _error(*common, f"--config.init.hf_path={minilm}")
  assert message.startswith("jaxlm: error: ") and "does not fit the configured model" in message
  assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_length_grouping_pads_less_and_takes_every_row_once():
  lengths = np.random.default_rng(0).integers(1, 17, size=96)
  grouped = pipeline.Order(lengths, 4, seed=0, train=True, group=8)
  plain = pipeline.Order(lengths, 4, seed=0, train=True)

  def padded(order, epoch):
    rows = order.epoch(epoch)
    return sum(4 * lengths[rows[i:i + 4]].max() for i in range(0, len(rows), 4))

  for epoch in range(3):  # every row once per epoch, and less padding to the longest row of each batch
    assert sorted(grouped.epoch(epoch).tolist()) == list(range(96))
    assert padded(grouped, epoch) < 0.8 * padded(plain, epoch)
  assert grouped.epoch(0).tolist() != grouped.epoch(1).tolist()  # a new order each epoch
  again = pipeline.Order(lengths, 4, seed=0, train=True, group=8)
  rows, epochs = again.rows_at(np.arange(90, 110))  # across an epoch boundary: the same as reading the epochs
  np.testing.assert_array_equal(rows, np.concatenate([grouped.epoch(0), grouped.epoch(1)])[90:110])
  np.testing.assert_array_equal(epochs, (np.arange(90, 110) >= 96).astype(int))


@pytest.mark.slow
def test_an_epoch_is_a_pass_over_the_windows_made(tmp_path, shared_data):
  """QA contexts longer than a row make several windows per question: eval_each_epoch counts windows, not questions."""
  raw = (shared_data / "text" / "wikitext-2" / "wiki.test.raw.nonblank-crlf.txt").read_bytes().decode("utf-8")
  paragraphs = [p.strip() for p in raw.split("\r\n") if 60 < len(p.split()) < 90][:12]
  data = [{"title": str(i), "paragraphs": [{"context": p, "qas": [{"id": str(i), "question": "what is it ?",
                                                                    "answers": [{"text": p.split()[3],
                                                                                 "answer_start": p.index(p.split()[3])}]}]}]}
          for i, p in enumerate(paragraphs)]
  path = tmp_path / "squad.json"
  path.write_text(json.dumps({"data": data}))
  workdir = tmp_path / "run"
  train_cli("bert_tiny_qa.py", workdir, f"data.train_files={path}", f"data.dev_files={path}", "data.test_files=",
            "train.eval_each_epoch=true", "train.batch_size=8", "train.steps=12", "checkpoint.every_steps=100")
  config = config_lib.from_json((workdir / "config.json").read_text())
  task = make_task(config)
  tokenizer = load_tokenizer(config, str(workdir))
  windows = len(pipeline.prepare_rows(task, json_records(path), tokenizer, "train", config.data)[0])
  assert windows >= 2 * len(paragraphs)
  dev_steps = [r["step"] for r in rows_of(workdir) if r["split"] == "dev"]
  epoch = windows // 8
  assert dev_steps == sorted({k * epoch for k in range(1, 12 // epoch + 1)} | {12}), (dev_steps, windows)


def json_records(path):
  return sources.read_squad(str(path))
