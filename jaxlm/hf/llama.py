"""Hugging Face Llama <-> jaxlm: a LlamaForCausalLM or LlamaModel directory (config.json + safetensors) <-> a
llama-style DecoderConfig and the parameters jaxlm.models.decoder.Decoder creates."""

from __future__ import annotations

import numpy as np

from jaxlm.hf import decoders
from jaxlm.hf.decoders import check_tree, host_per_layer, in_layout, tensors_where
from jaxlm.hf.io import ConvertError, TensorReader, read_config_json, read_safetensors, write_model_dir
from jaxlm.models.decoder import DecoderConfig


def _rope_theta(hf: dict, path: str) -> float:
  """The RoPE base of config.json, refusing scaled RoPE: transformers 5 writes rope_parameters {rope_type,
  rope_theta}; older versions wrote rope_theta and rope_scaling (null, or {type|rope_type, factor, ...})."""
  key = "rope_parameters" if hf.get("rope_parameters") is not None else "rope_scaling"
  rope = hf.get(key) or {}
  if not isinstance(rope, dict):
    raise ConvertError(f"{path}: {key} must be an object, got {rope!r}")
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default":
    raise ConvertError(f"{path}: {key} has rope_type '{kind}', which is not supported: the decoder's RoPE is "
                       "unscaled (rope_type 'default' only)")
  return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def read_hf_config(hf_dir: str, scan_layers: bool = False) -> DecoderConfig:
  """config.json of a Llama directory -> the llama-style DecoderConfig of the same network."""
  path = f"{hf_dir}/config.json"
  hf = read_config_json(hf_dir)
  if hf.get("model_type") != "llama":
    raise ConvertError(f"{path}: model_type is '{hf.get('model_type')}', expected 'llama'")
  if hf.get("hidden_act", "silu") != "silu":
    raise ConvertError(f"{path}: hidden_act '{hf['hidden_act']}' is not supported: the decoder's SwiGLU uses silu")
  theta = _rope_theta(hf, path)
  try:
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // h
    return DecoderConfig(
        vocab_size=hf["vocab_size"], max_len=hf.get("max_position_embeddings", 2048),
        num_layers=hf["num_hidden_layers"], d_model=d, num_heads=h, style="llama",
        num_kv_heads=hf.get("num_key_value_heads") or h, head_dim=0 if head_dim * h == d else head_dim,
        d_ff=hf["intermediate_size"], tie_embeddings=hf.get("tie_word_embeddings", False),
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
        # the decoder has biases on q, k, v, o and the MLP's output projection, or none; a Llama with either kind of
        # bias is the decoder with the others zero (decoder_params refuses gate/up biases that are not)
        use_bias=bool(hf.get("attention_bias", False) or hf.get("mlp_bias", False)),
        dropout=0.0, init_std=hf.get("initializer_range", 0.02), scan_layers=scan_layers)
  except KeyError as e:
    raise ConvertError(f"{path} has no '{e.args[0]}' entry") from None
  except ValueError as e:  # DecoderConfig's own checks, e.g. num_key_value_heads not dividing num_attention_heads
    raise ConvertError(f"{path}: {e}") from None


def decoder_params(tensors: dict[str, np.ndarray], cfg: DecoderConfig, hf: dict, where: str) -> dict:
  """Llama tensors (torch Linear weights are [out, in]) -> the Decoder's parameter tree (in cfg's layer layout).
  `hf` is config.json: it says which biases the checkpoint has."""
  get = TensorReader(tensors, where)
  # LlamaForCausalLM puts the network under 'model.'; LlamaModel has no prefix; lm_head.weight has none either
  prefix = "model." if "model.embed_tokens.weight" in tensors else ""
  v, d, h, k, e, f = cfg.vocab_size, cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, cfg.ffn_dim
  attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)

  def bias(present: bool, shape, name):
    return get(shape, name) if present else np.zeros(shape, np.float32)

  params = {"embedding": get((v, d), f"{prefix}embed_tokens.weight")}
  for i in range(cfg.num_layers):
    p = f"{prefix}layers.{i}"
    proj = {n: get((heads * e, d), f"{p}.self_attn.{n}_proj.weight").T.reshape(d, heads, e)  # [D, H|K, E]
            for n, heads in (("q", h), ("k", k), ("v", k))}
    attn = {}
    if k == h:  # the decoder fuses q, k and v when every query head has its own key/value head
      attn["qkv"] = np.stack([proj["q"], proj["k"], proj["v"]], 1)  # [D, 3, H, E]
    else:
      attn["q"], attn["kv"] = proj["q"], np.stack([proj["k"], proj["v"]], 1)  # [D, H, E], [D, 2, K, E]
    attn["o"] = get((d, h * e), f"{p}.self_attn.o_proj.weight").T.reshape(h, e, d)  # [H, E, D]
    mlp = {"wi": np.stack([get((f, d), f"{p}.mlp.{n}_proj.weight").T for n in ("gate", "up")], 1),  # [D, 2, F]
           "wo": get((d, f), f"{p}.mlp.down_proj.weight").T}  # [F, D]
    if cfg.use_bias:
      b = {n: bias(attention_bias, (heads * e,), f"{p}.self_attn.{n}_proj.bias").reshape(heads, e)
           for n, heads in (("q", h), ("k", k), ("v", k))}
      if k == h:
        attn["qkv_bias"] = np.stack([b["q"], b["k"], b["v"]])  # [3, H, E]
      else:
        attn["q_bias"], attn["kv_bias"] = b["q"], np.stack([b["k"], b["v"]])  # [H, E], [2, K, E]
      attn["o_bias"] = bias(attention_bias, (d,), f"{p}.self_attn.o_proj.bias")
      mlp["bo"] = bias(mlp_bias, (d,), f"{p}.mlp.down_proj.bias")
      for n in ("gate", "up") if mlp_bias else ():  # SwiGLU's inner biases: the decoder has none
        if np.any(get((f,), f"{p}.mlp.{n}_proj.bias")):
          raise ConvertError(f"{where}: tensor '{p}.mlp.{n}_proj.bias' is not zero, and the decoder's "
                             "SwiGLU has no bias there (config.json mlp_bias=true)")
    params[f"block_{i}"] = {"ln_attn": {"scale": get((d,), f"{p}.input_layernorm.weight")}, "attn": attn,
                            "ln_mlp": {"scale": get((d,), f"{p}.post_attention_layernorm.weight")}, "mlp": mlp}
  params["ln_final"] = {"scale": get((d,), f"{prefix}norm.weight")}
  if not cfg.tie_embeddings:
    params["lm_head"] = get((v, d), "lm_head.weight").T  # [V, D] -> [D, V]
  return in_layout(params, cfg)


