"""T5 encoder-decoder as published: pre-norm RMS blocks without biases, relative position buckets instead of
position embeddings, and either the original ReLU FFN with a tied, rescaled output ("t5") or T5 v1.1's gated GELU
with an untied lm_head ("t5_v1_1"), chosen by `EncDecConfig.style`.

Attention goes through jax.nn.dot_product_attention with scale 1 (T5 folds 1/sqrt(E) into the query init) and the
position bias as its `bias`. Packed rows carry segment ids and per-segment positions on both sides: self-attention
stays inside a segment, cross-attention joins equal segment ids, and segment 0 is padding. With `decode=True` the
decoder keeps its self-attention keys/values in the 'cache' collection, beside the cross-attention keys/values that
`init_cache` computes once from the encoder output.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.models import layers, norms

REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer: recompute everything in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
STYLES = ("t5", "t5_v1_1")


@dataclasses.dataclass(frozen=True)
class EncDecConfig:
  """The encoder-decoder's hyperparameters; layers see only this, never the run config."""
  vocab_size: int
  d_model: int
  num_heads: int
  head_dim: int  # T5's d_kv: need not be d_model // num_heads
  d_ff: int
  num_encoder_layers: int
  num_decoder_layers: int
  style: str = "t5"
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  norm_eps: float = 1e-6
  dropout: float = 0.1
  mlp_dropout: bool = True  # dropout on the MLP's hidden units too (T5); False: residual branches and embeddings only
  init_factor: float = 1.0  # T5's initializer_factor: every init stddev (derived from the shapes) is scaled by it
  dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False
  attention: str = "xla"
  tie_embeddings: bool | None = None  # None = the style's: tied for t5, untied for t5_v1_1
  lora: layers.LoraSpec | None = None  # low-rank adapters on the projections it targets (jaxlm/peft.py sets it)

  def __post_init__(self):
    if self.style not in STYLES:
      raise ValueError(f"model.style must be one of {', '.join(STYLES)} for model.family=encoder_decoder, "
                       f"got '{self.style}'")
    for key, value in (("vocab_size", self.vocab_size), ("d_model", self.d_model), ("num_heads", self.num_heads),
                       ("head_dim", self.head_dim), ("d_ff", self.d_ff), ("num_layers", self.num_encoder_layers),
                       ("num_decoder_layers", self.num_decoder_layers)):
      if value < 1:
        raise ValueError(f"model.{key} must be at least 1, got {value}")
    if self.relative_attention_num_buckets < 4:
      raise ValueError("model.relative_attention_num_buckets must be at least 4 (the encoder splits them by "
                       f"direction, then into exact and log-spaced halves), got {self.relative_attention_num_buckets}")
    if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
      raise ValueError(f"model.relative_attention_max_distance={self.relative_attention_max_distance} must exceed "
                       f"half of model.relative_attention_num_buckets={self.relative_attention_num_buckets} "
                       "(the distances that get a bucket each)")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
    if self.norm_eps <= 0:
      raise ValueError(f"model.norm_eps must be positive, got {self.norm_eps}")
    if self.init_factor <= 0:
      raise ValueError(f"model.init_factor must be positive, got {self.init_factor}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"model.dtype must be float32 or bfloat16, got '{self.dtype}'")
    if self.remat not in ("none", *REMAT_POLICIES):
      raise ValueError(f"model.remat must be one of none, {', '.join(REMAT_POLICIES)}; got '{self.remat}'")
    if self.attention not in layers.ATTENTION_IMPLS:
      raise ValueError(f"model.attention must be one of {', '.join(layers.ATTENTION_IMPLS)} for an encoder-decoder, "
                       f"got '{self.attention}' ('blocked' is causal self-attention, for decoders)")

  @property
  def tied(self) -> bool:
    """Output logits through the token embedding (scaled by d_model**-0.5) rather than a separate lm_head."""
    return self.style == "t5" if self.tie_embeddings is None else self.tie_embeddings

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def attention_impl(self):
    return None if self.attention == "auto" else self.attention

  @classmethod
  def from_config(cls, model_cfg) -> EncDecConfig:
    """From config.model (family encoder_decoder); keys only the other families read must keep neutral values."""
    if model_cfg.family != "encoder_decoder":
      raise ValueError(f"model.family='{model_cfg.family}', but this task needs the T5 encoder-decoder: "
                       "set --config.model.family=encoder_decoder")
    if model_cfg.num_kv_heads not in (0, model_cfg.num_heads):
      raise ValueError(f"model.num_kv_heads={model_cfg.num_kv_heads}: T5 has no grouped-query attention (leave it 0)")
    if not model_cfg.head_dim and model_cfg.d_model % model_cfg.num_heads:
      raise ValueError(f"model.d_model={model_cfg.d_model} is not divisible by model.num_heads="
                       f"{model_cfg.num_heads}: set model.head_dim")
    return cls(
        vocab_size=model_cfg.vocab_size, d_model=model_cfg.d_model, num_heads=model_cfg.num_heads,
        head_dim=model_cfg.head_dim or model_cfg.d_model // model_cfg.num_heads,
        d_ff=model_cfg.d_ff or 4 * model_cfg.d_model, num_encoder_layers=model_cfg.num_layers,
        num_decoder_layers=model_cfg.num_decoder_layers or model_cfg.num_layers, style=model_cfg.style,
        relative_attention_num_buckets=model_cfg.relative_attention_num_buckets,
        relative_attention_max_distance=model_cfg.relative_attention_max_distance, norm_eps=model_cfg.norm_eps,
        dropout=model_cfg.dropout, mlp_dropout=model_cfg.mlp_dropout, init_factor=model_cfg.init_factor,
        dtype=model_cfg.dtype, remat=model_cfg.remat, scan_layers=model_cfg.scan_layers, attention=model_cfg.attention,
        tie_embeddings=model_cfg.tie_embeddings)


def _bucket_table(num_buckets: int, max_distance: int) -> np.ndarray:
  """Bucket of each distance 0..max_distance in one direction: distances below num_buckets // 2 get a bucket each,
  the rest log-spaced buckets up to max_distance; computed in float64 so no edge moves with float32 rounding."""
  max_exact = num_buckets // 2
  n = np.arange(max_distance + 1, dtype=np.float64)
  log_scaled = np.log(np.maximum(n, 1.0) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
  large = np.minimum(max_exact + np.floor(log_scaled + 1e-9), num_buckets - 1)
  return np.where(n < max_exact, n, large).astype(np.int32)


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
  """T5's bucket of each key - query distance (int array, any shape). Bidirectional: half the buckets for keys after
  the query. Unidirectional (causal): keys after the query share bucket 0 with the query itself."""
  offset = 0
  if bidirectional:
    num_buckets //= 2
    offset = jnp.where(relative_position > 0, num_buckets, 0)
    n = jnp.abs(relative_position)
  else:
    n = jnp.maximum(-relative_position, 0)
  # every distance from max_distance on falls in the last bucket, so the table stops there
  table = jnp.asarray(_bucket_table(num_buckets, max_distance))
  return offset + table[jnp.minimum(n, max_distance)]


class RelativePositionBias(nn.Module):
  """A learned scalar per (bucket, head), looked up from key - query distances: one table per stack, computed once
  per call and added to every layer's self-attention scores."""
  cfg: EncDecConfig
  bidirectional: bool

  @nn.compact
  def __call__(self, positions_q, positions_k):
    """positions [B or 1, T] and [B or 1, S] (per segment) -> bias [B or 1, H, T, S] float32."""
    c = self.cfg
    table = layers.param(self, "embedding", layers.normal(c.init_factor * c.d_model ** -0.5),
                         (c.relative_attention_num_buckets, c.num_heads), (None, "heads"))
    relative = positions_k[:, None, :] - positions_q[:, :, None]  # [B, T, S]
    buckets = relative_position_bucket(relative, self.bidirectional, c.relative_attention_num_buckets,
                                       c.relative_attention_max_distance)
    return jnp.transpose(jnp.take(table, buckets, axis=0), (0, 3, 1, 2))  # [B, H, T, S]


def _heads(module: nn.Module, name: str, x, std: float):
  """x [B, T, D] -> [B, T, H, E] through a new projection `name`."""
  c = module.cfg
  return layers.project(module, name, "btd,dhe->bthe", x, layers.normal(std), (c.d_model, c.num_heads, c.head_dim),
                        ("embed", "heads", "head_dim"), c.compute_dtype, c.lora)


def _attend(module: nn.Module, q, k, v, mask, bias, cached: bool = False):
  """Unscaled softmax(q k + bias) v over the allowed keys, then the output projection: [B, T, H, E] -> [B, T, D].
  `cached`: k [B, H, E, S] and v [B, H, S, E] from a decoding cache, in the layouts layers.cached_attention reads."""
  c = module.cfg
  y = layers.cached_attention(q, k, v, mask, bias, scale=1.0) if cached else \
      jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=1.0, implementation=c.attention_impl)
  std = c.init_factor * (c.num_heads * c.head_dim) ** -0.5
  return layers.project(module, "o", "bthe,hed->btd", y, layers.normal(std), (c.num_heads, c.head_dim, c.d_model),
                        ("heads", "head_dim", "embed"), c.compute_dtype, c.lora)  # [B, T, D]


class SelfAttention(nn.Module):
  cfg: EncDecConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, mask, bias, cache_index=None):
    c = self.cfg
    # T5's init carries the 1/sqrt(E) that other models put in the scores: the query's stddev is (D * E) ** -0.5
    q = _heads(self, "q", x, c.init_factor * (c.d_model * c.head_dim) ** -0.5)
    k = _heads(self, "k", x, c.init_factor * c.d_model ** -0.5)
    v = _heads(self, "v", x, c.init_factor * c.d_model ** -0.5)
    if self.decode:  # init only sizes the cache: keys [B, H, E, max decode length], values [B, H, length, E]
      k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
      cached_k = self.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
      cached_v = self.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
      if not self.is_initializing():
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, 0, 0, cache_index))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, 0, cache_index, 0))
        k, v = cached_k.value, cached_v.value
    return _attend(self, q, k, v, mask, bias, cached=self.decode)


