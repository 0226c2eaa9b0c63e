"""Dropout from counter-based 32-bit draws (layers.dropout_keep / layers.Dropout): the rate it keeps, the expectation,
independence between neighbours, rows and keys, the rng stream, the same mask however the array is sharded; and where
T5 drops (model.mlp_dropout)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.models import layers
from jaxlm.models.encdec import EncDec, EncDecConfig, Mlp


def _close_to(observed, p, n, sigmas=5.0):
  """observed frequency within `sigmas` standard errors of a Bernoulli(p) mean over n draws."""
  return abs(observed - p) < sigmas * np.sqrt(p * (1 - p) / n) + 2.0 ** -33


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("shape", [(64, 128, 96), (512, 257), (100_003,)])
def test_keep_fraction_is_the_rate_and_neighbours_are_independent(rate, shape):
  keep, scale = layers.dropout_keep(jax.random.key(3, impl="rbg"), rate, shape)
  keep = np.asarray(keep)
  assert keep.shape == shape and keep.dtype == bool
  assert _close_to(1 - keep.mean(), rate, keep.size)
  assert scale * (1 - round(rate * 2 ** 32) / 2 ** 32) == pytest.approx(1.0, rel=1e-12)
  flat = keep.reshape(keep.shape[0], -1) if keep.ndim > 1 else keep[None]
  # every position within a row and every row drops at the rate: no stripes from the counter
  for part in (flat[:, 0::2], flat[:, 1::2], flat[: max(1, len(flat) // 2)], flat[len(flat) // 2:]):
    assert _close_to(1 - part.mean(), rate, part.size)
  # a drop says nothing about the element beside it, nor about the same position in the next row
  pairs = [(flat[:, :-1], flat[:, 1:])] + ([(flat[:-1], flat[1:])] if len(flat) > 1 else [])
  for left, right in pairs:
    assert _close_to((~left & ~right).mean(), rate * rate, left.size)
    assert _close_to((~left & right).mean(), rate * (1 - rate), left.size)


def _chi_square_of_bytes(bits):
  """chi-square statistic of the 256 patterns of 8 consecutive bits (non-overlapping windows) against uniform."""
  windows = bits[: bits.size // 8 * 8].reshape(-1, 8).astype(np.int64) @ (1 << np.arange(8))
  counts = np.bincount(windows, minlength=256)
  expected = windows.size / 256
  return ((counts - expected) ** 2 / expected).sum()


def test_runs_of_eight_draws_take_every_pattern_alike():
  """At rate 1/2 a mask bit is a fair coin: eight neighbours (along a row, or down eight rows) show all 256 patterns
  equally often (chi-square with 255 degrees of freedom, refused beyond 6 standard deviations). The bare counter, or the
  counter only xor-shifted, fails this and the tests above."""
  keep = np.asarray(layers.dropout_keep(jax.random.key(11, impl="rbg"), 0.5, (512, 2048))[0])
  bound = 255 + 6 * np.sqrt(2 * 255)
  assert _chi_square_of_bytes(keep.reshape(-1)) < bound
  assert _chi_square_of_bytes(keep.T.reshape(-1)) < bound


def test_masks_of_two_keys_are_independent_and_a_key_repeats_its_mask():
  keys = jax.random.split(jax.random.key(0, impl="rbg"), 4)
  masks = [np.asarray(layers.dropout_keep(k, 0.3, (256, 1024))[0]) for k in keys]
  for i in range(len(masks)):
    for j in range(i + 1, len(masks)):
      assert _close_to((~masks[i] & ~masks[j]).mean(), 0.09, masks[i].size)
      # nor shifted copies of each other: a mask against the other shifted by a few positions
      for shift in (1, 2, 1024):
        a, b = masks[i].reshape(-1)[shift:], masks[j].reshape(-1)[:-shift]
        assert _close_to((~a & ~b).mean(), 0.09, a.size)
  np.testing.assert_array_equal(masks[0], np.asarray(layers.dropout_keep(keys[0], 0.3, (256, 1024))[0]))


def test_the_mask_is_the_same_however_the_array_is_sharded():
  devices = np.array(jax.devices()[:8]).reshape(2, 2, 2)
  mesh = Mesh(devices, ("data", "fsdp", "tensor"))
  key = jax.random.key(5, impl="rbg")
  whole = np.asarray(jax.jit(lambda k: layers.dropout_keep(k, 0.1, (8, 64, 96))[0])(key))
  for spec in (PartitionSpec("data", None, "tensor"), PartitionSpec(None, ("fsdp", "tensor"), "data")):
    sharding = NamedSharding(mesh, spec)
    split = jax.jit(lambda k: layers.dropout_keep(k, 0.1, (8, 64, 96))[0], out_shardings=sharding)(key)
    assert split.sharding == sharding
    np.testing.assert_array_equal(np.asarray(split), whole)


def test_a_row_of_two_to_the_32_elements_is_refused():
  with pytest.raises(ValueError, match="fewer than 2\\*\\*32"):
    layers.dropout_keep(jax.random.key(0, impl="rbg"), 0.1, (2, 2 ** 16, 2 ** 16))


def test_dropout_module_keeps_the_expectation_and_follows_the_rng():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(256, 512)), jnp.float32)
  drop = layers.Dropout(0.2)
  run = jax.jit(lambda key: drop.apply({}, x, deterministic=False, rngs={"dropout": key}))
  a, b, a2 = run(jax.random.key(1, impl="rbg")), run(jax.random.key(2, impl="rbg")), run(jax.random.key(1, impl="rbg"))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))  # the same key, the same mask
  assert np.mean(np.asarray(a) != np.asarray(b)) > 0.2  # another key, another mask
  kept = np.asarray(a) != 0
  scale = 2 ** 32 / (2 ** 32 - round(0.2 * 2 ** 32))
  np.testing.assert_allclose(np.asarray(a)[kept], np.asarray(x)[kept] * scale, rtol=1e-6)
  # E[dropout(x)] = x: averaged over many keys, the output approaches the input
  mean = np.mean([np.asarray(run(jax.random.key(k, impl="rbg"))) for k in range(200)], axis=0)
  assert np.abs(mean - np.asarray(x)).mean() < 0.05 * np.abs(np.asarray(x)).mean()
  # nothing dropped when deterministic or at rate 0; everything at rate 1; bfloat16 stays bfloat16
  assert drop.apply({}, x, deterministic=True) is x
  assert layers.Dropout(0.0).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}) is x
  assert not np.any(np.asarray(layers.Dropout(1.0).apply({}, x, deterministic=False)))
  y = drop.apply({}, x.astype(jnp.bfloat16), deterministic=False, rngs={"dropout": jax.random.key(0, impl="rbg")})
  assert y.dtype == jnp.bfloat16


class _Adapted(nn.Module):
  """One projection with a LoRA adapter, through layers.dense as every model calls it."""
  lora: layers.LoraSpec

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(1.0), (x.shape[-1], 8))
    a = self.param("w_lora_a", nn.initializers.normal(1.0), (x.shape[-1], self.lora.rank))
    b = self.param("w_lora_b", nn.initializers.normal(1.0), (self.lora.rank, 8))
    return layers.dense(self, "btd,df->btf", x, w, jnp.float32, (a, b), self.lora)


def test_adapter_dropout_drops_the_adapter_input_in_training_only():
  """y = x W + (alpha / r) dropout(x) A B: the dropped inputs reach the adapter, never the frozen projection."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 64, 32)), jnp.float32)
  model = _Adapted(layers.LoraSpec(rank=4, alpha=8.0, dropout=0.5, targets="w"))
  variables = model.init(jax.random.key(0), x)
  p = variables["params"]
  base = np.einsum("btd,df->btf", x, p["w"])
  full = base + 2.0 * np.einsum("btd,dr,rf->btf", x, p["w_lora_a"], p["w_lora_b"])
  np.testing.assert_allclose(np.asarray(model.apply(variables, x)), full, rtol=1e-5, atol=1e-4)  # no rng: eval
  y = np.asarray(model.apply(variables, x, rngs={"dropout": jax.random.key(7, impl="rbg")}))
  assert not np.allclose(y, full, atol=1e-3)
  # what the adapter saw: (y - x W) / (alpha / r) = dropout(x) A B; recover dropout(x) A exactly from B's pseudo-inverse
  seen = np.einsum("btf,fr->btr", (y - base) / 2.0, np.linalg.pinv(p["w_lora_b"]))
  kept = np.einsum("btd,dr->btr", x, p["w_lora_a"])
  assert np.abs(seen - kept).mean() > 0.2 * np.abs(kept).mean()  # really dropped, at rate 0.5
  mean = np.mean([np.asarray(model.apply(variables, x, rngs={"dropout": jax.random.key(k, impl="rbg")}))
                  for k in range(100)], axis=0)
  assert np.abs(mean - full).mean() < 0.1 * np.abs(full - base).mean()  # and the expectation is kept


