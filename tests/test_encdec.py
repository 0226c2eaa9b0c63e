"""T5 encoder-decoder behaviour: shapes and bf16, decoder causality, encoder padding, packed pairs, KV-cache decoding,
scan/remat, sharded == single device, and the config keys that build it."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxlm import config as config_lib
from jaxlm import sharding
from jaxlm.hf.t5 import stack_layers
from jaxlm.models.encdec import EncDec, EncDecConfig, init_cache
from tests.conftest import REPO

BASE = str(REPO / "configs" / "base.py")
STYLES = ["t5", "t5_v1_1"]
V = 96  # divisible by the tensor axis, so the embedding's vocab dimension really is split on a 2x2x2 mesh


def _cfg(style="t5", **kw):
  # 8 buckets up to distance 20: the sequences below reach the log-spaced buckets and the saturated last one
  base = {"vocab_size": V, "d_model": 32, "num_heads": 4, "head_dim": 8, "d_ff": 64, "num_encoder_layers": 2,
          "num_decoder_layers": 2, "style": style, "relative_attention_num_buckets": 8,
          "relative_attention_max_distance": 20, "dropout": 0.0}
  return EncDecConfig(**{**base, **kw})


def _tokens(rng, b, n):
  return jnp.asarray(rng.integers(2, V, (b, n)), jnp.int32)


def _params(cfg, seed=0):
  """Per-layer parameters of EncDec(cfg) drawn in numpy (Flax's init compiles one XLA program per parameter, which
  costs seconds here): weights N(0, 1/fan_in), embeddings N(0, 1), norm scales near 1."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(EncDec(dataclasses.replace(cfg, scan_layers=False)).init(
      jax.random.key(0), tokens, tokens)["params"]))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      return 1 + 0.1 * rng.standard_normal(leaf.shape, np.float32)
    fan_in = 1 if name in ("token_embedding", "embedding") else leaf.shape[0] * (leaf.shape[1] if name == "o" else 1)
    return rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _apply(model):
  return jax.jit(lambda p, *args: model.apply({"params": p}, *args))


@pytest.mark.parametrize("style", STYLES)
def test_shapes_dtypes_dropout_and_bf16(style):
  cfg = _cfg(style)
  model = EncDec(cfg)
  rng = np.random.default_rng(0)
  enc, dec = _tokens(rng, 2, 24), _tokens(rng, 2, 20)
  params = _params(cfg)
  assert ("lm_head" in params["decoder"]) == (style == "t5_v1_1")  # tied by default only in the original style
  encoded = jax.eval_shape(lambda p, e: model.apply({"params": p}, e, method=EncDec.encode), params, enc)
  logits = _apply(model)(params, enc, dec)
  assert encoded.shape == (2, 24, 32) and logits.shape == (2, 20, V) and logits.dtype == jnp.float32

  # dropout acts only when asked, and follows the dropout rng
  drop = EncDec(_cfg(style, dropout=0.3))
  run = jax.jit(lambda p, key: drop.apply({"params": p}, enc, dec, deterministic=False, rngs={"dropout": key}))
  a, b = run(params, jax.random.key(1)), run(params, jax.random.key(2))
  assert not np.allclose(a, logits) and not np.allclose(a, b)
  np.testing.assert_array_equal(_apply(drop)(params, enc, dec), logits)

  # bf16 compute, float32 parameters and logits: within 3% of the logits' range of the float32 result
  out = _apply(EncDec(_cfg(style, dtype="bfloat16")))(params, enc, dec)
  assert out.dtype == jnp.float32
  assert np.max(np.abs(out - logits)) <= 0.03 * np.max(np.abs(logits))


