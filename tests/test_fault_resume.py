"""Nothing lost, nothing changed, through the real `jaxlm train` command: N steps + resume + N steps, runs stopped by
SIGTERM and SIGINT, and a run SIGKILLed in the middle of writing a checkpoint all log exactly the losses of one
straight run, step by step, and end in the same bits.

Every run uses the same config: a schedule that does not depend on train.steps, dropout on (so the RNG matters),
shuffled data (so the iterator state matters). A shared XLA compilation cache keeps the runs short.
"""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from jaxlm import checkpoint as ckpt_lib
from jaxlm import config as config_lib
from tests.conftest import REPO, child_env, train_tokenizer

STEPS = 12
TINY = str(REPO / "configs" / "gpt_tiny.py")


@pytest.fixture(scope="module")
def common(tmp_path_factory):
  """The `jaxlm train` arguments every run here shares, and the environment to run it in. The tokenizer is shared by
  every test module that uses this fixture (the compilation cache by the whole suite: `child_env`)."""
  shared = tmp_path_factory.getbasetemp() / "jaxlm_fault_shared"
  tokenizer = shared / "tok" / "tokenizer" / "spm.model"
  if not tokenizer.is_file():
    train_tokenizer(config_lib.load(TINY, ["tokenizer.max_sentences=3000"]), str(shared / "tok"))
  root = tmp_path_factory.mktemp("fault")
  args = [
      "--config", TINY, f"--config.tokenizer.path={tokenizer}", f"--config.train.steps={STEPS}",
      "--config.optim.schedule=constant", "--config.optim.warmup_steps=2", "--config.model.dropout=0.1",
      "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.eval_batches=1",
      "--config.train.progress_bar=false", "--config.checkpoint.every_steps=4"]
  return args, child_env(1), root


