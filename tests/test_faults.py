"""Failures a user can cause, through the `jaxlm` command: each ends in one `jaxlm: error: ...` line naming what is
wrong (file and line where there is one), a non-zero exit, and a workdir byte for byte as it was before.

Most cases run in this process (`cli.main`, catching SystemExit) on workdirs built once per module; a few run the
real command in a subprocess, where the whole of what a user sees (stderr, exit code) is checked.
"""

import asyncio
import gc
import gzip
import hashlib
import json
import logging
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlm import checkpoint as ckpt_lib
from jaxlm import cli, run, train
from jaxlm import config as config_lib
from jaxlm import workdir as workdir_lib
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.metric_writer import truncate_metrics
from jaxlm.tasks import known_tasks
from tests.conftest import BASE, REPO, TINY, TINY_ENCODER, child_env, train_tokenizer
from tests.test_fault_resume import Train, common  # noqa: F401 - `common` is a fixture used here too

# The tiny GPT of configs/gpt_tiny.py, two steps with a checkpoint after each; evaluation kept to one batch.
LM = ["--config", TINY, "--config.train.steps=2", "--config.checkpoint.every_steps=1", "--config.train.eval_every=0",
      "--config.train.eval_batches=1", "--config.train.log_every=1", "--config.train.progress_bar=false",
      "--config.checkpoint.async_save=false"]


# ---- helpers ------------------------------------------------------------------------------------------------------


def tree(path) -> dict | None:
  """Every file and folder under `path`: relative path -> sha256 of the file's bytes ('dir' for a folder); None when
  nothing is there."""
  path = pathlib.Path(path)
  if not path.exists():
    return None
  if path.is_file():
    return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
  return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
          for p in sorted(path.rglob("*"))}


def refused(*argv, watch=(), expect=()) -> str:
  """Runs `jaxlm ARGV` in this process; it must exit with one `jaxlm: error:` line containing every text of `expect`
  and leave every path in `watch` exactly as it was. Returns the line."""
  before = [tree(w) for w in watch]
  with pytest.raises(SystemExit) as e:
    cli.main([str(a) for a in argv])
  message = e.value.code
  assert isinstance(message, str), f"exit code {message!r}: expected an error line"  # sys.exit(line) exits with 1
  assert message.startswith("jaxlm: error: ") and "\n" not in message, message
  for text in expect:
    assert str(text) in message, (text, message)
  assert "unexpected" not in message, message  # a failure the user caused is never reported as a crash
  for w, b in zip(watch, before):
    assert tree(w) == b, f"{w} changed"
  return message


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  """Two sentencepiece models for the tiny GPT, trained on different samples (so with different fingerprints)."""
  # the first is the one tests/test_fault_resume.py trains (same place, same options): trained once per session
  shared = tmp_path_factory.getbasetemp() / "jaxlm_fault_shared" / "tok"
  root = tmp_path_factory.mktemp("tokenizers")
  paths = []
  for where, sentences in ((shared, 3000), (root / "b", 1500)):
    path = where / "tokenizer" / "spm.model"
    if not path.is_file():
      train_tokenizer(config_lib.load(TINY, [f"tokenizer.max_sentences={sentences}"]), str(where))
    paths.append(path)
  return paths


@pytest.fixture(scope="module")
def lm_workdir(tmp_path_factory, tokenizers):
  """A trained tiny GPT workdir (checkpoints 1 and 2, its own tokenizer); tests copy it before changing it."""
  workdir = tmp_path_factory.mktemp("lm") / "run"
  (workdir / "tokenizer").mkdir(parents=True)
  shutil.copy(tokenizers[0], workdir / "tokenizer" / "spm.model")
  cli.main(["train", *LM, "--workdir", str(workdir)])
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
  return workdir


def copy_of(workdir, tmp_path) -> pathlib.Path:
  target = tmp_path / "run"
  shutil.copytree(workdir, target)
  return target


def damage_manifests(workdir, steps) -> None:
  """Overwrites the OCDBT manifest of each step's state with random bytes: no array of it can be read."""
  for step in steps:
    manifest = pathlib.Path(workdir) / "checkpoints" / str(step) / "state" / "manifest.ocdbt"
    manifest.write_bytes(np.random.default_rng(step).bytes(200))


def jaxlm_process(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "jaxlm", *map(str, args)], check=False, capture_output=True, text=True,
                        timeout=timeout, env=child_env(1), cwd=REPO)


