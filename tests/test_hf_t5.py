"""HF T5 format: parity with transformers' T5ForConditionalGeneration (random small models of both styles, tied and
untied), scanned and per-layer layouts, export that transformers loads back, run overrides, and bad directories."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxlm import config as config_lib
from jaxlm.hf import t5 as hf_t5
from jaxlm.hf.io import ConvertError
from jaxlm.models.encdec import EncDec, EncDecConfig, relative_position_bucket
from tests.conftest import REPO

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# name -> (feed_forward_proj, tie_word_embeddings, whether lm_head gets weights of its own)
VARIANTS = {
    "t5": ("relu", True, False),  # the original: one embedding, outputs scaled by d_model**-0.5
    "t5_v1_1": ("gated-gelu", False, True),  # as published: its own lm_head, no scaling
    # what transformers 5 builds from a gated-gelu config by itself: weights tied, outputs not scaled
    "tied_unscaled": ("gated-gelu", False, False),
    "scaled_own_head": ("relu", True, True),  # scaled outputs through a separate lm_head
}
B, S, T, V = 2, 24, 20, 100


def _hf_model(directory, variant, **kw):
  proj, tie, own_head = VARIANTS[variant]
  torch.manual_seed(0)
  # 8 buckets up to distance 20 on sequences of 24: exact, log-spaced and saturated buckets all occur
  args = {"vocab_size": V, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 3,
          "num_heads": 4, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 20,
          "feed_forward_proj": proj, "tie_word_embeddings": tie, "dropout_rate": 0.0, "attn_implementation": "eager"}
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(**{**args, **kw})).eval()
  if own_head:
    model.lm_head.weight = torch.nn.Parameter(torch.randn(V, 32))
  model.save_pretrained(directory, safe_serialization=True)
  return model, str(directory)


def _inputs(padding: bool):
  rng = np.random.default_rng(0)
  enc, dec = rng.integers(2, V, (B, S)), rng.integers(2, V, (B, T))
  mask = np.ones((B, S), np.int64)
  if padding:
    mask[1, 17:] = 0
  return enc, dec, mask


def _hf_logits(model, enc, dec, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(mask),
                 decoder_input_ids=torch.tensor(dec)).logits.numpy()


def _logits(cfg, params, enc, dec, mask):
  run = jax.jit(lambda p, e, d, m: EncDec(cfg).apply({"params": p}, e, d, encoder_segment_ids=m))
  return np.asarray(run(params, *(jnp.asarray(a, jnp.int32) for a in (enc, dec, mask))))


def test_relative_position_bucket_matches_transformers():
  attention = transformers.models.t5.modeling_t5.T5Attention
  relative = np.arange(-400, 401)
  for bidirectional in (True, False):
    for buckets, distance in [(32, 128), (8, 20), (16, 32), (64, 256), (32, 64)]:
      want = attention._relative_position_bucket(torch.tensor(relative), bidirectional, buckets, distance).numpy()
      got = relative_position_bucket(jnp.asarray(relative), bidirectional, buckets, distance)
      np.testing.assert_array_equal(got, want, err_msg=f"{bidirectional=} {buckets=} {distance=}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
  hf_model, path = _hf_model(tmp_path, variant)
  cfg, params = hf_t5.load(path)
  proj = VARIANTS[variant][0]
  assert cfg.style == hf_t5.HF_STYLES[proj]
  assert (cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.d_model, cfg.head_dim, cfg.d_ff) == (2, 3, 32, 8, 64)
  assert cfg.tied == (variant == "t5") and ("lm_head" in params["decoder"]) == (variant != "t5")
  for padding in (False, True):
    enc, dec, mask = _inputs(padding)
    want = _hf_logits(hf_model, enc, dec, mask)
    np.testing.assert_allclose(_logits(cfg, params, enc, dec, mask), want, atol=1e-4, err_msg=f"{padding=}")


def test_scanned_layout_gives_the_same_logits(tmp_path):
  hf_model, path = _hf_model(tmp_path, "t5_v1_1")
  cfg, params = hf_t5.load(path)
  scan_cfg, scan_params = hf_t5.load(path, scan_layers=True)
  assert scan_cfg.scan_layers and scan_params["decoder"]["layers"]["cross_attn"]["q"].shape == (3, 32, 4, 8)
  enc, dec, mask = _inputs(padding=True)
  scanned = _logits(scan_cfg, scan_params, enc, dec, mask)
  np.testing.assert_allclose(scanned, _logits(cfg, params, enc, dec, mask), atol=1e-5)
  np.testing.assert_allclose(scanned, _hf_logits(hf_model, enc, dec, mask), atol=1e-4)
  assert jax.tree.map(np.shape, hf_t5.unstack_layers(scan_params, cfg)) == jax.tree.map(np.shape, params)


@pytest.mark.parametrize("variant,scan", [("t5", False), ("t5_v1_1", True), ("scaled_own_head", False)])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, variant, scan):
  hf_model, path = _hf_model(tmp_path / "in", variant)
  cfg, params = hf_t5.load(path, scan_layers=scan)
  out = str(tmp_path / "out")
  hf_t5.save(out, cfg, jax.device_put(params))  # device arrays, scanned or not, are written the same
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
  enc, dec, mask = _inputs(padding=True)
  np.testing.assert_allclose(_hf_logits(reloaded, enc, dec, mask), _hf_logits(hf_model, enc, dec, mask), atol=1e-4)
  again_cfg, again = hf_t5.load(out, scan_layers=scan)
  assert again_cfg == cfg
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_model_overrides_rebuild_the_checkpoint_config(tmp_path):
  for variant in ("t5", "t5_v1_1"):
    _, path = _hf_model(tmp_path / variant, variant, layer_norm_epsilon=1e-5, relative_attention_num_buckets=16)
    cfg = hf_t5.read_hf_config(path)
    run_cfg = config_lib.load(str(REPO / "configs" / "base.py"), hf_t5.model_overrides(cfg))
    rebuilt = EncDecConfig.from_config(run_cfg.model)
    for field in hf_t5.CHECKPOINT_KEYS:
      assert getattr(rebuilt, field) == getattr(cfg, field), field
    assert rebuilt.tied == cfg.tied == (variant == "t5")


def _rewrite(path, config=None, drop=(), reshape=()):
  tensors = load_file(os.path.join(path, "model.safetensors"))
  for name in drop:
    del tensors[name]
  for name in reshape:
    tensors[name] = tensors[name][:-1]
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  if config:
    with open(os.path.join(path, "config.json")) as f:
      hf = json.load(f)
    hf.update(config)
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump({k: v for k, v in hf.items() if v is not None}, f)


def test_bad_directories_name_the_file_and_tensor(tmp_path):
  _, path = _hf_model(tmp_path / "ok", "t5_v1_1")
  weights = os.path.join(path, "model.safetensors")
  name = "decoder.block.1.layer.1.EncDecAttention.k.weight"
  _rewrite(path, drop=[name])
  with pytest.raises(ConvertError, match=f"{weights}: tensor '{name}' not found"):
    hf_t5.load(path)

  _, path = _hf_model(tmp_path / "shape", "t5_v1_1")
  name = "encoder.block.0.layer.1.DenseReluDense.wi_1.weight"
  _rewrite(path, reshape=[name])
  with pytest.raises(ConvertError, match=rf"{path}/model.safetensors: tensor '{name}' has shape \(63, 32\)"):
    hf_t5.load(path)

  config_json = os.path.join(path, "config.json")
  _rewrite(path, config={"model_type": "bart"})
  with pytest.raises(ConvertError, match=f"{config_json}: model_type is 'bart'"):
    hf_t5.load(path)
  _rewrite(path, config={"model_type": "t5", "feed_forward_proj": "gated-silu"})
  with pytest.raises(ConvertError, match=f"{config_json}: feed_forward_proj 'gated-silu' is not supported"):
    hf_t5.load(path)
  _rewrite(path, config={"feed_forward_proj": "gated-gelu", "d_kv": None})
  with pytest.raises(ConvertError, match=f"{config_json} has no 'd_kv' entry"):
    hf_t5.load(path)