class CrossAttention(nn.Module):
  """Decoder queries over the encoder output; no position bias."""
  cfg: EncDecConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, encoded, mask):
    c = self.cfg
    q = _heads(self, "q", x, c.init_factor * (c.d_model * c.head_dim) ** -0.5)
    if encoded is None:  # a decoding step: the keys/values init_cache stored
      if not (self.decode and self.has_variable("cache", "key")):
        raise ValueError("decoding without the encoder output needs the cache init_cache makes (it holds the "
                         "encoder's keys/values)")
      k, v = self.get_variable("cache", "key"), self.get_variable("cache", "value")
    else:
      k = _heads(self, "k", encoded, c.init_factor * c.d_model ** -0.5)
      v = _heads(self, "v", encoded, c.init_factor * c.d_model ** -0.5)
      if self.decode:  # kept as keys [B, H, E, S] and values [B, H, S, E], as the self-attention cache
        k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
        cached_k = self.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
        if not self.is_initializing():
          cached_k.value, cached_v.value = k, v
    return _attend(self, q, k, v, mask, None, cached=self.decode)


class Mlp(nn.Module):
  """ReLU (t5) or gated GELU (tanh approximation, HF's gelu_new: t5_v1_1); dropout on the hidden units (mlp_dropout)."""
  cfg: EncDecConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):  # x [B, T, D]
    c = self.cfg
    dt, d, f = c.compute_dtype, c.d_model, c.d_ff
    wi = lambda name: layers.project(self, name, "btd,df->btf", x, layers.normal(c.init_factor * d ** -0.5), (d, f),
                                     ("embed", "mlp"), dt, c.lora)  # [B, T, F]
    if c.style == "t5":
      h = nn.relu(wi("wi"))
    else:
      h = nn.gelu(wi("wi_0"), approximate=True) * wi("wi_1")
    h = layers.Dropout(c.dropout if c.mlp_dropout else 0.0)(h, deterministic=self.deterministic)
    return layers.project(self, "wo", "btf,fd->btd", h, layers.normal(c.init_factor * f ** -0.5), (f, d),
                          ("mlp", "embed"), dt, c.lora)  # [B, T, D]


