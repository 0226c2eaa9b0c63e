"""Hugging Face BERT <-> jaxlm: config.json + model.safetensors + vocab.txt -> an EncoderConfig and encoder parameters
laid out as jaxlm.models.encoder.Encoder creates them (with the optional MLM/NSP pretraining heads), and back."""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm.hf.io import ConvertError, TensorReader, read_config_json, read_safetensors, write_model_dir
from jaxlm.models.encoder import Encoder, EncoderConfig, dummy_inputs
from jaxlm.models.heads import PreTrainingModel

# HF hidden_act -> EncoderConfig.hidden_act. HF's "gelu" is the exact erf form; the others are the tanh one.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
# The EncoderConfig fields a checkpoint fixes (its shapes, and the functions its weights were trained with), with the
# config key that sets each one.
CHECKPOINT_KEYS = {"vocab_size": "model.vocab_size", "max_len": "model.max_len", "num_layers": "model.num_layers",
                   "d_model": "model.d_model", "num_heads": "model.num_heads", "d_ff": "model.d_ff",
                   "type_vocab_size": "model.type_vocab_size", "hidden_act": "model.hidden_act",
                   "norm_eps": "model.norm_eps"}


def read_hf_config(hf_dir: str) -> EncoderConfig:
  path = os.path.join(hf_dir, "config.json")
  hf = read_config_json(hf_dir)
  if hf.get("model_type") != "bert":
    raise ConvertError(f"{path}: model_type is '{hf.get('model_type')}', only 'bert' checkpoints can be imported")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise ConvertError(f"{path}: position_embedding_type '{hf['position_embedding_type']}' is not supported "
                       "(only 'absolute')")
  act = hf.get("hidden_act", "gelu")
  if act not in HF_ACTIVATIONS:
    raise ConvertError(f"{path}: hidden_act '{act}' is not supported (known: {', '.join(HF_ACTIVATIONS)})")
  try:
    return EncoderConfig(
        vocab_size=hf["vocab_size"], max_len=hf["max_position_embeddings"], num_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"], num_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
        type_vocab_size=hf.get("type_vocab_size", 2), hidden_act=HF_ACTIVATIONS[act],
        norm_eps=hf.get("layer_norm_eps", 1e-12), dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1), init_std=hf.get("initializer_range", 0.02))
  except KeyError as e:
    raise ConvertError(f"{path} has no '{e.args[0]}' entry") from None