# ---- configuration: refused before any work, nothing written --------------------------------------------------------


@pytest.mark.parametrize("override, expect", [
    ("train.nonfinite=bogus", "--config.train.nonfinite=bogus: expected one of 'skip', 'stop'"),
    ("train.steps=-1", "--config.train.steps=-1: expected a number >= 1"),
    ("optim.learning_rate=-1e-3", "--config.optim.learning_rate=-1e-3: expected a number >= 0"),
    ("train.batch_size=0", "--config.train.batch_size=0: expected a number >= 1"),
    ("model.dropout=1.5", "--config.model.dropout=1.5: expected a number in [0, 1)"),
    ("optim.eps=0.0", "--config.optim.eps=0.0: expected a number > 0"),
    ("data.eval_fraction=1", "--config.data.eval_fraction=1: expected a number in [0, 1)"),
    ("train.max_consecutive_nonfinite_skips=-1", ("--config.train.max_consecutive_nonfinite_skips=-1: expected a "
     "number >= 0")),
    ("train.stepz=3", "unknown config key 'train.stepz'; nearest valid keys: train.steps"),
    ("train.steps=ten", "--config.train.steps=ten: expected an integer"),
    ("model.num_heads=3", "model.d_model=64 is not divisible by model.num_heads=3"),
    ("mesh.data=3", "needs 3 devices"),
])
def test_bad_config_values(tmp_path, override, expect):
  workdir = tmp_path / "run"
  refused("train", *LM, f"--config.{override}", "--workdir", workdir, watch=[workdir], expect=[expect])
  assert not workdir.exists()


@pytest.mark.parametrize("body, expect", [
    ("def get_config(:\n", "exp.py:1: invalid Python"),
    ("from jaxlm.configs import base\n\ndef get_config():\n  raise RuntimeError('no such recipe')\n",
     "exp.py:4: RuntimeError: no such recipe"),
    ("import numpy\n", "exp.py defines no get_config()"),
])
def test_config_files_that_do_not_load(tmp_path, body, expect):
  (tmp_path / "exp.py").write_text(body)
  refused("train", "--config", tmp_path / "exp.py", "--workdir", tmp_path / "run", watch=[tmp_path / "run"],
          expect=[expect])
  refused("train", "--config", tmp_path / "missing.py", "--workdir", tmp_path / "run", expect=["config file not found"])


def test_debug_shows_the_exception_itself(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="train.nonfinite"):
    cli.main(["train", *LM, "--config.train.nonfinite=bogus", "--workdir", str(tmp_path / "run"), "--debug"])


# ---- data: every source format names the file and line -----------------------------------------------------------

ENCODER = [f"--config.{o}" for o in TINY_ENCODER] + ["--config.tokenizer.kind=wordpiece",
                                                     "--config.train.progress_bar=false"]


