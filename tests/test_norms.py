"""The norms' closed-form backward pass (norms.norm) against autodiff of the plain formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models import norms


def _formula(x, scale, bias, eps, center):
  mean = jnp.mean(x, axis=-1, keepdims=True) if center else 0.0
  y = (x - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True) + eps) * scale
  return y if bias is None else y + bias


@pytest.mark.parametrize("center,with_bias", [(True, True), (True, False), (False, False)])
def test_norm_gradients_equal_autodiff_of_the_formula(center, with_bias):
  kx, ks, kb, kw = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (3, 7, 32)) * 2.5 + 0.7
  scale = jax.random.normal(ks, (32,))
  bias = jax.random.normal(kb, (32,)) if with_bias else None
  w = jax.random.normal(kw, (3, 7, 32))
  argnums = (0, 1, 2) if with_bias else (0, 1)

  def loss(fn):
    return lambda x, scale, bias: jnp.sum(jnp.sin(fn(x, scale, bias, 1e-5, center)) * w)

  out, got = jax.value_and_grad(loss(norms.norm), argnums)(x, scale, bias)
  ref_out, want = jax.value_and_grad(loss(_formula), argnums)(x, scale, bias)
  np.testing.assert_allclose(out, ref_out, rtol=1e-6)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
  assert float(jnp.max(jnp.abs(got[0]))) > 0.1  # a real gradient, not zeros


def test_norm_modules_in_bfloat16_keep_float32_statistics():
  x = (jax.random.normal(jax.random.key(1), (2, 5, 16)) * 30.0).astype(jnp.bfloat16)
  for module in (norms.LayerNorm(1e-5, True, jnp.bfloat16), norms.RMSNorm(1e-6, jnp.bfloat16)):
    params = module.init(jax.random.key(2), x)
    y = module.apply(params, x)
    assert y.dtype == jnp.bfloat16
    center = isinstance(module, norms.LayerNorm)
    want = _formula(x.astype(jnp.float32), 1.0, 0.0 if center else None, module.eps, center)
    np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=0.05)
    grads = jax.grad(lambda p: jnp.sum(module.apply(p, x).astype(jnp.float32) ** 2))(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