class EncoderLayer(nn.Module):
  """x + Attn(norm(x)), then x + Mlp(norm(x)); (carry, inputs) -> (carry, None) as nn.scan needs."""
  cfg: EncDecConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, inputs):
    mask, bias = inputs
    c = self.cfg
    norm = lambda name: norms.RMSNorm(c.norm_eps, c.compute_dtype, name=name)
    drop = lambda h: layers.Dropout(c.dropout)(h, deterministic=self.deterministic)
    x = x + drop(SelfAttention(c, name="attn")(norm("ln_attn")(x), mask, bias))
    x = x + drop(Mlp(c, self.deterministic, name="mlp")(norm("ln_mlp")(x)))
    return layers.residual(x), None


class DecoderLayer(nn.Module):
  """Causal self-attention, cross-attention over the encoder output, then the MLP, each pre-normed and residual."""
  cfg: EncDecConfig
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x, inputs):
    self_mask, self_bias, encoded, cross_mask, cache_index = inputs
    c = self.cfg
    norm = lambda name: norms.RMSNorm(c.norm_eps, c.compute_dtype, name=name)
    drop = lambda h: layers.Dropout(c.dropout)(h, deterministic=self.deterministic)
    h = SelfAttention(c, self.decode, name="self_attn")(norm("ln_self_attn")(x), self_mask, self_bias, cache_index)
    x = x + drop(h)
    x = x + drop(CrossAttention(c, self.decode, name="cross_attn")(norm("ln_cross_attn")(x), encoded, cross_mask))
    x = x + drop(Mlp(c, self.deterministic, name="mlp")(norm("ln_mlp")(x)))
    return layers.residual(x), None


