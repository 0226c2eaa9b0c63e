"""Building blocks shared by the model families: parameters with logical axis names, norms, attention, MLPs.

Shapes are written as einsum subscripts with a comment; letters: B batch, T query length, S key length,
D d_model, H query heads, K key/value heads, G query heads per kv head, E head_dim, F MLP hidden, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def param(module: nn.Module, name: str, init: Initializer, shape: Sequence[int], axes: Sequence[str | None]):
  """A float32 parameter created with its logical axis names (resolved to mesh axes in jaxlm/sharding.py)."""
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), jnp.float32)


def project(module: nn.Module, name: str, equation: str, x, init: Initializer, shape: Sequence[int],
            axes: Sequence[str | None], dtype):
  """x times a new parameter `name` by an einsum `equation` ('inputs,weight->outputs'), computed in `dtype`.

  Every dense projection of every model family goes through here, so what wraps a projection (adapters, quantised
  weights) is written once.
  """
  w = param(module, name, init, shape, axes)
  return jnp.einsum(equation, x, w.astype(dtype))


def normal(std: float) -> Initializer:
  return nn.initializers.normal(stddev=std)


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 whatever the compute dtype."""
  eps: float = 1e-5
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = param(self, "scale", nn.initializers.ones, (d,), ("norm",))
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale
    if self.use_bias:
      y = y + param(self, "bias", nn.initializers.zeros, (d,), ("norm",))
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps) * scale
    return y.astype(self.dtype)


def rope(x, positions, theta: float):
  """Rotary position embedding on x [B, T, H, E] at integer positions [B, T] (rotate-half convention)."""
  e = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))  # [E/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, E/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : e // 2], x32[..., e // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention_mask(segment_ids_q, segment_ids_k, positions_q=None, positions_k=None, causal: bool = True):
  """Boolean mask [B, 1, T, S]: same segment and, if causal, key position <= query position."""
  mask = segment_ids_q[:, :, None] == segment_ids_k[:, None, :]
  if causal:
    mask = mask & (positions_k[:, None, :] <= positions_q[:, :, None])
  return mask[:, None, :, :]


def dot_product_attention(q, k, v, mask, implementation: str | None):
  """q [B, T, H, E], k/v [B, S, K, E] (K divides H) -> [B, T, H, E] through jax.nn.dot_product_attention."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


class Mlp(nn.Module):
  """GELU MLP (gpt2, BERT) or SwiGLU (llama)."""
  d_ff: int
  kind: str  # gelu | gelu_tanh | swiglu
  use_bias: bool
  init_std: float
  out_std: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):  # x [B, T, D]
    d = x.shape[-1]
    if self.kind == "swiglu":
      wi = param(self, "wi", normal(self.init_std), (d, 2, self.d_ff), ("embed", None, "mlp"))
      gate_up = jnp.einsum("btd,dcf->btcf", x, wi.astype(self.dtype))  # [B, T, 2, F]
      h = nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
    else:
      wi = param(self, "wi", normal(self.init_std), (d, self.d_ff), ("embed", "mlp"))
      h = jnp.einsum("btd,df->btf", x, wi.astype(self.dtype))  # [B, T, F]
      if self.use_bias:
        h = h + param(self, "bi", nn.initializers.zeros, (self.d_ff,), ("mlp",)).astype(self.dtype)
      h = nn.gelu(h, approximate=self.kind == "gelu_tanh")
    wo = param(self, "wo", normal(self.out_std), (self.d_ff, d), ("mlp", "embed"))
    y = jnp.einsum("btf,fd->btd", h, wo.astype(self.dtype))  # [B, T, D]
    if self.use_bias:
      y = y + param(self, "bo", nn.initializers.zeros, (d,), ("norm",)).astype(self.dtype)
    return y


def llama_ffn_dim(d_model: int, multiple: int = 64) -> int:
  return multiple * math.ceil(int(8 * d_model / 3) / multiple)


def compact(selected):
  """selected [B, L] bool -> (order [B, L], count [B]): order lists the selected positions first, each group in its
  original order, so x[b, order[b]] is the row's selected entries followed by the rest."""
  order = jnp.argsort(~selected.astype(bool), axis=-1, stable=True).astype(jnp.int32)
  return order, jnp.sum(selected.astype(jnp.int32), axis=-1)


def gather(x, order):
  """x [B, L, ...] reordered along L by order [B, L]."""
  idx = order.reshape(order.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)
