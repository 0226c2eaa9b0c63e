"""Decoder-only transformer LM: GPT-2 style (learned positions, LayerNorm, GELU, tied embeddings) or Llama
style (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied output), chosen by `DecoderConfig.style`.

Causal attention goes through jax.nn.dot_product_attention so GPUs/TPUs may use fused kernels, or, with
`attention="blocked"`, through layers.blocked_causal_attention (the same function in query blocks that skip the keys
after them; faster on CPUs); packed sequences carry segment ids and per-document positions, and attention never
crosses a segment boundary.
With `decode=True` the attention layers keep a key/value cache in the 'cache' collection for sampling.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models import activations, layers, norms

REMAT_POLICIES = {
    "full": None,  # save nothing inside a block: recompute everything in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """The decoder's hyperparameters; layers see only this, never the run config."""
  vocab_size: int
  max_len: int
  num_layers: int
  d_model: int
  num_heads: int
  style: str = "gpt2"
  num_kv_heads: int = 0
  head_dim: int = 0
  d_ff: int = 0
  tie_embeddings: bool = True
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  use_bias: bool = True
  hidden_act: str = "gelu"  # gpt2 style's MLP: gelu (exact erf) | gelu_tanh (GPT-2's gelu_new); llama is SwiGLU
  dropout: float = 0.0
  init_std: float = 0.02
  dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False
  attention: str = "xla"
  lora: layers.LoraSpec | None = None  # low-rank adapters on the projections it targets (jaxlm/peft.py sets it)
  cache_len: int = 0  # decoding cache slots (0: max_len); slot = position, so it serves positions below it

  def __post_init__(self):
    if self.style not in ("gpt2", "llama"):
      raise ValueError(f"model.style must be 'gpt2' or 'llama', got '{self.style}'")
    if self.remat not in ("none", *REMAT_POLICIES):
      raise ValueError(f"model.remat must be one of none, {', '.join(REMAT_POLICIES)}; got '{self.remat}'")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"model.dtype must be float32 or bfloat16, got '{self.dtype}'")
    if self.attention not in layers.DECODER_ATTENTION_IMPLS:
      raise ValueError(f"model.attention must be one of {', '.join(layers.DECODER_ATTENTION_IMPLS)}, got "
                       f"'{self.attention}'")
    if self.hidden_act not in activations.GELUS:
      raise ValueError(f"model.hidden_act must be {' or '.join(activations.GELUS)}, got '{self.hidden_act}'")
    if self.kv_heads <= 0 or self.num_heads % self.kv_heads:
      raise ValueError(f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}")
    if not 0 <= self.cache_len <= self.max_len:
      raise ValueError(f"cache length {self.cache_len} must be in 0..model.max_len={self.max_len}")
    if not self.head_dim and self.d_model % self.num_heads:
      raise ValueError(f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}")
    token_ids = self.lora.token_ids if self.lora is not None else ()
    if any(not 0 <= i < self.vocab_size for i in token_ids) or len(set(token_ids)) != len(token_ids):
      raise ValueError(f"peft.trainable_token_ids={tuple(token_ids)}: expected distinct ids in 0..model.vocab_size-1 "
                       f"({self.vocab_size - 1})")

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def ffn_dim(self) -> int:
    if self.d_ff:
      return self.d_ff
    return 4 * self.d_model if self.style == "gpt2" else layers.llama_ffn_dim(self.d_model)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def attention_impl(self):
    return {"auto": None, "blocked": "xla"}.get(self.attention, self.attention)

  @classmethod
  def from_config(cls, model_cfg) -> DecoderConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in model_cfg.items() if k in names})