def _run_layers(layer_cls, cfg: EncDecConfig, num_layers: int, x, inputs, **attrs):
  """num_layers layers over x, each given the same `inputs`: a Python loop (params layers_0, layers_1, ...) or,
  with scan_layers, one nn.scan (params stacked on a leading 'layers' axis under 'layers'). Called from inside a
  stack's compact method, which becomes the layers' parent."""
  if cfg.remat != "none":
    layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    scanned = nn.scan(layer_cls, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=nn.broadcast, length=num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = scanned(cfg, **attrs, name="layers")(x, inputs)
    return x
  for i in range(num_layers):
    x, _ = layer_cls(cfg, **attrs, name=f"layers_{i}")(x, inputs)
  return x


def _default_positions(positions, t: int):
  return jnp.arange(t, dtype=jnp.int32)[None] if positions is None else positions  # [1, T] broadcasts over batch


class EncoderStack(nn.Module):
  cfg: EncDecConfig

  @nn.compact
  def __call__(self, embedding, tokens, segment_ids, positions, deterministic: bool):
    c = self.cfg
    b, s = tokens.shape
    segment_ids = jnp.ones((b, s), jnp.int32) if segment_ids is None else segment_ids
    positions = _default_positions(positions, s)
    x = layers.lookup(embedding, tokens).astype(c.compute_dtype)  # [B, S, D]
    x = layers.Dropout(c.dropout)(x, deterministic=deterministic)
    bias = RelativePositionBias(c, bidirectional=True, name="relpos_bias")(positions, positions)  # [B|1, H, S, S]
    mask = layers.attention_mask(segment_ids, segment_ids, causal=False)  # [B, 1, S, S]
    x = _run_layers(EncoderLayer, c, c.num_encoder_layers, x, (mask, bias), deterministic=deterministic)
    x = norms.RMSNorm(c.norm_eps, c.compute_dtype, name="ln_final")(x)
    return layers.Dropout(c.dropout)(x, deterministic=deterministic)


class DecoderStack(nn.Module):
  cfg: EncDecConfig

  @nn.compact
  def __call__(self, embedding, encoded, encoder_segment_ids, tokens, segment_ids, positions, deterministic: bool,
               decode: bool):
    c = self.cfg
    b, t = tokens.shape
    segment_ids = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
    if encoded is not None and encoder_segment_ids is None:
      encoder_segment_ids = jnp.ones(encoded.shape[:2], jnp.int32)
    cache_index = None
    if decode:
      positions, positions_k, segment_ids_k, encoder_segment_ids, cache_index = self._decode_state(
          segment_ids, positions, encoder_segment_ids)
    else:
      positions = positions_k = _default_positions(positions, t)
      segment_ids_k = segment_ids

    x = layers.lookup(embedding, tokens).astype(c.compute_dtype)  # [B, T, D]
    x = layers.Dropout(c.dropout)(x, deterministic=deterministic)
    self_bias = RelativePositionBias(c, bidirectional=False, name="relpos_bias")(positions, positions_k)
    self_mask = layers.attention_mask(segment_ids, segment_ids_k, positions, positions_k, causal=True)
    cross_mask = layers.attention_mask(segment_ids, encoder_segment_ids, causal=False)  # [B, 1, T, S]
    x = _run_layers(DecoderLayer, c, c.num_decoder_layers, x, (self_mask, self_bias, encoded, cross_mask, cache_index),
                    deterministic=deterministic, decode=decode)
    x = norms.RMSNorm(c.norm_eps, c.compute_dtype, name="ln_final")(x)
    x = layers.Dropout(c.dropout)(x, deterministic=deterministic)

    if c.tied:  # T5's tied output rescales by d_model**-0.5 before reusing the embedding
      logits = layers.einsum("btd,vd->btv", x * c.d_model ** -0.5, embedding.astype(c.compute_dtype))  # [B, T, V]
    else:
      logits = layers.project(self, "lm_head", "btd,dv->btv", x, layers.normal(c.init_factor),
                              (c.d_model, c.vocab_size), ("embed", "vocab"), c.compute_dtype, c.lora)  # [B, T, V]
    return logits.astype(jnp.float32)

  def _decode_state(self, segment_ids, positions, encoder_segment_ids):
    """Stores this call's decoder segment ids and positions at the cache index (and the encoder's segment ids when
    the encoder output is given); returns query positions, the cached key positions and segment ids, the encoder's
    segment ids and the index the layers write their keys/values at."""
    b, t = segment_ids.shape
    cached_seg = self.variable("cache", "segment_ids", jnp.zeros, (b, t), jnp.int32)
    cached_pos = self.variable("cache", "positions", jnp.zeros, (b, t), jnp.int32)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if encoder_segment_ids is not None:
      cached_enc_seg = self.variable("cache", "encoder_segment_ids", jnp.zeros, encoder_segment_ids.shape, jnp.int32)
    elif not self.has_variable("cache", "encoder_segment_ids"):
      raise ValueError("decoding without the encoder output needs the cache init_cache makes (it holds the "
                       "encoder's segment ids)")
    if self.is_initializing():  # init only sizes the cache; the forward pass is an ordinary one
      positions = _default_positions(positions, t)
      return positions, positions, segment_ids, encoder_segment_ids, index.value
    i = index.value
    if positions is None:  # consecutive positions from where the last call stopped
      positions = jnp.broadcast_to(i + jnp.arange(t, dtype=jnp.int32), (b, t))
    cached_seg.value = jax.lax.dynamic_update_slice(cached_seg.value, segment_ids.astype(jnp.int32), (0, i))
    cached_pos.value = jax.lax.dynamic_update_slice(cached_pos.value, positions.astype(jnp.int32), (0, i))
    index.value = i + t
    if encoder_segment_ids is not None:
      cached_enc_seg.value = encoder_segment_ids.astype(jnp.int32)
    # unwritten slots hold segment 0 and so are never attended to
    return positions, cached_pos.value, cached_seg.value, self.get_variable("cache", "encoder_segment_ids"), i


class EncDec(nn.Module):
  """T5: `encode` the inputs, `decode` logits [B, T, V] (float32) from the encoder output; `__call__` does both.

  Segment ids default to one segment (1) per row and positions to 0..L-1. decode=True decodes incrementally from a
  cache that `init_cache` makes: self-attention keys/values accumulate in the 'cache' collection, written at the
  cache's index (positions default to the index onwards), and the cross-attention keys/values were computed from the
  encoder output once, so steps pass encoded=None and each new token costs one position. A decode=True call that
  does pass `encoded` recomputes and stores them.
  """
  cfg: EncDecConfig

  def setup(self):
    c = self.cfg
    self.token_embedding = layers.param(self, "token_embedding", layers.normal(c.init_factor),
                                        (c.vocab_size, c.d_model), ("vocab", "embed"))
    self.encoder = EncoderStack(c)
    self.decoder = DecoderStack(c)

  def encode(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None, deterministic: bool = True):
    """tokens [B, S] -> encoder output [B, S, D] in the compute dtype."""
    return self.encoder(self.token_embedding, encoder_input_tokens, encoder_segment_ids, encoder_positions,
                        deterministic)

  def decode(self, encoded, encoder_segment_ids, decoder_input_tokens, decoder_segment_ids=None,
             decoder_positions=None, deterministic: bool = True, decode: bool = False):
    """Encoder output [B, S, D] (None when decoding from a cache init_cache made) and tokens [B, T] -> logits."""
    return self.decoder(self.token_embedding, encoded, encoder_segment_ids, decoder_input_tokens, decoder_segment_ids,
                        decoder_positions, deterministic, decode)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids=None, decoder_segment_ids=None,
               encoder_positions=None, decoder_positions=None, deterministic: bool = True, decode: bool = False):
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions, deterministic)
    return self.decode(encoded, encoder_segment_ids, decoder_input_tokens, decoder_segment_ids, decoder_positions,
                       deterministic, decode)


