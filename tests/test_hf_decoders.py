"""HF GPT-2 and Llama <-> jaxlm decoders: logits against transformers' PyTorch models (random-init, built offline),
export back to directories transformers loads, the scanned layout, sharded placement and clear errors."""

import copy
import json
import os

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from jaxlm import checksums, sharding, warm_start
from jaxlm import config as config_lib
from jaxlm.hf import ConvertError, decoders, detect_family, family_module, gpt2, llama
from jaxlm.models.decoder import Decoder, DecoderConfig
from tests.conftest import REPO

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 256
BASE = str(REPO / "configs" / "base.py")


def _gpt2(activation="gelu_new", tie=True, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                                activation_function=activation, tie_word_embeddings=tie, initializer_range=0.2,
                                layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  with torch.no_grad():  # random biases and norms, so a bias or norm read wrongly shows in the logits
    for name, p in model.named_parameters():
      if name.endswith("bias") or ".ln_" in name:
        p.add_(torch.randn_like(p) * 0.2)
  return model


def _llama(kv_heads=2, tie=False, theta=10000.0, attention_bias=False, mlp_bias=False, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=kv_heads, intermediate_size=96, max_position_embeddings=64,
                                 rope_theta=theta, tie_word_embeddings=tie, initializer_range=0.2, rms_norm_eps=1e-5,
                                 attention_bias=attention_bias, mlp_bias=mlp_bias, bos_token_id=0, eos_token_id=0)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") and "gate_proj" not in name and "up_proj" not in name or "norm" in name:
        p.add_(torch.randn_like(p) * 0.2)
  return model


def _save(model, path) -> str:
  model.save_pretrained(path, safe_serialization=True)
  return str(path)


def _tokens(seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, size=(2, 24)).astype(np.int32)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens, np.int64))).logits.numpy()


def _logits(cfg, params, tokens):
  return np.asarray(jax.jit(Decoder(cfg).apply)({"params": params}, tokens))


def _round_trip(module, cfg, params, out_dir, hf_class, tokens, want):
  """Export, load with transformers, compare logits with `want`; returns the reloaded model."""
  module.save(str(out_dir), cfg, params)
  reloaded = hf_class.from_pretrained(str(out_dir)).eval()
  np.testing.assert_allclose(_hf_logits(reloaded, tokens), want, atol=1e-4)
  return reloaded


@pytest.mark.parametrize("activation,tie", [("gelu_new", True), ("gelu", False)])
def test_gpt2_parity_and_round_trip(tmp_path, activation, tie):
  model = _gpt2(activation, tie)
  cfg, params = gpt2.load(_save(model, tmp_path / "hf"))
  assert (cfg.style, cfg.hidden_act, cfg.tie_embeddings, cfg.ffn_dim, cfg.max_len) == (
      "gpt2", "gelu_tanh" if activation == "gelu_new" else "gelu", tie, 256, 32)
  tokens = _tokens()
  want = _hf_logits(model, tokens)
  np.testing.assert_allclose(_logits(cfg, params, tokens), want, atol=1e-4)
  reloaded = _round_trip(gpt2, cfg, params, tmp_path / "out", transformers.GPT2LMHeadModel, tokens, want)
  assert reloaded.config.activation_function == activation
  # the exported directory imports to the very same parameters
  cfg2, params2 = gpt2.load(str(tmp_path / "out"))
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_gpt2_model_without_head_imports_the_same_parameters(tmp_path):
  model = _gpt2()
  _, params = gpt2.load(_save(model, tmp_path / "lm"))
  _, bare = gpt2.load(_save(model.transformer, tmp_path / "bare"))  # GPT2Model: no 'transformer.' prefix
  jax.tree.map(np.testing.assert_array_equal, bare, params)


