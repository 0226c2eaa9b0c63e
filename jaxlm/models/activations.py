"""Activation functions with their own backward passes.

`gelu` is the exact GELU in the erf form PyTorch and BERT use, x/2 · (1 + erf(x/√2)). jax.nn.gelu(approximate=False)
goes through erfc, which XLA expands to two polynomials, an exponential and selects, and autodiff of it builds that
expansion again in the backward pass; here the backward pass is the closed form Φ(x) + x·φ(x) with one erf and one exp.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _cdf(x):
  return 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))


@jax.custom_vjp
def gelu(x):
  """Exact GELU, x·Φ(x) with Φ the standard normal CDF; bfloat16/float16 inputs are computed in float32 (as PyTorch
  does) and returned in their own dtype."""
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return (xf * _cdf(xf)).astype(x.dtype)


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, g):
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  dgelu = _cdf(xf) + xf * _INV_SQRT_2PI * jnp.exp(-0.5 * xf * xf)
  return ((g * dgelu).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


# The MLPs' activation by name (model.hidden_act, checked against these by the model configs): "gelu" (exact, above)
# or "gelu_tanh" (the tanh approximation, GPT-2's gelu_new).
GELUS = {"gelu": gelu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def gelu_by_name(x, name: str):
  return GELUS[name](x)