def _data_case(tmp_path, name: str):
  """(file name, bytes, extra overrides, expected text) of one bad input per source format."""
  squad_ok = {"data": [{"title": "t", "paragraphs": [{"context": "anna lives in oslo .", "qas": [
      {"id": "q1", "question": "where ?", "answers": [{"text": "oslo", "answer_start": 14}]}]}]}]}
  cases = {
      "text_bytes": ("train.txt", b"fine text\n\ncaf\xe9 au lait\n", ["data.source=text"], "train.txt: not UTF-8 text"),
      "jsonl_json": ("train.jsonl", b'{"text": "one"}\n{"text": "two"\n', ["data.source=text"],
                     "train.jsonl:2: invalid JSON"),
      "jsonl_field": ("train.jsonl", b'{"text": "one"}\n{"body": "two"}\n', ["data.source=text"],
                      "train.jsonl:2: no field 'text' (data.jsonl_field)"),
      "conll_tag": ("train.conll", b"EU B-ORG\nrejects O\n\nPeter X-PER\n", ["task.name=ner", "data.source=conll",
                                                                           "model.family=encoder"],
                    "train.conll:4: unknown tag 'X-PER'"),
      "conll_columns": ("train.conll", b"EU NNP B-ORG\nrejects O\n", ["task.name=ner", "data.source=conll",
                                                                   "model.family=encoder"],
                        "train.conll:2: 2 columns where the file has 3"),
      "tsv_label": ("train.tsv", b"sentence\tlabel\na fine film\t1\nno label here\n",
                    ["task.name=classification", "data.source=tsv", "model.family=encoder"],
                    "train.tsv:3: row without a label"),
      # one stray row among many would add a third class to the head: refused, naming the row
      "tsv_stray_label": ("train.tsv", ("sentence\tlabel\n" + "".join(f"film number {i}\t{i % 2}\n" for i in range(24))
                                        + "a fine film\tpositive\n").encode(),
                          ["task.name=classification", "data.source=tsv", "model.family=encoder"],
                          "train.tsv:26: label 'positive' appears in this one train record only"),
      "squad_json": ("train.json", b'{"data": [\n{"title": "t",\n', ["task.name=qa", "data.source=squad",
                                                                     "model.family=encoder"],
                     "train.json:3: invalid JSON"),
      "squad_shape": ("train.json", json.dumps({"version": "1.1"}).encode(), ["task.name=qa", "data.source=squad",
                                                                              "model.family=encoder"],
                      "train.json: not SQuAD JSON"),
      "squad_answer": ("train.json", json.dumps({**squad_ok, "data": [{"title": "t", "paragraphs": [
          {"context": "anna lives in oslo .", "qas": [{"id": "q1", "question": "where ?",
                                                      "answers": [{"text": "oslo", "answer_start": 3}]}]}]}]}).encode(),
                       ["task.name=qa", "data.source=squad", "model.family=encoder"], "answer 'oslo' is not at"),
      "semeval_tag": ("train.txt", (b'1\t"The <e1>cut</e1> came from the <e3>knife</e3>."\nOther\n'
                      b'Comment:\n\n'), ["task.name=relation", "data.source=semeval", "model.family=encoder"],
                      "train.txt:1: malformed entity tag '<e3>'"),
      "pairs_json": ("train.jsonl", b'{"source": "a", "target": "b"}\n{"source": "c", \n',
                     ["task.name=seq2seq", "data.source=pairs", "model.family=encoder_decoder", "model.style=t5"],
                     "train.jsonl:2: invalid JSON"),
  }
  return cases[name]


@pytest.mark.parametrize("case", ["text_bytes", "jsonl_json", "jsonl_field", "conll_tag", "conll_columns", "tsv_label",
                                  "tsv_stray_label",
                                  "squad_json", "squad_shape", "squad_answer", "semeval_tag", "pairs_json"])
def test_bad_input_data(tmp_path, case):
  name, data, overrides, expect = _data_case(tmp_path, case)
  task = next((o.split("=")[1] for o in overrides if o.startswith("task.name=")), "lm")
  if task not in known_tasks():
    pytest.skip(f"task.name={task} is not in this tree")
  (tmp_path / name).write_bytes(data)
  workdir = tmp_path / "run"
  argv = ["train", "--config", BASE, *ENCODER, f"--config.data.train_files={tmp_path / name}",
          f"--config.data.tfds_data_dir={tmp_path / 'prepared'}", "--config.data.labels=('O','B-ORG','I-ORG')"
          if task == "ner" else "--config.data.labels=()", *[f"--config.{o}" for o in overrides], "--workdir", workdir]
  refused(*argv, watch=[workdir], expect=[expect])
  assert not workdir.exists()


def test_files_that_match_nothing_or_are_folders(tmp_path):
  refused("train", *LM, "--config.data.source=text", f"--config.data.train_files={tmp_path}/nothing*.txt",
          "--workdir", tmp_path / "run", expect=["data.train_files: '", "nothing*.txt' matches no files"])


# ---- the workdir: a file, or a path through a file ----------------------------------------------------------------


def test_workdir_that_is_a_file(tmp_path):
  (tmp_path / "run").write_text("not a folder")
  refused("train", *LM, "--workdir", tmp_path / "run", watch=[tmp_path / "run"], expect=["is a file, not a directory"])
  refused("train", *LM, "--workdir", tmp_path / "run" / "sub", watch=[tmp_path / "run"],
          expect=["is a file, not a directory"])
  for command in (["eval", "--config", TINY], ["generate", "--prompt", "x"], ["predict", "--input", tmp_path / "run"]):
    refused(*command, "--workdir", tmp_path / "run", watch=[tmp_path / "run"], expect=["is a file"])


def test_missing_workdir_for_readers(tmp_path):
  for command in (["generate", "--prompt", "x"], ["predict", "--input", tmp_path / "in.txt"]):
    refused(*command, "--workdir", tmp_path / "nothing", expect=["config.json not found"])
  assert not (tmp_path / "nothing").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_workdir(tmp_path, lm_workdir):
  workdir = copy_of(lm_workdir, tmp_path)
  os.chmod(workdir, 0o555)
  try:
    refused("train", *LM, "--config.train.steps=3", "--workdir", workdir, watch=[workdir], expect=["is not writable"])
  finally:
    os.chmod(workdir, 0o755)


