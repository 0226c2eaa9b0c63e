"""`jaxlm` end to end as a user runs it: train, resume, eval, generate, plot, and config errors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxlm import loop_timing
from tests.conftest import REPO, child_env

TINY = str(REPO / "configs" / "gpt_tiny.py")


def jaxlm(*args, timeout=300, devices=8):
  return subprocess.run([sys.executable, "-m", "jaxlm", *args], capture_output=True, text=True, timeout=timeout,
                        env=child_env(devices), cwd=REPO)


def rows(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.mark.slow
def test_train_resume_eval_generate_plot(tmp_path):
  wd = str(tmp_path / "run")
  common = ["--config", TINY, "--workdir", wd, "--config.mesh.fsdp=2"]
  r = jaxlm("train", *common, "--config.train.steps=20", "--config.checkpoint.every_steps=10")
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.path.isfile(os.path.join(wd, "tokenizer", "spm.model"))  # trained on first use
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["10", "20"]
  assert os.listdir(os.path.join(wd, "tensorboard"))
  config = json.load(open(os.path.join(wd, "config.json")))
  assert config["train"]["steps"] == 20 and config["mesh"]["fsdp"] == 2
  train_rows = rows(wd, "train")
  assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
  for r in train_rows:
    assert {"loss", "learning_rate", "tokens_per_s"} <= set(r)
  evals = rows(wd, "eval")
  assert evals and {"loss", "perplexity"} <= set(evals[-1])

  r = jaxlm("train", *common, "--config.train.steps=30", "--config.checkpoint.every_steps=10")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stdout and "(step 20)" in r.stdout
  assert [r["step"] for r in rows(wd, "train")] == [5, 10, 15, 20, 25, 30]

  r = jaxlm("eval", "--config", TINY, "--workdir", wd)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(r.stdout.strip().splitlines()[-1])
  assert result["step"] == 30 and result["eval"]["perplexity"] > 1

  r = jaxlm("generate", "--workdir", wd, "--prompt", "The list", "--max-new-tokens", "12", "--temperature", "0")
  assert r.returncode == 0, r.stderr[-3000:]
  text = r.stdout.strip().splitlines()[-1]
  assert text.startswith("The list")  # greedy may stop at an early end-of-document token: more is not required
  again = jaxlm("generate", "--workdir", wd, "--prompt", "The list", "--max-new-tokens", "12", "--temperature", "0")
  assert again.stdout == r.stdout  # greedy decoding is deterministic

  r = jaxlm("plot", "--workdir", wd)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(wd, "metrics.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  # a damaged latest step: eval and generate name it, use step 20 instead, and leave the files where they are
  shutil.rmtree(os.path.join(wd, "checkpoints", "30", "state"))
  r = jaxlm("eval", "--config", TINY, "--workdir", wd)
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 20
  assert "checkpoints/30 is damaged and is skipped" in r.stderr and "instead of step 30" in r.stderr
  r = jaxlm("generate", "--workdir", wd, "--prompt", "The list", "--max-new-tokens", "4", "--temperature", "0")
  assert r.returncode == 0 and "checkpoints/30 is damaged" in r.stderr, r.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["10", "20", "30"]
  # `jaxlm eval` replaces the rows training wrote at its step: every (step, split) once
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    keys = [(r["step"], r["split"]) for r in map(json.loads, f)]
  assert len(keys) == len(set(keys)) and (20, "eval") in keys and (30, "eval") in keys


def test_unknown_key_fails_before_work(tmp_path):
  r = jaxlm("train", "--config", TINY, "--workdir", str(tmp_path / "w"), "--config.train.stepz=5", devices=1)
  assert r.returncode != 0
  assert "train.stepz" in r.stderr and "train.steps" in r.stderr
  assert not (tmp_path / "w").exists()  # nothing was written


def test_bad_mesh_fails_clearly(tmp_path):
  r = jaxlm("train", "--config", TINY, "--workdir", str(tmp_path / "w"), "--config.mesh.data=3", devices=8)
  assert r.returncode != 0 and "mesh" in r.stderr and "needs 3 devices but 8 are available" in r.stderr
  assert not (tmp_path / "w").exists()


def test_bench_prints_one_json_line():
  r = jaxlm("bench", "--config", TINY, "--steps", "2", "--warmup", "1", "--peak-gflops", "100", devices=1)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(r.stdout.strip().splitlines()[-1])
  for key in ("tokens_per_s", "step_ms", "mfu", "compile_s", "peak_rss_mb", "params"):
    assert result[key] > 0, key
  assert result["mfu"] == pytest.approx(6 * result["params_6n"] * result["tokens_per_s"] / 100e9, rel=1e-3)


def test_train_rows_time_the_device_not_the_host(tmp_path):
  """The host dispatches up to a log interval ahead of the device. A row's tokens/s covers the steps between two rows
  as the device ran them: the first row is not the dispatch rate, the rows after an eval (whose steps were still
  queued when it started) are ordinary, and the last row does not cover two intervals."""
  wd = str(tmp_path / "run")
  r = jaxlm("train", "--config", TINY, "--workdir", wd, "--config.train.steps=40", "--config.train.log_every=5",
            "--config.train.eval_every=20", "--config.train.batch_size=256", "--config.checkpoint.every_steps=100",
            devices=1)
  assert r.returncode == 0, r.stderr[-3000:]
  train_rows = rows(wd, "train")
  rate = {row["step"]: row["tokens_per_s"] for row in train_rows}
  assert sorted(rate) == list(range(5, 45, 5))
  typical = sorted(rate.values())[len(rate) // 2]
  # the first row, the first after an eval, the last: within 3x of the typical row either way (a busy machine slowed
  # the first row of one run to 0.43x of the typical one)
  for step in (5, 25, 40):
    assert typical / 3 < rate[step] < 3 * typical, rate
  # train_seconds is stamped with the rate: a row's tokens over its rate is the time since the row before
  seconds = [row["train_seconds"] for row in train_rows]
  for before, after, row in zip(seconds, seconds[1:], train_rows[1:]):
    assert after - before == pytest.approx(5 * 256 * 64 / row["tokens_per_s"], rel=0.05, abs=0.01), train_rows


def test_the_first_step_is_left_out_of_the_rows_unless_it_is_a_row_alone():
  """The first run of a compiled step also finishes preparing it: the rows count from its end. A row of the first step
  alone is timed from its dispatch to its end."""
  alone = loop_timing.Throughput(tokens_per_step=100)
  alone.count({})
  alone.first_done(dispatched=2.0, done=4.0)
  assert alone.rate(alone.cut(), 4.5)[0] == pytest.approx(100 / 2.0)
  rows_after = loop_timing.Throughput(tokens_per_step=100)
  for step in range(5):
    rows_after.count({"attention_mask": np.ones((2, 10))} if step else {})
    if step == 0:
      rows_after.first_done(dispatched=2.0, done=4.0)
  rate, extra = rows_after.rate(rows_after.cut(), 6.0)
  assert rate == pytest.approx(4 * 20 / 2.0) and extra == {"nonpad_tokens_per_s": pytest.approx(4 * 20 / 2.0)}


@pytest.mark.slow
def test_profile_writes_a_trace_of_the_chosen_steps(tmp_path):
  wd = tmp_path / "run"
  r = jaxlm("train", "--config", TINY, "--workdir", str(wd), "--profile", "3:5", "--config.train.steps=6",
            "--config.train.eval_every=0", "--config.train.eval_batches=1",
            devices=1)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "profile of steps 3..4 written to" in r.stdout
  traces = list((wd / "profile").rglob("*.xplane.pb"))
  assert traces and traces[0].stat().st_size > 1000  # a trace TensorBoard's profile plugin reads
  r = jaxlm("train", "--config", TINY, "--workdir", str(tmp_path / "bad"), "--profile", "5:3", devices=1)
  assert r.returncode != 0 and "train.profile" in r.stderr
