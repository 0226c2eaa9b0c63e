"""The exact GELU with its own backward pass (activations.gelu) against jax.nn.gelu, autodiff and PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models import activations

X = np.concatenate([np.linspace(-12.0, 12.0, 2001), np.random.default_rng(0).normal(0, 3, 999)]).astype(np.float32)


def test_gelu_values_and_gradients_equal_jax_nn_gelu():
  w = jnp.asarray(np.random.default_rng(1).normal(size=X.shape).astype(np.float32))
  loss = lambda fn: (lambda x: jnp.sum(jnp.sin(fn(x)) * w))
  out, got = jax.value_and_grad(loss(activations.gelu))(jnp.asarray(X))
  ref, want = jax.value_and_grad(loss(lambda x: jax.nn.gelu(x, approximate=False)))(jnp.asarray(X))
  np.testing.assert_allclose(activations.gelu(jnp.asarray(X)), jax.nn.gelu(X, approximate=False), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(got))) > 0.5  # a real gradient, not zeros


def test_gelu_and_its_gradient_equal_torch():
  torch = pytest.importorskip("torch")
  xt = torch.tensor(X.astype(np.float64), requires_grad=True)
  torch.nn.functional.gelu(xt).sum().backward()  # the exact (erf) form, in float64
  np.testing.assert_allclose(activations.gelu(jnp.asarray(X)), torch.nn.functional.gelu(xt).detach().numpy(),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(activations.gelu(x)))(jnp.asarray(X)), xt.grad.numpy(),
                             rtol=1e-5, atol=1e-6)


def test_gelu_in_bfloat16_is_computed_in_float32():
  x = jnp.asarray(X).astype(jnp.bfloat16)
  g = jax.grad(lambda x: jnp.sum(activations.gelu(x).astype(jnp.float32)))(x)
  assert activations.gelu(x).dtype == jnp.bfloat16 and g.dtype == jnp.bfloat16
  want = jax.nn.gelu(x.astype(jnp.float32), approximate=False)
  np.testing.assert_allclose(activations.gelu(x).astype(jnp.float32), want.astype(jnp.bfloat16).astype(jnp.float32),
                             rtol=1e-2, atol=1e-5)  # float32's erf(-8) is -1: x·Φ(x) is 0 there, not 1e-15