# ---- resuming: the config and tokenizer must be the checkpoint's ----------------------------------------------------


@pytest.mark.parametrize("overrides, expect", [
    (["model.d_model=128"], ["model.d_model: checkpoint 64, config 128"]),
    (["model.num_layers=3", "model.style=llama"], ["model.style: checkpoint 'gpt2', config 'llama'",
                                                   "model.num_layers: checkpoint 2, config 3"]),
    (["model.scan_layers=true"], ["model.scan_layers: checkpoint False, config True"]),
])
def test_resume_with_another_model_names_the_keys(lm_workdir, overrides, expect):
  message = refused("train", *LM, "--config.train.steps=3", *[f"--config.{o}" for o in overrides], "--workdir",
                    lm_workdir, watch=[lm_workdir], expect=[f"{lm_workdir}/checkpoints/2 was saved with another model",
                                                             *expect])
  assert "damaged" not in message


def test_resume_with_another_tokenizer(lm_workdir, tokenizers):
  refused("train", *LM, "--config.train.steps=3", f"--config.tokenizer.path={tokenizers[1]}", "--workdir", lm_workdir,
          watch=[lm_workdir], expect=["was trained with tokenizer spm:", "its token ids would mean other text"])


def test_resume_without_the_tokenizer_it_was_trained_with(lm_workdir, tmp_path):
  workdir = copy_of(lm_workdir, tmp_path)
  os.remove(workdir / "tokenizer" / "spm.model")
  refused("train", *LM, "--config.train.steps=3", "--workdir", workdir, watch=[workdir],
          expect=["tokenizer/spm.model is missing but", "holds checkpoints trained with it"])


def test_a_fresh_run_whose_tokenizer_would_not_fit(tmp_path):
  workdir = tmp_path / "run"
  refused("train", *LM, "--config.tokenizer.vocab_size=256", "--workdir", workdir, watch=[workdir],
          expect=["tokenizer.vocab_size=256 but model.vocab_size=512"])
  assert not workdir.exists()  # no tokenizer was trained into it


def test_every_step_damaged(lm_workdir, tmp_path, capfd):
  workdir = copy_of(lm_workdir, tmp_path)
  damage_manifests(workdir, [1, 2])
  refused("train", *LM, "--config.train.steps=3", "--workdir", workdir, watch=[workdir],
          expect=[f"no checkpoint in {workdir}/checkpoints restores: {workdir}/checkpoints/2: ", "checkpoints/1: "])
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]


def test_eval_and_generate_check_model_and_tokenizer(lm_workdir, tokenizers):
  refused("eval", "--config", TINY, "--config.model.d_model=32", "--workdir", lm_workdir, watch=[lm_workdir],
          expect=["checkpoints/2 was saved with another model: model.d_model: checkpoint 64, config 32"])
  refused("eval", "--config", TINY, f"--config.tokenizer.path={tokenizers[1]}", "--workdir", lm_workdir,
          watch=[lm_workdir], expect=["was trained with tokenizer spm:"])
  refused("generate", "--workdir", lm_workdir, "--prompt", "The", f"--config.tokenizer.path={tokenizers[1]}",
          watch=[lm_workdir], expect=["was trained with tokenizer spm:"])
  refused("generate", "--workdir", lm_workdir, "--prompt", "The", "--temperature", "-1", watch=[lm_workdir],
          expect=["sample.temperature=-1.0: expected a number >= 0"])


def test_eval_past_a_damaged_step_prints_one_line_per_step(lm_workdir, tmp_path, capfd):
  workdir = copy_of(lm_workdir, tmp_path)
  damage_manifests(workdir, [2])
  before = tree(workdir)
  cli.main(["eval", "--config", TINY, "--config.train.eval_batches=1", "--workdir", str(workdir)])
  out, err = capfd.readouterr()
  assert json.loads(out.strip().splitlines()[-1])["step"] == 1
  lines = err.strip().splitlines()
  assert any(line.startswith(f"WARNING: checkpoint {workdir}/checkpoints/2 is damaged and is skipped: ") for line in
             lines), err
  assert "using the checkpoint of step 1 instead of step 2" in lines
  assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
  def checkpoints(files):  # eval appends its rows to metrics.jsonl and tensorboard/: the rest stays as it was
    return {k: v for k, v in files.items() if k != "metrics.jsonl" and not k.startswith("tensorboard")}

  assert checkpoints(tree(workdir)) == checkpoints(before)  # a reader never moves or changes checkpoints


