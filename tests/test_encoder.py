"""BERT encoder: sharded training equals one device, parameter PartitionSpecs, padding and packed-row isolation."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm import config as config_lib
from jaxlm import sharding
from jaxlm.models import encoder as encoder_lib
from jaxlm.models.encoder import Encoder, EncoderConfig, dummy_inputs
from jaxlm.tasks import make_task
from tests.conftest import REPO

BASE = str(REPO / "configs" / "base.py")
TINY = ["task.name=mlm_nsp", "model.family=encoder", "model.vocab_size=256", "model.max_len=32", "model.num_layers=2",
        "model.d_model=32", "model.num_heads=4", "model.d_ff=64", "model.dropout=0.1", "train.batch_size=8"]


def _config(mesh=(1, 1, 1), extra=()):
  return config_lib.load(BASE, TINY + [f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}", f"mesh.tensor={mesh[2]}",
                                       *extra])


def _batch(seed, b=8, length=32, vocab=256):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, size=(b, length)).astype(np.int32)
  lengths = rng.integers(length // 2, length + 1, size=b)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  types = ((np.arange(length)[None] >= lengths[:, None] // 2) & (mask > 0)).astype(np.int32)
  mlm_weights = ((rng.random((b, length)) < 0.3) & (mask > 0)).astype(np.float32)
  return {"input_ids": np.where(mlm_weights > 0, 4, ids * mask), "token_type_ids": types, "attention_mask": mask,
          "mlm_targets": ids, "mlm_weights": mlm_weights, "nsp_labels": rng.integers(0, 2, size=b).astype(np.int32),
          "example_weights": np.ones((b,), np.float32)}


def _setup(config):
  """Params born sharded: eval_shape -> shardings from the logical names -> jit(init, out_shardings)."""
  task = make_task(config)
  n = int(np.prod([config.mesh.data, config.mesh.fsdp, config.mesh.tensor]))
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:n])
  rules = sharding.rules_from_config(config.mesh)
  dummy = task.dummy_batch(config.train.batch_size, 32)
  abstract = jax.eval_shape(task.init_params, jax.random.key(0), dummy)
  shardings = sharding.shardings_for(abstract, mesh, rules)
  params = jax.jit(lambda r: nn.meta.unbox(task.init_params(r, dummy)), out_shardings=shardings)(jax.random.key(0))
  batch_shardings = {k: sharding.batch_sharding(mesh, rules, v.ndim) for k, v in dummy.items()}
  return task, params, shardings, batch_shardings


def _losses(mesh, steps=2, extra=()):
  config = _config(mesh, extra)
  task, params, shardings, batch_shardings = _setup(config)
  tx = optax.adam(1e-2)
  replicated = NamedSharding(jax.tree.leaves(shardings)[0].mesh, P())
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), shardings,
                                        transform_non_params=lambda _: replicated)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)

  # outputs pinned to the inputs' shardings: otherwise the second call sees equal shardings spelled differently
  # (P(None,) against P()) and compiles the step again
  @functools.partial(jax.jit, out_shardings=(shardings, opt_shardings, None))
  def step(params, opt_state, batch, i):
    (loss, _), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(params, batch, jax.random.key(i), True)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for i in range(steps):
    batch = {k: jax.device_put(v, batch_shardings[k]) for k, v in _batch(0).items()}
    params, opt_state, loss = step(params, opt_state, batch, i)
    losses.append(float(loss))
  # the parameters stay where the rules put them
  assert all(jax.tree.leaves(jax.tree.map(lambda p, s: p.sharding.is_equivalent_to(s, p.ndim), params, shardings)))
  return np.array(losses)


def test_sharded_losses_equal_single_device():
  # dropout on the hidden states and on the attention probabilities (which does something:
  # test_attention_dropout_only_in_training_and_never_through_padding): the same noise on any mesh
  noisy = ["model.attention_dropout=0.1"]
  base = _losses((1, 1, 1), extra=noisy)
  assert np.all(np.isfinite(base)) and base[-1] < base[0]
  # (8, 1, 1), plain data parallel, is the decoder tests' (test_sharding.py)
  np.testing.assert_allclose(_losses((1, 1, 8), extra=noisy), base, rtol=1e-5, err_msg="mesh (1, 1, 8)")
  np.testing.assert_allclose(_losses((2, 2, 2), extra=noisy), base, rtol=1e-5, err_msg="mesh (2, 2, 2)")


def test_partition_specs_on_2x2x2():
  _, params, shardings, _ = _setup(_config((2, 2, 2)))
  specs = {jax.tree_util.keystr(k): s.spec for k, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  enc = "['encoder']"
  assert specs[f"{enc}['word_embeddings']"] == P("tensor", "fsdp")
  assert specs[f"{enc}['position_embeddings']"] == P(None, "fsdp")
  assert specs[f"{enc}['type_embeddings']"] == P(None, "fsdp")
  assert specs[f"{enc}['blocks_0']['attn']['qkv']"] == P("fsdp", None, "tensor", None)
  assert specs[f"{enc}['blocks_0']['attn']['qkv_bias']"] == P(None, "tensor", None)
  assert specs[f"{enc}['blocks_1']['attn']['o']"] == P("tensor", None, "fsdp")
  assert specs[f"{enc}['blocks_0']['mlp']['wi']"] == P("fsdp", "tensor")
  assert specs[f"{enc}['blocks_0']['mlp']['wo']"] == P("tensor", "fsdp")
  assert specs[f"{enc}['blocks_0']['ln_attn']['scale']"] == P(None)
  assert specs[f"{enc}['pooler']"] == P("fsdp", None)
  assert specs["['mlm_bias']"] == P("tensor")
  assert specs["['mlm_transform']['kernel']"] == P("fsdp", None)
  # and the live arrays really are laid out that way
  qkv = params["encoder"]["blocks_0"]["attn"]["qkv"]
  assert qkv.sharding.spec == P("fsdp", None, "tensor", None)
  assert qkv.addressable_shards[0].data.shape == (16, 3, 2, 8)


def _encoder():
  cfg = EncoderConfig(vocab_size=64, max_len=32, num_layers=2, d_model=32, num_heads=4, dropout=0.0)
  model = Encoder(cfg)
  return jax.jit(model.apply), model.init(jax.random.key(1), **dummy_inputs(1, 8))


def test_padding_does_not_change_real_tokens():
  apply, variables = _encoder()
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 64, size=(1, 10)).astype(np.int32)
  types = np.array([[0] * 5 + [1] * 5], np.int32)
  hidden, pooled = apply(variables, ids, types, np.ones_like(ids))
  padded = np.concatenate([ids, rng.integers(1, 64, size=(1, 6)).astype(np.int32)], 1)
  padded_types = np.concatenate([types, np.ones((1, 6), np.int32)], 1)
  mask = np.concatenate([np.ones((1, 10)), np.zeros((1, 6))], 1).astype(np.int32)
  hidden_p, pooled_p = apply(variables, padded, padded_types, mask)
  np.testing.assert_allclose(hidden_p[:, :10], hidden, atol=1e-5)
  np.testing.assert_allclose(pooled_p, pooled, atol=1e-5)
  # without the mask the padding does leak in, so the check above is not vacuous
  hidden_u, _ = apply(variables, padded, padded_types, np.ones_like(padded))
  assert np.max(np.abs(hidden_u[:, :10] - hidden)) > 1e-3
  # an all-padding row (a filler row of the last batch) stays finite
  empty, _ = apply(variables, padded, padded_types, np.zeros_like(mask))
  assert np.all(np.isfinite(empty))


def test_packed_segments_are_isolated():
  apply, variables = _encoder()
  rng = np.random.default_rng(1)
  a, b = (rng.integers(1, 64, size=(1, n)).astype(np.int32) for n in (7, 9))
  alone_a, _ = apply(variables, a, np.zeros_like(a), np.ones_like(a))
  alone_b, _ = apply(variables, b, np.zeros_like(b), np.ones_like(b))
  packed = np.concatenate([a, b], 1)
  segments = np.array([[1] * 7 + [2] * 9], np.int32)
  positions = np.array([list(range(7)) + list(range(9))], np.int32)
  hidden, _ = apply(variables, packed, np.zeros_like(packed), np.ones_like(packed), segment_ids=segments,
                          positions=positions)
  np.testing.assert_allclose(hidden[:, :7], alone_a, atol=1e-5)
  np.testing.assert_allclose(hidden[:, 7:], alone_b, atol=1e-5)


def test_dropout_only_in_training():
  config = _config()
  task = make_task(config)
  batch = _batch(0)
  params = nn.meta.unbox(task.init_params(jax.random.key(0), batch))
  loss_fn = jax.jit(task.loss_fn, static_argnums=3)
  evals = [loss_fn(params, batch, jax.random.key(i), False)[0] for i in range(2)]
  trains = [loss_fn(params, batch, jax.random.key(i), True)[0] for i in range(2)]
  assert float(evals[0]) == float(evals[1])
  assert float(trains[0]) != float(trains[1])


def test_attention_without_dropout_equals_the_fused_kernel():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 6, 4, 8)), jnp.float32) for _ in range(3))
  keys = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2], bool)[:, None, None, :]  # [B, 1, 1, S]: padding
  segments = jnp.asarray([[1, 1, 1, 2, 2, 2], [1, 1, 2, 2, 0, 0]])
  packed = (segments[:, None, :, None] == segments[:, None, None, :]) & keys  # [B, 1, T, S]
  for mask in (None, keys, packed):
    want = jax.nn.dot_product_attention(q, k, v, mask=mask)
    got = encoder_lib.attention_with_dropout(q, k, v, mask, lambda p: p)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_attention_dropout_only_in_training_and_never_through_padding():
  cfg = EncoderConfig(vocab_size=64, max_len=32, num_layers=2, d_model=32, num_heads=4, dropout=0.0,
                      attention_dropout=0.5)
  model, plain = Encoder(cfg), Encoder(dataclasses.replace(cfg, attention_dropout=0.0))
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 64, size=(2, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  variables = model.init(jax.random.key(1), **dummy_inputs(1, 8))

  def run(m, ids, mask, key=None):
    train = key is not None
    return m.apply(variables, ids, None, mask, deterministic=not train, rngs={"dropout": key} if train else {})[0]

  # in eval the probabilities are not dropped: the same output as without attention dropout
  np.testing.assert_allclose(run(model, ids, mask), run(plain, ids, mask), atol=1e-6)
  # in training they are (residual dropout is 0 here, so only the attention noise differs)
  a, b = run(model, ids, mask, jax.random.key(2)), run(model, ids, mask, jax.random.key(3))
  assert float(jnp.max(jnp.abs(a - b))) > 1e-2
  assert float(jnp.max(jnp.abs(a - run(plain, ids, mask)))) > 1e-2
  # padded keys stay masked under dropout: what stands in the padding never reaches the real tokens
  other = ids.copy()
  other[:, 7:] = rng.integers(1, 64, size=(2, 3))
  short = mask.copy()
  short[:, 7:] = 0
  key = jax.random.key(4)
  np.testing.assert_allclose(run(model, ids, short, key)[:, :7], run(model, other, short, key)[:, :7], atol=1e-5)


def test_config_errors():
  with pytest.raises(ValueError, match="model.family=encoder"):
    make_task(config_lib.load(BASE, ["task.name=classification", "data.labels=('a','b')"]))
  with pytest.raises(ValueError, match="scan_layers"):
    EncoderConfig.from_config(_config(extra=["model.scan_layers=true"]).model)
  with pytest.raises(ValueError, match="hidden_act"):
    EncoderConfig.from_config(_config(extra=["model.hidden_act=relu"]).model)
  with pytest.raises(ValueError, match=r"model.attention_dropout.*\[0, 1\)"):
    EncoderConfig.from_config(_config(extra=["model.attention_dropout=1.0"]).model)
  apply, variables = _encoder()
  with pytest.raises(ValueError, match="model.max_len=32"):
    apply(variables, jnp.zeros((1, 40), jnp.int32))


def test_bfloat16_compute_stays_close_to_float32():
  cfg = EncoderConfig(vocab_size=64, max_len=32, num_layers=2, d_model=32, num_heads=4, dropout=0.0)
  variables = Encoder(cfg).init(jax.random.key(1), **dummy_inputs(1, 8))
  ids = np.random.default_rng(0).integers(1, 64, size=(2, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 8:] = 0
  want, _ = jax.jit(Encoder(cfg).apply)(variables, ids, None, mask)
  bf16 = EncoderConfig(**{**cfg.__dict__, "dtype": "bfloat16"})
  got, pooled = jax.jit(Encoder(bf16).apply)(variables, ids, None, mask)
  assert got.dtype == jnp.bfloat16 and pooled.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.1)