def test_init_follows_t5():
  """Flax's init: float32 parameters with logical axis names, stddevs by T5's rule (the query's folds in 1/sqrt(E))."""
  cfg = _cfg("t5_v1_1", d_model=64, num_encoder_layers=1, num_decoder_layers=1, init_factor=2.0)
  tokens = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.jit(lambda: EncDec(cfg).init(jax.random.key(0), tokens, tokens)["params"])()
  params = nn.meta.unbox(boxed)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert boxed["encoder"]["layers_0"]["attn"]["q"].names == ("embed", "heads", "head_dim")
  assert boxed["encoder"]["relpos_bias"]["embedding"].names == (None, "heads")
  d, e, h, f = 64, 8, 4, 64
  attn, mlp = params["decoder"]["layers_0"]["cross_attn"], params["encoder"]["layers_0"]["mlp"]
  for value, std in [(params["token_embedding"], 1.0), (params["decoder"]["lm_head"], 1.0), (attn["q"], (d * e) ** -0.5),
                     (attn["k"], d ** -0.5), (attn["o"], (h * e) ** -0.5), (mlp["wi_0"], d ** -0.5), (mlp["wo"], f ** -0.5),
                     (params["decoder"]["relpos_bias"]["embedding"], d ** -0.5)]:
    np.testing.assert_allclose(np.std(value), cfg.init_factor * std, rtol=0.25)
  np.testing.assert_array_equal(params["encoder"]["ln_final"]["scale"], np.ones(d))


@pytest.mark.parametrize("style", STYLES)
def test_decoder_is_causal(style):
  cfg = _cfg(style)
  rng = np.random.default_rng(1)
  enc, dec = _tokens(rng, 2, 24), _tokens(rng, 2, 20)
  params, run = _params(cfg), _apply(EncDec(cfg))
  base = run(params, enc, dec)
  t = 9
  out = run(params, enc, dec.at[:, t].set((dec[:, t] + 1) % V))
  np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-6)
  assert not np.allclose(out[:, t:], base[:, t:], atol=1e-3)


