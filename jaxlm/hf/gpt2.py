"""Hugging Face GPT-2 <-> jaxlm: a GPT2LMHeadModel or GPT2Model directory (config.json + safetensors) <-> a
gpt2-style DecoderConfig and the parameters jaxlm.models.decoder.Decoder creates."""

from __future__ import annotations

import numpy as np

from jaxlm.hf import decoders
from jaxlm.hf.bert import HF_ACTIVATIONS
from jaxlm.hf.decoders import check_tree, host_per_layer, in_layout, tensors_where
from jaxlm.hf.io import ConvertError, TensorReader, read_config_json, read_safetensors, write_model_dir
from jaxlm.models.decoder import DecoderConfig

# config.json entries whose other values change the network in ways the decoder does not have, with the neutral value.
FIXED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}
EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}


def read_hf_config(hf_dir: str, scan_layers: bool = False) -> DecoderConfig:
  """config.json of a GPT-2 directory -> the gpt2-style DecoderConfig of the same network."""
  path = f"{hf_dir}/config.json"
  hf = read_config_json(hf_dir)
  if hf.get("model_type") != "gpt2":
    raise ConvertError(f"{path}: model_type is '{hf.get('model_type')}', expected 'gpt2'")
  act = hf.get("activation_function", "gelu_new")
  if act not in HF_ACTIVATIONS:
    raise ConvertError(f"{path}: activation_function '{act}' is not supported (known: {', '.join(HF_ACTIVATIONS)})")
  for key, neutral in FIXED.items():
    if hf.get(key, neutral) != neutral:
      raise ConvertError(f"{path}: {key}={hf[key]} is not supported: the decoder has only {key}={neutral}")
  try:
    d = hf["n_embd"]
    return DecoderConfig(
        vocab_size=hf["vocab_size"], max_len=hf["n_positions"], num_layers=hf["n_layer"], d_model=d,
        num_heads=hf["n_head"], style="gpt2", d_ff=hf.get("n_inner") or 4 * d,
        tie_embeddings=hf.get("tie_word_embeddings", True), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        use_bias=True, hidden_act=HF_ACTIVATIONS[act], dropout=hf.get("resid_pdrop", 0.1),
        init_std=hf.get("initializer_range", 0.02), scan_layers=scan_layers)
  except KeyError as e:
    raise ConvertError(f"{path} has no '{e.args[0]}' entry") from None
  except ValueError as e:  # DecoderConfig's own checks, e.g. n_embd not divisible by n_head
    raise ConvertError(f"{path}: {e}") from None


def decoder_params(tensors: dict[str, np.ndarray], cfg: DecoderConfig, where: str) -> dict:
  """GPT-2 tensors -> the Decoder's parameter tree (in cfg's layer layout). GPT-2's Conv1D weights are already
  [in, out]; c_attn's output columns are q|k|v, each head-major."""
  get = TensorReader(tensors, where)
  # GPT2LMHeadModel puts the network under 'transformer.'; GPT2Model has no prefix; lm_head.weight has none either
  prefix = "transformer." if "transformer.wte.weight" in tensors else ""
  v, d, h, e, f = cfg.vocab_size, cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.ffn_dim
  params = {"embedding": get((v, d), f"{prefix}wte.weight"),
            "pos_embedding": get((cfg.max_len, d), f"{prefix}wpe.weight")}
  for i in range(cfg.num_layers):
    p = f"{prefix}h.{i}"
    params[f"block_{i}"] = {
        "ln_attn": get.norm(f"{p}.ln_1", d),
        "attn": {"qkv": get((d, 3 * d), f"{p}.attn.c_attn.weight").reshape(d, 3, h, e),  # [D, 3, H, E]
                 "qkv_bias": get((3 * d,), f"{p}.attn.c_attn.bias").reshape(3, h, e),
                 "o": get((d, d), f"{p}.attn.c_proj.weight").reshape(h, e, d),  # [H, E, D]
                 "o_bias": get((d,), f"{p}.attn.c_proj.bias")},
        "ln_mlp": get.norm(f"{p}.ln_2", d),
        "mlp": {"wi": get((d, f), f"{p}.mlp.c_fc.weight"), "bi": get((f,), f"{p}.mlp.c_fc.bias"),
                "wo": get((f, d), f"{p}.mlp.c_proj.weight"), "bo": get((d,), f"{p}.mlp.c_proj.bias")},
    }
  params["ln_final"] = get.norm(f"{prefix}ln_f", d)
  if not cfg.tie_embeddings:
    params["lm_head"] = get((v, d), "lm_head.weight").T  # torch Linear [V, D] -> [D, V]
  return in_layout(params, cfg)


