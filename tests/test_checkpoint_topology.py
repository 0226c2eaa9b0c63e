"""Topology change: a checkpoint saved on 8 devices as a 2x2x2 mesh restores onto 1 device and onto 4 devices as
4x1x1, each array on the new mesh's target sharding and bit for bit what was saved, and training continues with the
losses the old mesh would have produced."""

import jax
import numpy as np
import pytest

from jaxlm import checkpoint as ckpt_lib
from jaxlm import config as config_lib
from jaxlm import train
from jaxlm import workdir as workdir_lib
from tests.conftest import REPO

TINY = str(REPO / "configs" / "gpt_tiny.py")
MESHES = {"2x2x2": (8, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]), "1x1x1": (1, ["mesh.data=1"]),
          "4x1x1": (4, ["mesh.data=4"])}


def setup_for(mesh: str):
  n, overrides = MESHES[mesh]
  config = config_lib.load(TINY, ["model.dropout=0.1", "optim.warmup_steps=1", "model.num_layers=1",
                                  "data.seq_len=32", *overrides])
  return train.build(config, jax.devices()[:n])


def batches(config, n):
  rng = np.random.default_rng(0)
  b, t = config.train.batch_size, config.data.seq_len
  for _ in range(n):
    tokens = rng.integers(4, config.model.vocab_size, (b, t + 1), dtype=np.int32)
    yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((b, t), np.int32),
           "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
           "weights": np.ones((b, t), np.float32)}


def continue_training(setup, state, data):
  step_fn = train.compile_train_step(setup)
  losses = []
  for batch in data:
    state, metrics = step_fn(state, train.global_batch(batch, setup.batch_shardings))
    losses.append(float(metrics["loss"]))
  return losses


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A 2x2x2 run checkpointed after 2 steps, and the losses of its next 2 steps on that mesh."""
  workdir = tmp_path_factory.mktemp("topology")
  setup = setup_for("2x2x2")
  assert dict(setup.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  data = list(batches(setup.config, 4))
  state = train.init_state(setup, 0)
  step_fn = train.compile_train_step(setup)
  for batch in data[:2]:
    state, _ = step_fn(state, train.global_batch(batch, setup.batch_shardings))
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
  ckpt = ckpt_lib.Checkpointer(str(workdir), setup.config.checkpoint)
  ckpt.save(2, state, None, setup.config, workdir_lib.metadata(setup.config, setup))
  ckpt.close()
  host = jax.device_get(state)
  return workdir, host, continue_training(setup, state, data[2:]), data[2:]


@pytest.mark.parametrize("mesh", ["1x1x1", "4x1x1"])
def test_restore_onto_another_mesh_continues_with_the_same_losses(saved, mesh):
  workdir, saved_state, expected_losses, data = saved
  setup = setup_for(mesh)
  assert len(setup.mesh.devices.flat) == MESHES[mesh][0]
  ckpt = ckpt_lib.Checkpointer(str(workdir), setup.config.checkpoint, read_only=True)
  restored = ckpt.restore_latest(train.abstract_state(setup))
  assert restored.metadata["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  for got, want, target in zip(jax.tree.leaves(restored.state), jax.tree.leaves(saved_state),
                               jax.tree.leaves(setup.state_shardings)):
    assert got.sharding == target
    np.testing.assert_array_equal(np.asarray(got), want)
  losses = continue_training(setup, restored.state, data)
  # the same arithmetic, reduced in another order across devices: equal to float32 rounding
  np.testing.assert_allclose(losses, expected_losses, rtol=2e-6)
  assert losses[-1] != losses[0]
