"""Hugging Face PEFT's LoRA format (adapter_config.json + adapter_model.safetensors) <-> jaxlm adapters.

A jaxlm adapter sits on one weight, which may fuse several HF modules (the encoder's and GPT-2-style decoder's q|k|v,
Llama's k|v and gate|up). Exported, a fused adapter becomes one adapter per HF module that all share lora_A (the
module's slice of B is its lora_B), which is exactly the fused computation. Imported, adapters whose modules share
one jaxlm weight are stacked along the rank when their A matrices differ: A = [A_q | A_k | A_v] and B block-diagonal
(B_q on the first r rows of the q slice, zero elsewhere), so x A B_q = x A_q B_q and the rank-3r adapter computes
exactly what the three did; the run's peft.rank must be at least that sum (the rank left over starts as a fresh
adapter: new A, zero B). Differing scales are folded into B.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxlm.hf.io import ConvertError
from jaxlm.models.layers import LORA_SUFFIXES, LoraSpec

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix of every tensor name: the PeftModel's wrapped base model


# Each family: (regex on a per-layer jaxlm weight path, the HF modules it stands for). A module is (name, slot): the
# slot indexes the weight's first output axis (q, k, v of a fused qkv) or is None for the whole weight.
def _bert(prefix: str):
  layer = rf"{prefix}blocks_(\d+)/"
  def hf(i, name):
    return f"bert.encoder.layer.{i}.{name}"
  return [
      (layer + "attn/qkv", lambda m: [(hf(m[1], f"attention.self.{n}"), j) for j, n in
                                      enumerate(("query", "key", "value"))]),
      (layer + "attn/o", lambda m: [(hf(m[1], "attention.output.dense"), None)]),
      (layer + "mlp/wi", lambda m: [(hf(m[1], "intermediate.dense"), None)]),
      (layer + "mlp/wo", lambda m: [(hf(m[1], "output.dense"), None)]),
      (rf"{prefix}pooler", lambda m: [("bert.pooler.dense", None)]),
      (r"(classifier|qa_outputs)/kernel", lambda m: [(m[1], None)]),
  ]


def _gpt2():
  layer = r"block_(\d+)/"
  def hf(i, name):
    return f"transformer.h.{i}.{name}"
  return [
      (layer + "attn/qkv", lambda m: [(hf(m[1], "attn.c_attn"), None)]),
      (layer + "attn/o", lambda m: [(hf(m[1], "attn.c_proj"), None)]),
      (layer + "mlp/wi", lambda m: [(hf(m[1], "mlp.c_fc"), None)]),
      (layer + "mlp/wo", lambda m: [(hf(m[1], "mlp.c_proj"), None)]),
      ("lm_head", lambda m: [("lm_head", None)]),
  ]


def _llama():
  layer = r"block_(\d+)/"
  def hf(i, name):
    return f"model.layers.{i}.{name}"
  return [
      (layer + "attn/qkv", lambda m: [(hf(m[1], f"self_attn.{n}_proj"), j) for j, n in enumerate("qkv")]),
      (layer + "attn/q", lambda m: [(hf(m[1], "self_attn.q_proj"), None)]),
      (layer + "attn/kv", lambda m: [(hf(m[1], f"self_attn.{n}_proj"), j) for j, n in enumerate("kv")]),
      (layer + "attn/o", lambda m: [(hf(m[1], "self_attn.o_proj"), None)]),
      (layer + "mlp/wi", lambda m: [(hf(m[1], f"mlp.{n}_proj"), j) for j, n in enumerate(("gate", "up"))]),
      (layer + "mlp/wo", lambda m: [(hf(m[1], "mlp.down_proj"), None)]),
      ("lm_head", lambda m: [("lm_head", None)]),
  ]


def _t5():
  sublayers = {("encoder", "attn"): "0.SelfAttention", ("encoder", "mlp"): "1.DenseReluDense",
               ("decoder", "self_attn"): "0.SelfAttention", ("decoder", "cross_attn"): "1.EncDecAttention",
               ("decoder", "mlp"): "2.DenseReluDense"}
  pattern = r"(encoder|decoder)/layers_(\d+)/(attn|self_attn|cross_attn|mlp)/(q|k|v|o|wi|wi_0|wi_1|wo)"
  return [
      (pattern, lambda m: [(f"{m[1]}.block.{m[2]}.layer.{sublayers[(m[1], m[3])]}.{m[4]}", None)]),
      ("decoder/lm_head", lambda m: [("lm_head", None)]),
  ]


def module_table(family: str):
  """The (regex, modules) table of a family: bert (task models: the encoder under 'encoder/'), gpt2, llama, t5."""
  tables = {"bert": lambda: _bert("encoder/"), "gpt2": _gpt2, "llama": _llama, "t5": _t5}
  if family not in tables:
    raise ConvertError(f"no Hugging Face PEFT layout for the model family '{family}'")
  return tables[family]()


def hf_modules(family: str, weight_path: str) -> list[tuple[str, int | None]]:
  """The HF modules (name, slot) a per-layer jaxlm weight stands for."""
  for pattern, modules in module_table(family):
    m = re.fullmatch(pattern, weight_path)
    if m:
      return modules(m)
  raise ConvertError(f"the adapter on '{weight_path}' has no Hugging Face module to go to (family {family})")


def _flat(tree, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def adapter_tensors(family: str, params: dict) -> dict[str, np.ndarray]:
  """Every adapter of a per-layer host params tree -> PEFT tensors (lora_A [r, in], lora_B [out, r], torch Linear
  layout), named as PEFT saves them."""
  flat = _flat(params)
  out = {}
  for path, a in flat.items():
    if not path.endswith(LORA_SUFFIXES[0]):
      continue
    weight = path[: -len(LORA_SUFFIXES[0])]
    b = flat[weight + LORA_SUFFIXES[1]]
    r = a.shape[-1]
    lora_a = np.asarray(a, np.float32).reshape(-1, r).T  # [ins.., r] -> [r, in]
    for module, slot in hf_modules(family, weight):
      part = b if slot is None else b[:, slot]  # [r, outs..]
      out[f"{PREFIX}{module}.lora_A.weight"] = lora_a
      out[f"{PREFIX}{module}.lora_B.weight"] = np.asarray(part, np.float32).reshape(r, -1).T  # [out, r]
  return out


def write_adapter_dir(out_dir: str, family: str, params: dict, spec: LoraSpec, *, base_dir: str,
                      task_type: str | None, saved_modules: dict[str, np.ndarray]) -> None:
  """adapter_config.json + adapter_model.safetensors of the adapters in `params` (per-layer, host); `saved_modules`
  are the HF tensors of trained modules that are not adapters (a task head), saved whole as PEFT's
  modules_to_save."""
  tensors = adapter_tensors(family, params)
  targets = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in tensors})
  modules = sorted({name.rsplit(".", 1)[0] for name in saved_modules})
  tensors.update({PREFIX + k: np.asarray(v, np.float32) for k, v in saved_modules.items()})
  config = {
      "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": os.path.abspath(base_dir),
      "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "bias": "none",
      # full module names: PEFT matches a listed name against the end of each module's name
      "target_modules": targets, "modules_to_save": modules or None,
      "fan_in_fan_out": family == "gpt2",  # GPT-2's Conv1D stores weights [in, out]
      "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
      "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
  }
  os.makedirs(out_dir, exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(out_dir, WEIGHTS_FILE),
            metadata={"format": "pt"})
  with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)


def read_adapter_dir(adapter_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config.json, tensors without PEFT's prefix) of a PEFT LoRA directory; what jaxlm cannot represent is
  refused by name."""
  path = os.path.join(adapter_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise ConvertError(f"init.peft_path={adapter_dir}: {CONFIG_FILE} not found (a PEFT adapter directory holds "
                       f"{CONFIG_FILE} and {WEIGHTS_FILE})")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  if config.get("peft_type") != "LORA":
    raise ConvertError(f"{path}: peft_type '{config.get('peft_type')}', only LORA adapters can be loaded")
  for key, neutral in (("use_dora", False), ("use_rslora", False), ("bias", "none"), ("rank_pattern", {}),
                       ("alpha_pattern", {})):
    if config.get(key) not in (neutral, None):
      raise ConvertError(f"{path}: {key}={config[key]!r} is not supported (only {neutral!r})")
  weights = os.path.join(adapter_dir, WEIGHTS_FILE)
  if not os.path.isfile(weights):
    raise ConvertError(f"init.peft_path={adapter_dir}: {WEIGHTS_FILE} not found")
  tensors = {}
  with safe_open(weights, framework="numpy") as f:
    for key in f.keys():  # noqa: SIM118 - a safetensors handle is not iterable
      name = key.removeprefix(PREFIX)
      tensors[name.replace(".default.", ".")] = np.asarray(f.get_tensor(key), np.float32)
  return config, tensors


def imported_adapters(family: str, params: dict, spec: LoraSpec, adapter_dir: str
                      ) -> tuple[dict[str, np.ndarray], list[str]]:
  """{jaxlm adapter leaf path: value} for a per-layer params tree from a PEFT directory, and the modules_to_save tensor
  names it also holds. See the module docstring for how fused weights take them. The run's fresh A matrices fill
  the rank the imported ones leave over (shapes alone do where nothing is left over, or to check)."""
  config, tensors = read_adapter_dir(adapter_dir)
  scale = float(config["lora_alpha"]) / float(config["r"])
  flat = _flat(params)
  by_module = {}  # HF module -> (jaxlm weight path, slot)
  for path in flat:
    if path.endswith(LORA_SUFFIXES[0]):
      weight = path[: -len(LORA_SUFFIXES[0])]
      for module, slot in hf_modules(family, weight):
        by_module[module] = (weight, slot)
  adapted = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_A." in k or ".lora_B." in k})
  missing = [m for m in adapted if m not in by_module]
  if missing:
    raise ConvertError(f"init.peft_path={adapter_dir} adapts {', '.join(missing[:4])}, which have no adapter here: "
                       f"widen peft.targets (it is '{spec.targets}')")
  groups: dict[str, list] = {}
  for module in adapted:
    weight, slot = by_module[module]
    groups.setdefault(weight, []).append((slot, tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]))
  stacked = {}  # weight -> (whether every module shares one A, the A blocks stacked along the rank)
  for weight, parts in groups.items():
    shared = all(np.array_equal(parts[0][1], p[1]) for p in parts)  # one A for every module (jaxlm's own export)
    stacked[weight] = (shared, [parts[0][1]] if shared else [p[1] for p in parts])
    rank = sum(a.shape[0] for a in stacked[weight][1])
    if rank > spec.rank:
      raise ConvertError(f"init.peft_path={adapter_dir}: the adapters on the modules of '{weight}' need rank {rank} "
                         f"here (their A matrices stacked), but peft.rank={spec.rank}: set --config.peft.rank={rank}")
  out = {}
  for weight, parts in groups.items():
    a_old, b_old = flat[weight + LORA_SUFFIXES[0]], flat[weight + LORA_SUFFIXES[1]]
    ins, outs = a_old.shape[:-1], b_old.shape[1:]
    shared, blocks = stacked[weight]
    rank = sum(a.shape[0] for a in blocks)
    a_new = np.asarray(a_old, np.float32).copy()  # the rank left over keeps its fresh A (its B is zero)
    b_new = np.zeros(b_old.shape, np.float32)
    a_new.reshape(-1, spec.rank)[:, :rank] = np.concatenate(blocks, 0).T  # [in, rank]
    row = 0
    for slot, a, b in parts:
      rows = slice(0, a.shape[0]) if shared else slice(row, row + a.shape[0])
      row += 0 if shared else a.shape[0]
      shape = b_new.shape[1:] if slot is None else b_new.shape[2:]  # the module's outputs
      piece = np.zeros((spec.rank, int(np.prod(shape))), np.float32)
      piece[rows] = b.T * (scale / spec.scale)  # theirs [out, r] -> [r, out], at this run's scale
      if slot is None:
        b_new[...] = piece.reshape(b_new.shape)
      else:
        b_new[:, slot] = piece.reshape((spec.rank, *shape))
    out[weight + LORA_SUFFIXES[0]] = a_new.reshape(*ins, spec.rank)
    out[weight + LORA_SUFFIXES[1]] = b_new.reshape(spec.rank, *outs)
  saved = [k for k in tensors if ".lora_A." not in k and ".lora_B." not in k]
  return out, saved