def load(hf_dir: str, scan_layers: bool = False) -> tuple[DecoderConfig, dict]:
  """(DecoderConfig, Decoder parameters as float32 numpy arrays), stacked under blocks/block when scan_layers."""
  cfg = read_hf_config(hf_dir, scan_layers)
  where = tensors_where(hf_dir)
  params = decoder_params(read_safetensors(hf_dir), cfg, where)
  check_tree(params, cfg, where)
  return cfg, params


def model_overrides(cfg: DecoderConfig) -> list[str]:
  """The --config.model.* overrides that make a run's model the checkpoint's."""
  return decoders.model_overrides(cfg)


def hf_config(cfg: DecoderConfig, extra: dict | None = None) -> dict:
  """The config.json of GPT2LMHeadModel for cfg; `extra` adds or replaces entries (token ids, for instance)."""
  _check_exportable(cfg)
  hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_len, "n_embd": cfg.d_model, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
        "n_inner": cfg.ffn_dim, "activation_function": EXPORT_ACTIVATIONS[cfg.hidden_act],
        "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
        "attn_pdrop": 0.0, "scale_attn_weights": True, "dtype": "float32",
        # the token ids belong to the tokenizer, which the decoder does not know; GPT-2's defaults (50256) would
        # point outside a smaller vocabulary
        "bos_token_id": None, "eos_token_id": None}
  return {**hf, **(extra or {})}


def hf_tensors(cfg: DecoderConfig, params) -> dict[str, np.ndarray]:
  """Decoder parameters (either layout, host or device) -> GPT2LMHeadModel's tensors. Biases a use_bias=False
  decoder lacks are written as zeros, which is the same network."""
  _check_exportable(cfg)
  p = host_per_layer(params, cfg, "GPT-2 export")
  d, f = cfg.d_model, cfg.ffn_dim
  t = {"transformer.wte.weight": p["embedding"], "transformer.wpe.weight": p["pos_embedding"],
       "transformer.ln_f.weight": p["ln_final"]["scale"], "transformer.ln_f.bias": p["ln_final"]["bias"]}
  for i in range(cfg.num_layers):
    b, n = p[f"block_{i}"], f"transformer.h.{i}"
    attn, mlp = b["attn"], b["mlp"]
    t.update({
        f"{n}.ln_1.weight": b["ln_attn"]["scale"], f"{n}.ln_1.bias": b["ln_attn"]["bias"],
        f"{n}.attn.c_attn.weight": attn["qkv"].reshape(d, 3 * d),
        f"{n}.attn.c_attn.bias": attn["qkv_bias"].reshape(3 * d) if cfg.use_bias else _zeros(3 * d),
        f"{n}.attn.c_proj.weight": attn["o"].reshape(d, d),
        f"{n}.attn.c_proj.bias": attn["o_bias"] if cfg.use_bias else _zeros(d),
        f"{n}.ln_2.weight": b["ln_mlp"]["scale"], f"{n}.ln_2.bias": b["ln_mlp"]["bias"],
        f"{n}.mlp.c_fc.weight": mlp["wi"], f"{n}.mlp.c_fc.bias": mlp["bi"] if cfg.use_bias else _zeros(f),
        f"{n}.mlp.c_proj.weight": mlp["wo"], f"{n}.mlp.c_proj.bias": mlp["bo"] if cfg.use_bias else _zeros(d),
    })
  if not cfg.tie_embeddings:
    t["lm_head.weight"] = p["lm_head"].T  # [D, V] -> torch Linear [V, D]
  return t


def save(out_dir: str, cfg: DecoderConfig, params, extra_config: dict | None = None) -> None:
  """config.json + model.safetensors of a GPT2LMHeadModel that computes what Decoder(cfg) does with `params`."""
  write_model_dir(out_dir, hf_config(cfg, extra_config), hf_tensors(cfg, params))


def _zeros(n: int) -> np.ndarray:
  return np.zeros((n,), np.float32)


def _check_exportable(cfg: DecoderConfig) -> None:
  """GPT-2 has one fused q|k|v projection of d_model columns: no grouped-query attention, no other head width."""
  if cfg.style != "gpt2":
    raise ConvertError(f"GPT-2 export: model.style is '{cfg.style}', only 'gpt2' is a GPT-2 network")
  if cfg.kv_heads != cfg.num_heads:
    raise ConvertError(f"GPT-2 export: model.num_kv_heads={cfg.num_kv_heads} (grouped-query attention) has no "
                       "GPT-2 equivalent")
  if cfg.dim_per_head * cfg.num_heads != cfg.d_model:
    raise ConvertError(f"GPT-2 export: model.head_dim={cfg.head_dim} times num_heads={cfg.num_heads} is not "
                       f"d_model={cfg.d_model}, which GPT-2 requires")

