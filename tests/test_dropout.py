"""Dropout from 16-bit draws (layers.dropout_keep / layers.Dropout): the rate it keeps, the expectation, the rng
stream, and both halves of every random word in use."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models import layers


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("shape", [(64, 128, 96), (512, 257)])  # an even last axis (two draws a word) and an odd one
def test_keep_fraction_is_the_rate(rate, shape):
  keep, scale = layers.dropout_keep(jax.random.key(3, impl="rbg"), rate, shape)
  keep = np.asarray(keep)
  assert keep.shape == shape and keep.dtype == bool
  n = keep.size
  sd = np.sqrt(rate * (1 - rate) / n)
  assert abs((1 - keep.mean()) - rate) < 5 * sd + 2 ** -17
  assert scale * (1 - round(rate * 2 ** 16) / 2 ** 16) == pytest.approx(1.0, rel=1e-12)
  # each half of a 32-bit word drives its own element: even and odd positions drop at the rate alike
  flat = keep.reshape(-1, shape[-1])
  for part in (flat[:, 0::2], flat[:, 1::2]):
    assert abs((1 - part.mean()) - rate) < 5 * np.sqrt(rate * (1 - rate) / part.size) + 2 ** -17
  # neighbours are independent: a drop says nothing about the element beside it
  both = (~flat[:, 0:-1:2] & ~flat[:, 1::2]).mean()
  assert abs(both - rate * rate) < 5 * np.sqrt(rate * rate / flat[:, 1::2].size)


def test_dropout_module_keeps_the_expectation_and_follows_the_rng():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(256, 512)), jnp.float32)
  drop = layers.Dropout(0.2)
  run = jax.jit(lambda key: drop.apply({}, x, deterministic=False, rngs={"dropout": key}))
  a, b, a2 = run(jax.random.key(1, impl="rbg")), run(jax.random.key(2, impl="rbg")), run(jax.random.key(1, impl="rbg"))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))  # the same key, the same mask
  assert np.mean(np.asarray(a) != np.asarray(b)) > 0.2  # another key, another mask
  kept = np.asarray(a) != 0
  scale = 2 ** 16 / (2 ** 16 - round(0.2 * 2 ** 16))
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