@pytest.mark.parametrize("style", ["t5", "t5_v1_1"])
def test_t5_mlp_dropout_switches_off_only_the_hidden_units(style):
  """model.mlp_dropout=False: the MLP block of a training pass equals the deterministic one (its only dropout is on
  the hidden units), while T5's default drops hidden units; the whole model still drops on its residual branches."""
  cfg = EncDecConfig(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=128, num_encoder_layers=1,
                     num_decoder_layers=1, style=style, dropout=0.3)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 32)), jnp.float32)
  params = Mlp(cfg).init(jax.random.key(0), x)
  quiet = Mlp(cfg).apply(params, x)
  drop = {"dropout": jax.random.key(1, impl="rbg")}
  t5_like = Mlp(cfg, deterministic=False).apply(params, x, rngs=drop)
  hidden_off = Mlp(dataclasses.replace(cfg, mlp_dropout=False), deterministic=False).apply(params, x, rngs=drop)
  assert not np.allclose(t5_like, quiet)
  np.testing.assert_array_equal(hidden_off, quiet)

  tokens = jnp.asarray(np.random.default_rng(1).integers(2, 64, (2, 12)), jnp.int32)
  model = EncDec(dataclasses.replace(cfg, mlp_dropout=False))
  variables = model.init(jax.random.key(0), tokens, tokens)
  assert not np.allclose(model.apply(variables, tokens, tokens, deterministic=False, rngs=drop),
                         model.apply(variables, tokens, tokens))

