"""Hugging Face formats <-> jaxlm parameter trees, one module per family. Nothing here depends on the training loop:
a family module reads config.json and safetensors into a model config and a parameter tree, and writes them back.

Every family module gives load(hf_dir) -> (model config, params), save(out_dir, model config, params) and
model_overrides(model config) -> the --config.model.* overrides of a run with that model.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from jaxlm.hf.io import ConvertError, read_config_json

# config.json's model_type -> the family, whose converter is jaxlm/hf/<family>.py
FAMILIES = {"bert": "bert", "gpt2": "gpt2", "llama": "llama", "t5": "t5"}


def detect_family(hf_dir: str) -> str:
  """The family of a Hugging Face model directory, from its config.json's model_type."""
  model_type = read_config_json(hf_dir).get("model_type")
  if model_type not in FAMILIES:
    what = f"model_type '{model_type}'" if model_type is not None else "no model_type entry"
    raise ConvertError(f"{os.path.join(hf_dir, 'config.json')} has {what}: jaxlm converts only "
                       f"{', '.join(sorted(FAMILIES))}")
  return FAMILIES[model_type]


def family_module(family: str) -> ModuleType:
  """jaxlm.hf.<family>, imported when first asked for: each pulls in its own model code."""
  if family not in FAMILIES.values():
    raise ConvertError(f"unknown model family '{family}' (known: {', '.join(sorted(set(FAMILIES.values())))})")
  return importlib.import_module(f"jaxlm.hf.{family}")
