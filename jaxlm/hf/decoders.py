"""What the GPT-2 and Llama converters share: the decoder's per-layer and scanned parameter layouts, checking a
converted tree against the one Decoder creates, and placing host arrays onto a mesh one array at a time."""

from __future__ import annotations

import dataclasses
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxlm import sharding
from jaxlm.hf.io import ConvertError, safetensors_files
from jaxlm.models.decoder import Decoder, DecoderConfig, unstack_layers

# The DecoderConfig fields a checkpoint fixes (its shapes, and the functions its weights were trained with), each the
# --config.model.* key of the same name.
CHECKPOINT_FIELDS = ("style", "vocab_size", "max_len", "num_layers", "d_model", "num_heads", "num_kv_heads",
                     "head_dim", "d_ff", "tie_embeddings", "norm_eps", "rope_theta", "use_bias", "hidden_act")


def model_overrides(cfg: DecoderConfig) -> list[str]:
  """The --config.model.* overrides that make a run's model the checkpoint's."""
  return ["model.family=decoder", *(f"model.{name}={getattr(cfg, name)}" for name in CHECKPOINT_FIELDS)]


def abstract_params(cfg: DecoderConfig):
  """Decoder(cfg)'s parameters as shapes, boxed with their logical axis names; nothing is allocated."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), tokens)["params"])


def check_tree(params, cfg: DecoderConfig, where: str) -> None:
  """The tree has exactly the parameters, and shapes, that Decoder(cfg) creates (in cfg's layer layout)."""
  want = {jax.tree_util.keystr(k): v.shape for k, v in
          jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract_params(cfg)))[0]}
  got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  for key in sorted(set(want) | set(got)):
    if got.get(key) != want.get(key):
      raise ConvertError(f"{where}: parameter {key} has shape {got.get(key)}, the decoder has {want.get(key)}")


def stack_layers(params: dict) -> dict:
  """Per-layer layout (block_0, block_1, ...) -> the scan_layers layout: every block parameter stacked on a leading
  layers axis under blocks/block."""
  names = sorted((k for k in params if re.fullmatch(r"block_\d+", k)), key=lambda k: int(k.split("_")[1]))
  rest = {k: v for k, v in params.items() if k not in names}
  stacked = jax.tree.map(lambda *layers: np.stack([np.asarray(x) for x in layers]), *(params[k] for k in names))
  return {**rest, "blocks": {"block": stacked}}


def in_layout(params: dict, cfg: DecoderConfig) -> dict:
  """A per-layer tree in cfg's layout: stacked when cfg.scan_layers."""
  return stack_layers(params) if cfg.scan_layers else params


def host_per_layer(params, cfg: DecoderConfig, where: str) -> dict:
  """Any decoder parameters (device or host, either layout, boxed or not) -> float32 numpy arrays, per layer,
  checked against Decoder(cfg). Arrays spread over processes are gathered one at a time."""

  def to_host(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x), np.float32)

  params = jax.tree.map(to_host, nn.meta.unbox(params))
  if "blocks" in params:
    params = unstack_layers(params)
  check_tree(params, dataclasses.replace(cfg, scan_layers=False), where)
  return params


def place(params, cfg: DecoderConfig, mesh, rules):
  """Host arrays in cfg's layout -> jax.Arrays on `mesh`, each sharded as the rules place Decoder(cfg)'s parameter of
  that name. Every array is built shard by shard from its host copy, so no device ever holds the whole model."""
  check_tree(params, cfg, "the parameters to place")
  shardings = sharding.shardings_for(abstract_params(cfg), mesh, rules)
  return jax.tree.map(
      lambda a, s: jax.make_array_from_callback(np.shape(a), s, lambda index: np.asarray(a[index], np.float32)),
      params, shardings)


def tensors_where(hf_dir: str) -> str:
  """What errors about a directory's tensors name: its model.safetensors, or the index of its shards."""
  files = safetensors_files(hf_dir)
  return files[0] if len(files) == 1 else os.path.join(hf_dir, "model.safetensors.index.json")