class Train:
  """A `jaxlm train` subprocess whose output is read line by line as it comes."""

  def __init__(self, common, workdir, *extra, launcher=("-m", "jaxlm"), env=None):
    args, base_env, _ = common
    self.proc = subprocess.Popen([sys.executable, *launcher, "train", *args, "--workdir", str(workdir), *extra],
                                 env={**base_env, **(env or {})}, cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    self.lines, self._queue = [], queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line)
      self._queue.put(line)
    self._queue.put(None)

  @property
  def output(self) -> str:
    return "".join(self.lines)

  def wait_for(self, text: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while True:
      try:
        line = self._queue.get(timeout=max(deadline - time.time(), 0.01))
      except queue.Empty:
        self.kill()
        pytest.fail(f"no '{text}' within {timeout}s:\n{self.output[-3000:]}")
      if line is None:
        pytest.fail(f"exited ({self.proc.wait()}) before printing '{text}':\n{self.output[-3000:]}")
      if text in line:
        return

  def finish(self, timeout: float = 240) -> int:
    try:
      rc = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"still running after {timeout}s:\n{self.output[-3000:]}")
    time.sleep(0.1)  # let the reader take the last lines
    return rc

  def kill(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()


def train_rows(workdir) -> dict[int, list[tuple]]:
  """step -> every (loss, grad_norm, learning_rate) logged for it (a step redone after a crash appears twice)."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for r in map(json.loads, f):
      if r["split"] == "train":
        rows.setdefault(r["step"], []).append((r["loss"], r["grad_norm"], r["learning_rate"]))
  return rows


def final_checksums(workdir) -> dict:
  with open(os.path.join(workdir, "checkpoints", str(STEPS), "metadata", "metadata")) as f:
    return json.load(f)[ckpt_lib.CHECKSUM_KEY]


@pytest.fixture(scope="module")
def straight(common):
  """One run of all STEPS steps: what every interrupted run must reproduce exactly."""
  workdir = common[2] / "straight"
  run = Train(common, workdir)
  assert run.finish() == 0, run.output[-3000:]
  rows = train_rows(workdir)
  assert sorted(rows) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in rows.values())
  assert len({v[0][0] for v in rows.values()}) == STEPS  # the loss moves every step: equality below means something
  return {step: v[0] for step, v in rows.items()}, final_checksums(workdir)


def assert_same_trajectory(workdir, straight):
  expected, checksums = straight
  rows = train_rows(workdir)
  assert sorted(rows) == list(range(1, STEPS + 1))
  for step, logged in rows.items():
    assert all(r == expected[step] for r in logged), (step, logged, expected[step])
  assert final_checksums(workdir) == checksums  # model and optimiser state end bit for bit the same


@pytest.mark.slow
def test_n_steps_then_resume_for_n_more_is_exact(common, straight, tmp_path):
  first = Train(common, tmp_path, f"--config.train.steps={STEPS // 2}")
  assert first.finish() == 0, first.output[-3000:]
  second = Train(common, tmp_path)
  assert second.finish() == 0, second.output[-3000:]
  assert f"resumed from {tmp_path}/checkpoints/{STEPS // 2} (step {STEPS // 2})" in second.output
  assert_same_trajectory(tmp_path, straight)


@pytest.mark.slow
def test_sigterm_and_sigint_stop_after_the_step_with_a_checkpoint(common, straight, tmp_path):
  stops = []
  for sig, ready in ((signal.SIGTERM, "parameters, mesh"), (signal.SIGINT, "resumed from")):
    run = Train(common, tmp_path)
    run.wait_for(ready)  # the handler is in place; the first step is still compiling
    run.proc.send_signal(sig)
    assert run.finish() == 0, run.output[-3000:]
    name = signal.Signals(sig).name
    line = next((x for x in run.lines if x.startswith(f"stopped by {name} at step")), None)
    assert line is not None, run.output[-3000:]
    step = int(line.split(" at step ")[1].split(";")[0])
    assert f"checkpoint saved in {tmp_path}/checkpoints/{step}" in line
    assert os.path.isfile(os.path.join(tmp_path, "checkpoints", str(step), "commit_success.txt"))
    stops.append(step)
  assert 1 <= stops[0] < stops[1] < STEPS, stops
  last = Train(common, tmp_path)
  assert last.finish() == 0, last.output[-3000:]
  assert f"(step {stops[1]})" in last.output
  assert_same_trajectory(tmp_path, straight)


# Runs `jaxlm train`, but SIGKILLs itself just before Orbax renames the finished files of step KILL_AT_STEP into
# place: every byte is written, nothing is committed, as when a machine dies at the end of a save.
KILL_DURING_SAVE = """
import os, signal, sys
from orbax.checkpoint._src.path import atomicity
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def killing_finalize(self, *args, **kwargs):
  if self._final_path.name == os.environ["KILL_AT_STEP"]:
    os.kill(os.getpid(), signal.SIGKILL)
  return await finalize(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize
from jaxlm.cli import main
main()
"""


@pytest.mark.slow
def test_sigkill_during_a_save_keeps_the_previous_checkpoint(common, straight, tmp_path):
  killed = Train(common, tmp_path, launcher=("-c", KILL_DURING_SAVE), env={"KILL_AT_STEP": "8"})
  assert killed.finish() == -signal.SIGKILL, killed.output[-3000:]
  checkpoints = os.path.join(tmp_path, "checkpoints")
  assert sorted(os.listdir(checkpoints)) == ["4", "8.orbax-checkpoint-tmp"]
  # the save is asynchronous: training went on past step 8 until the write of step 8 was to be committed
  assert max(train_rows(tmp_path)) >= 8
  restarted = Train(common, tmp_path)
  assert restarted.finish() == 0, restarted.output[-3000:]
  assert f"resumed from {checkpoints}/4 (step 4)" in restarted.output
  assert "8.orbax-checkpoint-tmp" not in os.listdir(checkpoints)
  assert_same_trajectory(tmp_path, straight)  # the steps after 4 were logged twice, the same both times