def test_config_json_that_is_not_json(lm_workdir, tmp_path):
  workdir = copy_of(lm_workdir, tmp_path)
  (workdir / "config.json").write_text('{"model": {"d_model": 64},\n  "train": }\n')
  refused("generate", "--workdir", workdir, "--prompt", "x", watch=[workdir],
          expect=[f"{workdir}/config.json:2: invalid JSON"])
  (workdir / "config.json").write_text(json.dumps({"model": {"dropout": 7.0}}))
  refused("generate", "--workdir", workdir, "--prompt", "x", watch=[workdir],
          expect=[f"{workdir}/config.json: model.dropout=7.0: expected a number in [0, 1)"])


def test_predict_on_a_language_model(lm_workdir, tmp_path):
  (tmp_path / "in.txt").write_text("a line\n")
  refused("predict", "--workdir", lm_workdir, "--input", tmp_path / "in.txt", watch=[lm_workdir],
          expect=["task.name='lm' has no `jaxlm predict`"])


def test_refused_commands_print_one_line_in_a_real_process(lm_workdir, tmp_path):
  """What a user sees: the exit code, and stderr holding the warnings and one error line, no traceback."""
  workdir = copy_of(lm_workdir, tmp_path)
  damage_manifests(workdir, [1, 2])
  before = tree(workdir)
  r = jaxlm_process("train", *LM, "--config.train.steps=3", "--workdir", workdir)
  assert r.returncode == 1, r.stderr[-3000:]
  lines = r.stderr.strip().splitlines()
  assert lines[-1].startswith(f"jaxlm: error: no checkpoint in {workdir}/checkpoints restores"), \
      f"{r.stderr[:3000]}\n...\n{r.stderr[-3000:]}"
  assert all(line.startswith(("WARNING: checkpoint", "jaxlm: error: ")) for line in lines), r.stderr[:6000]
  assert tree(workdir) == before
  r = jaxlm_process("train", *LM, "--config.train.nonfinite=halt", "--workdir", workdir)
  assert (r.returncode, r.stderr) == (1, ("jaxlm: error: --config.train.nonfinite=halt: expected one of 'skip', "
                                         "'stop'\n"))



class _Pending:
  def __await__(self):
    yield


def _abandoned_coroutine(filename: str):
  """A coroutine compiled as if it lived in `filename`, suspended at an await and turning GeneratorExit into an
  error the way Orbax's array reads do, so closing it when it is collected prints an unraisable report."""
  scope = {"_Pending": _Pending}
  exec(compile("async def read():\n"
               "  try:\n"
               "    await _Pending()\n"
               "  except GeneratorExit as e:\n"
               "    raise Exception('Encountered error while reading array index') from e\n", filename, "exec"), scope)
  coroutine = scope["read"]()
  coroutine.send(None)
  return coroutine


def test_abandoned_reads_of_a_failed_restore_are_not_printed(monkeypatch):
  """Orbax's read coroutines left behind by a damaged step are dropped when collected; anyone else's are reported."""
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(unraisable.exc_value))
  ckpt_lib.ignore_closed_loop_callbacks()
  orbax_file = os.path.join(ckpt_lib._ORBAX_DIR, "_src", "serialization", "serialization.py")
  coroutine = _abandoned_coroutine(orbax_file)
  del coroutine
  gc.collect()
  assert seen == []
  coroutine = _abandoned_coroutine(os.path.join(REPO, "user_code.py"))
  del coroutine
  gc.collect()
  assert [str(e) for e in seen] == ["Encountered error while reading array index"]

class _Read:
  """Reports an error naming `path` when it is collected, as TensorStore reads of a step's arrays do."""

  def __init__(self, path):
    self.path = path

  def __del__(self):
    raise ValueError(f'DATA_LOSS: Error reading "{self.path}/state/" [tensorstore_spec=\'{{"path":"{self.path}/state/"}}\']')


