"""Where a run's parameters start: pretrained ones where they match (a jaxlm checkpoint's, init.checkpoint_dir, or a
converted Hugging Face model's, init.hf_path), LoRA adapters from init.peft_path, and checkpoints that hold the
trained parameters only (peft), with a reference to the frozen base they are restored on top of."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxlm import peft, peft_format, train
from jaxlm.checkpoint import CHECKSUM_KEY, checkpoint_dir, read_json_item, restore_params_subset
from jaxlm.checksums import checksums, path_name, verify_checksums


def with_frozen_base(setup: train.Setup, step_dir: str, params, log=None):
  """The parameters of a step that holds the trained ones only (peft): the frozen ones loaded again from the source
  it names (the config's init.hf_path / init.checkpoint_dir), checked against its fingerprint, the saved on top.
  Parameters of a full step are returned as they are."""
  reference = (read_json_item(step_dir, "metadata") or {}).get(BASE_KEY)
  if reference is None:
    return params
  # loaded straight into the target shapes and shardings: no parameter is initialised only to be overwritten
  base, report, _ = pretrained_params(train.abstract_state(setup).params, setup.task, setup.config)
  if report is not None and log is not None:
    log(report.describe())
  return with_base(params, base, setup.trainable, reference, step_dir)


def pretrained_params(params, task, config):
  """(params, report, key): `params` with the pretrained ones a fresh run starts from where they match, a jaxlm
  checkpoint's (init.checkpoint_dir) or a converted one's (the task's pretrained_source(), e.g. from init.hf_path);
  report and key are None when the config names no source."""
  source = task.pretrained_source()
  if source is not None and config.init.checkpoint_dir:
    raise ValueError(f"init.checkpoint_dir={config.init.checkpoint_dir} and {source[0]} both name the parameters "
                     "to start from: set one")
  if config.init.checkpoint_dir:
    return (*init_from_checkpoint(params, config.init.checkpoint_dir), "init.checkpoint_dir")
  if source is not None:
    return (*init_from_tree(params, source[1], source_name=source[0], key="init.hf_path"), "init.hf_path")
  return params, None, None


def init_from_pretrained(state: train.TrainState, task, config, log) -> train.TrainState:
  """A fresh run starts from pretrained parameters where they match (pretrained_params). Optimiser state and step stay
  fresh."""
  params, report, _ = pretrained_params(state.params, task, config)
  if report is None:
    return state
  log(report.describe())
  return state.replace(params=params)


def start_state(setup: train.Setup, log) -> tuple[train.TrainState, dict | None]:
  """A fresh run's first state, and the base reference its checkpoints carry instead of the frozen parameters (None
  when they hold everything): pretrained weights where they match, then LoRA adapters (and heads) from
  init.peft_path. Checkpoints leave the frozen parameters out when every one of them came from the pretrained
  source and checkpoint.save_frozen is off."""
  c = setup.config
  state = train.init_state(setup, c.train.seed)
  params, report, key = pretrained_params(state.params, setup.task, c)
  if report is not None:
    log(report.describe())
  if c.init.peft_path:
    if peft.lora_spec(c.peft) is None:
      raise peft.PeftError(f"init.peft_path={c.init.peft_path} holds LoRA adapters: set peft.method=lora")
    params, adapters = init_from_tree(params, peft_format.source_tree(c, params, c.init.peft_path),
                                      source_name=c.init.peft_path, key="init.peft_path")
    log(adapters.describe())
  base = None
  if setup.trainable is not None and report is not None and not c.checkpoint.save_frozen:
    loaded = set(report.loaded)
    frozen = [p for p, m in zip(peft.paths(params), jax.tree.leaves(setup.trainable)) if not m]
    if all(p in loaded for p in frozen):
      base = base_reference(key, report.source, peft.split(params, setup.trainable)[1])
  return state.replace(params=params), base


@dataclasses.dataclass
class InitReport:
  """What a partial initialisation did, by parameter path (relative to the params tree)."""
  source: str
  loaded: list[str]
  new: list[str]  # in the model, not in the source: keep their fresh initialisation
  unused: list[str]  # in the source, not in the model

  def describe(self) -> str:
    lines = [f"initialised from {self.source}: {len(self.loaded)} parameters loaded, {len(self.new)} newly "
             f"initialised, {len(self.unused)} in the source unused"]
    for title, names in (("loaded", self.loaded), ("newly initialised", self.new), ("unused", self.unused)):
      if names:
        lines.append(f"  {title}: {', '.join(names)}")
    return "\n".join(lines)


def _flat(tree) -> dict[str, Any]:
  return {path_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _match(target: Mapping[str, Any], source_shapes: Mapping[str, tuple], source: str, key: str):
  loaded = sorted(k for k in target if k in source_shapes)
  for k in loaded:
    want, have = tuple(target[k].shape), tuple(source_shapes[k])
    if want != have:
      raise ValueError(f"{key}: parameter '{k}' has shape {have} in {source} but {want} in this model")
  new = sorted(k for k in target if k not in source_shapes)
  return loaded, new, sorted(k for k in source_shapes if k not in target)


def _replace_leaves(params, values: Mapping[str, Any]):
  return jax.tree_util.tree_map_with_path(lambda p, x: values.get(path_name(p), x), params)


def init_from_tree(params, source, *, source_name: str, key: str = "init") -> tuple[Any, InitReport]:
  """Copies every parameter of `source` (a nested dict of host or device arrays, e.g. from a converter) whose path
  exists in `params` into it, onto the target's sharding and dtype. Shape mismatches are an error naming the path."""
  target = _flat(params)
  src = {k: v for k, v in _flat(source).items()}
  loaded, new, unused = _match(target, {k: np.shape(v) for k, v in src.items()}, source_name, key)

  def place(k):
    arr = np.asarray(src[k]).astype(target[k].dtype)
    return jax.make_array_from_callback(arr.shape, target[k].sharding, lambda index: arr[index])

  return _replace_leaves(params, {k: place(k) for k in loaded}), InitReport(source_name, loaded, new, unused)


def resolve_step_dir(path: str, key: str = "init.checkpoint_dir") -> str:
  """A jaxlm workdir, its checkpoints/ directory, or one step directory -> the step directory (latest if not given)."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "state")):
    return path
  directory = checkpoint_dir(path) if os.path.isdir(checkpoint_dir(path)) else path
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{key}={path} does not exist")
  steps = ocp.path.step.checkpoint_steps(directory)
  if not steps:
    raise FileNotFoundError(f"{key}={path} holds no finalised jaxlm checkpoint")
  return os.path.join(directory, str(max(steps)))


def init_from_checkpoint(params, path: str, *, key: str = "init.checkpoint_dir") -> tuple[Any, InitReport]:
  """Parameters only, partially: every parameter of a jaxlm checkpoint whose path exists in `params` (with the same
  shape) is restored straight onto the target sharding; the rest of `params` keeps its initialisation."""
  step_dir = resolve_step_dir(path, key)
  state_meta = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "state")).item_metadata
  source_shapes = {k[len("params/"):]: tuple(m.shape) for k, m in _flat(dict(state_meta.items())).items()
                   if k.startswith("params/")}
  target = _flat(params)
  loaded, new, unused = _match(target, source_shapes, step_dir, key)
  report = InitReport(step_dir, loaded, new, unused)
  if not loaded:
    return params, report
  subset: dict = {}
  for k in loaded:
    node = subset
    *parents, leaf = k.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = jax.ShapeDtypeStruct(target[k].shape, target[k].dtype, sharding=target[k].sharding)
  values = _flat(restore_params_subset(step_dir, subset))
  with open(os.path.join(step_dir, "metadata", "metadata")) as f:
    meta = json.load(f)
  expected = {k[len("params/"):]: v for k, v in meta.get(CHECKSUM_KEY, {}).items() if k.startswith("params/")}
  verify_checksums(values, expected, step_dir)
  return _replace_leaves(params, values), report


# ---- checkpoints of the trained parameters only (parameter-efficient fine-tuning) ---------------------------------
# A run that freezes parameters it loaded from init.hf_path / init.checkpoint_dir need not write them again at every
# step: such a checkpoint holds the trained parameters (LoRA adapters, the head), the optimiser state (which has
# nothing for frozen ones) and, in its metadata, where the frozen ones came from with a fingerprint of their values.
# Restoring loads them from that source again, checks the fingerprint, and puts the saved ones on top.

BASE_KEY = "frozen_base"  # metadata entry: {"key": init key, "source": path, "fingerprint": ...} of the frozen weights


class BaseMismatchError(ValueError):
  """The frozen weights a trained-only checkpoint needs are not those it was trained on."""


def fingerprint(tree) -> str:
  """A short hash of every array's checksums (bits and layout): the same values give the same hash on any mesh."""
  return hashlib.sha256(json.dumps(checksums(tree), sort_keys=True).encode()).hexdigest()[:16]


def base_reference(key: str, source: str, frozen) -> dict:
  """The metadata entry of a run whose `frozen` parameters (peft.split's second part) all came from `key`=`source`."""
  return {"key": key, "source": os.path.abspath(source), "fingerprint": fingerprint(frozen)}


def _pruned(tree):
  """Nested dicts without None leaves and without the dicts that leaves nothing in."""
  if not isinstance(tree, dict):
    return tree
  out = {k: _pruned(v) for k, v in tree.items() if v is not None}
  return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}


