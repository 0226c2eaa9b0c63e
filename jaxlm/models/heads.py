"""Task heads on the BERT encoder, each a whole model `{encoder, head}`: MLM (tied) + NSP pretraining, sequence
classification, token classification (softmax or CRF) and extractive QA (start/end logits).

The encoder's parameters sit under "encoder" in every model, so one converted checkpoint starts any task; everything
beside it is the task's head (which parameter-efficient fine-tuning keeps training, jaxlm/peft.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxlm.models import activations, crf, layers, norms
from jaxlm.models.encoder import Encoder, EncoderConfig


class Dense(nn.Module):
  """x [..., D] -> [..., features] with logical axes (embed, out_axis) on the kernel."""
  features: int
  init_std: float
  dtype: jnp.dtype
  out_axis: str | None = None
  lora: layers.LoraSpec | None = None

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    lead = "bjklmn"[:x.ndim - 1]  # x [..., D] -> [..., C], the leading axes named, as an adapter's einsums need
    y = layers.project(self, "kernel", f"{lead}d,dc->{lead}c", x, layers.normal(self.init_std), (d, self.features),
                       ("embed", self.out_axis), self.dtype, self.lora)
    return y + layers.param(self, "bias", nn.initializers.zeros, (self.features,), (self.out_axis,)).astype(self.dtype)


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
    self.mlm_transform = Dense(c.d_model, c.init_std, c.compute_dtype, lora=c.lora)
    self.mlm_norm = norms.LayerNorm(c.norm_eps, True, c.compute_dtype)
    self.mlm_bias = layers.param(self, "mlm_bias", nn.initializers.zeros, (c.vocab_size,), ("vocab",))
    if self.nsp:
      self.nsp_head = Dense(2, c.init_std, c.compute_dtype, lora=c.lora)

  def __call__(self, input_ids, token_type_ids, attention_mask, deterministic: bool = True, mlm_positions=None):
    c = self.cfg
    hidden, pooled = self.encoder(input_ids, token_type_ids, attention_mask, deterministic)  # [B, L, D]
    if mlm_positions is not None:
      hidden = jnp.take_along_axis(hidden, mlm_positions[..., None], axis=1)  # [B, P, D]
    h = self.mlm_norm(activations.gelu_by_name(self.mlm_transform(hidden), c.hidden_act))
    mlm_logits = (self.encoder.attend(h) + self.mlm_bias.astype(c.compute_dtype)).astype(jnp.float32)  # [B, P, V]
    nsp_logits = self.nsp_head(pooled).astype(jnp.float32) if self.nsp else None  # [B, 2]
    return mlm_logits, nsp_logits


class SequenceClassifier(nn.Module):
  """pooled -> dropout -> dense: logits [B, C] (BertForSequenceClassification). Rows packed with several examples
  (segment_ids, positions) give `cls_positions` [B, M], the [CLS] of each: logits [B, M, C], each from its own
  pooled [CLS]."""
  cfg: EncoderConfig
  num_labels: int
  dropout: float

  @nn.compact
  def __call__(self, input_ids, token_type_ids, attention_mask, deterministic: bool = True, segment_ids=None,
               positions=None, cls_positions=None):
    c = self.cfg
    if not c.pooler:
      raise ValueError("sequence classification reads the pooled output: set model.pooler=True")
    encoder = Encoder(c, name="encoder")
    hidden, pooled = encoder(input_ids, token_type_ids, attention_mask, deterministic, segment_ids, positions)
    if cls_positions is not None:
      cls = jnp.take_along_axis(hidden, cls_positions[:, :, None], axis=1)  # [B, M, D]
      pooled = encoder.pool(cls.reshape(-1, c.d_model)).reshape(cls.shape)  # [B, M, D]
    pooled = layers.Dropout(self.dropout)(pooled, deterministic=deterministic)
    logits = Dense(self.num_labels, c.init_std, c.compute_dtype, lora=c.lora, name="classifier")(pooled)  # [B, C]
    return logits.astype(jnp.float32)


class TokenClassifier(nn.Module):
  """hidden -> dropout -> dense: per-token tag scores [B, L, N]; with `crf`, also the CRF's (masked) transition,
  start and end scores, else None. Packed rows pass segment_ids and positions on to the encoder."""
  cfg: EncoderConfig
  num_labels: int
  dropout: float
  crf: bool = False
  allowed_transitions: tuple | None = None
  allowed_start: tuple | None = None

  @nn.compact
  def __call__(self, input_ids, token_type_ids, attention_mask, deterministic: bool = True, segment_ids=None,
               positions=None):
    c = self.cfg
    hidden, _ = Encoder(c, name="encoder")(input_ids, token_type_ids, attention_mask, deterministic, segment_ids,
                                           positions)
    hidden = layers.Dropout(self.dropout)(hidden, deterministic=deterministic)
    logits = Dense(self.num_labels, c.init_std, c.compute_dtype, lora=c.lora, name="classifier")(hidden)  # [B, L, N]
    logits = logits.astype(jnp.float32)
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
    logits = Dense(2, c.init_std, c.compute_dtype, lora=c.lora, name="qa_outputs")(hidden).astype(jnp.float32)
    return logits[..., 0], logits[..., 1]