class Attention(nn.Module):
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x, positions, segment_ids, decode: bool):
    c = self.cfg
    dt, d, h, k, e = c.compute_dtype, c.d_model, c.num_heads, c.kv_heads, c.dim_per_head
    out_std = c.init_std / math.sqrt(2 * c.num_layers)
    if h == k:  # one fused projection for q, k and v
      qkv = layers.project(self, "qkv", "btd,dche->btche", x, layers.normal(c.init_std), (d, 3, h, e),
                           ("embed", None, "heads", "head_dim"), dt, c.lora)  # [B, T, 3, H, E]
      if c.use_bias:
        qkv = qkv + layers.param(self, "qkv_bias", nn.initializers.zeros, (3, h, e), (None, "heads", "head_dim")).astype(dt)
      q, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      q = layers.project(self, "q", "btd,dhe->bthe", x, layers.normal(c.init_std), (d, h, e),
                         ("embed", "heads", "head_dim"), dt, c.lora)  # [B, T, H, E]
      kv = layers.project(self, "kv", "btd,dcke->btcke", x, layers.normal(c.init_std), (d, 2, k, e),
                          ("embed", None, "kv_heads", "head_dim"), dt, c.lora)  # [B, T, 2, K, E]
      if c.use_bias:
        q = q + layers.param(self, "q_bias", nn.initializers.zeros, (h, e), ("heads", "head_dim")).astype(dt)
        kv = kv + layers.param(self, "kv_bias", nn.initializers.zeros, (2, k, e), (None, "kv_heads", "head_dim")).astype(dt)
      key, value = kv[:, :, 0], kv[:, :, 1]
    if c.style == "llama":
      q = layers.rope(q, positions, c.rope_theta)
      key = layers.rope(key, positions, c.rope_theta)

    if decode:
      key_t, value_h, positions_k, segment_ids_k = self._update_cache(key, value, segment_ids)
    else:
      positions_k, segment_ids_k = positions, segment_ids
    mask = layers.attention_mask(segment_ids, segment_ids_k, positions, positions_k, causal=True)
    if decode:
      y = layers.cached_attention(q, key_t, value_h, mask)  # [B, T, H, E]
    elif c.attention == "blocked":
      y = layers.blocked_causal_attention(q, key, value, mask)  # [B, T, H, E]
    else:
      y = layers.dot_product_attention(q, key, value, mask, c.attention_impl)  # [B, T, H, E]
    out = layers.project(self, "o", "bthe,hed->btd", y, layers.normal(out_std), (h, e, d),
                         ("heads", "head_dim", "embed"), dt, c.lora)  # [B, T, D]
    if c.use_bias:
      out = out + layers.param(self, "o_bias", nn.initializers.zeros, (d,), ("norm",)).astype(dt)
    return out

  def _update_cache(self, key, value, segment_ids):
    """Writes this call's keys/values at the cache index; returns the whole cache (keys [B, K, E, S], values
    [B, K, S, E]: the layouts layers.cached_attention multiplies without a transposed copy) and its positions."""
    b, t, k, e = key.shape
    max_len = self.cfg.cache_len or self.cfg.max_len  # slots; the position table (gpt2) keeps max_len rows
    cached_k = self.variable("cache", "key", jnp.zeros, (b, k, e, max_len), key.dtype)
    cached_v = self.variable("cache", "value", jnp.zeros, (b, k, max_len, e), value.dtype)
    cached_seg = self.variable("cache", "segment_ids", jnp.zeros, (b, max_len), jnp.int32)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    key_t, value_h = key.transpose(0, 2, 3, 1), value.transpose(0, 2, 1, 3)  # [B, K, E, T], [B, K, T, E]
    if self.is_initializing():
      return key_t, value_h, jnp.broadcast_to(jnp.arange(t), (b, t)), segment_ids
    i = index.value
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, key_t, (0, 0, 0, i))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, value_h, (0, 0, i, 0))
    cached_seg.value = jax.lax.dynamic_update_slice(cached_seg.value, segment_ids.astype(jnp.int32), (0, i))
    index.value = i + t
    # cache slots are indexed by absolute position; unwritten slots hold segment 0, and a slot past the
    # query's position is excluded by the causal test on positions.
    positions_k = jnp.broadcast_to(jnp.arange(max_len), (b, max_len))
    return cached_k.value, cached_v.value, positions_k, cached_seg.value


class Block(nn.Module):
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x, positions, segment_ids, deterministic: bool, decode: bool):
    c = self.cfg
    norm = (lambda name: norms.LayerNorm(c.norm_eps, True, c.compute_dtype, name=name)) if c.style == "gpt2" \
        else (lambda name: norms.RMSNorm(c.norm_eps, c.compute_dtype, name=name))
    h = Attention(c, name="attn")(norm("ln_attn")(x), positions, segment_ids, decode)
    x = x + layers.Dropout(c.dropout)(h, deterministic=deterministic)
    h = layers.Mlp(c.ffn_dim, c.hidden_act if c.style == "gpt2" else "swiglu", c.use_bias, c.init_std,
                   c.init_std / math.sqrt(2 * c.num_layers), c.compute_dtype, c.lora, name="mlp")(norm("ln_mlp")(x))
    x = x + layers.Dropout(c.dropout)(h, deterministic=deterministic)
    return layers.residual(x)


