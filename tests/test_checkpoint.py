"""Checkpointer: one step holds state, data iterator, config and metadata; keep policies; checksums; damaged and
unfinished steps are skipped with a warning, falling back to the step before."""

import glob
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm import checkpoint as ckpt_lib
from jaxlm import checksums, train
from jaxlm import config as config_lib
from jaxlm import workdir as workdir_lib
from tests.conftest import REPO

TINY = str(REPO / "configs" / "gpt_tiny.py")


def tiny(*overrides):
  return config_lib.load(TINY, list(overrides))


@pytest.fixture(scope="module")
def one_device():
  setup = train.build(tiny("mesh.data=1"), jax.devices()[:1])
  return setup, train.init_state(setup, 0)


def numbers():
  """A resumable grain iterator standing in for the batch pipeline."""
  return iter(grain.MapDataset.range(1000).shuffle(seed=3).to_iter_dataset())


def trees_equal(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))


def save_steps(workdir, setup, state, steps, config=None, **kw):
  config = config or setup.config
  ckpt = ckpt_lib.Checkpointer(str(workdir), config.checkpoint)
  it = numbers()
  for step in steps:
    next(it)
    ckpt.save(step, state.replace(step=jnp.asarray(step, jnp.int32)), it, config, {"name": "t"}, **kw)
  ckpt.close()


def test_one_checkpoint_holds_state_data_config_and_metadata(one_device, tmp_path):
  setup, state = one_device
  config = setup.config
  it = numbers()
  seen = [next(it) for _ in range(5)]
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), config.checkpoint)
  assert config.checkpoint.async_save
  meta = workdir_lib.metadata(config, setup, "spm:abc")
  assert ckpt.save(7, state, it, config, meta)
  expected_next = [next(it) for _ in range(3)]  # the iterator moves on while the write finishes
  ckpt.close()

  ckpt = ckpt_lib.Checkpointer(str(tmp_path), config.checkpoint, read_only=True)
  fresh = numbers()
  restored = ckpt.restore_latest(train.abstract_state(setup), fresh)
  assert restored.step == 7 and restored.path == os.path.join(tmp_path, "checkpoints", "7")
  assert trees_equal(restored.state, state)
  assert [next(fresh) for _ in range(3)] == expected_next != seen[:3]
  saved_config = ckpt.manager.restore(7, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  assert config_lib.from_json_dict(saved_config).to_dict() == config.to_dict()
  from jaxlm import __version__
  assert restored.metadata["jaxlm_version"] == __version__
  assert restored.metadata["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
  assert restored.metadata["tokenizer_fingerprint"] == "spm:abc"
  assert restored.metadata[ckpt_lib.CHECKSUM_KEY] == checksums.checksums(state)
  assert trees_equal(ckpt.restore_params(7, train.abstract_state(setup).params), state.params)
  ckpt.close()


def test_keep_last_n_and_every_k(one_device, tmp_path):
  setup, state = one_device
  save_steps(tmp_path, setup, state, range(1, 10), tiny("checkpoint.keep=2", "checkpoint.keep_every=4"))
  assert ckpt_lib.Checkpointer(str(tmp_path), setup.config.checkpoint, read_only=True).all_steps() == [4, 8, 9]


@pytest.mark.parametrize("mode, values, best", [("max", [0.5, 0.9, 0.7, 0.6], 2), ("min", [3.0, 2.0, 1.0, 4.0], 3)])
def test_keep_best_by_metric(one_device, tmp_path, mode, values, best):
  setup, state = one_device
  config = tiny("checkpoint.keep=1", "checkpoint.best_metric=score", f"checkpoint.best_mode={mode}")
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), config.checkpoint)
  for step, value in enumerate(values, 1):
    ckpt.save(step, state, None, config, {}, metrics={"score": value, "loss": 1.0})
    ckpt.wait()
  assert ckpt.all_steps() == [best, len(values)]  # the best one, and the newest for resuming
  assert ckpt.best_step() == best
  with pytest.raises(KeyError, match="checkpoint.best_metric='score' is not among"):
    ckpt.save(9, state, None, config, {}, metrics={"accuracy": 1.0})
  ckpt.close()


