"""LoRA and freezing: adapters against a direct computation and against the base model, merged weights, what trains
through the real train step, optimiser-state bytes, adapter sharding, trained-only checkpoints (resume, size, base
fingerprint) and the errors of bad keys."""

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import memory, peft, train
from jaxlm.models import layers
from jaxlm.models.decoder import Decoder, DecoderConfig
from jaxlm.models.encdec import EncDec, EncDecConfig
from jaxlm.models.encoder import EncoderConfig, dummy_inputs
from jaxlm.models.heads import SequenceClassifier
from tests.conftest import BASE, PLAIN_ADAM, REPO, TINY_ENCODER, sampled_batches, train_steps

SPEC = layers.LoraSpec(rank=4, alpha=8.0, targets="")  # '' is found in every path: every projection adapted
CLASSIFY = ["task.name=classification", *TINY_ENCODER, "model.d_ff=64", "task.head_dropout=0.0",
            "data.labels=('neg','pos','neutral')", "train.batch_size=16", *PLAIN_ADAM]


def _randomise_adapters(params, seed=0, std=0.05):
  """Every adapter leaf random (B too): the adapted model then differs from its base."""
  rng = np.random.default_rng(seed)
  return peft.map_paths(lambda p, x: jnp.asarray(rng.normal(0, std, np.shape(x)), jnp.float32)
                        if peft.is_adapter(p) else x, nn.meta.unbox(params))