def test_late_reports_about_a_step_whose_read_failed_are_not_printed(monkeypatch, tmp_path):
  """What the collector prints about the arrays of a step whose read failed (reported already in one line) is
  dropped; reports naming a step that was read intact, or another directory, are kept."""
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(str(unraisable.exc_value)))
  monkeypatch.setattr(ckpt_lib, "_UNREAD_STEPS", set())
  ckpt_lib.ignore_closed_loop_callbacks()
  damaged, intact = str(tmp_path / "checkpoints" / "2"), str(tmp_path / "checkpoints" / "1")
  with pytest.raises(RuntimeError), ckpt_lib._reading(damaged):
    _Read(damaged)  # collected at once, while the read goes on
    raise RuntimeError("the read fails")
  with ckpt_lib._reading(intact):
    pass
  _Read(damaged)
  gc.collect()
  assert seen == []
  _Read(intact)
  _Read(str(tmp_path / "checkpoints" / "20"))
  gc.collect()
  assert len(seen) == 2 and f"{intact}/state/" in seen[0] and "checkpoints/20/state/" in seen[1], seen



def _unretrieved_read_error(loop, path: str) -> None:
  """A future of `loop` holding a read error that names `path`, collected with its exception never retrieved."""
  future = loop.create_future()
  future.set_exception(ValueError(f'DATA_LOSS: Error reading "params.w/.zarray" at local file "{path}/state/"'))
  del future
  gc.collect()


def test_unretrieved_read_errors_of_a_failed_step_are_not_logged(monkeypatch, tmp_path, caplog):
  """asyncio logs 'Future exception was never retrieved' when it collects a read future of a failed restore, even
  after the one-line error: dropped for a step whose read failed, kept for a step read intact or another directory."""
  monkeypatch.setattr(ckpt_lib, "_UNREAD_STEPS", set())
  ckpt_lib.ignore_closed_loop_callbacks()
  damaged, intact = str(tmp_path / "checkpoints" / "2"), str(tmp_path / "checkpoints" / "1")
  loop = asyncio.new_event_loop()
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    with pytest.raises(RuntimeError), ckpt_lib._reading(damaged):
      _unretrieved_read_error(loop, damaged)  # while the read goes on
      raise RuntimeError("the read fails")
    with ckpt_lib._reading(intact):
      pass
    _unretrieved_read_error(loop, damaged)
    assert caplog.records == []
    _unretrieved_read_error(loop, intact)
    _unretrieved_read_error(loop, str(tmp_path / "checkpoints" / "20"))
  loop.close()
  logged = [r.exc_info[1] for r in caplog.records]
  assert [r.getMessage().splitlines()[0] for r in caplog.records] == ["Future exception was never retrieved"] * 2
  assert f"{intact}/state/" in str(logged[0]) and "checkpoints/20/state/" in str(logged[1]), logged

# ---- numerics: a diverged run stops loudly ------------------------------------------------------------------------

# A learning rate warmed up from 0 to 1e30: step 1 is a no-op, step 2's update is huge but finite, and from step 3 on
# the loss is non-finite.
EXPLODE = ["--config.optim.learning_rate=1e30", "--config.optim.warmup_steps=3", "--config.optim.schedule=linear",
           "--config.checkpoint.keep=0", "--config.train.steps=9", "--config.train.log_every=3",
           "--config.train.nonfinite=skip", "--config.model.num_layers=1", "--config.model.d_model=32",
           "--config.data.seq_len=16"]


def test_divergence_stops_at_the_limit_and_keeps_the_checkpoint_before_it(tokenizers, tmp_path, capsys):
  workdir = tmp_path / "run"
  common_args = [*LM, f"--config.tokenizer.path={tokenizers[0]}", *EXPLODE, "--workdir", str(workdir)]
  # a first run stopped (as by SIGTERM) at step 4, inside the run of skips that starts at step 3: its stop saves step
  # 4, and it carries on in the next run
  config = config_lib.load(TINY, [a[len("--config."):] for a in common_args if a.startswith("--config.")])
  run.run(config, str(workdir), stop_requested=lambda step: step == 4)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2", "4"]  # step 3, inside the run of skips, waited
  capsys.readouterr()
  message = refused("train", *common_args, "--config.train.max_consecutive_nonfinite_skips=4",
                    expect=[("jaxlm: error: training diverged: 4 updates in a row skipped for a non-finite loss or "
                            "gradient norm (steps 3-6; train.max_consecutive_nonfinite_skips=4); the latest checkpoint "
                            f"is {workdir}/checkpoints/2, from before step 3; the checkpoints of steps 4 were moved to "
                            f"{workdir}/checkpoints_diverged")])
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"], message
  assert sorted(os.listdir(workdir / "checkpoints_diverged")) == ["4"]
  out = capsys.readouterr().out
  for step, in_a_row in ((5, 3), (6, 4)):  # every step is a save point here: the skips are read at each
    assert (f"WARNING: non-finite loss or gradient norm at step {step}: update skipped ({in_a_row} in a row, "
            f"{in_a_row} in all; the run stops at 4 in a row (train.max_consecutive_nonfinite_skips))") in out, out
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["split"] == "train"] == [3, 6]  # a row every 3 steps, the last one's too


