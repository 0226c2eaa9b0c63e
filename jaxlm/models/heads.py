"""Task heads on the BERT encoder, each a whole model `{encoder, head}`: MLM (tied) + NSP pretraining, sequence
classification, token classification (softmax or CRF) and extractive QA (start/end logits).

The encoder's parameters sit under "encoder" in every model, so one converted checkpoint starts any task.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxlm.models import crf, layers
from jaxlm.models.encoder import Encoder, EncoderConfig


class Dense(nn.Module):
  """x [..., D] -> [..., features] with logical axes (embed, out_axis) on the kernel."""
  features: int
  init_std: float
  dtype: jnp.dtype
  out_axis: str | None = None

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    w = layers.param(self, "kernel", layers.normal(self.init_std), (d, self.features), ("embed", self.out_axis))
    b = layers.param(self, "bias", nn.initializers.zeros, (self.features,), (self.out_axis,))
    return jnp.einsum("...d,dc->...c", x, w.astype(self.dtype)) + b.astype(self.dtype)


class PreTrainingModel(nn.Module):
  """BERT pretraining: MLM logits through transform -> act -> LayerNorm -> tied embeddings + bias, and NSP logits
  from the pooled output. `mlm_positions` [B, P] limits the vocabulary projection to the masked positions."""
  cfg: EncoderConfig
  nsp: bool = True

  def setup(self):
    c = self.cfg
    if self.nsp and not c.pooler:
      raise ValueError("next-sentence prediction reads the pooled output: set model.pooler=True")
    self.encoder = Encoder(c)
    self.mlm_transform = Dense(c.d_model, c.init_std, c.compute_dtype)
    self.mlm_norm = layers.LayerNorm(c.norm_eps, True, c.compute_dtype)
    self.mlm_bias = layers.param(self, "mlm_bias", nn.initializers.zeros, (c.vocab_size,), ("vocab",))
    if self.nsp:
      self.nsp_head = Dense(2, c.init_std, c.compute_dtype)

  def __call__(self, input_ids, token_type_ids, attention_mask, deterministic: bool = True, mlm_positions=None):
    c = self.cfg
    hidden, pooled = self.encoder(input_ids, token_type_ids, attention_mask, deterministic)  # [B, L, D]
    if mlm_positions is not None:
      hidden = jnp.take_along_axis(hidden, mlm_positions[..., None], axis=1)  # [B, P, D]
    h = self.mlm_norm(nn.gelu(self.mlm_transform(hidden), approximate=c.hidden_act == "gelu_tanh"))
    mlm_logits = (self.encoder.attend(h) + self.mlm_bias.astype(c.compute_dtype)).astype(jnp.float32)  # [B, P, V]
    nsp_logits = self.nsp_head(pooled).astype(jnp.float32) if self.nsp else None  # [B, 2]
    return mlm_logits, nsp_logits


class SequenceClassifier(nn.Module):
  """pooled -> dropout -> dense: logits [B, C] (BertForSequenceClassification)."""
  cfg: EncoderConfig
  num_labels: int
  dropout: float

  @nn.compact
  def __call__(self, input_ids, token_type_ids, attention_mask, deterministic: bool = True):
    c = self.cfg
    if not c.pooler:
      raise ValueError("sequence classification reads the pooled output: set model.pooler=True")
    _, pooled = Encoder(c, name="encoder")(input_ids, token_type_ids, attention_mask, deterministic)
    pooled = nn.Dropout(self.dropout)(pooled, deterministic=deterministic)
    return Dense(self.num_labels, c.init_std, c.compute_dtype, name="classifier")(pooled).astype(jnp.float32)


class TokenClassifier(nn.Module):
  """hidden -> dropout -> dense: per-token tag scores [B, L, N]; with `crf`, also the CRF's (masked) transition,
  start and end scores, else None."""
  cfg: EncoderConfig
  num_labels: int
  dropout: float
  crf: bool = False
  allowed_transitions: tuple | None = None
  allowed_start: tuple | None = None

  @nn.compact
  def __call__(self, input_ids, token_type_ids, attention_mask, deterministic: bool = True):
    c = self.cfg
    hidden, _ = Encoder(c, name="encoder")(input_ids, token_type_ids, attention_mask, deterministic)
    hidden = nn.Dropout(self.dropout)(hidden, deterministic=deterministic)
    logits = Dense(self.num_labels, c.init_std, c.compute_dtype, name="classifier")(hidden).astype(jnp.float32)
    scores = None
    if self.crf:
      scores = crf.CrfScores(self.num_labels, self.allowed_transitions, self.allowed_start, name="crf")()
    return logits, scores


class SpanExtractor(nn.Module):
  """hidden -> dense(2): start and end logits [B, L] each (BertForQuestionAnswering)."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, attention_mask, deterministic: bool = True):
    c = self.cfg
    hidden, _ = Encoder(c, name="encoder")(input_ids, token_type_ids, attention_mask, deterministic)
    logits = Dense(2, c.init_std, c.compute_dtype, name="qa_outputs")(hidden).astype(jnp.float32)  # [B, L, 2]
    return logits[..., 0], logits[..., 1]