def _strip_prefix(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """BertModel keys have no prefix; BertFor* models put the encoder under 'bert.'. The heads ('cls.', 'classifier.',
  ...) keep their names."""
  return {k.removeprefix("bert."): v for k, v in tensors.items()}


def encoder_params(tensors: dict[str, np.ndarray], cfg: EncoderConfig, where: str) -> dict:
  """HF tensors (torch Linear weights are [out, in]) -> the Encoder's parameter tree."""
  get = TensorReader(_strip_prefix(tensors), where)
  d, h, e, f = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.ffn_dim
  params = {
      "word_embeddings": get((cfg.vocab_size, d), "embeddings.word_embeddings.weight"),
      "position_embeddings": get((cfg.max_len, d), "embeddings.position_embeddings.weight"),
      "type_embeddings": get((cfg.type_vocab_size, d), "embeddings.token_type_embeddings.weight"),
      "ln_embed": get.norm("embeddings.LayerNorm", d),
  }
  for i in range(cfg.num_layers):
    p = f"encoder.layer.{i}"
    names = [f"{p}.attention.self.{n}" for n in ("query", "key", "value")]
    params[f"blocks_{i}"] = {
        "attn": {"qkv": np.stack([get((d, d), f"{n}.weight").T.reshape(d, h, e) for n in names], 1),  # [D, 3, H, E]
                 "qkv_bias": np.stack([get((d,), f"{n}.bias").reshape(h, e) for n in names]),  # [3, H, E]
                 "o": get((d, d), f"{p}.attention.output.dense.weight").T.reshape(h, e, d),  # [H, E, D]
                 "o_bias": get((d,), f"{p}.attention.output.dense.bias")},
        "ln_attn": get.norm(f"{p}.attention.output.LayerNorm", d),
        "mlp": {"wi": get((f, d), f"{p}.intermediate.dense.weight").T, "bi": get((f,), f"{p}.intermediate.dense.bias"),
                "wo": get((d, f), f"{p}.output.dense.weight").T, "bo": get((d,), f"{p}.output.dense.bias")},
        "ln_mlp": get.norm(f"{p}.output.LayerNorm", d),
    }
  if cfg.pooler:
    params["pooler"] = get((d, d), "pooler.dense.weight").T
    params["pooler_bias"] = get((d,), "pooler.dense.bias")
  return params


def pretraining_head_params(tensors: dict[str, np.ndarray], cfg: EncoderConfig, where: str) -> dict | None:
  """The MLM transform/bias and NSP head of a BertForPreTraining checkpoint, as PreTrainingModel names them;
  None when the checkpoint has none (a bare BertModel such as all-MiniLM-L6-v2)."""
  tensors = _strip_prefix(tensors)
  if "cls.predictions.bias" not in tensors:
    return None
  get = TensorReader(tensors, where)
  d = cfg.d_model
  heads = {"mlm_transform": {"kernel": get((d, d), "cls.predictions.transform.dense.weight").T,
                             "bias": get((d,), "cls.predictions.transform.dense.bias")},
           "mlm_norm": get.norm("cls.predictions.transform.LayerNorm", d),
           "mlm_bias": get((cfg.vocab_size,), "cls.predictions.bias")}
  if "cls.seq_relationship.weight" in tensors:
    heads["nsp_head"] = {"kernel": get((2, d), "cls.seq_relationship.weight").T,
                         "bias": get((2,), "cls.seq_relationship.bias")}
  return heads


def _check_tree(params: dict, cfg: EncoderConfig, where: str) -> None:
  """The converted tree has exactly the parameters, and shapes, that Encoder(cfg) creates."""
  want = jax.eval_shape(lambda: nn.meta.unbox(Encoder(cfg).init(jax.random.key(0), **dummy_inputs(1, 1))["params"]))
  want_flat = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
  got_flat = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  for key in sorted(set(want_flat) | set(got_flat)):
    if got_flat.get(key) != want_flat.get(key):
      raise ConvertError(f"{where}: parameter {key} converts to shape {got_flat.get(key)}, the encoder has "
                         f"{want_flat.get(key)}")


def load_hf_bert(hf_dir: str, with_heads: bool = False):
  """(EncoderConfig, encoder params (numpy float32), vocab.txt path); with_heads adds the pretraining heads' params
  (or None) as a fourth item."""
  cfg = read_hf_config(hf_dir)
  vocab_path = os.path.join(hf_dir, "vocab.txt")
  if not os.path.isfile(vocab_path):
    raise ConvertError(f"{vocab_path} not found: the WordPiece vocabulary is needed to tokenise for this model")
  with open(vocab_path, encoding="utf-8") as f:
    vocab_lines = sum(1 for _ in f)
  if vocab_lines != cfg.vocab_size:
    raise ConvertError(f"{vocab_path} has {vocab_lines} tokens but {hf_dir}/config.json says vocab_size="
                       f"{cfg.vocab_size}: the vocabulary does not belong to this checkpoint")
  tensors = read_safetensors(hf_dir)
  params = encoder_params(tensors, cfg, hf_dir)
  _check_tree(params, cfg, hf_dir)
  if with_heads:
    return cfg, params, vocab_path, pretraining_head_params(tensors, cfg, hf_dir)
  return cfg, params, vocab_path


def model_overrides(cfg: EncoderConfig) -> list[str]:
  """The --config.model.* overrides that make a run's model the checkpoint's."""
  values = {"family": "encoder", "pooler": cfg.pooler,
            **{key.split(".", 1)[1]: getattr(cfg, field) for field, key in CHECKPOINT_KEYS.items()}}
  return [f"model.{k}={v}" for k, v in values.items()]


def check_compatible(model: EncoderConfig, hf_dir: str) -> EncoderConfig:
  """Stops before training when the configured model cannot take the checkpoint's weights; returns its config."""
  hf = read_hf_config(hf_dir)
  wrong = []
  for field, key in CHECKPOINT_KEYS.items():
    mine, theirs = getattr(model, field), getattr(hf, field)
    if field == "d_ff":
      mine, theirs = model.ffn_dim, hf.ffn_dim
    if mine != theirs:
      wrong.append(f"{key}={mine} but the checkpoint has {theirs}")
  if wrong:
    raise ConvertError(f"init.hf_path={hf_dir} does not fit the configured model: " + "; ".join(wrong)
                       + ". Set these keys to the checkpoint's values: " + " ".join(
                           f"--config.{o}" for o in model_overrides(hf)))
  return hf


def source_tree(hf_dir: str, with_heads: bool = False) -> dict:
  """The checkpoint as a task model's parameter tree, for jaxlm.warm_start.init_from_tree: {"encoder": ...} plus,
  with_heads, the pretraining heads where the checkpoint has them."""
  _, encoder, _, heads = load_hf_bert(hf_dir, with_heads=True)
  return {"encoder": encoder, **(heads if with_heads and heads else {})}


def vocab_is_lowercase(hf_dir: str) -> bool:
  """Whether the checkpoint's tokenizer lower-cases: tokenizer_config.json's do_lower_case where the directory has
  one, else whether vocab.txt lacks upper-case word pieces (uncased vocabularies have none)."""
  tok_config = os.path.join(hf_dir, "tokenizer_config.json")
  if os.path.isfile(tok_config):
    with open(tok_config, encoding="utf-8") as f:
      value = json.load(f).get("do_lower_case")
    if value is not None:
      return bool(value)
  with open(os.path.join(hf_dir, "vocab.txt"), encoding="utf-8") as f:
    return not any(p.strip() != p.strip().lower() for p in f if not p.startswith("["))


def configure_from_hf(config, hf_dir: str) -> None:
  """Sets a run config's model keys and WordPiece tokenizer to those of a Hugging Face BERT directory, and starts
  training from its weights (init.hf_path): recipe configs call this instead of typing the checkpoint's shape."""
  cfg = read_hf_config(hf_dir)
  config.model.family = "encoder"
  for field, key in CHECKPOINT_KEYS.items():
    config.model[key.split(".", 1)[1]] = getattr(cfg, field)
  config.init.hf_path = str(hf_dir)
  config.tokenizer.kind = "wordpiece"
  config.tokenizer.path = os.path.join(hf_dir, "vocab.txt")
  config.tokenizer.lowercase = vocab_is_lowercase(hf_dir)


# ---- export: jaxlm parameters -> a Hugging Face BERT directory ----------------------------------------------------

EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}