def test_a_checkpoint_saved_without_metrics_is_ranked_later(one_device, tmp_path):
  setup, state = one_device
  config = tiny("checkpoint.keep=1", "checkpoint.best_metric=score")
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), config.checkpoint)
  ckpt.save(1, state, None, config, {}, metrics={"score": 0.5})
  ckpt.save(2, state, None, config, {})  # as a stop saves: before any evaluation
  ckpt.wait()
  assert ckpt.best_step() == 1
  with pytest.raises(KeyError, match="checkpoint.best_metric='score' is not among"):
    ckpt.rank(2, {"accuracy": 1.0})
  os.makedirs(tmp_path / "checkpoints" / "2" / "metrics.jaxlm-tmp")  # as left by a process killed while ranking
  assert ckpt.rank(2, {"score": 0.7, "loss": 1.0})
  assert not ckpt.rank(2, {"score": 0.1}) and not ckpt.rank(1, {"score": 0.9}) and not ckpt.rank(7, {"score": 1.0})
  assert ckpt.best_step() == 2
  ckpt.close()
  reader = ckpt_lib.Checkpointer(str(tmp_path), config.checkpoint, read_only=True)
  assert reader.best_step() == 2 and reader.manager.metrics(2) == {"score": 0.7, "loss": 1.0}
  reader.close()


@pytest.mark.parametrize("override, message", [
    ("checkpoint.best_mode=best", "--config.checkpoint.best_mode=best: expected one of 'max', 'min'"),
    ("checkpoint.keep=-1", "--config.checkpoint.keep=-1: expected a number >= 0"),
    ("checkpoint.every_steps=0", "--config.checkpoint.every_steps=0: expected a number >= 1"),
])
def test_bad_keep_settings_name_the_key(tmp_path, override, message):
  with pytest.raises(config_lib.ConfigError) as e:
    ckpt_lib.Checkpointer(str(tmp_path), tiny(override).checkpoint)
  assert str(e.value) == message


def test_checksums_agree_on_host_device_and_any_mesh():
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), devices=jax.devices())
  rng = np.random.default_rng(0)
  host = {"w": rng.normal(size=(16, 12)).astype(np.float32), "h": rng.normal(size=(6, 4, 2)).astype(jnp.bfloat16),
          "flags": np.array([True, False, True, True]), "step": np.int32(7)}
  specs = {"w": P("fsdp", "tensor"), "h": P(None, ("data", "tensor")), "flags": P("data"), "step": P()}
  sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in host.items()}
  assert not sharded["w"].sharding.is_fully_replicated
  on_one = jax.device_put(host, jax.devices()[0])
  sums = checksums.checksums(sharded)
  assert checksums.checksums(on_one) == checksums.checksums(host) == sums
  assert np.asarray(checksums.device_checksums(jax.tree.leaves(sharded))).tolist() == [sums[k] for k in sorted(sums)]
  # swapping two rows keeps the plain sum but not the row-weighted one
  swapped = checksums.checksums({"w": host["w"][[1, 0, *range(2, 16)]]})["w"]
  assert swapped[0] == sums["w"][0] and swapped[1] != sums["w"][1]


def test_verify_checksums_names_the_changed_array(one_device):
  _, state = one_device
  expected = checksums.checksums(state)
  checksums.verify_checksums(state, expected, "here")
  w = state.params["block_1"]["mlp"]["wo"]
  flipped = state.replace(params={**state.params, "block_1": {
      **state.params["block_1"], "mlp": {**state.params["block_1"]["mlp"], "wo": w.at[3, 5].set(-w[3, 5])}}})
  with pytest.raises(ckpt_lib.CorruptCheckpointError, match="here: restored values of params/block_1/mlp/wo differ"):
    checksums.verify_checksums(flipped, expected, "here")


def _largest_array_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True) if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def _flip_bytes(path):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(size // 2)
    chunk = f.read(64)
    f.seek(size // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))


DAMAGE = {
    "array file deleted": lambda d: os.remove(_largest_array_file(d)),
    "array file truncated": lambda d: os.truncate(_largest_array_file(d), os.path.getsize(_largest_array_file(d)) // 2),
    "array bytes flipped": lambda d: _flip_bytes(_largest_array_file(d)),
    "data iterator state truncated": lambda d: os.truncate(glob.glob(os.path.join(d, "data", "process_0*"))[0], 5),
    "metadata truncated": lambda d: os.truncate(os.path.join(d, "metadata", "metadata"), 5),
    "state tree deleted": lambda d: shutil.rmtree(os.path.join(d, "state")),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_step_is_skipped_with_a_warning(one_device, tmp_path, damage):
  setup, state = one_device
  save_steps(tmp_path, setup, state, [1, 2])
  step2 = os.path.join(tmp_path, "checkpoints", "2")
  DAMAGE[damage](step2)
  warnings = []
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), setup.config.checkpoint)
  it = numbers()
  restored = ckpt.restore_latest(train.abstract_state(setup), it, log=warnings.append)
  assert restored.step == 1 and int(restored.state.step) == 1
  assert trees_equal(restored.state.params, state.params)
  assert next(it) == list(grain.MapDataset.range(1000).shuffle(seed=3))[1]  # step 1's iterator position
  assert any(step2 in w and "damaged" in w for w in warnings), warnings
  # kept for inspection, out of the way: step 2 can be saved again
  assert os.path.isdir(os.path.join(tmp_path, "checkpoints_corrupt", "2")) and not os.path.exists(step2)
  assert ckpt.all_steps() == [1]
  assert ckpt.save(2, state, it, setup.config, {})
  ckpt.close()


def test_all_steps_damaged_is_an_error_that_moves_nothing(one_device, tmp_path):
  setup, state = one_device
  save_steps(tmp_path, setup, state, [1, 2])
  for step in (1, 2):
    DAMAGE["array file deleted"](os.path.join(tmp_path, "checkpoints", str(step)))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), setup.config.checkpoint)
  with pytest.raises(ckpt_lib.NoUsableCheckpointError, match="no checkpoint in .* restores") as e:
    ckpt.restore_latest(train.abstract_state(setup), log=lambda m: None)
  assert "checkpoints/1" in str(e.value) and "checkpoints/2" in str(e.value)
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()