def test_skip_counting_by_steps():
  skips = run._Skips(total=2, streak_start=0)
  for step, finite in enumerate([True, False, False, True, False, True, False, False, False], 1):
    skips.add(step, np.bool_(finite))
  assert skips.read(upto=3) == [2, 3] and (skips.in_a_row(), skips.total, skips.streak_start) == (2, 4, 2)
  assert skips.read(upto=6) == [5] and (skips.in_a_row(), skips.total) == (0, 5)
  assert skips.read(upto=9) == [7, 8, 9] and (skips.in_a_row(), skips.total, skips.streak_start) == (3, 8, 7)
  assert run._steps_text([3, 4, 5]) == "steps 3-5" and run._steps_text([3, 5]) == "2 steps from 3 to 5"


# ---- metrics.jsonl after a crash ----------------------------------------------------------------------------------


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "split": split, "loss": float(s)} for s in range(1, 7) for split in ("train", "eval")]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "split": "tr')  # a cut-off last row
  assert truncate_metrics(str(path), 4) == 5
  assert [json.loads(line) for line in path.read_text().splitlines()] == [r for r in rows if r["step"] <= 4]
  assert truncate_metrics(str(path), 4) == 0


@pytest.mark.slow
def test_kill_9_past_the_last_checkpoint_then_resume(common, tmp_path):  # noqa: F811 - the fixture
  """SIGKILL three steps after the checkpoint of step 4, then a resume: every (step, split) is logged once."""
  first = Train(common, tmp_path, "--config.checkpoint.async_save=false")
  first.wait_for("step 7 loss=")
  first.proc.send_signal(signal.SIGKILL)
  assert first.finish() == -signal.SIGKILL
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in logged) >= 7 and sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]
  second = Train(common, tmp_path)
  assert second.finish() == 0, second.output[-3000:]
  assert f"resumed from {tmp_path}/checkpoints/4 (step 4)" in second.output
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  keys = [(r["step"], r["split"]) for r in rows]
  assert len(keys) == len(set(keys)), keys
  assert [s for s, split in keys if split == "train"] == list(range(1, 13))
  assert rows[:4] == [r for r in logged if r["step"] <= 4]  # the rows up to the checkpoint are kept as they were


# ---- Hugging Face files (`jaxlm convert`) -------------------------------------------------------------------------

HF_CONFIG = {"model_type": "bert", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16}


def _hf_dir(tmp_path, *, config=None, safetensors: bytes | None = None, vocab: int = 8) -> pathlib.Path:
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text(config if isinstance(config, str) else json.dumps(config or HF_CONFIG))
  (hf / "vocab.txt").write_text("".join(f"[unused{i}]\n" for i in range(vocab)))
  if safetensors is not None:
    (hf / "model.safetensors").write_bytes(safetensors)
  return hf