def trained_only(params, mask):
  """The trained parameters alone (a nested dict without the frozen leaves)."""
  return _pruned(peft.split(params, mask)[0])


def saved_state(state, mask, base: dict | None):
  """What a checkpoint of `state` holds: everything, or, with a base reference, the trained parameters alone."""
  return state if base is None else state.replace(params=trained_only(state.params, mask))


def trained_only_target(full_target, mask, *, params_only: bool = False):
  """A restore target for Checkpointer.restore_latest / restore_params that follows the step: the full state (or
  params) for a full checkpoint, the trained parameters alone for one whose metadata has a base reference."""
  def target(meta: dict):
    if BASE_KEY not in meta:
      return full_target
    if params_only:
      return trained_only(full_target, mask)
    return full_target.replace(params=trained_only(full_target.params, mask))
  return target


def with_base(saved_params, base_params, mask, reference: dict, where: str):
  """The full parameters: `base_params` (loaded from the source the config names; leaves it lacks may be shapes) with
  the saved trained ones on top, after checking that the frozen ones are those the checkpoint was trained on."""
  frozen = peft.split(base_params, mask)[1]
  missing = [p for p, x in zip(peft.paths(frozen), jax.tree.leaves(frozen)) if isinstance(x, jax.ShapeDtypeStruct)]
  if missing:
    raise BaseMismatchError(f"{where} holds trained parameters only, and its frozen {', '.join(missing[:3])} are not "
                            f"in the weights the config names now: point {reference['key']} at "
                            f"{reference['source']}, where they came from")
  got = fingerprint(frozen)
  if got != reference["fingerprint"]:
    raise BaseMismatchError(
        f"{where} holds trained parameters only; its frozen weights came from {reference['key']}="
        f"{reference['source']} (fingerprint {reference['fingerprint']}), but those loaded now differ (fingerprint "
        f"{got}): point {reference['key']} at the weights the run started from")
  saved = {peft.path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(saved_params)}
  return jax.tree_util.tree_map_with_path(lambda p, x: saved.get(peft.path_name(p), x), base_params)
