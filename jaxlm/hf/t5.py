"""Hugging Face T5 <-> jaxlm: a T5ForConditionalGeneration directory (config.json + model.safetensors) to an
EncDecConfig and parameters laid out as jaxlm.models.encdec.EncDec creates them (per-layer or scanned), and back."""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxlm.hf.decoders import tensors_where
from jaxlm.hf.io import ConvertError, TensorReader, read_config_json, read_safetensors, write_model_dir
from jaxlm.models.encdec import EncDec, EncDecConfig, unstack_layers

# HF feed_forward_proj -> EncDecConfig.style (HF's gated-gelu is the tanh approximation, gelu_new)
HF_STYLES = {"relu": "t5", "gated-gelu": "t5_v1_1"}
# The EncDecConfig fields a checkpoint fixes (its shapes, and the functions its weights were trained with), with the
# config key that sets each one.
CHECKPOINT_KEYS = {"vocab_size": "model.vocab_size", "d_model": "model.d_model", "num_heads": "model.num_heads",
                   "head_dim": "model.head_dim", "d_ff": "model.d_ff", "num_encoder_layers": "model.num_layers",
                   "num_decoder_layers": "model.num_decoder_layers", "style": "model.style",
                   "relative_attention_num_buckets": "model.relative_attention_num_buckets",
                   "relative_attention_max_distance": "model.relative_attention_max_distance",
                   "norm_eps": "model.norm_eps", "tie_embeddings": "model.tie_embeddings"}
# each sublayer of our encoder / decoder layers -> (its index in an HF block's `layer` list, the HF module name)
ENCODER_LAYER = {"attn": ("0", "SelfAttention"), "mlp": ("1", "DenseReluDense")}
DECODER_LAYER = {"self_attn": ("0", "SelfAttention"), "cross_attn": ("1", "EncDecAttention"),
                 "mlp": ("2", "DenseReluDense")}


def read_hf_config(hf_dir: str, scan_layers: bool = False) -> EncDecConfig:
  """config.json -> EncDecConfig. Tied (one embedding, outputs scaled by d_model**-0.5) where the checkpoint scales its
  decoder output: transformers 5 says so in scale_decoder_outputs, earlier versions in tie_word_embeddings."""
  path = os.path.join(hf_dir, "config.json")
  hf = read_config_json(hf_dir)
  if hf.get("model_type") != "t5":
    raise ConvertError(f"{path}: model_type is '{hf.get('model_type')}', only 't5' checkpoints can be imported")
  proj = hf.get("feed_forward_proj", "relu")
  if proj not in HF_STYLES:
    raise ConvertError(f"{path}: feed_forward_proj '{proj}' is not supported (known: {', '.join(HF_STYLES)})")
  try:
    return EncDecConfig(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], num_heads=hf["num_heads"], head_dim=hf["d_kv"],
        d_ff=hf["d_ff"], num_encoder_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"], style=HF_STYLES[proj],
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), dropout=hf.get("dropout_rate", 0.1),
        init_factor=hf.get("initializer_factor", 1.0),
        tie_embeddings=bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))),
        scan_layers=scan_layers)
  except KeyError as e:
    raise ConvertError(f"{path} has no '{e.args[0]}' entry") from None
  except ValueError as e:
    raise ConvertError(f"{path}: {e}") from None


def _attention(get, prefix: str, cfg: EncDecConfig) -> dict:
  """q/k/v/o of one HF attention (torch Linear weights are [out, in]) as [D, H, E] and [H, E, D]."""
  d, h, e = cfg.d_model, cfg.num_heads, cfg.head_dim
  out = {n: get((h * e, d), f"{prefix}.{n}.weight").T.reshape(d, h, e) for n in ("q", "k", "v")}
  out["o"] = get((d, h * e), f"{prefix}.o.weight").T.reshape(h, e, d)
  return out


def _mlp(get, prefix: str, cfg: EncDecConfig) -> dict:
  d, f = cfg.d_model, cfg.d_ff
  names = ("wi",) if cfg.style == "t5" else ("wi_0", "wi_1")
  return {**{n: get((f, d), f"{prefix}.{n}.weight").T for n in names}, "wo": get((d, f), f"{prefix}.wo.weight").T}