class ScanBlock(nn.Module):
  """Block with the (carry, _) -> (carry, None) signature nn.scan needs."""
  cfg: DecoderConfig
  deterministic: bool
  decode: bool

  @nn.compact
  def __call__(self, x, inputs):
    positions, segment_ids = inputs
    return Block(self.cfg, name="block")(x, positions, segment_ids, self.deterministic, self.decode), None


class Decoder(nn.Module):
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, deterministic: bool = True, decode: bool = False):
    """tokens [B, T] int -> logits [B, T, V] (float32). positions/segment_ids [B, T] default to one document."""
    c = self.cfg
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    emb = layers.param(self, "embedding", layers.normal(c.init_std), (c.vocab_size, c.d_model), ("vocab", "embed"))
    x = layers.lookup(emb, tokens)  # [B, T, D]
    token_ids = c.lora.token_ids if c.lora is not None else ()
    if token_ids:  # trained rows: emb[id] + delta for the listed ids (zero at the start)
      ids = jnp.asarray(token_ids, jnp.int32)
      delta = layers.param(self, "embedding" + layers.TOKEN_DELTA, nn.initializers.zeros, (len(token_ids), c.d_model),
                           (None, "embed"))
      x = x + jnp.einsum("btk,kd->btd", (tokens[..., None] == ids).astype(delta.dtype), delta)
    x = x.astype(c.compute_dtype)
    if c.style == "gpt2":
      pos_emb = layers.param(self, "pos_embedding", layers.normal(c.init_std), (c.max_len, c.d_model), (None, "embed"))
      x = x + layers.lookup(pos_emb, positions, None).astype(c.compute_dtype)
    x = layers.Dropout(c.dropout)(x, deterministic=deterministic)

    block = Block
    if c.remat != "none":
      # static_argnums counts self: (x, positions, segment_ids, deterministic, decode) -> 4, 5 are static
      block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers, static_argnums=(4, 5))
    if c.scan_layers:
      scan_block = ScanBlock if c.remat == "none" else nn.remat(
          ScanBlock, policy=REMAT_POLICIES[c.remat], prevent_cse=False)
      x, _ = nn.scan(
          scan_block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
          in_axes=nn.broadcast, length=c.num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
      )(c, deterministic, decode, name="blocks")(x, (positions, segment_ids))
    else:
      for i in range(c.num_layers):
        x = block(c, name=f"block_{i}")(x, positions, segment_ids, deterministic, decode)

    if c.style == "gpt2":
      x = norms.LayerNorm(c.norm_eps, True, c.compute_dtype, name="ln_final")(x)
    else:
      x = norms.RMSNorm(c.norm_eps, c.compute_dtype, name="ln_final")(x)
    if c.tie_embeddings:
      logits = layers.einsum("btd,vd->btv", x, emb.astype(c.compute_dtype))  # [B, T, V]
      if token_ids:  # the tied output rows are the trained embedding rows
        logits = logits.at[..., ids].add(jnp.einsum("btd,kd->btk", x, delta.astype(c.compute_dtype)))
    else:
      logits = layers.project(self, "lm_head", "btd,dv->btv", x, layers.normal(c.init_std), (c.d_model, c.vocab_size),
                              ("embed", "vocab"), c.compute_dtype, c.lora)  # [B, T, V]
      if token_ids:  # lm_head[:, id] + delta for the listed ids
        head_delta = layers.param(self, "lm_head" + layers.TOKEN_DELTA, nn.initializers.zeros,
                                  (c.d_model, len(token_ids)), ("embed", None))
        logits = logits.at[..., ids].add(jnp.einsum("btd,dk->btk", x, head_delta.astype(c.compute_dtype)))
    return logits.astype(jnp.float32)


def unstack_layers(params: dict) -> dict:
  """The scan_layers layout (blocks/block, leading layers axis) -> one block_{i} subtree per layer."""
  stacked = params["blocks"]["block"]
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  rest = {k: v for k, v in params.items() if k != "blocks"}
  return {**rest, **{f"block_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers)}}
