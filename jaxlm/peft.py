"""Parameter-efficient fine-tuning: which parameters train (LoRA adapters, task heads, the optim.trainable and
optim.frozen regexes over parameter paths), the LoRA spec a task's model carries, and adapters folded into the weights
they adapt. Pure functions of the config and the parameter tree: the step library and the memory planner import it.

Parameter paths are the params tree's keys joined by '/', e.g. 'block_0/attn/qkv' (decoder), 'encoder/blocks_0/mlp/wi'
(an encoder task), 'blocks/block/attn/o' (scan_layers: every layer in one stacked array). Regexes are searched in them
(re.search), so 'attn/(qkv|o)' finds every layer's attention projections.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import ConfigError
from jaxlm.models.decoder import DecoderConfig
from jaxlm.models.encoder import EncoderConfig
from jaxlm.models.layers import LORA_SUFFIXES, TOKEN_DELTA, LoraSpec

METHODS = ("none", "lora")
TRAINED, FROZEN = "trained", "frozen"  # the optimiser's two partitions (jaxlm/optim.py)
FROZEN_DTYPES = ("float32", "bfloat16")


class PeftError(ConfigError):
  """peft.* / optim.trainable / optim.frozen values that cannot be used with this model."""


def _regex(key: str, text: str) -> re.Pattern | None:
  if not text:
    return None
  try:
    return re.compile(text)
  except re.error as e:
    raise PeftError(f"{key}='{text}' is not a regular expression: {e}") from None


def lora_spec(peft_cfg) -> LoraSpec | None:
  """The LoRA spec of peft.*; None for peft.method='none'. Every value is checked here, before any work."""
  if peft_cfg.method not in METHODS:
    raise PeftError(f"peft.method='{peft_cfg.method}': expected one of {', '.join(METHODS)}")
  if peft_cfg.method == "none":
    return None
  if int(peft_cfg.rank) < 1:
    raise PeftError(f"peft.rank={peft_cfg.rank}: a LoRA adapter needs rank >= 1")
  if not float(peft_cfg.alpha) > 0:
    raise PeftError(f"peft.alpha={peft_cfg.alpha}: the adapters' scale alpha / rank must be positive")
  if not 0.0 <= float(peft_cfg.dropout) < 1.0:
    raise PeftError(f"peft.dropout={peft_cfg.dropout}: expected a rate in [0, 1)")
  if not peft_cfg.targets:
    raise PeftError("peft.targets is empty: give a regex over projection paths, e.g. 'attn/(qkv|o)|mlp/(wi|wo)'")
  _regex("peft.targets", peft_cfg.targets)
  return LoraSpec(int(peft_cfg.rank), float(peft_cfg.alpha), float(peft_cfg.dropout), str(peft_cfg.targets),
                  tuple(int(i) for i in peft_cfg.trainable_token_ids))


def with_lora(model: nn.Module, spec: LoraSpec | None) -> nn.Module:
  """`model` (a Flax module whose `cfg` is a model config with a `lora` field) with that field set to `spec`."""
  cfg = getattr(model, "cfg", None)
  if cfg is None or not any(f.name == "lora" for f in dataclasses.fields(cfg)):
    raise PeftError(f"peft.method='lora': the model {type(model).__name__} has no LoRA support (its config carries "
                    "no LoraSpec)")
  if spec is not None and spec.token_ids and not isinstance(cfg, DecoderConfig):
    raise PeftError(f"peft.trainable_token_ids={spec.token_ids}: trained token rows are built for decoders "
                    f"(model.family='decoder'), not for {type(model).__name__}")
  return model.clone(cfg=dataclasses.replace(cfg, lora=spec))


def attach(task, config):
  """The task with its model's projections adapted as peft.* says (unchanged for peft.method='none'). Models never
  see the run config: the spec travels in their own config dataclass."""
  spec = lora_spec(config.peft)
  if spec is not None:
    task.model = with_lora(task.model, spec)
  return task


def backbone(model: nn.Module) -> str | None:
  """The params subtree that holds the pretrained network, when the model has a task head beside it: every encoder
  task model keeps its encoder under 'encoder' (jaxlm/models/heads.py); decoders and encoder-decoders are all
  backbone (their output layer is part of the pretrained model)."""
  return "encoder" if isinstance(getattr(model, "cfg", None), EncoderConfig) else None


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def path_name(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return "/".join(parts)


def paths(tree) -> list[str]:
  """Every parameter's path, in leaf order; boxed (nn.Partitioned) parameters count as one leaf."""
  return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)[0]]