def load(hf_dir: str) -> tuple[EncoderConfig, dict]:
  """(EncoderConfig, the pretraining model's parameters: {"encoder": ...} plus the MLM/NSP heads where the checkpoint
  has them), as numpy float32: the load every family module gives. save() writes such a tree back."""
  cfg, encoder, _, heads = load_hf_bert(hf_dir, with_heads=True)
  return cfg, {"encoder": encoder, **(heads or {})}


def _to_host(tree) -> dict:
  """Device or host arrays, boxed or not -> float32 numpy; arrays spread over processes are gathered one by one."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x), np.float32)
  return jax.tree.map(one, nn.meta.unbox(tree))


def _check_module_tree(params: dict, module: nn.Module, where: str) -> None:
  """The tree has exactly the parameters, and shapes, that `module` creates."""
  want = jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.key(0), **dummy_inputs(1, 1))["params"]))
  want_flat = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
  got_flat = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  for key in sorted(set(want_flat) | set(got_flat)):
    if got_flat.get(key) != want_flat.get(key):
      raise ConvertError(f"{where}: parameter {key} has shape {got_flat.get(key)}, the model has "
                         f"{want_flat.get(key)}")


def encoder_tensors(params: dict, cfg: EncoderConfig, prefix: str = "") -> dict[str, np.ndarray]:
  """The Encoder's parameter tree (host arrays) -> HF BERT tensors (torch Linear weights are [out, in]), each name
  after `prefix` ('bert.' inside a BertFor* model, '' for BertModel)."""
  d = cfg.d_model
  t = {"embeddings.word_embeddings.weight": params["word_embeddings"],
       "embeddings.position_embeddings.weight": params["position_embeddings"],
       "embeddings.token_type_embeddings.weight": params["type_embeddings"],
       "embeddings.LayerNorm.weight": params["ln_embed"]["scale"], "embeddings.LayerNorm.bias": params["ln_embed"]["bias"]}
  for i in range(cfg.num_layers):
    b, n = params[f"blocks_{i}"], f"encoder.layer.{i}"
    attn, mlp = b["attn"], b["mlp"]
    for j, name in enumerate(("query", "key", "value")):
      t[f"{n}.attention.self.{name}.weight"] = attn["qkv"][:, j].reshape(d, d).T  # [D, H, E] -> [H*E, D]
      t[f"{n}.attention.self.{name}.bias"] = attn["qkv_bias"][j].reshape(d)
    t.update({
        f"{n}.attention.output.dense.weight": attn["o"].reshape(d, d).T, f"{n}.attention.output.dense.bias": attn["o_bias"],
        f"{n}.attention.output.LayerNorm.weight": b["ln_attn"]["scale"],
        f"{n}.attention.output.LayerNorm.bias": b["ln_attn"]["bias"],
        f"{n}.intermediate.dense.weight": mlp["wi"].T, f"{n}.intermediate.dense.bias": mlp["bi"],
        f"{n}.output.dense.weight": mlp["wo"].T, f"{n}.output.dense.bias": mlp["bo"],
        f"{n}.output.LayerNorm.weight": b["ln_mlp"]["scale"], f"{n}.output.LayerNorm.bias": b["ln_mlp"]["bias"],
    })
  if cfg.pooler:
    t["pooler.dense.weight"], t["pooler.dense.bias"] = params["pooler"].T, params["pooler_bias"]
  return {prefix + k: v for k, v in t.items()}


def pretraining_head_tensors(heads: dict) -> dict[str, np.ndarray]:
  """PreTrainingModel's MLM transform/bias (and NSP head, where present) -> the 'cls.' tensors of BertForPreTraining /
  BertForMaskedLM. The MLM decoder is tied to the word embeddings, so it has no tensor of its own."""
  t = {"cls.predictions.transform.dense.weight": heads["mlm_transform"]["kernel"].T,
       "cls.predictions.transform.dense.bias": heads["mlm_transform"]["bias"],
       "cls.predictions.transform.LayerNorm.weight": heads["mlm_norm"]["scale"],
       "cls.predictions.transform.LayerNorm.bias": heads["mlm_norm"]["bias"],
       "cls.predictions.bias": heads["mlm_bias"]}
  if "nsp_head" in heads:
    t["cls.seq_relationship.weight"] = heads["nsp_head"]["kernel"].T
    t["cls.seq_relationship.bias"] = heads["nsp_head"]["bias"]
  return t


def hf_config(cfg: EncoderConfig, architecture: str, extra: dict | None = None) -> dict:
  """The config.json of a BERT `architecture` (BertModel, BertForPreTraining, ...) for cfg; `extra` adds or
  replaces entries."""
  hf = {"architectures": [architecture], "model_type": "bert", "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_len, "num_hidden_layers": cfg.num_layers, "hidden_size": cfg.d_model,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.ffn_dim, "type_vocab_size": cfg.type_vocab_size,
        "hidden_act": EXPORT_ACTIVATIONS[cfg.hidden_act], "layer_norm_eps": cfg.norm_eps,
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.attention_dropout,
        "initializer_range": cfg.init_std, "position_embedding_type": "absolute", "pad_token_id": 0,
        "tie_word_embeddings": True, "dtype": "float32"}
  return {**hf, **(extra or {})}


def hf_tensors(cfg: EncoderConfig, params) -> tuple[str, dict[str, np.ndarray]]:
  """(architecture, tensors) for an Encoder tree (-> BertModel) or a PreTrainingModel tree {"encoder", MLM heads
  [, NSP head]} (-> BertForPreTraining with NSP, BertForMaskedLM without: it has no pooler, so none is written)."""
  params = _to_host(params)
  if "encoder" not in params:
    _check_module_tree(params, Encoder(cfg), "BERT export")
    return "BertModel", encoder_tensors(params, cfg)
  nsp = "nsp_head" in params
  _check_module_tree(params, PreTrainingModel(cfg, nsp=nsp), "BERT export")
  heads = {k: v for k, v in params.items() if k != "encoder"}
  if nsp:
    return "BertForPreTraining", {**encoder_tensors(params["encoder"], cfg, "bert."), **pretraining_head_tensors(heads)}
  encoder = {k: v for k, v in params["encoder"].items() if k not in ("pooler", "pooler_bias")}
  tensors = encoder_tensors(encoder, dataclasses.replace(cfg, pooler=False), "bert.")
  return "BertForMaskedLM", {**tensors, **pretraining_head_tensors(heads)}


def save(out_dir: str, cfg: EncoderConfig, params, extra_config: dict | None = None) -> None:
  """config.json + model.safetensors of the BERT model that computes what jaxlm does with `params` (see hf_tensors);
  the caller copies vocab.txt beside them."""
  architecture, tensors = hf_tensors(cfg, params)
  write_model_dir(out_dir, hf_config(cfg, architecture, extra_config), tensors)