@pytest.mark.parametrize("kv_heads,tie,theta", [(2, False, 500000.0), (1, True, 10000.0), (4, False, 777.0)])
def test_llama_parity_and_round_trip(tmp_path, kv_heads, tie, theta):
  model = _llama(kv_heads, tie, theta)
  cfg, params = llama.load(_save(model, tmp_path / "hf"))
  assert (cfg.style, cfg.kv_heads, cfg.tie_embeddings, cfg.rope_theta, cfg.ffn_dim, cfg.use_bias) == (
      "llama", kv_heads, tie, theta, 96, False)
  assert ("qkv" in params["block_0"]["attn"]) == (kv_heads == 4)  # fused only without grouped-query attention
  tokens = _tokens(1)
  want = _hf_logits(model, tokens)
  np.testing.assert_allclose(_logits(cfg, params, tokens), want, atol=1e-4)
  reloaded = _round_trip(llama, cfg, params, tmp_path / "out", transformers.LlamaForCausalLM, tokens, want)
  assert reloaded.config.rope_parameters["rope_theta"] == theta
  assert reloaded.config.num_key_value_heads == kv_heads and reloaded.config.tie_word_embeddings == tie


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_llama_attention_bias(tmp_path, kv_heads):
  """A Llama with attention biases is the decoder with use_bias and a zero MLP output bias; exported back, the zero
  SwiGLU biases make it a Llama with both kinds of bias."""
  model = _llama(kv_heads, attention_bias=True)
  cfg, params = llama.load(_save(model, tmp_path / "hf"))
  assert cfg.use_bias
  np.testing.assert_array_equal(params["block_1"]["mlp"]["bo"], 0)
  tokens = _tokens(2)
  want = _hf_logits(model, tokens)
  np.testing.assert_allclose(_logits(cfg, params, tokens), want, atol=1e-4)
  reloaded = _round_trip(llama, cfg, params, tmp_path / "out", transformers.LlamaForCausalLM, tokens, want)
  assert reloaded.config.attention_bias and reloaded.config.mlp_bias
  _, params2 = llama.load(str(tmp_path / "out"))
  jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_scanned_layout(tmp_path, family):
  model = _gpt2(seed=3) if family == "gpt2" else _llama(seed=3)
  module = family_module(family)
  path = _save(model, tmp_path / "hf")
  cfg, stacked = module.load(path, scan_layers=True)
  assert cfg.scan_layers and set(stacked) >= {"blocks"} and not any(k.startswith("block_") for k in stacked)
  _, per_layer = module.load(path)
  for leaf in jax.tree.leaves(stacked["blocks"]["block"]):
    assert leaf.shape[0] == 2  # the layers axis leads
  jax.tree.map(np.testing.assert_array_equal, decoders.unstack_layers(stacked), per_layer)
  jax.tree.map(np.testing.assert_array_equal, decoders.stack_layers(per_layer), stacked)
  tokens = _tokens(3)
  want = _hf_logits(model, tokens)
  np.testing.assert_allclose(_logits(cfg, stacked, tokens), want, atol=1e-4)
  hf_class = transformers.GPT2LMHeadModel if family == "gpt2" else transformers.LlamaForCausalLM
  _round_trip(module, cfg, stacked, tmp_path / "out", hf_class, tokens, want)  # export straight from the stack


