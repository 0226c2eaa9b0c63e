"""The same data on any topology, end to end: on real text with shuffling and packing on, 1 process x 8 simulated
devices, 2 processes x 4 and 4 processes x 2 train on the same 2x2x2 mesh and log the same loss at every step; a run
stopped by 2 processes and resumed by 4 continues the exact stream."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, child_env

STOP_AT, STEPS = 3, 6


def train_losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [r for r in map(json.loads, f) if r["split"] == "train"]
  steps = [r["step"] for r in rows]
  assert len(steps) == len(set(steps)), f"steps logged more than once (by more than one process?): {steps}"
  return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def common(tmp_path_factory, request):
  """jaxlm train arguments shared by every run: Tiny Shakespeare, shuffled, packed first-fit, a 2x2x2 mesh."""
  shared = REPO.parent / "shared" / "data"
  if not shared.is_dir():
    if os.environ.get("CI") == "true":
      pytest.fail(f"{shared} is missing, and CI must have it")
    pytest.skip(f"{shared} not present")
  root = tmp_path_factory.mktemp("topology")
  text = shared / "text" / "tinyshakespeare.txt"
  args = ["--config", str(REPO / "configs" / "gpt_tiny.py"), "--config.data.source=text",
          f"--config.data.train_files={text}", "--config.data.doc_split=blank_lines", "--config.data.shuffle=true",
          "--config.data.packing=first_fit", f"--config.data.tfds_data_dir={root / 'tfds'}",
          "--config.tokenizer.max_sentences=3000"]
  r = subprocess.run([sys.executable, "-m", "jaxlm", "tokenizer", *args, "--workdir", str(root / "tok")],
                     env=child_env(1), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  args += [
      f"--config.tokenizer.path={root / 'tok' / 'tokenizer' / 'spm.model'}", "--config.train.batch_size=8",
      # a schedule that does not depend on train.steps, so stopping early and continuing is one run
      "--config.optim.schedule=constant", "--config.optim.warmup_steps=2",
      "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.eval_batches=1",
      f"--config.checkpoint.every_steps={STOP_AT}",
      "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
      "--config.distributed.initialization_timeout_s=120", "--config.distributed.heartbeat_timeout_s=30"]
  return args, root


def train(common, workdir, steps, processes, devices, timeout=400):
  if processes == 1:
    r = subprocess.run([sys.executable, "-m", "jaxlm", "train", *common, "--workdir", str(workdir),
                        f"--config.train.steps={steps}"], env=child_env(devices), cwd=REPO, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout
  logs = workdir.parent / f"logs_{workdir.name}_{processes}"
  r = subprocess.run(["bash", str(REPO / "launch" / "local_multiprocess.sh"), str(processes), str(devices), "--",
                      sys.executable, "-m", "jaxlm", "train", *common, "--workdir", str(workdir),
                      f"--config.train.steps={steps}"],
                     env=child_env(devices, LOG_DIR=str(logs), GRACE_S="5"), cwd=REPO, capture_output=True,
                     text=True, timeout=timeout)
  process_logs = "\n".join(p.read_text()[-3000:] for p in sorted(logs.glob("process_*.log")))
  assert r.returncode == 0, r.stderr[-2000:] + process_logs
  log = (logs / "process_0.log").read_text()
  assert f"{processes} processes" in log
  return log


@pytest.mark.slow
def test_one_two_and_four_processes_train_on_the_same_batches(common):
  args, root = common
  reference = root / "one_by_eight"
  train(args, reference, STEPS, processes=1, devices=8)
  expected = train_losses(reference)
  assert sorted(expected) == list(range(1, STEPS + 1)) and expected[STEPS] < expected[1]  # it trained

  # 2 processes x 4 devices stop at STOP_AT; 4 processes x 2 devices resume and finish
  workdir = root / "two_then_four"
  train(args, workdir, STOP_AT, processes=2, devices=4)
  log = train(args, workdir, STEPS, processes=4, devices=2)
  assert f"(step {STOP_AT})" in log
  got = train_losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  for step in expected:
    assert got[step] == pytest.approx(expected[step], rel=1e-5), (step, got, expected)