def test_encoder_padding_does_not_reach_real_positions():
  cfg = _cfg("t5_v1_1")
  model = EncDec(cfg)
  rng = np.random.default_rng(2)
  enc, dec = _tokens(rng, 2, 15), _tokens(rng, 2, 20)
  params, run = _params(cfg), _apply(model)
  encode = jax.jit(lambda p, *args: model.apply({"params": p}, *args, method=EncDec.encode))
  padded = jnp.concatenate([enc, _tokens(rng, 2, 9)], axis=1)  # whatever sits in the padding
  seg = jnp.asarray([[1] * 15 + [0] * 9] * 2, jnp.int32)
  np.testing.assert_allclose(encode(params, padded, seg)[:, :15], encode(params, enc), atol=1e-5)
  np.testing.assert_allclose(run(params, padded, dec, seg), run(params, enc, dec), atol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_packed_pairs_equal_each_alone(style):
  """Two (input, target) pairs packed in one row, with per-segment positions, give each pair's logits alone."""
  cfg = _cfg(style)
  rng = np.random.default_rng(3)
  params, run = _params(cfg), _apply(EncDec(cfg))
  pairs = [(_tokens(rng, 1, 11), _tokens(rng, 1, 9)), (_tokens(rng, 1, 13), _tokens(rng, 1, 8))]

  def pack(parts, length):
    tokens, seg, pos = rng.integers(2, V, length), np.zeros(length, np.int32), np.zeros(length, np.int32)
    start = 0  # after the pairs comes padding (segment 0) holding arbitrary tokens
    for i, p in enumerate(parts):
      n = p.shape[1]
      tokens[start:start + n], seg[start:start + n], pos[start:start + n] = p[0], i + 1, np.arange(n)
      start += n
    return [jnp.asarray(a[None], jnp.int32) for a in (tokens, seg, pos)]

  (enc, enc_seg, enc_pos), (dec, dec_seg, dec_pos) = pack([e for e, _ in pairs], 24), pack([d for _, d in pairs], 20)
  out = run(params, enc, dec, enc_seg, dec_seg, enc_pos, dec_pos)[0]
  for (e, d), start in zip(pairs, (0, 9)):
    alone = run(params, jnp.pad(e, ((0, 0), (0, 24 - e.shape[1]))), jnp.pad(d, ((0, 0), (0, 20 - d.shape[1]))),
                (jnp.arange(24) < e.shape[1]).astype(jnp.int32)[None])[0]  # padded to the same shapes: one compile
    np.testing.assert_allclose(out[start:start + d.shape[1]], alone[:d.shape[1]], atol=2e-5)


@pytest.mark.parametrize("style,scan", [("t5", False), ("t5_v1_1", True)])
def test_kv_cache_decoding_matches_full_decoder(style, scan):
  """Token-by-token decoding from the cache equals the full decoder at every position; steps never see `encoded`."""
  cfg = _cfg(style, scan_layers=scan)
  model = EncDec(cfg)
  rng = np.random.default_rng(4)
  b, s, t = 2, 24, 20
  enc, dec = _tokens(rng, b, s), _tokens(rng, b, t)
  enc_seg = jnp.asarray([[1] * s, [1] * 17 + [0] * 7], jnp.int32)  # the second row's input is padded
  params = _params(cfg)
  params = stack_layers(params, cfg) if scan else params
  encoded = jax.jit(lambda p: model.apply({"params": p}, enc, enc_seg, method=EncDec.encode))(params)
  full = jax.jit(lambda p: model.apply({"params": p}, encoded, enc_seg, dec, method=EncDec.decode))(params)

  cache = init_cache(model, params, encoded, enc_seg, t)  # the cross-attention keys/values, computed once
  assert int(cache["decoder"]["index"]) == 0 and not np.any(cache["decoder"]["segment_ids"])
  step = jax.jit(lambda cache, tokens: model.apply({"params": params, "cache": cache}, None, None, tokens,
                                                   decode=True, method=EncDec.decode, mutable=["cache"]))
  logits, v = step(cache, dec[:, :3])  # a prefix of 3 tokens in one call, then one token per call
  np.testing.assert_allclose(logits, full[:, :3], atol=2e-5)
  cache = v["cache"]
  for i in range(3, t):
    logits, v = step(cache, dec[:, i:i + 1])
    cache = v["cache"]
    np.testing.assert_allclose(logits[:, 0], full[:, i], atol=2e-5, err_msg=f"position {i}")
  assert int(cache["decoder"]["index"]) == t


def test_scan_and_remat_keep_the_function():
  """Values and gradients of the plain model, remat=full, and scan_layers with remat=dots (stacked weights)."""
  cfg = _cfg("t5_v1_1")
  rng = np.random.default_rng(5)
  enc, dec = _tokens(rng, 2, 24), _tokens(rng, 2, 20)
  params = _params(cfg)

  def value_and_grad(c, p):
    m = EncDec(c)
    return jax.jit(jax.value_and_grad(lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, enc, dec)))))(p)

  ref_value, ref_grads = value_and_grad(cfg, params)
  scan_cfg = _cfg("t5_v1_1", scan_layers=True, remat="dots")
  for c, p, to_layout in [(_cfg("t5_v1_1", remat="full"), params, lambda g: g),
                          (scan_cfg, stack_layers(params, cfg), lambda g: stack_layers(g, cfg))]:
    value, grads = value_and_grad(c, p)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(to_layout(ref_grads)), jax.tree.leaves(grads)):
      np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5 * np.max(np.abs(x)))
  # the scanned model's own init stacks each parameter on a leading 'layers' axis, as stack_layers lays them out
  tokens = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda: EncDec(scan_cfg).init(jax.random.key(0), tokens, tokens)["params"])
  assert boxed["decoder"]["layers"]["self_attn"]["q"].names == ("layers", "embed", "heads", "head_dim")
  assert jax.tree.map(np.shape, nn.meta.unbox(boxed)) == jax.tree.map(np.shape, stack_layers(params, cfg))


def _loss(model, params, batch):
  logits = model.apply({"params": params}, batch["enc"], batch["dec"], batch["enc_seg"], batch["dec_seg"],
                       batch["enc_pos"], batch["dec_pos"])
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], axis=-1)[..., 0]
  weights = (batch["dec_seg"] > 0).astype(jnp.float32)
  return jnp.sum(nll * weights) / jnp.sum(weights)


