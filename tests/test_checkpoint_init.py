"""Initialisation for fine-tuning: parameters only, and partially, from a jaxlm checkpoint (init.checkpoint_dir) or
from a converter's params tree; the report names what was loaded, newly initialised and unused; a shape mismatch is
an error naming the parameter."""

import jax
import numpy as np
import pytest

from jaxlm import checkpoint as ckpt_lib
from jaxlm import checksums, train, warm_start
from jaxlm import config as config_lib
from tests.conftest import REPO
from tests.test_fault_resume import Train, common  # noqa: F401 - `common` is a fixture used here too

TINY = str(REPO / "configs" / "gpt_tiny.py")


def tiny(*overrides):
  return config_lib.load(TINY, ["mesh.data=1", *overrides])


def fresh(config, devices=1, seed=0):
  setup = train.build(config, jax.devices()[:devices])
  return setup, train.init_state(setup, seed)


def save(workdir, state, step):
  config = tiny()
  ckpt = ckpt_lib.Checkpointer(str(workdir), config.checkpoint)
  ckpt.save(step, state, None, config, {})
  ckpt.close()


@pytest.fixture(scope="module")
def tied():
  return fresh(tiny())[1]


@pytest.fixture(scope="module")
def untied4():
  """The fine-tuning model: an lm_head of its own, on a 1x2x2 mesh."""
  return fresh(tiny("model.tie_embeddings=false", "mesh.fsdp=2", "mesh.tensor=2"), devices=4)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tied):
  """A jaxlm workdir whose step-3 checkpoint holds a tied-embedding decoder (no lm_head), values unlike a fresh init."""
  workdir = tmp_path_factory.mktemp("pretrained")
  state = tied.replace(params=jax.tree.map(lambda x: x * 0.5 + 0.25, tied.params))
  save(workdir, state, 3)
  return workdir, jax.device_get(state.params)


def test_partial_restore_into_a_model_with_a_new_head(pretrained, untied4):
  workdir, source = pretrained
  setup, state = untied4
  params, report = warm_start.init_from_checkpoint(state.params, str(workdir))
  assert report.source == str(workdir / "checkpoints" / "3")
  assert report.new == ["lm_head"] and report.unused == []
  assert len(report.loaded) == len(jax.tree.leaves(source)) and "block_1/mlp/wo" in report.loaded
  targets = warm_start._flat(setup.state_shardings.params)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = checksums.path_name(path)
    assert leaf.sharding == targets[name]  # restored straight onto the fine-tuning mesh
    want = warm_start._flat(state.params)[name] if name == "lm_head" else warm_start._flat(source)[name]
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want))
  text = report.describe()
  assert "1 newly initialised" in text and "newly initialised: lm_head" in text and "loaded: block_0/attn/o" in text


def test_parameters_left_out_of_the_model_are_reported_unused(tied, tmp_path):
  head = np.full((64, 512), 0.5, np.float32)
  save(tmp_path, tied.replace(params={**tied.params, "lm_head": head}), 5)
  params, report = warm_start.init_from_checkpoint(tied.params, str(tmp_path / "checkpoints" / "5"))
  assert report.unused == ["lm_head"] and report.new == [] and len(report.loaded) == len(jax.tree.leaves(params))


def test_shape_mismatch_names_the_parameter(pretrained, tied):
  workdir, _ = pretrained
  smaller = {**tied.params, "embedding": jax.ShapeDtypeStruct((256, 64), np.float32)}  # model.vocab_size=256
  with pytest.raises(ValueError, match=r"init.checkpoint_dir: parameter 'embedding' has shape \(512, 64\) in .*"
                                       r"checkpoints/3 but \(256, 64\) in this model"):
    warm_start.init_from_checkpoint(smaller, str(workdir))


def test_missing_checkpoint_is_a_clear_error(tied, tmp_path):
  with pytest.raises(FileNotFoundError, match="init.checkpoint_dir=.*does not exist"):
    warm_start.init_from_checkpoint(tied.params, str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="holds no finalised jaxlm checkpoint"):
    warm_start.init_from_checkpoint(tied.params, str(tmp_path / "empty"))


