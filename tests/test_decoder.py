"""Decoder model behaviour: shapes, causality, packed-segment isolation, KV-cache decoding, options."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import generation
from jaxlm.models import layers
from jaxlm.models.decoder import Decoder, DecoderConfig


def _cfg(style, **kw):
  base = dict(vocab_size=97, max_len=32, num_layers=2, d_model=32, num_heads=4, style=style)
  if style == "llama":
    base.update(num_kv_heads=2, tie_embeddings=False, use_bias=False)
  base.update(kw)
  return DecoderConfig(**base)


STYLES = ["gpt2", "llama"]


def _init(cfg, b=2, t=16):
  model = Decoder(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t)), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
  return model, params, tokens


def _decode(model):
  """One jitted KV-cache step of `model` (whole programs compile faster here than op-by-op dispatch)."""
  return jax.jit(lambda variables, *args: model.apply(variables, *args, decode=True, mutable=["cache"]))


@pytest.mark.parametrize("style", STYLES)
def test_shapes_and_dtype(style):
  model, params, tokens = _init(_cfg(style))
  logits = jax.jit(model.apply)({"params": params}, tokens)
  assert logits.shape == (2, 16, 97) and logits.dtype == jnp.float32
  bf16 = Decoder(_cfg(style, dtype="bfloat16"))
  out = jax.jit(bf16.apply)({"params": params}, tokens)
  assert out.dtype == jnp.float32  # logits come back in float32 for the loss
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  np.testing.assert_allclose(out, logits, atol=0.1)  # bf16 compute stays close to float32


@pytest.mark.parametrize("style", STYLES)
def test_causality(style):
  model, params, tokens = _init(_cfg(style))
  apply = jax.jit(model.apply)
  base = apply({"params": params}, tokens)
  t = 9
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % 97)
  out = apply({"params": params}, changed)
  np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
  assert not np.allclose(out[:, t:], base[:, t:])


@pytest.mark.parametrize("style", STYLES)
def test_packed_segments_are_isolated(style):
  """A document's logits inside a pack equal its logits alone, whatever its neighbours are."""
  cfg = _cfg(style)
  model = Decoder(cfg)
  rng = np.random.default_rng(1)
  doc = rng.integers(0, 97, 6)
  alone = jnp.asarray(doc[None], jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), alone)["params"]
  apply = jax.jit(model.apply)
  ref = apply({"params": params}, alone)[0]
  for left_len in (3, 7):
    left, right = rng.integers(0, 97, left_len), rng.integers(0, 97, 5)
    tokens = np.concatenate([left, doc, right])[None]
    seg = np.concatenate([np.full(left_len, 1), np.full(6, 2), np.full(5, 3)])[None]
    pos = np.concatenate([np.arange(left_len), np.arange(6), np.arange(5)])[None]
    out = apply({"params": params}, jnp.asarray(tokens, jnp.int32), jnp.asarray(pos), jnp.asarray(seg))[0]
    np.testing.assert_allclose(out[left_len:left_len + 6], ref, atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_blocked_attention_equals_the_xla_path(dtype):
  """Blocked causal attention against jax.nn.dot_product_attention's XLA path, outputs and gradients: grouped-query
  heads, two packed documents and padding in one row, and a length that is not a multiple of the block."""
  rng = np.random.default_rng(3)
  b, t, h, kh, e = 2, 40, 4, 2, 8
  q = jnp.asarray(rng.standard_normal((b, t, h, e)), dtype)
  k, v = (jnp.asarray(rng.standard_normal((b, t, kh, e)), dtype) for _ in range(2))
  seg = np.ones((b, t), np.int32)
  seg[1, 17:33], seg[1, 33:] = 2, 0  # a second document, then padding
  pos = np.stack([np.arange(t), np.concatenate([np.arange(17), np.arange(16), np.arange(7)])])
  mask = layers.attention_mask(jnp.asarray(seg), jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(pos))
  w = jnp.asarray(rng.standard_normal((b, t, h, e)), jnp.float32)
  ref_fn = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla") * w)
  new_fn = lambda q, k, v: jnp.sum(layers.blocked_causal_attention(q, k, v, mask, block=16) * w)
  out = layers.blocked_causal_attention(q, k, v, mask, block=16)
  ref = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  assert out.dtype == dtype and out.shape == ref.shape
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol)
  for g, g_ref in zip(jax.grad(new_fn, (0, 1, 2))(q, k, v), jax.grad(ref_fn, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), atol=5 * tol)