# The task heads PEFT saves whole (modules_to_save) that jaxlm maps back: HF tensor -> (jaxlm path, to jaxlm layout).
HEAD_TENSORS: dict[str, tuple[str, Callable]] = {
    "classifier.weight": ("classifier/kernel", np.transpose), "classifier.bias": ("classifier/bias", np.asarray),
    "qa_outputs.weight": ("qa_outputs/kernel", np.transpose), "qa_outputs.bias": ("qa_outputs/bias", np.asarray),
}


def family_of(model_cfg) -> str:
  """The Hugging Face family of a run's config.model: bert, gpt2, llama or t5."""
  if model_cfg.family == "encoder":
    return "bert"
  if model_cfg.family == "encoder_decoder":
    return "t5"
  return model_cfg.style


def source_tree(config, params, adapter_dir: str) -> dict:
  """The parameters init.peft_path gives a fresh run (adapters, and the heads PEFT saved whole), as a nested tree for
  warm_start.init_from_tree; `params` is the run's (per-layer) tree, whose fresh adapters fill unused rank."""
  if config.model.scan_layers:
    raise ConvertError("init.peft_path with model.scan_layers=True is not supported: load the adapters into a run "
                       "with per-layer parameters")
  spec = LoraSpec(int(config.peft.rank), float(config.peft.alpha), float(config.peft.dropout), config.peft.targets)
  adapters = {k: v for k, v in _flat(params).items() if k.endswith(LORA_SUFFIXES)}
  values, saved = imported_adapters(family_of(config.model), _nested(adapters), spec, adapter_dir)
  for name in saved:
    if name not in HEAD_TENSORS:
      raise ConvertError(f"init.peft_path={adapter_dir} saves the module tensor '{name}' whole (modules_to_save); "
                         f"jaxlm loads only the task heads' ({', '.join(sorted(HEAD_TENSORS))})")
  _, tensors = read_adapter_dir(adapter_dir)
  for name in saved:
    path, layout = HEAD_TENSORS[name]
    values[path] = layout(tensors[name])
  return _nested(values)


def _nested(flat: dict) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return out
