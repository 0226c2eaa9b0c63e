"""Loading experiment configs: a Python file's get_config(), --config.KEY=VALUE overrides, validation.

Every key is defined in configs/base.py, with the check its value must pass declared beside it (CHECKS; see
jaxlm/config_checks.py). An unknown key, a value of the wrong type or one its check refuses stops the command before
any work with one line naming the key, the value and what the key accepts.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import sys
import traceback
from collections.abc import Sequence

import ml_collections

from jaxlm.configs import base as base_configs


class ConfigError(ValueError):
  """A config file or override that cannot be used; the message says which key and why."""


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Imports `path` and returns its get_config(); configs/ is importable so experiments can derive from base. A file
  that does not import, or whose get_config() raises, is a ConfigError naming the file and line."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}" if not os.path.isdir(path) else f"{path} is a directory, "
                      "not a config file")
  config_dir = os.path.dirname(os.path.abspath(path))
  if config_dir not in sys.path:
    sys.path.insert(0, config_dir)
  name = "jaxlm_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise ConfigError(f"{path} defines no get_config()")
    config = module.get_config()
  except ConfigError:
    raise
  except Exception as e:  # anything a config file's own code raises: a user's file, reported as one line
    raise ConfigError(_where_it_failed(path, e)) from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not an ml_collections.ConfigDict")
  return config


def _where_it_failed(path: str, e: Exception) -> str:
  """'FILE:LINE: what went wrong' for an exception raised while importing a config file or running its get_config():
  the line is the innermost one in a config file (the file itself, or the base it imports)."""
  if isinstance(e, SyntaxError):
    return f"{e.filename or path}:{e.lineno}: invalid Python: {e.msg}"
  frames = traceback.extract_tb(e.__traceback__)
  config_dir = os.path.dirname(os.path.abspath(path))
  in_configs = [f for f in frames if os.path.dirname(os.path.abspath(f.filename)) == config_dir]
  frame = in_configs[-1] if in_configs else None
  where = f"{frame.filename}:{frame.lineno}" if frame else path
  detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
  hint = ""
  if isinstance(e, ModuleNotFoundError) and e.name == "base":
    hint = " (a config outside configs/ imports the base config as `from jaxlm.configs import base`)"
  return f"{where}: {type(e).__name__}{': ' + detail if detail else ''}{hint}"


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


def declared_checks() -> dict:
  """key -> its Check, as configs/base.py declares them (CHECKS fills as get_config() runs)."""
  base_configs.get_config()
  return dict(base_configs.CHECKS)


def get_key(config: ml_collections.ConfigDict, key: str):
  """The value of a dotted key, e.g. get_key(c, 'train.steps')."""
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _type_error(value, default) -> str | None:
  """The value must have the type of base.py's default (an int where a float is expected is fine)."""
  if default is None:
    return None
  if isinstance(default, bool):
    return None if isinstance(value, bool) else "expected true or false"
  if isinstance(default, int):
    return None if isinstance(value, int) and not isinstance(value, bool) else "expected an integer"
  if isinstance(default, float):
    return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "expected a number"
  if isinstance(default, str):
    return None if isinstance(value, str) else "expected a string"
  if isinstance(default, (tuple, list)):
    return None if isinstance(value, (tuple, list)) else "expected a tuple"
  return None


def validate(config: ml_collections.ConfigDict, source: str = "", overrides: Sequence[str] = ()) -> None:
  """Checks every key's value against its type in configs/base.py and the check declared beside it; raises one
  ConfigError naming each refused key, its value (as given on the command line when an override set it) and what the
  key accepts. `source` names where the other values came from (a config file, a workdir's config.json)."""
  base = base_config()
  checks = dict(base_configs.CHECKS)
  base_keys = set(all_keys(base))
  given = {}
  for item in overrides:
    key, _, text = item.partition("=")
    given[key] = text  # the last override of a key is the one in force
  problems = []
  for key in all_keys(config):
    if key not in base_keys:
      continue  # unknown keys are check_against_base's (a workdir's config.json may hold keys since renamed)
    value = get_key(config, key)
    why = _type_error(value, get_key(base, key))
    if why is None and key in checks:
      why = checks[key].error(value)
    if why is not None:
      where = f"--config.{key}={given[key]}" if key in given else f"{source + ': ' if source else ''}{key}={value!r}"
      problems.append(f"{where}: {why}")
  if problems:
    raise ConfigError("; ".join(problems))


def load(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads a config file, checks its keys against the base config, applies overrides, validates every value."""
  config = load_config_file(path)
  check_against_base(config, base_config(), path)
  config = apply_overrides(config, overrides)
  validate(config, path, overrides)
  return config


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


def from_saved(saved: dict, source: str) -> ml_collections.ConfigDict:
  """A config saved as JSON (a workdir's config.json, a checkpoint's config item) over base.py's defaults: keys added
  since it was written take their default, keys since removed are dropped; then validated like a loaded config."""
  config = base_config()
  values = from_json_dict(saved)

  def merge(node, into, prefix):
    for name, value in node.items():
      if name not in into:
        continue
      if isinstance(into[name], ml_collections.ConfigDict):
        if isinstance(value, ml_collections.ConfigDict):
          merge(value, into[name], f"{prefix}{name}.")
        continue
      why = _type_error(value, into[name])
      if why is not None:
        raise ConfigError(f"{source}: {prefix}{name}={value!r}: {why}")
      with into.unlocked():
        into[name] = value

  merge(values, config, "")
  validate(config, source)
  return config


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates '--config.KEY=VALUE' overrides from the other arguments."""
  overrides, rest = [], []
  for arg in argv:
    if arg.startswith("--config."):
      overrides.append(arg[len("--config."):])
    else:
      rest.append(arg)
  return overrides, rest
