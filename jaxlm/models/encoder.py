"""BERT-style bidirectional encoder: learned positions and token types, post-LayerNorm blocks, GELU MLP, tanh pooler.

Parameters carry logical axis names (jaxlm/models/layers.py) so the decoder's mesh rules shard it unchanged; the
layout is the one jaxlm/convert.py fills from a Hugging Face BERT checkpoint.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import sharding
from jaxlm.models import activations, layers, norms

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# The names of the encoder's input arrays in a batch, all int32 [batch, length].
INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")
POOLER_EQUATION = "bd,de->be"  # the pooler's dense layer on the first token: [B, D] -> [B, D]


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """The encoder's hyperparameters; layers see only this, never the run config."""
  vocab_size: int
  max_len: int
  num_layers: int
  d_model: int
  num_heads: int
  d_ff: int = 0
  type_vocab_size: int = 2
  hidden_act: str = "gelu"
  norm_eps: float = 1e-12
  dropout: float = 0.1
  attention_dropout: float = 0.0
  init_std: float = 0.02
  dtype: str = "float32"
  remat: str = "none"
  attention: str = "xla"
  pooler: bool = True
  lora: layers.LoraSpec | None = None  # low-rank adapters on the projections it targets (jaxlm/peft.py sets it)

  def __post_init__(self):
    if self.d_model % self.num_heads:
      raise ValueError(f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}")
    if self.hidden_act not in activations.GELUS:  # gelu = exact erf form (BERT's "gelu"); gelu_tanh = tanh approx.
      raise ValueError(f"model.hidden_act must be one of {', '.join(activations.GELUS)}, got '{self.hidden_act}'")
    if self.remat not in ("none", *REMAT_POLICIES):
      raise ValueError(f"model.remat must be one of none, {', '.join(REMAT_POLICIES)}; got '{self.remat}'")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"model.dtype must be float32 or bfloat16, got '{self.dtype}'")
    if self.type_vocab_size < 1:
      raise ValueError(f"model.type_vocab_size must be at least 1, got {self.type_vocab_size}")
    if not 0.0 <= self.attention_dropout < 1.0:
      raise ValueError(f"model.attention_dropout must be in [0, 1), got {self.attention_dropout}")
    if self.attention not in layers.ATTENTION_IMPLS:
      raise ValueError(f"model.attention must be one of {', '.join(layers.ATTENTION_IMPLS)} for an encoder, got "
                       f"'{self.attention}' ('blocked' is causal attention, for decoders)")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def ffn_dim(self) -> int:
    return self.d_ff or 4 * self.d_model

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def attention_impl(self):
    return None if self.attention == "auto" else self.attention

  @classmethod
  def from_config(cls, model_cfg) -> EncoderConfig:
    """From config.model; keys that only a decoder understands must be left at their neutral values."""
    if model_cfg.family != "encoder":
      raise ValueError(f"model.family='{model_cfg.family}', but this task needs the BERT encoder: "
                       "set --config.model.family=encoder")
    if model_cfg.scan_layers:
      raise ValueError("model.scan_layers=True is not supported by the encoder (model.family=encoder)")
    if model_cfg.num_kv_heads not in (0, model_cfg.num_heads):
      raise ValueError(f"model.num_kv_heads={model_cfg.num_kv_heads}: the encoder has no grouped-query attention "
                       "(leave it 0)")
    if model_cfg.head_dim not in (0, model_cfg.d_model // model_cfg.num_heads):
      raise ValueError(f"model.head_dim={model_cfg.head_dim}: the encoder's head width is d_model // num_heads "
                       "(leave it 0)")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in model_cfg.items() if k in names})