@pytest.mark.parametrize("damage", ["state tree deleted", "metadata truncated"])
def test_readers_fall_back_past_a_damaged_step_and_move_nothing(one_device, tmp_path, damage):
  """eval, generate, predict and the test split restore parameters only, read-only: a damaged step is named and
  skipped for the newest intact one before it, and stays where it is."""
  setup, state = one_device
  save_steps(tmp_path, setup, state, [1, 2, 3])
  step3 = os.path.join(tmp_path, "checkpoints", "3")
  DAMAGE[damage](step3)
  warnings = []
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), setup.config.checkpoint, read_only=True)
  step, params = ckpt.restore_params_falling_back(3, train.abstract_state(setup).params, log=warnings.append)
  assert step == 2 and trees_equal(params, state.params)
  assert any(step3 in w and "damaged" in w for w in warnings) and "instead of step 3" in warnings[-1], warnings
  # an intact preferred step (e.g. the best by a dev metric) is used as is, without a word
  warnings.clear()
  assert ckpt.restore_params_falling_back(1, train.abstract_state(setup).params, log=warnings.append)[0] == 1
  assert not warnings
  assert ckpt.all_steps() == [1, 2, 3] and os.path.isdir(step3)
  for step in (1, 2):
    DAMAGE[damage](os.path.join(tmp_path, "checkpoints", str(step)))
  with pytest.raises(ckpt_lib.NoUsableCheckpointError, match="no checkpoint in .* restores intact") as e:
    ckpt.restore_params_falling_back(3, train.abstract_state(setup).params, log=lambda m: None)
  assert all(f"checkpoints/{s}" in str(e.value) for s in (1, 2, 3))
  ckpt.close()


def test_unfinished_save_is_never_a_step_and_is_cleaned_up(one_device, tmp_path):
  """What a process killed mid-write leaves: Orbax's tmp directory, never renamed to its step."""
  setup, state = one_device
  save_steps(tmp_path, setup, state, [1, 2])
  checkpoints = os.path.join(tmp_path, "checkpoints")
  unfinished = os.path.join(checkpoints, "3.orbax-checkpoint-tmp")  # Orbax's name for step 3 while it is written
  shutil.copytree(os.path.join(checkpoints, "2"), unfinished)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), setup.config.checkpoint)
  assert ckpt.all_steps() == [1, 2]
  assert ckpt.restore_latest(train.abstract_state(setup)).step == 2
  assert ckpt.save(3, state, None, setup.config, {})
  assert not ckpt.save(3, state, None, setup.config, {})  # a step already saved is not written twice
  ckpt.close()
  assert sorted(os.listdir(checkpoints)) == ["1", "2", "3"]
  restored = ckpt_lib.Checkpointer(str(tmp_path), setup.config.checkpoint).restore_latest(train.abstract_state(setup))
  assert restored.step == 3 and int(restored.state.step) == int(state.step)



def test_compressed_checkpoints_restore_with_either_setting(one_device, tmp_path):
  setup, state = one_device
  save_steps(tmp_path / "plain", setup, state, [1])
  save_steps(tmp_path / "zstd", setup, state, [1], tiny("checkpoint.compress=true"))
  size = {k: sum(os.path.getsize(f) for f in glob.glob(str(tmp_path / k / "checkpoints" / "1" / "**"), recursive=True)
                 if os.path.isfile(f)) for k in ("plain", "zstd")}
  assert size["zstd"] < 0.8 * size["plain"]  # the fresh optimiser moments are zeros
  restored = ckpt_lib.Checkpointer(str(tmp_path / "zstd"), setup.config.checkpoint).restore_latest(
      train.abstract_state(setup))
  assert not setup.config.checkpoint.compress and trees_equal(restored.state.params, state.params)
