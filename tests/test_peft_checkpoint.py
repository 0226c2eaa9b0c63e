"""Checkpoints of a LoRA run through the real loop (run.run): they hold the trained parameters alone beside a reference
to the base and its fingerprint; a run stopped and resumed ends in the bits of a straight one; eval restores the base
from its source under the adapters; a changed base is refused; the sizes against a full checkpoint (tiny model, and
all-MiniLM-L6-v2's shapes against the full SST-2 recipe's state)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from jaxlm import checkpoint, evaluation, peft, run, train, warm_start
from jaxlm import config as config_lib
from jaxlm.hf import bert as hf_bert
from tests.conftest import BASE, REPO

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(59)]


def _hf_bert(directory, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=32, layer_norm_eps=1e-12)
  transformers.BertModel(cfg).save_pretrained(directory, safe_serialization=True)
  (directory / "vocab.txt").write_text("".join(f"{w}\n" for w in SPECIAL + WORDS))
  return str(directory)


def _tsv(path, n, seed):
  rng = np.random.default_rng(seed)
  lines = ["sentence\tlabel"]
  for _ in range(n):
    words = list(rng.choice(WORDS, size=rng.integers(3, 10)))
    lines.append(" ".join(words) + "\t" + ("pos" if "w1" in words or "w2" in words else "neg"))
  path.write_text("\n".join(lines) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def lora_config(tmp_path_factory):
  root = tmp_path_factory.mktemp("peft_run")
  hf_dir = _hf_bert(root / "base")
  keys = hf_bert.model_overrides(hf_bert.read_hf_config(hf_dir))
  return config_lib.load(BASE, [
      *keys, "task.name=classification", "data.source=tsv", f"data.train_files={_tsv(root / 'train.tsv', 96, 0)}",
      f"data.dev_files={_tsv(root / 'dev.tsv', 16, 1)}", "data.labels=('neg','pos')", "data.seq_len=16",
      f"init.hf_path={hf_dir}", "tokenizer.kind=wordpiece", f"tokenizer.path={hf_dir}/vocab.txt",
      "model.dropout=0.1", "peft.method=lora", "peft.dropout=0.1", "peft.rank=4", "train.batch_size=8",
      "train.steps=6", "train.eval_every=0", "train.eval_batches=1", "train.progress_bar=False", "train.log_every=1",
      "checkpoint.every_steps=3", "checkpoint.async_save=False", "optim.learning_rate=1e-2",
      "optim.schedule=constant", "optim.warmup_steps=0"]), root


@pytest.fixture(scope="module")
def straight(lora_config):
  config, root = lora_config
  workdir = str(root / "straight")
  state = run.run(config, workdir)
  return workdir, jax.device_get(state.params)


def _metadata(workdir, step):
  with open(os.path.join(workdir, "checkpoints", str(step), "metadata", "metadata")) as f:
    return json.load(f)


def test_checkpoints_hold_the_trained_parameters_and_a_base_reference(lora_config, straight):
  config, _ = lora_config
  workdir, _ = straight
  meta = _metadata(workdir, 6)
  base = meta[warm_start.BASE_KEY]
  assert base["key"] == "init.hf_path" and base["source"] == os.path.abspath(config.init.hf_path)
  saved = {k[len("params/"):] for k in meta[checkpoint.CHECKSUM_KEY] if k.startswith("params/")}
  mask = train.build(config).trainable
  params = train.abstract_state(train.build(config)).params
  trained = {p for p, m in zip(peft.paths(params), jax.tree.leaves(mask)) if m}
  assert saved == trained and any(p.endswith("_lora_b") for p in saved) and "classifier/kernel" in saved


def test_stopped_and_resumed_run_ends_in_the_bits_of_a_straight_run(lora_config, straight):
  config, root = lora_config
  workdir, final = straight
  resumed = str(root / "resumed")
  run.run(config, resumed, stop_requested=lambda step: step == 3)
  assert sorted(int(s) for s in os.listdir(os.path.join(resumed, "checkpoints"))) == [3]
  state = run.run(config, resumed)
  assert _metadata(resumed, 6)[checkpoint.CHECKSUM_KEY] == _metadata(workdir, 6)[checkpoint.CHECKSUM_KEY]
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(final)):
    np.testing.assert_array_equal(a, b)


def test_eval_restores_the_base_under_the_adapters_and_refuses_a_changed_base(lora_config, straight, tmp_path):
  config, _ = lora_config
  workdir, final = straight
  setup = train.build(config)
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint, read_only=True)
  step, params = evaluation.restore_params(setup, ckpt)
  assert step == 6
  for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(final)):
    np.testing.assert_array_equal(a, b)
  # the frozen encoder is the Hugging Face checkpoint's, bit for bit
  _, encoder, _ = hf_bert.load_hf_bert(config.init.hf_path)
  np.testing.assert_array_equal(np.asarray(params["encoder"]["word_embeddings"]), encoder["word_embeddings"])

  moved = _hf_bert(tmp_path / "other", seed=1)  # the same shapes, other values
  shutil.copyfile(os.path.join(config.init.hf_path, "vocab.txt"), os.path.join(moved, "vocab.txt"))
  other = config_lib.apply_overrides(config, [f"init.hf_path={moved}"])
  with pytest.raises(warm_start.BaseMismatchError, match="init.hf_path=.*fingerprint") as err:
    evaluation.restore_params(train.build(other), ckpt)
  assert "\n" not in str(err.value)
  ckpt.close()


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def test_trained_only_checkpoint_leaves_the_frozen_bytes_out_on_disk(lora_config, tmp_path):
  config, _ = lora_config
  setup = train.build(config)
  state = train.init_state(setup, 0)
  frozen_bytes = sum(x.nbytes for x, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(setup.trainable))
                     if not m)
  sizes = {}
  for name, base in (("full", None), ("trained", {"key": "init.hf_path", "source": "x", "fingerprint": "0"})):
    ckpt = checkpoint.Checkpointer(str(tmp_path / name), config.checkpoint)
    ckpt.save(1, warm_start.saved_state(state, setup.trainable, base), None, config, {})
    ckpt.close()
    sizes[name] = _dir_bytes(tmp_path / name / "checkpoints" / "1" / "state")
  # every frozen byte is left out (with each array's own files, a few kB each at this size)
  assert sizes["full"] - sizes["trained"] >= frozen_bytes, (sizes, frozen_bytes)


def test_minilm_sst2_lora_recipe_budget(minilm):
  """all-MiniLM-L6-v2's shapes in the SST-2 recipes, nothing trained: the LoRA recipe trains <= 2% of the parameters,
  keeps <= 5% of the full fine-tune's optimiser state, and its checkpoints are <= 5% of the full run's."""
  states = {}
  for name in ("bert_sst2", "bert_sst2_lora"):
    config = config_lib.load(str(REPO / "configs" / f"{name}.py"), ["data.labels=('0','1')"])
    setup = train.build(config)
    states[name] = (setup, train.abstract_state(setup))
  full_setup, full = states["bert_sst2"]
  setup, lora = states["bert_sst2_lora"]
  total = peft.count(lora.params)
  assert peft.count(lora.params, setup.trainable) <= 0.02 * total
  assert full_setup.trainable is None and peft.count(full.params) == total - sum(
      int(np.prod(x.shape)) for p, x in zip(peft.paths(lora.params), jax.tree.leaves(lora.params))
      if peft.is_adapter(p))
  assert train.state_bytes(lora.opt_state) <= 0.05 * train.state_bytes(full.opt_state)
  saved = warm_start.saved_state(lora, setup.trainable, {"key": "init.hf_path"})
  assert train.state_bytes(saved) <= 0.05 * train.state_bytes(full)