@pytest.mark.parametrize("scan", [False, True])
def test_loss_on_2x2x2_mesh_equals_one_device(scan):
  cfg = _cfg("t5_v1_1", scan_layers=scan)
  model = EncDec(cfg)
  rng = np.random.default_rng(6)
  b, s, t = len(jax.devices()), 16, 12
  half_s, half_t = s // 2, t // 2
  batch = {"enc": _tokens(rng, b, s), "dec": _tokens(rng, b, t), "targets": _tokens(rng, b, t),
           # two packed pairs per row, the second pair's target half padded
           "enc_seg": jnp.asarray(np.repeat([[1] * half_s + [2] * half_s], b, 0), jnp.int32),
           "dec_seg": jnp.asarray(np.repeat([[1] * half_t + [2] * (half_t - 2) + [0] * 2], b, 0), jnp.int32),
           "enc_pos": jnp.asarray(np.tile(np.r_[np.arange(half_s), np.arange(half_s)], (b, 1)), jnp.int32),
           "dec_pos": jnp.asarray(np.tile(np.r_[np.arange(half_t), np.arange(half_t)], (b, 1)), jnp.int32)}
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(6), batch["enc"], batch["dec"]))["params"]
  params = stack_layers(_params(cfg), cfg) if scan else _params(cfg)

  losses = {}
  for shape in [(1, 1, 1), (2, 2, 2)]:
    c = config_lib.load(BASE, [f"mesh.data={shape[0]}", f"mesh.fsdp={shape[1]}", f"mesh.tensor={shape[2]}"])
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:int(np.prod(shape))])
    rules = sharding.rules_from_config(c.mesh)
    param_shardings = sharding.shardings_for(boxed, mesh, rules)
    if shape == (2, 2, 2):  # the parameters really are split over the mesh
      assert param_shardings["token_embedding"].spec == P("tensor", "fsdp")
      attn = param_shardings["decoder"]["layers" if scan else "layers_0"]["cross_attn"]["q"].spec
      assert attn == (P(None, "fsdp", "tensor", None) if scan else P("fsdp", "tensor", None))
    placed = jax.device_put(params, param_shardings)
    placed_batch = jax.device_put(batch, sharding.batch_sharding(mesh, rules))
    losses[shape] = float(jax.jit(lambda p, x: _loss(model, p, x))(placed, placed_batch))
  assert np.isfinite(losses[(1, 1, 1)])
  np.testing.assert_allclose(losses[(2, 2, 2)], losses[(1, 1, 1)], rtol=1e-5)


def test_config_from_model_keys_and_named_errors():
  c = config_lib.load(BASE, ["model.family=encoder_decoder", "model.style=t5_v1_1", "model.tie_embeddings=False",
                             "model.num_layers=3", "model.num_decoder_layers=2", "model.d_model=48",
                             "model.num_heads=4", "model.relative_attention_num_buckets=16"])
  cfg = EncDecConfig.from_config(c.model)
  assert (cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.head_dim, cfg.d_ff) == (3, 2, 12, 192)
  assert (cfg.style, cfg.tied, cfg.relative_attention_num_buckets, cfg.mlp_dropout) == ("t5_v1_1", False, 16, True)
  assert not EncDecConfig.from_config(config_lib.load(BASE, ["model.family=encoder_decoder", "model.style=t5",
                                                             "model.mlp_dropout=False"]).model).mlp_dropout
  c.model.num_decoder_layers = 0
  assert EncDecConfig.from_config(c.model).num_decoder_layers == 3  # 0 = model.num_layers

  with pytest.raises(ValueError, match="model.family=encoder_decoder"):
    EncDecConfig.from_config(config_lib.load(BASE).model)
  with pytest.raises(ValueError, match="model.style"):
    c.model.style = "gpt2"
    EncDecConfig.from_config(c.model)
  with pytest.raises(ValueError, match="model.num_kv_heads"):
    c.model.style, c.model.num_kv_heads = "t5", 2
    EncDecConfig.from_config(c.model)
  with pytest.raises(ValueError, match="model.relative_attention_max_distance"):
    _cfg(relative_attention_num_buckets=32, relative_attention_max_distance=16)
  with pytest.raises(ValueError, match="model.remat"):
    _cfg(remat="some")
  with pytest.raises(ValueError, match="model.num_decoder_layers"):
    _cfg(num_decoder_layers=0)
