"""Loading experiment configs: a Python file's get_config(), --config.KEY=VALUE overrides, validation.

Every key is defined in configs/base.py. An override of an unknown key, or a value that does not parse as the
key's type, stops the run before any work with a message naming the key and the nearest valid keys.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence

import ml_collections

from jaxlm.configs import base as base_configs


class ConfigError(ValueError):
  """A config file or override that cannot be used; the message says which key and why."""


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Imports `path` and returns its get_config(); configs/ is importable so experiments can derive from base."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}")
  config_dir = os.path.dirname(os.path.abspath(path))
  if config_dir not in sys.path:
    sys.path.insert(0, config_dir)
  name = "jaxlm_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config()")
  config = module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not an ml_collections.ConfigDict")
  return config


def all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Dotted names of every leaf key, e.g. 'train.steps'."""
  keys = []
  for name, value in config.items():
    full = f"{prefix}{name}"
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(all_keys(value, full + "."))
    else:
      keys.append(full)
  return keys


def nearest_keys(key: str, config: ml_collections.ConfigDict, n: int = 3) -> list[str]:
  keys = all_keys(config)
  close = difflib.get_close_matches(key, keys, n=n, cutoff=0.5)
  if not close:  # fall back to the leaf name alone: 'train.stpes' ~ 'steps' anywhere
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
    close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=n, cutoff=0.5)]
  return close


def _parse_value(key: str, text: str, current):
  """Parses an override string into the type of the key's current value."""
  def fail(why):
    raise ConfigError(f"--config.{key}={text}: {why} (current value {current!r}, type {type(current).__name__})")

  if isinstance(current, bool):
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    fail("expected a boolean")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      fail("expected an integer")
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      fail("expected a number")
  if isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = tuple(part for part in text.split(",") if part)
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return type(current)(value)
  if current is None:  # keys declared None take any literal, or a plain string
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  fail("cannot override a value of this type from the command line")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies 'KEY=VALUE' strings (KEY dotted, without the 'config.' prefix) in order."""
  config = ml_collections.ConfigDict(config.to_dict())  # a copy; the caller's config stays as it was
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"--config.{item}: expected --config.KEY=VALUE")
    key, text = item.split("=", 1)
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
      is_leaf = i == len(parts) - 1
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        near = nearest_keys(key, config)
        hint = f"; nearest valid keys: {', '.join(near)}" if near else ""
        raise ConfigError(f"unknown config key '{key}'{hint}")
      if is_leaf:
        current = node[part]
        if isinstance(current, ml_collections.ConfigDict):
          raise ConfigError(f"'{key}' is a group of keys, not a value; its keys: {', '.join(all_keys(current, key + '.'))}")
        with node.unlocked():
          node[part] = _parse_value(key, text, current)
      else:
        node = node[part]
  return config


def check_against_base(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict, source: str) -> None:
  """Every key an experiment file sets must exist in configs/base.py, with a compatible type."""
  base_keys = set(all_keys(base))
  for key in all_keys(config):
    if key not in base_keys:
      near = nearest_keys(key, base)
      hint = f"; nearest valid keys: {', '.join(near)}" if near else ""
      raise ConfigError(f"{source}: unknown config key '{key}' (not defined in configs/base.py){hint}")


def base_config() -> ml_collections.ConfigDict:
  """configs/base.py's config (installed with the package as jaxlm.configs.base): every key with its default."""
  return base_configs.get_config()


def load(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads a config file, checks its keys against the base config, applies overrides."""
  config = load_config_file(path)
  check_against_base(config, base_config(), path)
  return apply_overrides(config, overrides)


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def from_json(text: str) -> ml_collections.ConfigDict:
  return from_json_dict(json.loads(text))


def from_json_dict(d: dict) -> ml_collections.ConfigDict:
  """JSON turns tuples into lists; configs declare tuples, so lists come back as tuples."""
  def fix(x):
    if isinstance(x, dict):
      return {k: fix(v) for k, v in x.items()}
    if isinstance(x, list):
      return tuple(fix(v) for v in x)
    return x
  return ml_collections.ConfigDict(fix(d))


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates '--config.KEY=VALUE' overrides from the other arguments."""
  overrides, rest = [], []
  for arg in argv:
    if arg.startswith("--config."):
      overrides.append(arg[len("--config."):])
    else:
      rest.append(arg)
  return overrides, rest
