"""Checksums of the arrays a checkpoint holds.

Orbax stores arrays without a checksum of their contents (zstd frames of incompressible data are stored raw), so a
flipped bit restores silently. Each array gets two wrapping uint32 sums of its bits: a plain one, and one weighted
by the index along the first axis (catches swapped or misplaced rows). Integer sums are exact in any order, so the
values are the same on any mesh and a checkpoint is verified after a topology change too. On CPU they are summed
with numpy over each process's shards (XLA:CPU reduces integers several times slower); on accelerators, on device.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


class CorruptCheckpointError(RuntimeError):
  """A finalised checkpoint step whose files cannot be read back, or read back with values that differ from those
  saved."""


WEIGHT = 0x9E3779B1  # odd multiplier: row i weighs i * WEIGHT + 1 (mod 2**32)


def path_name(path) -> str:
  """'params/block_0/attn/o' for a tree path: the names used in checksums and fine-tuning reports."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    else:
      parts.append(str(k))
  return "/".join(parts)


def _device_bits(x):
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte values become a trailing pair of words


def _device_checksum(x):
  bits = _device_bits(x)
  if x.ndim == 0:
    rows = jnp.sum(bits, dtype=jnp.uint32)[None]
  else:
    rows = jnp.sum(bits, axis=tuple(range(1, bits.ndim)), dtype=jnp.uint32)  # [first axis]
  weight = jax.lax.iota(jnp.uint32, rows.shape[0]) * jnp.uint32(WEIGHT) + jnp.uint32(1)
  return jnp.stack([jnp.sum(rows, dtype=jnp.uint32), jnp.sum(rows * weight, dtype=jnp.uint32)])


@jax.jit
def device_checksums(leaves):
  return jnp.stack([_device_checksum(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def _host_bits(a: np.ndarray) -> np.ndarray:
  a = np.ascontiguousarray(a)
  if a.dtype == np.bool_:
    return a.astype(np.uint32)
  if a.dtype.itemsize in (1, 2):
    return a.view({1: np.uint8, 2: np.uint16}[a.dtype.itemsize]).astype(np.uint32)
  return a.reshape(a.shape or (1,)).view(np.uint32)


def _host_checksum(x) -> np.ndarray:
  if isinstance(x, jax.Array):
    shards = [(s.index, s.data) for s in x.addressable_shards if s.replica_id == 0]
  else:
    shards = [((), x)]
  total = np.zeros(2, np.uint64)  # uint64 wraps mod 2**64, a multiple of 2**32: the low words stay exact
  for index, data in shards:
    bits = _host_bits(np.asarray(data))
    rows = bits.reshape(bits.shape[0] if np.ndim(data) else 1, -1).sum(axis=1, dtype=np.uint32).astype(np.uint64)
    start = (index[0].start or 0) if np.ndim(data) and index else 0
    weight = np.arange(start, start + rows.shape[0], dtype=np.uint64) * np.uint64(WEIGHT) + np.uint64(1)
    total += np.array([rows.sum(dtype=np.uint64), (rows * weight).sum(dtype=np.uint64)], np.uint64)
  return total


def checksums(tree) -> dict[str, list[int]]:
  """Path -> [sum of bits, row-weighted sum of bits] (uint32) for every array of a (sharded) pytree."""
  named = jax.tree_util.tree_leaves_with_path(tree)
  leaves = [x for _, x in named]
  if jax.default_backend() == "cpu" or not all(isinstance(x, jax.Array) for x in leaves):
    sums = np.stack([_host_checksum(x) for x in leaves]) if leaves else np.zeros((0, 2), np.uint64)
    if jax.process_count() > 1:  # each process summed its own shards
      sums = np.sum(multihost_utils.process_allgather(sums.astype(np.uint64)), axis=0, dtype=np.uint64)
    sums = sums & np.uint64(0xFFFFFFFF)
  else:
    sums = np.asarray(jax.device_get(device_checksums(leaves)))
  return {path_name(p): [int(a), int(b)] for (p, _), (a, b) in zip(named, sums)}


def verify_checksums(tree, expected: Mapping[str, list[int]], where: str) -> None:
  """Raises CorruptCheckpointError naming the arrays whose restored bits differ from those saved."""
  got = checksums(tree)
  bad = sorted(k for k, v in got.items() if k in expected and list(expected[k]) != v)
  if bad:
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise CorruptCheckpointError(f"{where}: restored values of {', '.join(bad[:5])}{more} differ from what was saved")
