"""Non-finite values: a NaN/Inf loss or gradient norm is caught inside the train step; train.nonfinite='skip' keeps
the parameters and optimiser state, counts and logs the skip; 'stop' ends the run without saving the poisoned state,
so the newest checkpoint is the last good one."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import train
from tests.conftest import REPO
from tests.test_fault_resume import Train, common  # noqa: F401 - `common` is a fixture used here too

TINY = str(REPO / "configs" / "gpt_tiny.py")


def lm_batch(config, rng, poison=False):
  b, t = config.train.batch_size, config.data.seq_len
  tokens = rng.integers(4, config.model.vocab_size, (b, t + 1), dtype=np.int32)
  weights = np.ones((b, t), np.float32)
  if poison:
    weights[0, 0] = np.nan  # one token's loss weight: the loss and every gradient become NaN
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((b, t), np.int32),
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(), "weights": weights}


def same(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y, equal_nan=True)), a, b)))


def test_poisoned_batch_is_skipped_inside_the_step():
  config = config_lib.load(TINY, ["mesh.data=1", "train.nonfinite=skip", "model.num_layers=1"])
  setup = train.build(config, jax.devices()[:1])
  step_fn = train.compile_train_step(setup)
  rng = np.random.default_rng(0)
  state, m1 = step_fn(train.init_state(setup, 0), lm_batch(config, rng))
  before = jax.device_get(state)
  state, m2 = step_fn(state, lm_batch(config, rng, poison=True))
  assert bool(m1["finite"]) and not bool(m2["finite"]) and math.isnan(float(m2["loss"]))
  assert int(state.step) == 2 and int(state.nonfinite_skips) == int(m2["nonfinite_skips"]) == 1
  assert same(state.params, before.params) and same(state.opt_state, before.opt_state)
  state, m3 = step_fn(state, lm_batch(config, rng))  # the next good batch trains normally
  assert bool(m3["finite"]) and int(m3["nonfinite_skips"]) == 1 and not same(state.params, before.params)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


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
  # the skipped updates left the parameters as step 2 made them: the step-5 checkpoint holds step 2's parameters
  with open(tmp_path / "checkpoints" / "2" / "metadata" / "metadata") as f2, \
       open(tmp_path / "checkpoints" / "5" / "metadata" / "metadata") as f5:
    at2, at5 = json.load(f2)["checksums"], json.load(f5)["checksums"]
  params = [k for k in at2 if k.startswith("params/")]
  assert params and all(at2[k] == at5[k] for k in params)
  assert at2["nonfinite_skips"] != at5["nonfinite_skips"]
