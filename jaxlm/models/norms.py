"""LayerNorm and RMSNorm, computed in float32 whatever the compute dtype, through one function with a closed-form
backward pass (norm)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models import layers


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 whatever the compute dtype (gradients by norm's closed form)."""
  eps: float = 1e-5
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = layers.param(self, "scale", nn.initializers.ones, (d,), ("norm",))
    bias = layers.param(self, "bias", nn.initializers.zeros, (d,), ("norm",)) if self.use_bias else None
    return norm(x.astype(jnp.float32), scale, bias, self.eps, True).astype(self.dtype)


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = layers.param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",))
    return norm(x.astype(jnp.float32), scale, None, self.eps, False).astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def norm(x, scale, bias, eps: float, center: bool):
  """LayerNorm (center=True) or RMSNorm of float32 x [..., D] over D, times scale, plus bias (None: none). Backward:
  the closed form dx = r (g' - mean(g') - x^ mean(g' x^)), g' = g scale, x^ the normalised x, r the reciprocal deviation
  (no mean(g') without centring): autodiff of the formula left XLA more reductions and broadcasts per norm."""
  return _norm_fwd(x, scale, bias, eps, center)[0]


def _norm_fwd(x, scale, bias, eps, center):
  xc = x - jnp.mean(x, axis=-1, keepdims=True) if center else x
  r = jax.lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + eps)
  y = xc * r * scale
  return (y if bias is None else y + bias), (xc, r, scale, bias)


def _norm_bwd(eps, center, res, g):
  xc, r, scale, bias = res
  g = g.astype(jnp.float32)
  xhat = xc * r
  gs = g * scale
  inner = gs - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True)
  dx = r * (inner - jnp.mean(gs, axis=-1, keepdims=True) if center else inner)
  rows = tuple(range(g.ndim - 1))
  dbias = None if bias is None else jnp.sum(g, axis=rows).astype(bias.dtype)
  return dx, jnp.sum(g * xhat, axis=rows).astype(scale.dtype), dbias


norm.defvjp(_norm_fwd, _norm_bwd)
