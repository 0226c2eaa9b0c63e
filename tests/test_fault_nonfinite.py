"""Non-finite values, through `jaxlm train`: a NaN/Inf loss or gradient norm is caught inside the train step;
train.nonfinite='skip' keeps the parameters and optimiser state, counts and logs the skip; 'stop' ends the run without
saving the poisoned state, so the newest checkpoint is the last good one."""

import json
import math
import os

import pytest

from tests.test_fault_resume import Train, common  # noqa: F401 - `common` is a fixture used here too

# A learning rate warmed up from 0 to 1e30: step 1 is a no-op, step 2's update is huge but finite, and from step 3 on
# the loss is non-finite.
EXPLODE = ["--config.optim.learning_rate=1e30", "--config.optim.warmup_steps=3", "--config.optim.schedule=linear",
           "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=0", "--config.train.steps=5"]


def rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if r["split"] == "train"}


@pytest.mark.slow
def test_stop_policy_keeps_the_last_good_checkpoint(common, tmp_path):
  run = Train(common, tmp_path, *EXPLODE, "--config.train.nonfinite=stop")
  assert run.finish() == 1, run.output[-3000:]
  assert (f"non-finite loss or gradient norm by step 3 (train.nonfinite='stop'); the last good checkpoint is "
          f"{tmp_path}/checkpoints/2, nothing after it") in run.output
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
  logged = rows(tmp_path)
  assert math.isfinite(logged[2]["loss"]) and not math.isfinite(logged[3]["loss"]) and max(logged) == 3


@pytest.mark.slow
def test_skip_policy_counts_and_logs_skipped_updates(common, tmp_path):
  run = Train(common, tmp_path, *EXPLODE, "--config.train.nonfinite=skip")
  assert run.finish() == 0, run.output[-3000:]
  logged = rows(tmp_path)
  assert [logged[s]["nonfinite_skips"] for s in range(1, 6)] == [0, 0, 1, 2, 3]
  assert all(not math.isfinite(logged[s]["loss"]) for s in (3, 4, 5))
  # the skipped updates left parameters and optimiser state as step 2 made them: only the counters moved on
  with open(tmp_path / "checkpoints" / "2" / "metadata" / "metadata") as f2, \
       open(tmp_path / "checkpoints" / "5" / "metadata" / "metadata") as f5:
    at2, at5 = json.load(f2)["checksums"], json.load(f5)["checksums"]
  assert sorted(k for k in at2 if at2[k] != at5[k]) == ["nonfinite_skips", "step"]
  assert any(k.startswith("params/") for k in at2) and any(k.startswith("opt_state/") for k in at2)