def t5_params(tensors: dict[str, np.ndarray], cfg: EncDecConfig, where: str) -> dict:
  """HF T5ForConditionalGeneration tensors -> EncDec's per-layer parameter tree (layers_0, layers_1, ...). An untied
  cfg takes lm_head.weight, or shared.weight where the checkpoint has no lm_head (transformers then ties them)."""
  get = TensorReader(tensors, where)
  d, nb, h = cfg.d_model, cfg.relative_attention_num_buckets, cfg.num_heads
  norm = lambda name: {"scale": get((d,), name)}
  params = {"token_embedding": get((cfg.vocab_size, d), "shared.weight", "encoder.embed_tokens.weight")}
  for stack, num_layers, layout in (("encoder", cfg.num_encoder_layers, ENCODER_LAYER),
                                    ("decoder", cfg.num_decoder_layers, DECODER_LAYER)):
    # T5 keeps the stack's one relative-position table in the first layer's self-attention
    relpos = get((nb, h), f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    tree = {"relpos_bias": {"embedding": relpos}, "ln_final": norm(f"{stack}.final_layer_norm.weight")}
    for i in range(num_layers):
      layer = {}
      for ours, (idx, hf_name) in layout.items():
        prefix = f"{stack}.block.{i}.layer.{idx}"
        read = _mlp if ours == "mlp" else _attention
        layer[ours] = read(get, f"{prefix}.{hf_name}", cfg)
        layer[f"ln_{ours}"] = norm(f"{prefix}.layer_norm.weight")
      tree[f"layers_{i}"] = layer
    params[stack] = tree
  if not cfg.tied:
    params["decoder"]["lm_head"] = get((cfg.vocab_size, d), "lm_head.weight", "shared.weight").T  # [D, V]
  return params


def stack_layers(params: dict, cfg: EncDecConfig) -> dict:
  """Per-layer tree -> the scan_layers tree: each stack's layers_i stacked into 'layers' on a leading axis."""
  out = dict(params)
  for stack, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
    tree = {k: v for k, v in params[stack].items() if not k.startswith("layers_")}
    tree["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *[params[stack][f"layers_{i}"] for i in range(n)])
    out[stack] = tree
  return out


def _check_tree(params: dict, cfg: EncDecConfig, where: str) -> None:
  """The converted tree has exactly the parameters, and shapes, that EncDec(cfg) creates."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  want = jax.eval_shape(lambda: nn.meta.unbox(EncDec(cfg).init(jax.random.key(0), tokens, tokens)["params"]))
  want_flat = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
  got_flat = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  for key in sorted(set(want_flat) | set(got_flat)):
    if got_flat.get(key) != want_flat.get(key):
      raise ConvertError(f"{where}: parameter {key} converts to shape {got_flat.get(key)}, the model has "
                         f"{want_flat.get(key)}")


def load(hf_dir: str, scan_layers: bool = False) -> tuple[EncDecConfig, dict]:
  """(EncDecConfig, parameters as numpy float32) of a Hugging Face T5ForConditionalGeneration directory; scan_layers
  gives the stacked layout (and a config that scans).

  Tied and untied checkpoints both load. transformers 5 writes a model with tied weights but unscaled outputs (a
  gated-gelu T5Config) with no lm_head.weight: that becomes an untied model whose lm_head is a copy of the embedding.
  A scaled checkpoint with its own lm_head becomes an untied one with the scale folded into lm_head.
  """
  cfg = read_hf_config(hf_dir)
  where = tensors_where(hf_dir)
  tensors = read_safetensors(hf_dir)
  shared = tensors.get("shared.weight", tensors.get("encoder.embed_tokens.weight"))
  own_head = "lm_head.weight" in tensors and not np.array_equal(tensors["lm_head.weight"], shared)
  scaled = cfg.tied
  if own_head or not scaled:  # an output projection of its own, or the embedding without the scale
    cfg = dataclasses.replace(cfg, tie_embeddings=False)
  params = t5_params(tensors, cfg, where)
  if own_head and scaled:
    params["decoder"]["lm_head"] = params["decoder"]["lm_head"] * np.float32(cfg.d_model ** -0.5)
  _check_tree(params, cfg, where)
  if scan_layers:
    return dataclasses.replace(cfg, scan_layers=True), stack_layers(params, cfg)
  return cfg, params


def hf_config(cfg: EncDecConfig, extra: dict | None = None) -> dict:
  """The config.json of the T5ForConditionalGeneration equal to EncDec(cfg); `extra` adds or replaces entries. The
  token ids are T5's (pad 0, which also starts decoding; eos 1): `extra` sets a different tokenizer's."""
  hf = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True,
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.head_dim, "d_ff": cfg.d_ff,
        "num_layers": cfg.num_encoder_layers, "num_decoder_layers": cfg.num_decoder_layers,
        "num_heads": cfg.num_heads, "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "feed_forward_proj": {v: k for k, v in HF_STYLES.items()}[cfg.style], "layer_norm_epsilon": cfg.norm_eps,
        "dropout_rate": cfg.dropout, "initializer_factor": cfg.init_factor,
        # both spellings: transformers < 5 reads tie_word_embeddings, 5 reads scale_decoder_outputs
        "tie_word_embeddings": cfg.tied, "scale_decoder_outputs": cfg.tied,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0, "use_cache": True, "dtype": "float32"}
  return {**hf, **(extra or {})}


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:  # spread over processes: gathered one array at a time
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x), np.float32)


def hf_tensors(cfg: EncDecConfig, params) -> dict[str, np.ndarray]:
  """EncDec parameters (per-layer or scanned, boxed or not, host or device) -> HF tensor names and torch layouts."""
  p = unstack_layers(jax.tree.map(_to_host, nn.meta.unbox(params)), cfg)
  _check_tree(p, dataclasses.replace(cfg, scan_layers=False), "T5 export")
  d, h, e = cfg.d_model, cfg.num_heads, cfg.head_dim
  out = {"shared.weight": p["token_embedding"]}
  for stack, num_layers, layout in (("encoder", cfg.num_encoder_layers, ENCODER_LAYER),
                                    ("decoder", cfg.num_decoder_layers, DECODER_LAYER)):
    tree = p[stack]
    out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = tree["relpos_bias"]["embedding"]
    out[f"{stack}.final_layer_norm.weight"] = tree["ln_final"]["scale"]
    for i in range(num_layers):
      layer = tree[f"layers_{i}"]
      for ours, (idx, hf_name) in layout.items():
        prefix = f"{stack}.block.{i}.layer.{idx}"
        out[f"{prefix}.layer_norm.weight"] = layer[f"ln_{ours}"]["scale"]
        for name, w in layer[ours].items():
          if ours == "mlp":
            t = w.T
          elif name == "o":
            t = w.reshape(h * e, d).T  # [H, E, D] -> [D, H*E]
          else:
            t = w.reshape(d, h * e).T  # [D, H, E] -> [H*E, D]
          out[f"{prefix}.{hf_name}.{name}.weight"] = t
  if not cfg.tied:
    out["lm_head.weight"] = p["decoder"]["lm_head"].T  # [V, D]
  return out


def save(out_dir: str, cfg: EncDecConfig, params, extra_config: dict | None = None) -> None:
  """config.json + model.safetensors of a T5ForConditionalGeneration that computes what EncDec(cfg) does with
  `params`."""
  write_model_dir(out_dir, hf_config(cfg, extra_config), hf_tensors(cfg, params))


def model_overrides(cfg: EncDecConfig) -> list[str]:
  """The --config.model.* overrides that make a run's model the checkpoint's."""
  values = {"family": "encoder_decoder", "num_kv_heads": 0,
            **{key.split(".", 1)[1]: getattr(cfg, field) for field, key in CHECKPOINT_KEYS.items()}}
  values["tie_embeddings"] = cfg.tied
  return [f"model.{k}={v}" for k, v in values.items()]