def test_blocked_attention_products_batch_over_rows_and_kv_heads_only():
  """Every product of blocked attention and of its gradient is a four-axis batched dot [B, K, rows, ·]: with a
  separate size-G query-head axis (five axes) XLA:CPU took about a third longer for the forward and backward pass."""
  b, t, h, kh, e = 2, 40, 4, 2, 8
  q, w = jnp.ones((b, t, h, e)), jnp.ones((b, t, h, e))
  k = v = jnp.ones((b, t, kh, e))
  pos, seg = jnp.arange(t)[None].repeat(b, 0), jnp.ones((b, t), jnp.int32)
  mask = layers.attention_mask(seg, seg, pos, pos)
  loss = lambda q, k, v: jnp.sum(layers.blocked_causal_attention(q, k, v, mask, block=16) * w)
  dots = [eq for eq in jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(q, k, v).jaxpr.eqns
          if eq.primitive.name == "dot_general"]
  assert len(dots) == 3 * 6  # 3 blocks x (2 forward products + 4 for their gradients)
  for eq in dots:
    (_, _), (lhs_batch, rhs_batch) = eq.params["dimension_numbers"]
    assert [v.aval.ndim for v in eq.invars] == [4, 4] and len(lhs_batch) == len(rhs_batch) == 2, eq


@pytest.mark.parametrize("style", STYLES)
def test_blocked_attention_model_equals_xla_attention(style):
  """model.attention='blocked' is the same function as 'xla' (loss and every gradient), and decoding with it keeps
  the KV-cache path."""
  model, params, tokens = _init(_cfg(style), t=16)
  blocked = Decoder(_cfg(style, attention="blocked"))
  loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, tokens) ** 2)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss(model)))(params)
  new_loss, new_grads = jax.jit(jax.value_and_grad(loss(blocked)))(params)
  np.testing.assert_allclose(new_loss, ref_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(new_grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  cache = blocked.init(jax.random.key(0), tokens[:, :1], decode=True)["cache"]
  pos = jnp.broadcast_to(jnp.arange(4), (2, 4))
  logits, _ = _decode(blocked)({"params": params, "cache": cache}, tokens[:, :4], pos, jnp.ones((2, 4), jnp.int32))
  np.testing.assert_allclose(logits, jax.jit(model.apply)({"params": params}, tokens)[:, :4], atol=2e-5)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decoding_matches_full_forward(style, scan):
  cfg = _cfg(style, scan_layers=scan)
  model, params, tokens = _init(cfg, b=2, t=12)
  full = jax.jit(model.apply)({"params": params}, tokens)
  cache = model.init(jax.random.key(0), tokens[:, :1], decode=True)["cache"]
  p = 5
  pos = jnp.broadcast_to(jnp.arange(p), (2, p))
  decode = _decode(model)
  logits, v = decode({"params": params, "cache": cache}, tokens[:, :p], pos, jnp.ones((2, p), jnp.int32))
  np.testing.assert_allclose(logits, full[:, :p], atol=2e-5)
  cache = v["cache"]
  for i in range(p, 12):
    logits, v = decode({"params": params, "cache": cache}, tokens[:, i:i + 1], jnp.full((2, 1), i),
                       jnp.ones((2, 1), jnp.int32))
    cache = v["cache"]
    np.testing.assert_allclose(logits[:, 0], full[:, i], atol=2e-5)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_and_scan_keep_the_function(remat):
  cfg = _cfg("gpt2")
  model, params, tokens = _init(cfg)
  ref_grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, tokens).sum()))(params)
  remat_model = Decoder(_cfg("gpt2", remat=remat))
  grads = jax.jit(jax.grad(lambda p: remat_model.apply({"params": p}, tokens).sum()))(params)
  for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  scan_model = Decoder(_cfg("gpt2", scan_layers=True, remat=remat))
  scan_params = scan_model.init(jax.random.key(0), tokens)["params"]
  assert scan_params["blocks"]["block"]["mlp"]["wi"].value.shape[0] == 2  # layers stacked on a leading axis
  assert scan_params["blocks"]["block"]["mlp"]["wi"].names[0] == "layers"


@pytest.mark.parametrize("equation,x_shape,w_shape", [("bthe,hed->btd", (2, 3, 4, 5), (4, 5, 6)),
                                                      ("btd,dche->btche", (2, 3, 6), (6, 3, 4, 5)),
                                                      ("...d,de->...e", (2, 3, 6), (6, 7))])
def test_weight_major_einsum_is_the_einsum_and_contracts_in_the_weights_order(equation, x_shape, w_shape):
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=x_shape).astype(np.float32), rng.normal(size=w_shape).astype(np.float32)
  np.testing.assert_allclose(layers.einsum(equation, x, w), np.einsum(equation, x, w), rtol=1e-5, atol=1e-5)
  (eqn,) = _dots(jax.make_jaxpr(lambda x, w: layers.einsum(equation, x, w))(x, w).jaxpr)
  (x_axes, w_axes), _ = eqn.params["dimension_numbers"]
  assert list(w_axes) == sorted(w_axes) and list(x_axes) == sorted(x_axes)