def init_cache(model: EncDec, params, encoded, encoder_segment_ids, max_decode_len: int):
  """The decoding cache of rows whose encoder output is `encoded` [B, S, D]: room for max_decode_len decoder tokens,
  and the cross-attention keys/values computed here, once, so that every decoding step passes encoded=None."""
  b, s = encoded.shape[:2]

  def empty():
    dummy = jnp.zeros((b, s, model.cfg.d_model), encoded.dtype)
    tokens = jnp.zeros((b, max_decode_len), jnp.int32)
    return model.init(jax.random.key(0), dummy, None, tokens, decode=True, method=EncDec.decode)["cache"]

  cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(empty))
  # decoding zero tokens stores the encoder's keys/values and segment ids and leaves the rest of the cache empty
  _, variables = model.apply({"params": params, "cache": cache}, encoded, encoder_segment_ids,
                             jnp.zeros((b, 0), jnp.int32), decode=True, method=EncDec.decode, mutable=["cache"])
  return variables["cache"]


def unstack_layers(params: dict, cfg: EncDecConfig) -> dict:
  """The scan_layers tree -> the per-layer tree; a per-layer tree is returned as it is."""
  if "layers" not in params["encoder"]:
    return params
  out = dict(params)
  for stack, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
    tree = {k: v for k, v in params[stack].items() if k != "layers"}
    tree.update({f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], params[stack]["layers"]) for i in range(n)})
    out[stack] = tree
  return out
