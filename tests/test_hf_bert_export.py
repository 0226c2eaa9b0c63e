"""jaxlm BERT -> Hugging Face: exported directories load in transformers and compute what the jaxlm model and the
original checkpoint compute (random-init BERTs built offline)."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from jaxlm.hf import ConvertError, bert
from jaxlm.models.encoder import Encoder
from jaxlm.models.heads import PreTrainingModel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 128


def _bert(cls, seed, **kw):
  torch.manual_seed(seed)
  args = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 64, "max_position_embeddings": 32, "initializer_range": 0.2,
          "attn_implementation": "eager"}
  model = cls(transformers.BertConfig(**{**args, **kw})).eval()
  with torch.no_grad():  # random biases and norms, so one read or written wrongly shows in the outputs
    for name, p in model.named_parameters():
      if name.endswith("bias") or "LayerNorm" in name:
        p.add_(torch.randn_like(p) * 0.2)
  return model


def _save(model, directory: pathlib.Path) -> str:
  model.save_pretrained(directory, safe_serialization=True)
  (directory / "vocab.txt").write_text("".join(f"[unused{i}]\n" for i in range(VOCAB)))
  return str(directory)


def _batch(seed=0):
  """Two sentence pairs; the second row ends in padding."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, VOCAB, size=(2, 12)).astype(np.int32)
  types = np.zeros_like(ids)
  types[:, 7:] = 1
  mask = np.ones_like(ids)
  mask[1, 9:] = 0
  ids[1, 9:] = 0
  types[1, 9:] = 0
  return ids, types, mask


def _run(model, ids, types, mask):
  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long), token_type_ids=torch.tensor(types, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long))


def _export(cfg, params, out: pathlib.Path, src: str) -> str:
  bert.save(str(out), cfg, params)
  (out / "vocab.txt").write_bytes(pathlib.Path(src, "vocab.txt").read_bytes())  # the caller's part
  return str(out)


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_pretraining_round_trip(tmp_path, act):
  original = _bert(transformers.BertForPreTraining, 0, hidden_act=act)
  src = _save(original, tmp_path / "hf")
  cfg, params = bert.load(src)
  assert set(params) == {"encoder", "mlm_transform", "mlm_norm", "mlm_bias", "nsp_head"}
  out = _export(cfg, params, tmp_path / "out", src)
  with open(os.path.join(out, "config.json")) as f:
    hf = json.load(f)
  assert hf["architectures"] == ["BertForPreTraining"] and hf["hidden_act"] == act

  batch = _batch()
  want = _run(original, *batch)
  got = _run(transformers.BertForPreTraining.from_pretrained(out, attn_implementation="eager").eval(), *batch)
  np.testing.assert_allclose(got.prediction_logits.numpy(), want.prediction_logits.numpy(), atol=1e-4)
  np.testing.assert_allclose(got.seq_relationship_logits.numpy(), want.seq_relationship_logits.numpy(), atol=1e-4)
  # jaxlm's own model with these parameters computes the same
  mlm, nsp = PreTrainingModel(cfg, nsp=True).apply({"params": params}, *batch)
  np.testing.assert_allclose(mlm, got.prediction_logits.numpy(), atol=1e-4)
  np.testing.assert_allclose(nsp, got.seq_relationship_logits.numpy(), atol=1e-4)
  # and the exported directory imports to the very same parameters
  cfg2, params2 = bert.load(out)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_bert_model_round_trip(tmp_path):
  original = _bert(transformers.BertModel, 1)
  src = _save(original, tmp_path / "hf")
  cfg, params = bert.load(src)
  assert set(params) == {"encoder"}
  out = _export(cfg, params["encoder"], tmp_path / "out", src)  # a bare Encoder tree
  batch = _batch(1)
  want = _run(original, *batch)
  got = _run(transformers.BertModel.from_pretrained(out, attn_implementation="eager").eval(), *batch)
  real = batch[2].astype(bool)
  np.testing.assert_allclose(got.last_hidden_state.numpy()[real], want.last_hidden_state.numpy()[real], atol=1e-4)
  np.testing.assert_allclose(got.pooler_output.numpy(), want.pooler_output.numpy(), atol=1e-4)
  hidden, pooled = Encoder(cfg).apply({"params": params["encoder"]}, *batch)
  np.testing.assert_allclose(np.asarray(hidden)[real], got.last_hidden_state.numpy()[real], atol=1e-4)
  np.testing.assert_allclose(pooled, got.pooler_output.numpy(), atol=1e-4)


def test_mlm_only_model_exports_as_masked_lm(tmp_path):
  """A PreTrainingModel without NSP (task head 'mlm') becomes BertForMaskedLM, which has no pooler."""
  src = _save(_bert(transformers.BertForPreTraining, 2), tmp_path / "hf")
  cfg, params = bert.load(src)
  del params["nsp_head"]
  out = _export(cfg, params, tmp_path / "out", src)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["architectures"] == ["BertForMaskedLM"]
  batch = _batch(2)
  got = _run(transformers.BertForMaskedLM.from_pretrained(out, attn_implementation="eager").eval(), *batch)
  mlm, _ = PreTrainingModel(cfg, nsp=False).apply({"params": params}, *batch)
  np.testing.assert_allclose(mlm, got.logits.numpy(), atol=1e-4)


def test_device_arrays_export_like_host_arrays(tmp_path):
  src = _save(_bert(transformers.BertModel, 3), tmp_path / "hf")
  cfg, params = bert.load(src)
  _, host = bert.hf_tensors(cfg, params["encoder"])
  architecture, device = bert.hf_tensors(cfg, jax.device_put(params["encoder"]))
  assert architecture == "BertModel" and host.keys() == device.keys()
  for k in host:
    np.testing.assert_array_equal(device[k], host[k])


def test_trees_that_are_not_the_model_are_refused(tmp_path):
  src = _save(_bert(transformers.BertModel, 4), tmp_path / "hf")
  cfg, params = bert.load(src)
  encoder = params["encoder"]
  wi = encoder["blocks_1"]["mlp"]["wi"]
  encoder["blocks_1"]["mlp"]["wi"] = np.zeros((32, 48), np.float32)
  with pytest.raises(ConvertError, match=r"BERT export: parameter \['blocks_1'\]\['mlp'\]\['wi'\] has shape \(32, 48\), "
                     r"the model has \(32, 64\)"):
    bert.save(str(tmp_path / "out"), cfg, encoder)
  encoder["blocks_1"]["mlp"]["wi"] = wi
  del encoder["pooler"]
  with pytest.raises(ConvertError, match=r"parameter \['pooler'\] has shape None"):
    bert.save(str(tmp_path / "out"), cfg, encoder)
  assert not (tmp_path / "out").exists()