def _dots(jaxpr):
  """The dot_general equations of a jaxpr, looking inside the calls it makes (a custom_vjp's forward)."""
  found = []
  for eqn in jaxpr.eqns:
    found += [eqn] if eqn.primitive.name == "dot_general" else []
    for value in eqn.params.values():
      inner = getattr(value, "jaxpr", value)
      if hasattr(inner, "eqns"):
        found += _dots(inner)
  return found


@pytest.mark.parametrize("equation,x_shape,w_shape", [("btd,df->btf", (4, 16, 32), (32, 96)),
                                                      ("bthe,hed->btd", (4, 16, 4, 8), (4, 8, 48)),
                                                      ("btd,dche->btche", (4, 16, 32), (32, 3, 4, 8)),
                                                      ("btd,vd->btv", (4, 16, 32), (96, 32))])
def test_projection_gradients_contract_one_token_axis(equation, x_shape, w_shape):
  """layers.einsum's weight gradient merges [B, T] into one axis: the gradients equal autodiff of jnp.einsum, and
  the compiled gradient holds no copy of the [tokens, outputs] gradient transposed (XLA:CPU's copy when B and T were
  contracted apart)."""
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  g = jax.random.normal(kg, jnp.einsum(equation, x, w).shape)
  ours = jax.grad(lambda x, w: jnp.sum(jnp.tanh(layers.einsum(equation, x, w)) * g), (0, 1))
  want = jax.grad(lambda x, w: jnp.sum(jnp.tanh(jnp.einsum(equation, x, w)) * g), (0, 1))(x, w)
  for a, b in zip(ours(x, w), want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  tokens, outputs = 64, math.prod(g.shape[2:])
  hlo = jax.jit(ours).lower(x, w).compile().as_text()
  out_axes = ",".join(map(str, g.shape[2:]))
  transposed = re.findall(rf"f32\[{outputs},{tokens}\]", hlo) + re.findall(rf"f32\[{out_axes},4,16\]", hlo)
  assert not transposed, transposed


def test_the_training_step_transposes_no_attention_output():
  """The attention output [B, T, H, E] meets the o weight [H, E, D] in (H, E) order: the compiled gradient holds no
  copy of either with E before H (jnp.einsum's alphabetical (e, h) contraction order made XLA transpose both)."""
  cfg = _cfg("gpt2", num_heads=4, d_model=32)  # H 4, E 8, D 32; B 2, T 16
  model, params, tokens = _init(cfg)
  hlo = jax.jit(jax.grad(lambda p: model.apply({"params": p}, tokens).sum())).lower(params).compile().as_text()
  transposed = [line for line in hlo.splitlines() if re.search(r"= f32\[(2,16,|32,)?8,4(,32)?\]", line)]
  assert transposed == [], transposed[:5]


@pytest.mark.parametrize("style", STYLES)
def test_a_decoding_step_copies_no_cache(style):
  """One decoding step of 6 rows (beam search's shape: each row its own write index) writes its keys/values into the
  cache and attends over it without a copy of any layer's cache: in the [rows, B, S, K, E] layout XLA:CPU copied
  every layer's keys, transposed, at every token (~30% of a beam search at batch 8 of the GPT-2-sized model)."""
  cfg = _cfg(style, max_len=24)
  model, params, _ = _init(cfg)
  decoding = generation.decoder_decoding(model)
  cache = decoding.init_cache(params, 6)
  tokens, positions = jnp.ones((6, 1), jnp.int32), jnp.arange(6, dtype=jnp.int32)[:, None] + 3
  # the cache donated, as a search's loop carries it: the update may then write in place
  hlo = jax.jit(decoding.step, donate_argnums=1).lower(params, cache, tokens, positions).compile().as_text()
  per_layer = 6 * cfg.kv_heads * cfg.dim_per_head * 24  # one layer's keys (or values), all rows
  copies = [line for line in hlo.splitlines()
            if re.match(r"\s*(ROOT )?%[a-z_]*(copy|transpose)[a-z_.0-9]* = f32\[([0-9,]+)\]", line)
            and np.prod([int(n) for n in re.search(r"= f32\[([0-9,]+)\]", line).group(1).split(",")]) == per_layer]
  assert copies == [], copies[:3]
  logits, _ = decoding.step(params, cache, tokens, positions)
  assert logits.shape == (6, 1, cfg.vocab_size)


def test_bad_hyperparameters_are_named():
  with pytest.raises(ValueError, match="num_kv_heads"):
    _cfg("llama", num_kv_heads=3)
  with pytest.raises(ValueError, match="model.style"):
    _cfg("bert")