def _safetensors(header: dict, data: bytes) -> bytes:
  raw = json.dumps(header).encode()
  return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("case, expect", [
    ("missing_dir", "config.json not found"),
    ("bad_json", "config.json: not valid JSON"),
    ("unknown_family", "has model_type 'xlnet': jaxlm converts only"),
    ("vocab_size", "vocab.txt has 5 tokens but"),
    ("no_weights", "model.safetensors not found"),
    ("truncated", "model.safetensors: not a readable safetensors file"),
    ("huge_header", "model.safetensors: not a readable safetensors file"),
    ("offsets_past_end", "model.safetensors: not a readable safetensors file"),
    ("gzip_not_safetensors", "model.safetensors: not a readable safetensors file"),
])
def test_bad_hugging_face_files(tmp_path, case, expect):
  tensor = {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}
  valid = _safetensors(tensor, bytes(64))
  hf = {
      "missing_dir": lambda: tmp_path / "nothing",
      "bad_json": lambda: _hf_dir(tmp_path, config='{"model_type": "bert",', safetensors=valid),
      "unknown_family": lambda: _hf_dir(tmp_path, config={**HF_CONFIG, "model_type": "xlnet"}, safetensors=valid),
      "vocab_size": lambda: _hf_dir(tmp_path, safetensors=valid, vocab=5),
      "no_weights": lambda: _hf_dir(tmp_path),
      "truncated": lambda: _hf_dir(tmp_path, safetensors=valid[:len(valid) - 10]),
      "huge_header": lambda: _hf_dir(tmp_path, safetensors=struct.pack("<Q", 2 ** 62) + b"{}"),
      "offsets_past_end": lambda: _hf_dir(tmp_path, safetensors=_safetensors(
          {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 1 << 40]}}, bytes(64))),
      "gzip_not_safetensors": lambda: _hf_dir(tmp_path, safetensors=gzip.compress(valid)),
  }[case]()
  workdir = tmp_path / "converted"
  refused("convert", "--hf", hf, "--workdir", workdir, watch=[workdir, tmp_path / "hf"], expect=[expect])
  assert not workdir.exists()


# ---- predict: records in, predictions out -------------------------------------------------------------------------

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "a", "film", "fine", "bad"]


@pytest.fixture(scope="module")
def classifier_workdir(tmp_path_factory):
  """A classification workdir (config.json, WordPiece vocabulary, a step-0 checkpoint of a tiny encoder whose arrays
  are all zero) made with the library, without training or compiling: predict needs a checkpoint, not a good one."""
  workdir = tmp_path_factory.mktemp("classifier") / "run"
  workdir.mkdir()
  (workdir / "vocab.txt").write_text("\n".join(dict.fromkeys(VOCAB)) + "\n")
  n = len(dict.fromkeys(VOCAB))
  config = config_lib.load(BASE, [*TINY_ENCODER, f"model.vocab_size={n}", "task.name=classification",
                                  "data.labels=('neg','pos')", "tokenizer.kind=wordpiece", "tokenizer.lowercase=true",
                                  f"tokenizer.path={workdir / 'vocab.txt'}", "checkpoint.async_save=false",
                                  f"train.batch_size={len(jax.devices())}", "data.seq_len=16"])
  setup = train.build(config)
  tokenizer = load_tokenizer(config, str(workdir))
  ckpt = ckpt_lib.Checkpointer(str(workdir), config.checkpoint)
  zeros = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), train.abstract_state(setup))
  ckpt.save(0, zeros, None, config, workdir_lib.metadata(config, setup, tokenizer.fingerprint()))
  ckpt.close()
  workdir_lib.write_config(config, str(workdir))
  return workdir


def test_predict_counts_records_and_blank_lines(classifier_workdir, tmp_path, capfd):
  (tmp_path / "in.txt").write_text("a fine film\n\nbad\n\n\na film\tfine\n")
  out = tmp_path / "out.tsv"
  cli.main(["predict", "--workdir", str(classifier_workdir), "--input", str(tmp_path / "in.txt"), "--output", str(out)])
  stderr = capfd.readouterr().err
  assert (f"predict: 3 records read from {tmp_path / 'in.txt'} (3 blank lines skipped), 3 predictions written to "
          f"{out}") in stderr
  assert [line.split("\t", 1)[1] for line in out.read_text().splitlines()] == ["a fine film", "bad", "a film\tfine"]


def test_predict_refuses_bad_input(classifier_workdir, tmp_path):
  (tmp_path / "empty.txt").write_text("\n\n")
  (tmp_path / "latin1.txt").write_bytes(b"a fine film\ncaf\xe9\n")
  (tmp_path / "folder").mkdir()
  out = tmp_path / "out.tsv"
  out.write_text("earlier predictions\n")
  cases = [(tmp_path / "empty.txt", "empty.txt: no input to predict for"),
           (tmp_path / "latin1.txt", "latin1.txt: not UTF-8 text (byte 15"),
           (tmp_path / "missing.txt", "missing.txt: No such file or directory"),
           (tmp_path / "folder", "folder is a directory")]
  for path, expect in cases:
    refused("predict", "--workdir", classifier_workdir, "--input", path, "--output", out,
            watch=[classifier_workdir, out], expect=[expect])
  refused("predict", "--workdir", classifier_workdir, "--input", tmp_path / "empty.txt", "--output",
          tmp_path / "nowhere" / "out.tsv", watch=[classifier_workdir], expect=["nowhere is not a directory"])
