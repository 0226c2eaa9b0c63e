"""Reading and writing Hugging Face model directories: config.json and safetensors (single or sharded), with errors
that name the directory, the file and the tensor."""

from __future__ import annotations

import json
import os

import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, so safetensors reads bfloat16 checkpoints
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file


class ConvertError(ValueError):
  """A Hugging Face directory that cannot be read as a model jaxlm knows, or does not fit the configured model."""


def read_config_json(hf_dir: str) -> dict:
  """config.json of a Hugging Face model directory, as a dict."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise ConvertError(f"{path} not found: a Hugging Face model directory holds config.json and model.safetensors")
  try:
    with open(path, encoding="utf-8") as f:
      hf = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConvertError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(hf, dict):
    raise ConvertError(f"{path}: expected a JSON object at the top level")
  return hf


def safetensors_files(hf_dir: str) -> list[str]:
  """model.safetensors, or the shards model.safetensors.index.json lists."""
  single = os.path.join(hf_dir, "model.safetensors")
  index = single + ".index.json"
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ConvertError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    return sorted({os.path.join(hf_dir, name) for name in weight_map.values()})
  hint = " (pytorch_model.bin is not read: re-save with safe_serialization=True)" if os.path.isfile(
      os.path.join(hf_dir, "pytorch_model.bin")) else ""
  raise ConvertError(f"{single} not found{hint}")


def read_safetensors(hf_dir: str) -> dict[str, np.ndarray]:
  """Every tensor of the directory's safetensors file(s), as numpy arrays."""
  tensors = {}
  for path in safetensors_files(hf_dir):
    if not os.path.isfile(path):
      raise ConvertError(f"{path} not found (listed in model.safetensors.index.json)")
    try:
      with safe_open(path, framework="numpy") as f:
        for key in f.keys():  # noqa: SIM118 - a safetensors handle is not iterable
          tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as e:
      raise ConvertError(f"{path}: not a readable safetensors file ({e})") from None
  return tensors


def write_model_dir(out_dir: str, config: dict, tensors: dict[str, np.ndarray]) -> None:
  """config.json and model.safetensors (torch's 'pt' format metadata, so transformers loads it) into out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  contiguous = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  tmp = os.path.join(out_dir, "model.safetensors.tmp")
  save_file(contiguous, tmp, metadata={"format": "pt"})
  os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
  with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)


class TensorReader:
  """Takes tensors by name as float32, naming the directory and the key when one is missing or has the wrong shape."""

  def __init__(self, tensors: dict[str, np.ndarray], where: str):
    self.tensors, self.where = tensors, where

  def __call__(self, shape, *names) -> np.ndarray:
    for name in names:  # alternatives: old TF-converted BERT checkpoints call LayerNorm parameters gamma/beta
      if name in self.tensors:
        value = self.tensors[name]
        if tuple(value.shape) != tuple(shape):
          raise ConvertError(f"{self.where}: tensor '{name}' has shape {tuple(value.shape)}, but config.json "
                             f"implies {tuple(shape)}")
        return np.asarray(value, np.float32)
    raise ConvertError(f"{self.where}: tensor '{names[0]}' not found")

  def norm(self, prefix: str, d: int) -> dict[str, np.ndarray]:
    """A LayerNorm's scale and bias (BERT's weight/bias, or gamma/beta in old TF-converted checkpoints)."""
    return {"scale": self((d,), f"{prefix}.weight", f"{prefix}.gamma"),
            "bias": self((d,), f"{prefix}.bias", f"{prefix}.beta")}

  def has(self, name: str) -> bool:
    return name in self.tensors