def map_paths(fn: Callable[[str, object], object], tree):
  """fn(path, leaf) over every parameter (boxed ones as one leaf)."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_name(p), x), tree, is_leaf=_is_box)


ADDED_SUFFIXES = (*LORA_SUFFIXES, TOKEN_DELTA)  # what peft.method='lora' adds to a model: LoRA factors, token rows


def is_adapter(path: str) -> bool:
  """LoRA factors and trained token rows: what peft.method='lora' adds to the model and trains."""
  return path.endswith(ADDED_SUFFIXES)


def _listing(names: list[str], n: int = 8) -> str:
  more = f", ... ({len(names)} in all)" if len(names) > n else ""
  return ", ".join(names[:n]) + more


def trainable_mask(params, model: nn.Module, config, *, projections: Callable[[], list[str]] | None = None,
                   check: bool = True):
  """A tree of bools (True = trains) shaped as the unboxed params, or None when every parameter trains.

  The trained set: with peft.method='lora', the adapters and the task head (everything beside the backbone); with
  'none', everything, or, when optim.trainable is set, the head alone; plus whatever optim.trainable matches; minus
  whatever optim.frozen matches (frozen wins). `check` refuses regexes that match nothing (naming the key and some
  paths); `projections` lists the adaptable projections for that message.
  """
  lora = lora_spec(config.peft)
  trainable_re = _regex("optim.trainable", config.optim.trainable)
  frozen_re = _regex("optim.frozen", config.optim.frozen)
  if lora is None and trainable_re is None and frozen_re is None:
    return None
  head = backbone(model)
  names = paths(params)

  def trains(path: str) -> bool:
    if lora is None and trainable_re is None:
      chosen = True
    else:
      chosen = (lora is not None and is_adapter(path)) or (head is not None and path.split("/")[0] != head) or (
          trainable_re is not None and trainable_re.search(path) is not None)
    return chosen and not (frozen_re is not None and frozen_re.search(path))

  if check:
    if lora is not None and not any(p.endswith(LORA_SUFFIXES) for p in names):
      listed = _listing(projections()) if projections is not None else _listing(names)
      raise PeftError(f"peft.targets='{lora.targets}' matches none of this model's dense projections: {listed}")
    for key, pattern in (("optim.trainable", trainable_re), ("optim.frozen", frozen_re)):
      if pattern is not None and not any(pattern.search(p) for p in names):
        raise PeftError(f"{key}='{pattern.pattern}' matches no parameter path; the paths are like: {_listing(names)}")
    if not any(trains(p) for p in names):
      raise PeftError(f"nothing left to train: peft.method='{config.peft.method}', optim.trainable="
                      f"'{config.optim.trainable}', optim.frozen='{config.optim.frozen}' freeze every parameter")
  return map_paths(lambda path, _: trains(path), params)


def projection_paths(task, batch) -> list[str]:
  """The paths of every dense projection of the task's model (those a LoRA target regex can pick), found by
  initialising it abstractly with an adapter on each."""
  original = task.model
  task.model = with_lora(original, LoraSpec(rank=1, alpha=1.0, targets=""))  # '' is found in every path
  try:
    shapes = jax.eval_shape(task.init_params, jax.random.key(0), batch)
  finally:
    task.model = original
  return [p[: -len(LORA_SUFFIXES[0])] for p in paths(shapes) if p.endswith(LORA_SUFFIXES[0])]


def split(tree, mask):
  """(trained, frozen): `tree` twice, with None in place of the other part's leaves. mask None: (tree, None)."""
  if mask is None:
    return tree, None
  trained = jax.tree.map(lambda m, x: x if m else None, mask, tree)
  frozen = jax.tree.map(lambda m, x: None if m else x, mask, tree)
  return trained, frozen


def join(trained, frozen, mask):
  """The inverse of split."""
  if mask is None:
    return trained
  return jax.tree.map(lambda m, a, b: a if m else b, mask, trained, frozen, is_leaf=lambda x: x is None)