def load(hf_dir: str, scan_layers: bool = False) -> tuple[DecoderConfig, dict]:
  """(DecoderConfig, Decoder parameters as float32 numpy arrays), stacked under blocks/block when scan_layers."""
  cfg = read_hf_config(hf_dir, scan_layers)
  where = tensors_where(hf_dir)
  params = decoder_params(read_safetensors(hf_dir), cfg, read_config_json(hf_dir), where)
  check_tree(params, cfg, where)
  return cfg, params


def model_overrides(cfg: DecoderConfig) -> list[str]:
  """The --config.model.* overrides that make a run's model the checkpoint's."""
  return decoders.model_overrides(cfg)


def hf_config(cfg: DecoderConfig, extra: dict | None = None) -> dict:
  """The config.json of LlamaForCausalLM for cfg; `extra` adds or replaces entries (token ids, for instance)."""
  _check_exportable(cfg)
  hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_len, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.dim_per_head,
        "intermediate_size": cfg.ffn_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        # both spellings: transformers 5 reads rope_parameters, earlier versions rope_theta
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.use_bias, "mlp_bias": cfg.use_bias,
        "initializer_range": cfg.init_std, "attention_dropout": 0.0, "dtype": "float32",
        # the token ids belong to the tokenizer, which the decoder does not know
        "bos_token_id": None, "eos_token_id": None}
  return {**hf, **(extra or {})}


def hf_tensors(cfg: DecoderConfig, params) -> dict[str, np.ndarray]:
  """Decoder parameters (either layout, host or device) -> LlamaForCausalLM's tensors. A use_bias decoder becomes
  attention_bias and mlp_bias, with zero biases on the gate and up projections it does not have."""
  _check_exportable(cfg)
  p = host_per_layer(params, cfg, "Llama export")
  d, h, k, e, f = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, cfg.ffn_dim
  t = {"model.embed_tokens.weight": p["embedding"], "model.norm.weight": p["ln_final"]["scale"]}
  for i in range(cfg.num_layers):
    b, n = p[f"block_{i}"], f"model.layers.{i}"
    attn, mlp = b["attn"], b["mlp"]
    if k == h:
      q, key, value = (attn["qkv"][:, j] for j in range(3))  # [D, H, E] each
    else:
      q, key, value = attn["q"], attn["kv"][:, 0], attn["kv"][:, 1]
    t.update({
        f"{n}.input_layernorm.weight": b["ln_attn"]["scale"],
        f"{n}.self_attn.q_proj.weight": q.reshape(d, h * e).T, f"{n}.self_attn.k_proj.weight": key.reshape(d, k * e).T,
        f"{n}.self_attn.v_proj.weight": value.reshape(d, k * e).T,
        f"{n}.self_attn.o_proj.weight": attn["o"].reshape(h * e, d).T,
        f"{n}.post_attention_layernorm.weight": b["ln_mlp"]["scale"],
        f"{n}.mlp.gate_proj.weight": mlp["wi"][:, 0].T, f"{n}.mlp.up_proj.weight": mlp["wi"][:, 1].T,
        f"{n}.mlp.down_proj.weight": mlp["wo"].T,
    })
    if cfg.use_bias:
      if k == h:
        qb, kb, vb = attn["qkv_bias"]
      else:
        qb, (kb, vb) = attn["q_bias"], attn["kv_bias"]
      t.update({f"{n}.self_attn.q_proj.bias": qb.reshape(h * e), f"{n}.self_attn.k_proj.bias": kb.reshape(k * e),
                f"{n}.self_attn.v_proj.bias": vb.reshape(k * e), f"{n}.self_attn.o_proj.bias": attn["o_bias"],
                f"{n}.mlp.gate_proj.bias": np.zeros((f,), np.float32),
                f"{n}.mlp.up_proj.bias": np.zeros((f,), np.float32), f"{n}.mlp.down_proj.bias": mlp["bo"]})
  if not cfg.tie_embeddings:
    t["lm_head.weight"] = p["lm_head"].T  # [D, V] -> [V, D]
  return t


def save(out_dir: str, cfg: DecoderConfig, params, extra_config: dict | None = None) -> None:
  """config.json + model.safetensors of a LlamaForCausalLM that computes what Decoder(cfg) does with `params`."""
  write_model_dir(out_dir, hf_config(cfg, extra_config), hf_tensors(cfg, params))


def _check_exportable(cfg: DecoderConfig) -> None:
  if cfg.style != "llama":
    raise ConvertError(f"Llama export: model.style is '{cfg.style}', only 'llama' is a Llama network")
