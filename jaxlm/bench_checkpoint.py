"""`jaxlm bench --checkpoint DIR`: seconds and MB/s to save a config's train state (synchronously; asynchronously,
with how long the caller is blocked) and to restore it, beside the disk's own sequential speed measured with dd."""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp

from jaxlm import checkpoint as ckpt_lib
from jaxlm import checksums, train
from jaxlm import workdir as workdir_lib

MB = 1e6


def _files(path: str) -> list[str]:
  return [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]


def fsync_tree(path: str) -> None:
  """Makes a written checkpoint durable (Orbax leaves that to the OS), so it can be compared with dd's fdatasync."""
  for name in _files(path):
    fd = os.open(name, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def evict(path: str) -> None:
  """Drops a directory's (already synced) pages from the page cache, so the next read comes from the disk."""
  for name in _files(path) if os.path.isdir(path) else [path]:
    fd = os.open(name, os.O_RDONLY)
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def _dd_rate(output: str) -> float:
  """MB/s from dd's summary line ('... copied, 1.2 s, 850 MB/s')."""
  m = re.search(r"copied, ([\d.]+) s", output)
  if not m:
    raise RuntimeError(f"unexpected dd output: {output!r}")
  n = int(re.search(r"^(\d+) bytes", output, re.MULTILINE).group(1))
  return n / float(m.group(1)) / MB


def disk_speed(directory: str, size_mb: int) -> dict:
  """dd's sequential write (with fdatasync) and uncached read of a file as large as the checkpoint."""
  path = os.path.join(directory, "dd.bin")
  w = subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={size_mb}", "conv=fdatasync"],
                     capture_output=True, text=True, check=True)
  evict(path)
  r = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], capture_output=True, text=True, check=True)
  os.remove(path)
  return {"dd_write_mb_s": _dd_rate(w.stderr), "dd_read_mb_s": _dd_rate(r.stderr)}


def randomised(setup, state):
  """Every float array filled with noise. A fresh state's zero optimiser moments would compress to nothing; a
  trained state's do not, and noise is the honest worst case for the compressor."""

  def fill(key, state):
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [
        jax.random.normal(k, x.shape, x.dtype) * 0.02 if jnp.issubdtype(x.dtype, jnp.floating) else x
        for k, x in zip(keys, leaves)])

  return jax.jit(fill, out_shardings=setup.state_shardings, donate_argnums=1)(jax.random.key(1), state)


def bench_checkpoint(config, parent: str, *, repeats: int = 3) -> dict:
  """Writes under PARENT/jaxlm_bench_checkpoint (removed afterwards) and returns the figures."""
  directory = os.path.join(os.path.abspath(parent), "jaxlm_bench_checkpoint")
  setup = train.build(config)
  state = jax.block_until_ready(randomised(setup, train.init_state(setup, config.train.seed)))
  state_mb = sum(x.nbytes for x in jax.tree.leaves(state)) / MB
  meta = workdir_lib.metadata(config, setup)
  shutil.rmtree(directory, ignore_errors=True)
  os.makedirs(directory)

  t0 = time.perf_counter()
  checksums.checksums(state)
  checksum_s = time.perf_counter() - t0

  def saves(async_save: bool) -> tuple[list[float], list[float], list[float], ckpt_lib.Checkpointer]:
    cfg = config.checkpoint.copy_and_resolve_references()
    cfg.async_save, cfg.keep = async_save, 0
    ckpt = ckpt_lib.Checkpointer("", cfg, directory=os.path.join(directory, "async" if async_save else "sync"))
    blocked, total, durable = [], [], []
    for step in range(1, repeats + 1):
      t0 = time.perf_counter()
      ckpt.save(step, state, None, config, meta)
      blocked.append(time.perf_counter() - t0)  # what the training loop waits for before its next step
      ckpt.wait()
      total.append(time.perf_counter() - t0)
      fsync_tree(ckpt.step_path(step))
      durable.append(time.perf_counter() - t0)
    return blocked, total, durable, ckpt

  _, sync_s, sync_durable_s, ckpt = saves(False)
  ckpt.close()
  async_blocked_s, async_s, _, ckpt = saves(True)
  step_dir = ckpt.step_path(repeats)
  disk_mb = sum(os.path.getsize(f) for f in _files(step_dir)) / MB

  abstract = train.abstract_state(setup)
  cold, warm = [], []
  for _ in range(repeats):
    evict(step_dir)
    t0 = time.perf_counter()
    jax.block_until_ready(ckpt.restore(repeats, abstract))
    cold.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    jax.block_until_ready(ckpt.restore(repeats, abstract))
    warm.append(time.perf_counter() - t0)
  ckpt.close()
  disk = disk_speed(directory, int(disk_mb) + 1)

  med = statistics.median
  out = {
      "params": train.count_params(state.params), "state_mb": round(state_mb, 1), "on_disk_mb": round(disk_mb, 1),
      "devices": jax.device_count(), "repeats": repeats, "checksum_s": round(checksum_s, 3),
      "sync_save_s": round(med(sync_s), 3), "sync_save_mb_s": round(state_mb / med(sync_s), 1),
      "sync_save_fsynced_s": round(med(sync_durable_s), 3),
      "sync_save_fsynced_mb_s": round(state_mb / med(sync_durable_s), 1),
      "async_blocked_s": round(med(async_blocked_s), 3), "async_total_s": round(med(async_s), 3),
      "restore_cold_s": round(med(cold), 3), "restore_cold_mb_s": round(state_mb / med(cold), 1),
      "restore_warm_s": round(med(warm), 3), "restore_warm_mb_s": round(state_mb / med(warm), 1),
      **{k: round(v, 1) for k, v in disk.items()},
  }
  out["blocked_over_sync_save"] = round(out["async_blocked_s"] / out["sync_save_s"], 4)
  out["restore_over_dd_read"] = round(out["restore_cold_mb_s"] / out["dd_read_mb_s"], 3)
  shutil.rmtree(directory, ignore_errors=True)
  return out