def dummy_inputs(batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
  """Encoder inputs with the pipeline's names, shapes and dtypes, for init and tracing."""
  ints = np.zeros((batch_size, seq_len), np.int32)
  return {"input_ids": ints, "token_type_ids": ints.copy(), "attention_mask": np.ones_like(ints)}


def attention_with_dropout(q, k, v, mask, drop):
  """softmax(q k^T / sqrt(E), masked), `drop` applied to the probabilities, then @ v: BERT's attention in training
  (attention_probs_dropout_prob). q/k/v [B, T|S, H, E]; mask broadcastable to [B, H, T, S] (True = attend)."""
  scores = jnp.einsum("bthe,bshe->bhts", q, k).astype(jnp.float32) / np.sqrt(q.shape[-1])
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = drop(jax.nn.softmax(scores, axis=-1)).astype(v.dtype)
  return jnp.einsum("bhts,bshe->bthe", probs, v)


class SelfAttention(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x, mask, deterministic: bool = True):
    c = self.cfg
    dt, d, h, e = c.compute_dtype, c.d_model, c.num_heads, c.head_dim
    # one fused projection for q, k and v: a single matmul instead of three
    qkv = layers.project(self, "qkv", "btd,dche->btche", x, layers.normal(c.init_std), (d, 3, h, e),
                         ("embed", None, "heads", "head_dim"), dt, c.lora)  # [B, T, 3, H, E]
    qkv = qkv + layers.param(self, "qkv_bias", nn.initializers.zeros, (3, h, e), (None, "heads", "head_dim")).astype(dt)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if c.attention_dropout > 0 and not deterministic:  # the fused kernel has no dropout: spelled out in training
      drop = layers.Dropout(c.attention_dropout, name="attention_dropout")
      y = attention_with_dropout(q, k, v, mask, lambda p: drop(p, deterministic=False))
    else:
      y = layers.dot_product_attention(q, k, v, mask, c.attention_impl)  # [B, T, H, E]
    out = layers.project(self, "o", "bthe,hed->btd", y, layers.normal(c.init_std), (h, e, d),
                         ("heads", "head_dim", "embed"), dt, c.lora)  # [B, T, D]
    return out + layers.param(self, "o_bias", nn.initializers.zeros, (d,), ("norm",)).astype(dt)


class Block(nn.Module):
  """Post-LayerNorm block (BERT): x = LN(x + Attn(x)); x = LN(x + MLP(x))."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    c = self.cfg
    h = SelfAttention(c, name="attn")(x, mask, deterministic)
    x = norms.LayerNorm(c.norm_eps, True, c.compute_dtype, name="ln_attn")(
        x + layers.Dropout(c.dropout)(h, deterministic=deterministic))
    h = layers.Mlp(c.ffn_dim, c.hidden_act, True, c.init_std, c.init_std, c.compute_dtype, c.lora, name="mlp")(x)
    return layers.residual(norms.LayerNorm(c.norm_eps, True, c.compute_dtype, name="ln_mlp")(
        x + layers.Dropout(c.dropout)(h, deterministic=deterministic)))


class Encoder(nn.Module):
  """(input_ids, token_type_ids, attention_mask) [B, L] -> (hidden [B, L, D], pooled [B, D] or None).

  attention_mask is 1 on real tokens: padded keys are never attended to. For packed rows, segment_ids [B, L]
  keep attention inside each segment and positions [B, L] restart the position embedding per segment.
  `attend` maps hidden states onto the vocabulary through the word-embedding table (the tied MLM decoder).
  """
  cfg: EncoderConfig

  def setup(self):
    c = self.cfg
    self.word_embeddings = layers.param(
        self, "word_embeddings", layers.normal(c.init_std), (c.vocab_size, c.d_model), ("vocab", "embed"))
    self.position_embeddings = layers.param(
        self, "position_embeddings", layers.normal(c.init_std), (c.max_len, c.d_model), (None, "embed"))
    self.type_embeddings = layers.param(
        self, "type_embeddings", layers.normal(c.init_std), (c.type_vocab_size, c.d_model), (None, "embed"))
    self.ln_embed = norms.LayerNorm(c.norm_eps, True, c.compute_dtype)
    self.drop = layers.Dropout(c.dropout)
    block = Block if c.remat == "none" else nn.remat(Block, policy=REMAT_POLICIES[c.remat], static_argnums=(3,))
    self.blocks = [block(c) for _ in range(c.num_layers)]
    if c.pooler:
      shape, axes = (c.d_model, c.d_model), ("embed", None)
      self.pooler_w = layers.param(self, "pooler", layers.normal(c.init_std), shape, axes)
      self.pooler_lora = layers.lora_params(self, "pooler", POOLER_EQUATION, shape, axes, c.lora)
      self.pooler_b = layers.param(self, "pooler_bias", nn.initializers.zeros, (c.d_model,), ("norm",))

  def __call__(self, input_ids, token_type_ids=None, attention_mask=None, deterministic: bool = True,
               segment_ids=None, positions=None):
    c = self.cfg
    b, t = input_ids.shape
    if t > c.max_len:
      raise ValueError(f"input length {t} exceeds model.max_len={c.max_len} (the position table's size)")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = layers.lookup(self.word_embeddings, input_ids) + layers.lookup(self.position_embeddings, positions, None)
    if token_type_ids is not None:
      x = x + layers.lookup(self.type_embeddings, token_type_ids, None)
    else:  # every token is segment A
      x = x + self.type_embeddings[0]
    x = self.drop(self.ln_embed(x.astype(c.compute_dtype)), deterministic=deterministic)  # [B, L, D]

    # keys only: [B, 1, 1, S] broadcasts over heads and queries, so padding costs no [B, T, S] mask
    mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
    if segment_ids is not None:
      same = layers.attention_mask(segment_ids, segment_ids, causal=False)  # [B, 1, T, S]
      mask = same if mask is None else same & mask
    for block in self.blocks:
      x = block(x, mask, deterministic)

    pooled = self.pool(x[:, 0]) if c.pooler else None  # [B, D]
    return x, pooled

  def pool(self, first):
    """The pooler: hidden states of [CLS] tokens [N, D] -> tanh(dense) [N, D] (also each packed example's [CLS])."""
    c = self.cfg
    first = sharding.constrain(first, ("batch", None))  # rows over the batch axes, as the residual stream's
    return sharding.constrain(jnp.tanh(
        layers.dense(self, POOLER_EQUATION, first, self.pooler_w, c.compute_dtype, self.pooler_lora, c.lora)
        + self.pooler_b.astype(c.compute_dtype)), ("batch", None))

  def attend(self, x):
    """x [..., D] -> logits [..., V] against the word-embedding table."""
    return jnp.einsum("...d,vd->...v", x, self.word_embeddings.astype(self.cfg.compute_dtype))