def labels(mask, tree):
  """The optimiser partition of every leaf of `tree` (boxed or not): TRAINED or FROZEN."""
  del tree  # the mask is a prefix of boxed and unboxed trees alike
  return jax.tree.map(lambda m: TRAINED if m else FROZEN, mask)


def cast_frozen(params, mask, dtype: str):
  """Frozen parameters stored in `dtype` (model.frozen_dtype); boxed parameters keep their axis names."""
  if mask is None or dtype == "float32":
    return params

  def cast(m, x):
    if m:
      return x
    return x.replace_boxed(x.value.astype(dtype)) if _is_box(x) else x.astype(dtype)

  return jax.tree.map(cast, mask, params)


def count(tree, mask=None, trained: bool = True) -> int:
  """Parameters in `tree` (boxed or not), or of its trained / frozen part."""
  part = split(tree, mask)[0 if trained else 1] if mask is not None else tree
  return int(sum(np.prod(np.shape(x.value if _is_box(x) else x)) for x in
                 jax.tree.leaves(part, is_leaf=_is_box)))


def merge_adapters(params, spec: LoraSpec):
  """Params with every adapter folded into the weight it adapts (W + alpha / r * A B) and removed: the tree of the
  model without LoRA, computing the same function (up to rounding). Every projection's weight is laid out
  [inputs..., outputs...] (layers.lora_shapes), with a leading layers axis under scan_layers. Trained token rows
  are added to their table: embedding [V, D] rows, lm_head [D, V] columns (spec.token_ids)."""
  def fold(node, where):
    if not isinstance(node, dict):
      return node
    out = {}
    for key, value in node.items():
      if is_adapter(key):
        continue
      a, b = node.get(key + LORA_SUFFIXES[0]), node.get(key + LORA_SUFFIXES[1])
      if a is not None and b is not None:
        value = value + spec.scale * _product(a, b, np.shape(value), f"{where}{key}")
      delta = node.get(key + TOKEN_DELTA)
      if delta is not None:
        value = _add_token_rows(value, delta, spec.token_ids, f"{where}{key}")
      out[key] = fold(value, f"{where}{key}/")
    return out

  return fold(nn.meta.unbox(params), "")


def _add_token_rows(table, delta, token_ids, where: str):
  """table [V, D] + delta [K, D] at rows token_ids, or table [D, V] + delta [D, K] at those columns."""
  ids = np.asarray(token_ids, np.int32)
  if np.shape(delta) == (len(ids), np.shape(table)[1]):
    index = (ids,)
  elif np.shape(delta) == (np.shape(table)[0], len(ids)):
    index = (slice(None), ids)
  else:
    raise ValueError(f"{where}: token rows {np.shape(delta)} for {len(ids)} ids do not fit the table "
                     f"{np.shape(table)}")
  if isinstance(table, np.ndarray):
    out = np.array(table, np.float32)
    out[index] += np.asarray(delta, np.float32)
    return out
  return jnp.asarray(table, jnp.float32).at[index].add(jnp.asarray(delta, jnp.float32))


def _product(a, b, weight_shape, where: str):
  """A B shaped as the weight: [ins.., r] x [r, outs..]; stacked layers multiply layer by layer."""
  xp = np if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) else jnp
  a32, b32 = a.astype(np.float32), b.astype(np.float32)
  if tuple(weight_shape) == tuple(a.shape[:-1]) + tuple(b.shape[1:]):
    return xp.tensordot(a32, b32, axes=1)
  n = a.shape[0]
  if (b.shape[0] == n and tuple(weight_shape) == (n, *a.shape[1:-1], *b.shape[2:])):
    flat = xp.einsum("lir,lro->lio", a32.reshape(n, -1, a.shape[-1]), b32.reshape(n, b.shape[1], -1))
    return flat.reshape(weight_shape)
  raise ValueError(f"{where}: adapter shapes {a.shape} x {b.shape} do not make the weight's shape {weight_shape}")


def strip_adapters(params):
  """Params without the adapters (the base model's tree), nothing folded."""
  def strip(node):
    if not isinstance(node, dict):
      return node
    return {k: strip(v) for k, v in node.items() if not is_adapter(k)}
  return strip(nn.meta.unbox(params))


def has_adapters(params) -> bool:
  return any(is_adapter(p) for p in paths(params))