def _models():
  """(name, base model, its inputs) of every family, tiny."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
  gpt2 = DecoderConfig(vocab_size=64, max_len=16, num_layers=2, d_model=32, num_heads=4, style="gpt2")
  llama = DecoderConfig(vocab_size=64, max_len=16, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                        style="llama", tie_embeddings=False, use_bias=False)
  scanned = dataclasses.replace(llama, scan_layers=True, remat="full")
  encoder = EncoderConfig(vocab_size=64, max_len=16, num_layers=2, d_model=32, num_heads=4, d_ff=64, dropout=0.0)
  t5 = EncDecConfig(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=64, num_encoder_layers=2,
                    num_decoder_layers=2, style="t5_v1_1", tie_embeddings=False, dropout=0.0)
  inputs = dummy_inputs(2, 8)
  inputs["input_ids"] = np.asarray(tokens)
  return [("gpt2", Decoder(gpt2), (tokens,)), ("llama", Decoder(llama), (tokens,)),
          ("llama_scan", Decoder(scanned), (tokens,)),
          ("encoder", SequenceClassifier(encoder, 3, 0.0), tuple(inputs.values())),
          ("t5", EncDec(t5), (tokens, tokens))]


@pytest.mark.parametrize("name,model,inputs", _models(), ids=[m[0] for m in _models()])
def test_zero_b_is_the_base_model_and_merged_weights_are_the_adapter_path(name, model, inputs):
  adapted = peft.with_lora(model, SPEC)
  params = nn.meta.unbox(adapted.init(jax.random.key(1), *inputs)["params"])
  assert peft.has_adapters(params) and all(
      not np.any(x) for p, x in zip(peft.paths(params), jax.tree.leaves(params)) if p.endswith("_lora_b"))
  base = peft.strip_adapters(params)
  # parameter names of the model are unchanged: the adapters are new leaves beside them
  assert set(peft.paths(base)) == set(peft.paths(nn.meta.unbox(model.init(jax.random.key(1), *inputs)["params"])))
  out = lambda m, p: np.asarray(jax.tree.leaves(m.apply({"params": p}, *inputs))[0])
  np.testing.assert_array_equal(out(adapted, params), out(model, base))  # B = 0: exactly the base model

  trained = _randomise_adapters(params)
  with_adapters = out(adapted, trained)
  base_out = out(model, base)
  assert np.max(np.abs(with_adapters - base_out)) > 0.05 * np.max(np.abs(base_out))  # the adapters now matter
  # float32 rounding of two summation orders: bounded relative to the logits' size
  scale = float(np.max(np.abs(with_adapters)))
  np.testing.assert_allclose(out(model, peft.merge_adapters(trained, SPEC)), with_adapters, atol=2e-5 * scale, rtol=0)


class _Projection(nn.Module):
  equation: str
  shape: tuple
  axes: tuple
  lora: layers.LoraSpec

  @nn.compact
  def __call__(self, x):
    return layers.project(self, "w", self.equation, x, nn.initializers.normal(1.0), self.shape, self.axes,
                          jnp.float32, self.lora)


@pytest.mark.parametrize("equation,x_shape,w_shape", [
    ("btd,dche->btche", (2, 3, 8), (8, 3, 2, 4)),  # fused q|k|v
    ("bthe,hed->btd", (2, 3, 2, 4), (2, 4, 8)),  # attention output: two input axes
    ("btd,dcf->btcf", (2, 3, 8), (8, 2, 6)),  # SwiGLU gate|up
])
def test_adapter_output_is_x_w_plus_scaled_x_a_b(equation, x_shape, w_shape):
  spec = layers.LoraSpec(rank=3, alpha=5.0, targets="w")
  x = np.random.default_rng(0).normal(size=x_shape).astype(np.float32)
  module = _Projection(equation, w_shape, ("embed",) * len(w_shape), spec)
  params = _randomise_adapters(module.init(jax.random.key(0), x)["params"], std=0.3)
  w, a, b = (np.asarray(params[k], np.float64) for k in ("w", "w_lora_a", "w_lora_b"))
  n_in = len(w_shape) - (b.ndim - 1)  # the weight is [inputs..., outputs...]
  assert a.shape == (*w_shape[:n_in], 3) and b.shape == (3, *w_shape[n_in:])
  x64 = x.astype(np.float64)
  xa = np.tensordot(x64, a, axes=n_in)  # contracts x's last n_in axes with A's inputs
  expected = np.tensordot(x64, w, axes=n_in) + spec.scale * np.tensordot(xa, b, axes=1)
  np.testing.assert_allclose(np.asarray(module.apply({"params": params}, x)), expected, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("equation,x_shape,w_shape", [
    ("btd,dche->btche", (2, 3, 8), (8, 3, 2, 4)),
    ("bthe,hed->btd", (2, 3, 2, 4), (2, 4, 8)),
    ("btd,dcf->btcf", (2, 3, 8), (8, 2, 6)),
])
def test_adapter_gradients_are_those_of_x_w_plus_scaled_x_a_b(equation, x_shape, w_shape):
  """The adapted projection's own backward pass (layers._merged_lora) against the gradients of the unmerged sum
  written out in float64 numpy, for a loss sum(c * y) with random c: x, W (when it trains), A and B."""
  spec = layers.LoraSpec(rank=3, alpha=5.0, targets="w")
  rng = np.random.default_rng(1)
  x = rng.normal(size=x_shape).astype(np.float32)
  module = _Projection(equation, w_shape, ("embed",) * len(w_shape), spec)
  params = _randomise_adapters(module.init(jax.random.key(0), x)["params"], std=0.3)
  y_shape = jax.eval_shape(lambda p: module.apply({"params": p}, x), params).shape
  c = rng.normal(size=y_shape).astype(np.float32)
  loss = lambda p, x: jnp.sum(jnp.asarray(c) * module.apply({"params": p}, x))
  grads, dx = jax.grad(loss, argnums=(0, 1))(params, x)

  w, a, b = (np.asarray(params[k], np.float64) for k in ("w", "w_lora_a", "w_lora_b"))
  n_in = len(w_shape) - (b.ndim - 1)
  n_rest = len(x_shape) - n_in
  x64, c64 = x.astype(np.float64), c.astype(np.float64)
  xa = np.tensordot(x64, a, axes=n_in)  # [rest..., r]
  g_xa = np.tensordot(c64, b, axes=(list(range(n_rest, c64.ndim)), list(range(1, b.ndim))))  # [rest..., r]
  rest_axes = list(range(n_rest))
  expected = {
      "w": np.tensordot(x64, c64, axes=(rest_axes, rest_axes)),
      "w_lora_a": spec.scale * np.tensordot(x64, g_xa, axes=(rest_axes, rest_axes)),
      "w_lora_b": spec.scale * np.tensordot(xa, c64, axes=(rest_axes, rest_axes)),
  }
  merged = w + spec.scale * np.tensordot(a, b, axes=1)
  expected_dx = np.tensordot(c64, merged, axes=(list(range(n_rest, c64.ndim)), list(range(n_in, w.ndim))))
  for name, want in expected.items():
    np.testing.assert_allclose(np.asarray(grads[name]), want, rtol=1e-4, atol=1e-4, err_msg=name)
  np.testing.assert_allclose(np.asarray(dx), expected_dx, rtol=1e-4, atol=1e-4)


def test_adapter_gradients_with_the_weight_stored_outputs_first():
  """A weight stored [outputs, inputs] ('btd,fd->btf'), which the backward pass does not take as matrices: its
  gradients against float64 numpy einsums of the unmerged sum x W^T + scale (x A) B."""
  spec = layers.LoraSpec(rank=3, alpha=5.0, targets="w")
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 3, 8)).astype(np.float32)
  module = _Projection("btd,fd->btf", (6, 8), ("embed", "embed"), spec)
  params = _randomise_adapters(module.init(jax.random.key(0), x)["params"], std=0.3)
  c = rng.normal(size=(2, 3, 6)).astype(np.float32)
  grads, dx = jax.grad(lambda p, x: jnp.sum(jnp.asarray(c) * module.apply({"params": p}, x)), (0, 1))(params, x)
  w, a, b = (np.asarray(params[k], np.float64) for k in ("w", "w_lora_a", "w_lora_b"))  # [f, d], [d, r], [r, f]
  x64, c64 = x.astype(np.float64), c.astype(np.float64)
  xa, g_xa = np.einsum("btd,dr->btr", x64, a), np.einsum("btf,rf->btr", c64, b)
  expected = {"w": np.einsum("btd,btf->fd", x64, c64), "w_lora_a": spec.scale * np.einsum("btd,btr->dr", x64, g_xa),
              "w_lora_b": spec.scale * np.einsum("btr,btf->rf", xa, c64)}
  for name, want in expected.items():
    np.testing.assert_allclose(np.asarray(grads[name]), want, rtol=1e-4, atol=1e-4, err_msg=name)
  merged = w + spec.scale * np.einsum("dr,rf->fd", a, b)
  np.testing.assert_allclose(np.asarray(dx), np.einsum("btf,fd->btd", c64, merged), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("equation,x_shape,w_shape", [("btd,df->btf", (4, 16, 32), (32, 96)),
                                                      ("bthe,hed->btd", (4, 16, 4, 8), (4, 8, 48))])
def test_adapter_gradients_contract_one_token_axis(equation, x_shape, w_shape):
  """The adapter's gradients (the weight frozen, as in LoRA training) contract [B, T] merged into one axis, as
  layers.einsum's weight gradient: the compiled gradient holds no copy of x, x A or the output gradient with the
  tokens last (XLA:CPU's copies when B and T were contracted apart)."""
  spec = layers.LoraSpec(rank=4, alpha=8.0, targets="w")
  x = jax.random.normal(jax.random.key(1), x_shape)
  module = _Projection(equation, w_shape, ("embed",) * len(w_shape), spec)
  params = _randomise_adapters(module.init(jax.random.key(0), x)["params"], std=0.3)
  adapters = {k: v for k, v in params.items() if k != "w"}
  loss = lambda ad, x: jnp.sum(jnp.tanh(module.apply({"params": {"w": params["w"], **ad}}, x)))
  hlo = jax.jit(jax.grad(loss, (0, 1))).lower(adapters, x).compile().as_text()
  inputs, outputs = x_shape[2:], w_shape[len(x_shape) - 2:]
  copies = [line for line in hlo.splitlines() if re.search(r"= \S+ (copy|transpose)\(|copy\w*_fusion\(", line)]
  shapes = [f"= f32[{','.join(map(str, axes))},{tokens}]" for tokens in ("64", "4,16")
            for axes in (inputs, (math.prod(inputs),), (spec.rank,), outputs, (math.prod(outputs),))]
  transposed = [line.strip()[:120] for line in copies if any(shape in line for shape in shapes)]
  assert not transposed, transposed


def _config(*extra):
  return config_lib.load(BASE, CLASSIFY + list(extra))


def _toy(n=128):
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 256, size=(n, 16)).astype(np.int32)
  labels = (ids[:, 1] % 3).astype(np.int32)
  return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": np.ones_like(ids),
          "labels": labels, "example_weights": np.ones((n,), np.float32)}


