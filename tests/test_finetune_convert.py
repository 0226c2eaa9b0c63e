"""`jaxlm convert --hf DIR --workdir OUT`: a random small BertModel (saved here, nothing downloaded) becomes a jaxlm
workdir whose checkpoint reproduces transformers' hidden states and starts a fine-tuning task's encoder."""

import json

import jax
import numpy as np
import pytest

from jaxlm import checkpoint, checksums, cli, train, warm_start
from jaxlm import config as config_lib
from jaxlm import workdir as workdir_lib
from jaxlm.models.encoder import Encoder, EncoderConfig
from tests.conftest import REPO
from tests.test_convert import _batch, _small_hf_config, _torch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _hf_dir(tmp_path):
  torch.manual_seed(0)
  model = transformers.BertModel(_small_hf_config()).eval()
  model.save_pretrained(tmp_path / "hf", safe_serialization=True)
  (tmp_path / "hf" / "vocab.txt").write_text("".join(f"{w}\n" for w in SPECIAL + [f"w{i}" for i in range(251)]))
  return model, str(tmp_path / "hf")


def test_convert_workdir_reproduces_transformers_and_starts_fine_tuning(tmp_path):
  hf_model, hf_dir = _hf_dir(tmp_path)
  out = tmp_path / "converted"
  cli.main(["convert", "--hf", hf_dir, "--workdir", str(out), "--config.train.batch_size=8"])

  config = workdir_lib.read_config(str(out))
  assert config.tokenizer.kind == "wordpiece" and (out / "vocab.txt").read_text() == open(f"{hf_dir}/vocab.txt").read()
  assert config.tokenizer.lowercase  # no upper-case piece in this vocabulary
  setup = train.build(config)
  ckpt = checkpoint.Checkpointer(str(out), config.checkpoint, read_only=True)
  params = ckpt.restore_params(ckpt.latest_step(), train.abstract_state(setup).params)
  ckpt.close()

  ids, types, mask = _batch(256)
  encoder = Encoder(EncoderConfig.from_config(config.model))
  hidden, _ = encoder.apply({"params": jax.device_get(params["encoder"])}, ids, types, mask)
  with torch.no_grad():
    expected = hf_model(*_torch(ids), token_type_ids=_torch(types)[0],
                        attention_mask=_torch(mask)[0]).last_hidden_state.numpy()
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(hidden)[real], expected[real], atol=2e-4, rtol=1e-3)

  # a NER task of the same shape starts from the workdir: the encoder is loaded, only the head is new
  model_keys = {k: v for k, v in json.loads((out / "config.json").read_text())["model"].items()}
  ner = config_lib.load(str(REPO / "configs" / "base.py"), [
      "task.name=ner", "data.labels=('O','B-X','I-X')", "train.batch_size=8", f"init.checkpoint_dir={out}",
      *(f"model.{k}={v}" for k, v in model_keys.items() if k in ("family", "vocab_size", "max_len", "num_layers",
                                                                "d_model", "num_heads", "d_ff", "norm_eps"))])
  ner_setup = train.build(ner)
  state = train.init_state(ner_setup, 0)
  loaded, report = warm_start.init_from_checkpoint(state.params, str(out))
  assert report.loaded and all(k.startswith("encoder/") for k in report.loaded)
  assert report.new and all(not k.startswith("encoder/") for k in report.new)
  flat = lambda tree: {checksums.path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}  # noqa: E731
  converted = flat({"encoder": params["encoder"]})
  started = flat(loaded)
  for key in report.loaded:
    np.testing.assert_array_equal(np.asarray(started[key]), np.asarray(converted[key]))