def test_init_from_a_converted_params_tree(untied4):
  """What a converter (e.g. from Hugging Face) hands over: nested dicts of host arrays, other dtypes allowed."""
  _, state = untied4
  rng = np.random.default_rng(0)
  source = {"embedding": rng.normal(size=(512, 64)).astype(np.float16),
            "block_0": {"mlp": {"wi": rng.normal(size=(64, 256)).astype(np.float32)}},
            "pooler": {"kernel": np.zeros((64, 64), np.float32)}}
  params, report = warm_start.init_from_tree(state.params, source, source_name="hf:bert-tiny")
  assert report.loaded == ["block_0/mlp/wi", "embedding"] and report.unused == ["pooler/kernel"]
  assert len(report.new) == len(jax.tree.leaves(state.params)) - 2
  assert params["embedding"].dtype == np.float32 and params["embedding"].sharding == state.params["embedding"].sharding
  np.testing.assert_array_equal(np.asarray(params["embedding"]), source["embedding"].astype(np.float32))
  np.testing.assert_array_equal(np.asarray(params["block_1"]["mlp"]["wi"]),
                                np.asarray(state.params["block_1"]["mlp"]["wi"]))
  with pytest.raises(ValueError, match="init.hf_path: parameter 'embedding' has shape"):
    warm_start.init_from_tree(state.params, {"embedding": np.zeros((3, 64))}, source_name="x", key="init.hf_path")


class ConvertingTask:
  """A task whose pretrained_source() hands over a converted checkpoint, as the encoder tasks do for init.hf_path."""

  def pretrained_source(self):
    return "hf:tiny", {"embedding": np.ones((512, 64), np.float32), "cls": {"kernel": np.ones((64, 2), np.float32)}}


class PlainTask:
  def pretrained_source(self):
    return None


def test_the_loop_starts_from_a_tasks_converted_checkpoint(tied):
  lines = []
  state = warm_start.init_from_pretrained(tied, ConvertingTask(), tiny(), lines.append)
  np.testing.assert_array_equal(np.asarray(state.params["embedding"]), np.ones((512, 64), np.float32))
  assert lines[0].startswith("initialised from hf:tiny: 1 parameters loaded") and "unused: cls/kernel" in lines[0]
  assert warm_start.init_from_pretrained(tied, PlainTask(), tiny(), lines.append) is tied and len(lines) == 1
  with pytest.raises(ValueError, match="init.checkpoint_dir=/x and hf:tiny both name the parameters to start from"):
    warm_start.init_from_pretrained(tied, ConvertingTask(), tiny("init.checkpoint_dir=/x"), lines.append)


@pytest.mark.slow
def test_jaxlm_train_starts_from_init_checkpoint_dir_once(common, pretrained, untied4, tmp_path):
  workdir, source = pretrained
  # learning rate 0: after one step the loaded parameters are still exactly the pretrained ones
  extra = ["--config.model.tie_embeddings=false", f"--config.init.checkpoint_dir={workdir}", "--config.train.steps=1",
           "--config.optim.learning_rate=0"]
  first = Train(common, tmp_path, *extra)
  assert first.finish() == 0, first.output[-3000:]
  assert (f"initialised from {workdir}/checkpoints/3: {len(jax.tree.leaves(source))} parameters loaded, 1 newly "
          "initialised, 0 in the source unused") in first.output
  assert "  newly initialised: lm_head" in first.output
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), tiny().checkpoint, read_only=True)
  params = ckpt.restore_params(1, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                               untied4[1].params))
  np.testing.assert_array_equal(np.asarray(params["block_0"]["attn"]["qkv"]), source["block_0"]["attn"]["qkv"])
  again = Train(common, tmp_path, *extra)  # restores step 1: nothing left to train, only the final eval
  assert again.finish() == 0, again.output[-3000:]
  assert "resumed from" in again.output and "initialised from" not in again.output  # never re-initialised