def _changed(config, steps=3):
  """{path: whether the real train step changed it} after `steps` steps from the config's fresh state."""
  before = jax.device_get(train.init_state(train.build(config), config.train.seed).params)
  state, _ = train_steps(config, sampled_batches(_toy(), 16), steps)
  after = jax.device_get(state.params)
  return {p: not np.array_equal(x, y) for p, x, y in zip(peft.paths(before), jax.tree.leaves(before),
                                                       jax.tree.leaves(after))}, state


def test_lora_trains_adapters_and_head_only_and_keeps_no_optimiser_state_for_the_rest():
  lora = _config("peft.method=lora", "optim.learning_rate=1e-2")
  changed, state = _changed(lora)
  for path, moved in changed.items():
    assert moved == (peft.is_adapter(path) or path.startswith("classifier/")), path

  full_state = train.init_state(train.build(_config()), 0)
  mask = train.build(lora).trainable
  trained_bytes = sum(x.nbytes for x, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(mask)) if m)
  # AdamW keeps two float32 moments per trained parameter, and scalar step counters
  counters = sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if x.ndim == 0)
  assert train.state_bytes(state.opt_state) == 2 * trained_bytes + counters
  full_counters = sum(x.nbytes for x in jax.tree.leaves(full_state.opt_state) if x.ndim == 0)
  assert train.state_bytes(full_state.opt_state) == 2 * train.state_bytes(full_state.params) + full_counters
  assert train.state_bytes(state.opt_state) < 0.5 * train.state_bytes(full_state.opt_state)