def test_llama_placed_on_a_2x2x2_mesh(tmp_path):
  """Each converted array lands on the sharding the rules give its logical axes, built shard by shard."""
  model = _llama(kv_heads=2, tie=False)
  cfg, params = llama.load(_save(model, tmp_path / "hf"))
  config = config_lib.load(BASE, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:8])
  rules = sharding.rules_from_config(config.mesh)
  placed = decoders.place(params, cfg, mesh, rules)

  # the base rules: vocab, heads, kv_heads and mlp over tensor; embed over fsdp; norms replicated
  want = {"embedding": P("tensor", "fsdp"), "lm_head": P("fsdp", "tensor"), "ln_final/scale": P(None),
          "attn/q": P("fsdp", "tensor", None), "attn/kv": P("fsdp", None, "tensor", None),
          "attn/o": P("tensor", None, "fsdp"), "mlp/wi": P("fsdp", None, "tensor"), "mlp/wo": P("tensor", "fsdp"),
          "ln_attn/scale": P(None), "ln_mlp/scale": P(None)}
  flat = {checksums.path_name(k): v for k, v in jax.tree_util.tree_leaves_with_path(placed)}
  host = {checksums.path_name(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
  assert len(flat) == 3 + 2 * 7
  for name, arr in flat.items():
    spec = want[name.split("/", 1)[1] if name.startswith("block_") else name]
    assert arr.sharding.is_equivalent_to(NamedSharding(mesh, spec), arr.ndim), (name, arr.sharding.spec)
    assert len(arr.addressable_shards) == 8
    split = np.prod(arr.shape) // np.prod(arr.addressable_shards[0].data.shape)
    assert split == (1 if spec == P(None) else 4), name  # two mesh axes of 2 split every weight matrix
    np.testing.assert_array_equal(np.asarray(arr), host[name])

  # the same through warm_start.init_from_tree onto sharded parameters, as a run starting from the checkpoint does
  shardings = sharding.shardings_for(decoders.abstract_params(cfg), mesh, rules)
  fresh = jax.tree.map(lambda a, s: jax.device_put(np.zeros_like(a), s), params, shardings)
  from_tree, report = warm_start.init_from_tree(fresh, params, source_name="llama")
  assert not report.new and not report.unused
  for a, b in zip(jax.tree.leaves(from_tree), jax.tree.leaves(placed)):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  tokens = _tokens(4)
  got = jax.jit(Decoder(cfg).apply)({"params": placed}, tokens)
  np.testing.assert_allclose(np.asarray(got), _hf_logits(model, tokens), atol=1e-4)


def test_model_overrides_rebuild_the_checkpoints_model(tmp_path):
  for module, model in ((gpt2, _gpt2(tie=False)), (llama, _llama(kv_heads=1, theta=500000.0))):
    path = _save(model, tmp_path / module.__name__)
    cfg, params = module.load(path)
    config = config_lib.load(BASE, module.model_overrides(cfg))
    assert config.model.family == "decoder"
    run_cfg = DecoderConfig.from_config(config.model)
    for name in decoders.CHECKPOINT_FIELDS:
      assert getattr(run_cfg, name) == getattr(cfg, name), name
    decoders.check_tree(params, run_cfg, path)  # the run's model has exactly the checkpoint's parameters


def test_sharded_safetensors_directory(tmp_path):
  model = _llama(seed=6)
  _, single = llama.load(_save(model, tmp_path / "single"))
  model.save_pretrained(tmp_path / "shards", max_shard_size="40KB")
  index = tmp_path / "shards" / "model.safetensors.index.json"
  assert index.is_file() and len(list((tmp_path / "shards").glob("model-*.safetensors"))) > 1
  _, sharded = llama.load(str(tmp_path / "shards"))
  jax.tree.map(np.testing.assert_array_equal, sharded, single)
  with open(index) as f:
    entries = json.load(f)
  del entries["weight_map"]["model.norm.weight"]
  with open(index, "w") as f:
    json.dump(entries, f)
  for shard in (tmp_path / "shards").glob("model-*.safetensors"):
    _edit_tensors(str(shard.parent), lambda t: t.pop("model.norm.weight", None), shard.name)
  with pytest.raises(ConvertError, match=rf"{index}: tensor 'model.norm.weight' not found"):
    llama.load(str(tmp_path / "shards"))


def test_detect_family(tmp_path):
  assert detect_family(_save(_gpt2(), tmp_path / "g")) == "gpt2"
  assert detect_family(_save(_llama(), tmp_path / "l")) == "llama"
  for model_type in ("t5", "bert"):
    (tmp_path / model_type).mkdir()
    (tmp_path / model_type / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert detect_family(str(tmp_path / model_type)) == model_type
  (tmp_path / "x").mkdir()
  (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": "mistral"}))
  with pytest.raises(ConvertError, match=r"x/config.json has model_type 'mistral'.*bert, gpt2, llama, t5"):
    detect_family(str(tmp_path / "x"))
  with pytest.raises(ConvertError, match="config.json not found"):
    detect_family(str(tmp_path / "nowhere"))


def _edit_config(path, **changes):
  file = os.path.join(path, "config.json")
  with open(file) as f:
    hf = json.load(f)
  with open(file, "w") as f:
    json.dump({**hf, **changes}, f)
  return hf


def _edit_tensors(path, edit, name="model.safetensors"):
  file = os.path.join(path, name)
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file, metadata={"format": "pt"})


def test_bad_gpt2_directories(tmp_path):
  path = _save(_gpt2(), tmp_path)
  file = os.path.join(path, "model.safetensors")
  hf = _edit_config(path, scale_attn_by_inverse_layer_idx=True)
  with pytest.raises(ConvertError, match=r"config.json: scale_attn_by_inverse_layer_idx=True is not supported"):
    gpt2.load(path)
  _edit_config(path, **{**hf, "activation_function": "relu"})
  with pytest.raises(ConvertError, match=r"config.json: activation_function 'relu' is not supported"):
    gpt2.load(path)
  _edit_config(path, **{**hf, "n_inner": 128})
  with pytest.raises(ConvertError, match=rf"{file}: tensor 'transformer.h.0.mlp.c_fc.weight' has shape \(64, 256\).*\(64, 128\)"):
    gpt2.load(path)
  _edit_config(path, **hf)
  _edit_tensors(path, lambda t: t.pop("transformer.h.1.attn.c_proj.bias"))
  with pytest.raises(ConvertError, match=rf"{file}: tensor 'transformer.h.1.attn.c_proj.bias' not found"):
    gpt2.load(path)
  with pytest.raises(ConvertError, match="model_type is 'gpt2', expected 'llama'"):
    llama.load(path)


def test_bad_llama_directories(tmp_path):
  path = _save(_llama(), tmp_path)
  file = os.path.join(path, "model.safetensors")
  hf = _edit_config(path, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
  with pytest.raises(ConvertError, match=r"config.json: rope_parameters has rope_type 'linear'"):
    llama.load(path)
  _edit_config(path, **{**hf, "rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
  with pytest.raises(ConvertError, match=r"config.json: rope_scaling has rope_type 'dynamic'"):
    llama.load(path)
  _edit_config(path, **{**hf, "hidden_act": "gelu"})
  with pytest.raises(ConvertError, match=r"config.json: hidden_act 'gelu' is not supported"):
    llama.load(path)
  _edit_config(path, **{**hf, "num_key_value_heads": 3})
  with pytest.raises(ConvertError, match=r"config.json: model.num_kv_heads=3 must divide"):
    llama.load(path)
  _edit_config(path, **{**hf, "num_key_value_heads": 4})
  with pytest.raises(ConvertError, match=rf"{file}: tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(32, 64\)"):
    llama.load(path)
  _edit_config(path, **hf)
  _edit_tensors(path, lambda t: t.pop("lm_head.weight"))
  with pytest.raises(ConvertError, match=rf"{file}: tensor 'lm_head.weight' not found"):
    llama.load(path)


def test_llama_gate_bias_the_decoder_cannot_hold(tmp_path):
  model = _llama(mlp_bias=True)
  with torch.no_grad():
    model.model.layers[1].mlp.up_proj.bias.fill_(0.5)
  path = _save(model, tmp_path)
  with pytest.raises(ConvertError, match=r"model.safetensors: tensor 'model.layers.1.mlp.up_proj.bias' is not zero"):
    llama.load(path)


def _zeros(cfg):
  return jax.tree.map(lambda s: np.zeros(s.shape, np.float32), nn.meta.unbox(decoders.abstract_params(cfg)))


def test_exports_the_family_cannot_hold_are_refused(tmp_path):
  gqa = DecoderConfig(vocab_size=VOCAB, max_len=16, num_layers=1, d_model=32, num_heads=4, num_kv_heads=2)
  with pytest.raises(ConvertError, match="GPT-2 export: model.num_kv_heads=2"):
    gpt2.save(str(tmp_path), gqa, _zeros(gqa))
  with pytest.raises(ConvertError, match="Llama export: model.style is 'gpt2'"):
    llama.save(str(tmp_path), gqa, _zeros(gqa))
  cfg = DecoderConfig(vocab_size=VOCAB, max_len=16, num_layers=1, d_model=32, num_heads=4, num_kv_heads=2,
                      style="llama")
  params = _zeros(cfg)
  params["block_0"]["attn"]["kv"] = np.zeros((32, 2, 4, 8), np.float32)  # four kv heads where cfg has two
  with pytest.raises(ConvertError, match=r"Llama export: parameter \['block_0'\]\['attn'\]\['kv'\] has shape "
                     r"\(32, 2, 4, 8\), the decoder has \(32, 2, 2, 8\)"):
    llama.save(str(tmp_path), cfg, params)
  assert not os.path.exists(tmp_path / "model.safetensors")


def test_bfloat16_checkpoint(tmp_path):
  """Most Llama checkpoints are stored in bfloat16, which safetensors' numpy reader cannot read."""
  model = _llama(kv_heads=2)
  with torch.no_grad():  # the reference: float32 with bfloat16-rounded weights (its RoPE frequencies stay float32)
    for p in model.parameters():
      p.copy_(p.to(torch.bfloat16).float())
  path = _save(copy.deepcopy(model).to(torch.bfloat16), tmp_path)
  assert load_file(os.path.join(path, "model.safetensors"))["lm_head.weight"].dtype == ml_dtypes.bfloat16
  cfg, params = llama.load(path)
  assert params["embedding"].dtype == np.float32
  np.testing.assert_array_equal(params["block_1"]["mlp"]["wo"], model.model.layers[1].mlp.down_proj.weight.detach().T)
  tokens = _tokens(5)
  np.testing.assert_allclose(_logits(cfg, params, tokens), _hf_logits(model, tokens), atol=1e-4)