def test_freezing_regexes_without_lora():
  probe, _ = _changed(_config("optim.trainable=^classifier/", "optim.learning_rate=1e-2"))
  assert {p for p, moved in probe.items() if moved} == {"classifier/bias", "classifier/kernel"}
  lower, _ = _changed(_config("optim.frozen=embeddings|blocks_0/", "optim.learning_rate=1e-2"), steps=2)
  for path, moved in lower.items():
    assert moved == ("embeddings" not in path and "blocks_0/" not in path), path
  # with LoRA, optim.trainable adds to the adapters and the head
  extra, _ = _changed(_config("peft.method=lora", "optim.trainable=ln_embed", "optim.learning_rate=1e-2"), steps=2)
  assert extra["encoder/ln_embed/scale"] and not extra["encoder/blocks_0/attn/qkv"] and extra["classifier/kernel"]


def test_frozen_parameters_in_bfloat16():
  setup = train.build(_config("peft.method=lora", "model.frozen_dtype=bfloat16"))
  state = train.abstract_state(setup)
  for path, x, m in zip(peft.paths(state.params), jax.tree.leaves(state.params), jax.tree.leaves(setup.trainable)):
    assert x.dtype == (jnp.float32 if m else jnp.bfloat16), path


@pytest.mark.parametrize("override,words", [
    ("peft.targets=attn/(qkv", ["peft.targets", "not a regular expression"]),
    ("peft.targets=nothing_here", ["peft.targets", "encoder/blocks_0/attn/qkv"]),
    ("optim.trainable=nothing_here", ["optim.trainable", "matches no parameter path", "encoder/"]),
    ("optim.frozen=.", ["nothing left to train"]),
    ("peft.rank=0", ["peft.rank"]),
])
def test_bad_regexes_and_peft_keys_give_one_line_errors(override, words):
  extra = ["peft.method=lora"] if override.startswith("peft.") else []
  with pytest.raises(config_lib.ConfigError) as err:
    train.build(_config(*extra, override))
  message = str(err.value)
  assert "\n" not in message and all(w in message for w in words), message


def test_adapters_shard_like_their_weights_on_a_2x2x2_mesh():
  setup = train.build(config_lib.load(BASE, [
      "peft.method=lora", "model.num_heads=4", "model.d_model=32", "model.vocab_size=64", "model.style=llama",
      "model.num_kv_heads=2", "model.use_bias=False", "model.tie_embeddings=False", "mesh.data=2", "mesh.fsdp=2",
      "mesh.tensor=2", "peft.targets=attn|mlp|lm_head"]))
  specs = {p: s.spec for p, s in zip(peft.paths(setup.state_shardings.params),
                                     jax.tree.leaves(setup.state_shardings.params))}
  checked = 0
  for path, spec in specs.items():
    if not path.endswith("_lora_a"):
      continue
    weight = path[: -len("_lora_a")]
    w, a, b = specs[weight], spec, specs[weight + "_lora_b"]
    n_in = len(a) - 1
    assert tuple(a) == (*tuple(w)[:n_in], None) and tuple(b) == (None, *tuple(w)[n_in:]), (path, w, a, b)
    checked += 1
  assert checked == 2 * 5 + 1  # q, kv, o, wi, wo in each layer, and lm_head
  assert any(s is not None for s in specs["block_0/attn/q_lora_a"])
  assert "tensor" in tuple(specs["block_0/attn/q_lora_b"])


def test_llama_7b_with_lora_fits_one_141gb_device_in_bfloat16_and_the_full_fine_tune_does_not():
  config = config_lib.load(str(REPO / "configs" / "llama_7b.py"), [
      "peft.method=lora", "model.frozen_dtype=bfloat16", "optim.grad_accum_steps=64"])
  est = memory.estimate(config, 1)
  full = memory.estimate(memory.full_fine_tune(config), 1)
  m, r = config.model, config.peft.rank
  d, f, n = m.d_model, m.d_ff, m.num_layers
  # rank-r adapters on q|k|v, o, gate|up and down of every layer: r * (inputs + outputs) each
  trained = n * r * ((d + 3 * d) + (d + d) + (d + 2 * f) + (f + d))
  assert est["trained_count"] == trained
  assert full["trained_count"] == full["param_count"] == est["param_count"] - trained
  b = est["bytes_per_device"]
  assert b["params"] == 2 * (est["param_count"] - trained) + 4 * trained  # frozen in bfloat16, adapters in float32
  assert b["gradients"] == 2 * 4 * trained  # float32, and the accumulation's running sum
  assert 0 <= b["optimizer"] - 2 * 4 * trained <= 16  # two moments, and step counters
  gib = 141e9 / memory.GIB  # one 141 GB accelerator (H200)
  assert b["total"] / memory.GIB < gib < full["bytes_per_device"]["total"] / memory.GIB
  text = memory.format_comparison(est, full, gib)
  assert text.splitlines()[-1].split()[-4:] == ["fits", "does", "NOT", "fit"]
