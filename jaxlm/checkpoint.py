"""The one Orbax wrapper: the train state, the data-iterator state, the resolved config and metadata are saved
and restored together, as items of one checkpoint step; restoring falls back past damaged steps.

The train state holds the step, parameters, optimiser state and the non-finite counter. It holds no RNG key: the
train step derives its key from train.seed and the step, so restoring the step restores the random stream.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxlm import peft

ITEMS = ("state", "data", "config", "metadata")
CHECKSUM_KEY = "checksums"  # metadata entry: state array path -> two uint32 sums of its bits (see checksums)


class CorruptCheckpointError(RuntimeError):
  """A finalised checkpoint step whose files cannot be read back, or read back with values that differ from those
  saved."""


class NoUsableCheckpointError(FileNotFoundError):
  """Checkpoint steps exist but none of them restores."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def corrupt_dir(workdir_checkpoints: str) -> str:
  """Where damaged steps are moved, beside the checkpoint directory so Orbax never lists them as steps."""
  return workdir_checkpoints.rstrip("/") + "_corrupt"


def stderr_log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def finalized_steps(directory: str) -> list[int]:
  """The steps whose save completed, newest first, listed without opening a manager: nothing is created or cleaned
  up, so a command can look before it is accepted."""
  return sorted(ocp.path.step.checkpoint_steps(directory), reverse=True) if os.path.isdir(directory) else []


def read_json_item(step_dir: str, item: str) -> dict | None:
  """A step's JSON item ('config' or 'metadata') as saved, or None when it is missing or unreadable."""
  try:
    with open(os.path.join(step_dir, item, "metadata"), encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def ignore_closed_loop_callbacks() -> None:
  """Drops the 'Event loop is closed' reports of a failed restore. When one array of a damaged step fails to read,
  Orbax's asyncio loop ends while TensorStore still has reads of the other arrays in flight; as each finishes, its
  callback calls loop.call_soon_threadsafe on the closed loop and the RuntimeError is printed as unraisable, a
  traceback per array, around the one-line message that names the step. Every other unraisable report is kept."""
  previous = sys.unraisablehook
  if getattr(previous, "_jaxlm_closed_loop_filter", False):
    return

  def hook(unraisable):
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
      tb = tb.tb_next
    if (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed" and tb is not None
        and tb.tb_frame.f_code.co_name == "_check_closed"):
      return
    previous(unraisable)

  hook._jaxlm_closed_loop_filter = True
  sys.unraisablehook = hook


# ---- checksums ----------------------------------------------------------------------------------------------------
# Orbax stores arrays without a checksum of their contents (zstd frames of incompressible data are stored raw), so a
# flipped bit restores silently. Each array gets two wrapping uint32 sums of its bits: a plain one, and one weighted
# by the index along the first axis (catches swapped or misplaced rows). Integer sums are exact in any order, so the
# values are the same on any mesh and a checkpoint is verified after a topology change too. On CPU they are summed
# with numpy over each process's shards (XLA:CPU reduces integers several times slower); on accelerators, on device.

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
      from jax.experimental import multihost_utils
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


# ---- keep policy --------------------------------------------------------------------------------------------------


def _best_value(name: str, metrics: Mapping[str, float]) -> float:
  return float(metrics[name])


def preservation_policy(ckpt_cfg):
  """checkpoint.keep / keep_every / best_metric as one Orbax policy: a step is kept if any part keeps it."""
  cm = ocp.checkpoint_managers
  policies = [cm.LatestN(n=ckpt_cfg.keep if ckpt_cfg.keep > 0 else None)]
  if ckpt_cfg.keep_every:
    policies.append(cm.EveryNSteps(interval_steps=ckpt_cfg.keep_every))
  if ckpt_cfg.best_metric:
    # BestN keeps the n highest after sorting ascending (descending with reverse=True, i.e. the lowest)
    policies.append(cm.BestN(get_metric_fn=functools.partial(_best_value, ckpt_cfg.best_metric),
                             reverse=ckpt_cfg.best_mode == "min", n=ckpt_cfg.keep_best,
                             keep_checkpoints_without_metrics=False))
  return cm.AnyPreservationPolicy(policies)


def check_config(ckpt_cfg) -> None:
  if ckpt_cfg.every_steps < 1:
    raise ValueError(f"checkpoint.every_steps must be at least 1, got {ckpt_cfg.every_steps}")
  if ckpt_cfg.keep < 0 or ckpt_cfg.keep_every < 0:
    raise ValueError(f"checkpoint.keep and checkpoint.keep_every must be >= 0, got {ckpt_cfg.keep} and "
                     f"{ckpt_cfg.keep_every}")
  if ckpt_cfg.best_mode not in ("max", "min"):
    raise ValueError(f"checkpoint.best_mode must be 'max' or 'min', got '{ckpt_cfg.best_mode}'")
  if ckpt_cfg.best_metric and ckpt_cfg.keep_best < 1:
    raise ValueError(f"checkpoint.keep_best must be at least 1 when checkpoint.best_metric is set, got "
                     f"{ckpt_cfg.keep_best}")


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  metadata: dict
  path: str


class Checkpointer:
  def __init__(self, workdir: str, ckpt_cfg, *, read_only: bool = False, directory: str | None = None):
    check_config(ckpt_cfg)
    self.best_metric = ckpt_cfg.best_metric
    best = functools.partial(_best_value, ckpt_cfg.best_metric) if ckpt_cfg.best_metric else None
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation_policy(ckpt_cfg),
        best_fn=best,  # makes Orbax store the metrics passed to save(); the policy above decides what is kept
        best_mode=ckpt_cfg.best_mode,
        enable_async_checkpointing=ckpt_cfg.async_save,
        # a process killed mid-save leaves STEP.orbax-checkpoint-tmp*: never listed as a step, removed at start
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
    )
    self.directory = directory or checkpoint_dir(workdir)
    # Orbax's zarr format without compression unless asked: zstd shrinks float weights by about a tenth but makes
    # saving and restoring several times slower where the CPU, not the disk, is the limit (`jaxlm bench
    # --checkpoint`). Either setting restores: the handler reads what each checkpoint records.
    state_handler = ocp.PyTreeCheckpointHandler(use_compression=ckpt_cfg.compress)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=ITEMS,
        item_handlers={"state": state_handler, "data": grain.checkpoint.CheckpointHandler()})

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the best checkpoint.best_metric (the latest step when no metric is tracked)."""
    return self.manager.best_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_iterator, config, metadata: dict, *, metrics: Mapping[str, float] | None = None,
           force: bool = True) -> bool:
    """Starts writing one checkpoint (in the background when checkpoint.async_save); False if `step` is already saved.

    Fine-tuning passes its eval metrics here: with checkpoint.best_metric set they rank the step for keep_best.
    """
    if step in self.manager.all_steps():
      return False
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      raise KeyError(f"checkpoint.best_metric='{self.best_metric}' is not among the metrics given for step {step}: "
                     f"{sorted(metrics)}")
    meta = dict(metadata, **{CHECKSUM_KEY: checksums(state), "saved_at": time.time()})
    items = {
        "state": ocp.args.PyTreeSave(state),
        "config": ocp.args.JsonSave(config.to_dict()),
        "metadata": ocp.args.JsonSave(meta),
    }
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def metadata(self, step: int) -> dict:
    return dict(self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"])

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the state onto the shardings in `abstract_state` (any mesh), and the iterator in place; checks the
    restored arrays against the checksums saved with them."""
    return self._restore(step, abstract_state, data_iterator).state

  def _restore(self, step: int, abstract_state, data_iterator) -> Restored:
    path = self.step_path(step)
    try:
      meta = self.metadata(step)
      if callable(abstract_state):  # the target depends on what the step holds (trained_only_target)
        abstract_state = abstract_state(meta)
      # grain keeps one iterator state per process: written by another number of processes, none of them applies
      saved_processes = meta.get("process_count", jax.process_count())
      items = {"state": ocp.args.PyTreeRestore(
          abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
      if data_iterator is not None and saved_processes == jax.process_count():
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      state = self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
    except Exception as e:
      raise CorruptCheckpointError(f"{path}: {type(e).__name__}: {_first_line(e)}") from e
    verify_checksums(state, meta.get(CHECKSUM_KEY, {}), path)
    if data_iterator is not None and saved_processes != jax.process_count():
      _skip_batches(data_iterator, step, saved_processes)
    return Restored(step, state, meta, path)

  def restore_latest(self, abstract_state, data_iterator=None, *, log: Callable[[str], None] = stderr_log
                     ) -> Restored | None:
    """The newest step that restores intact; None if there is no step at all.

    A damaged step is reported with a warning naming it, then moved to checkpoints_corrupt/ (so later saves of that
    step number work, and nothing is deleted), and the step before it is tried. If every step fails, nothing is
    moved (the cause is then more likely the config than the files) and NoUsableCheckpointError names them all.
    """
    failures = []
    for step in reversed(self.all_steps()):
      try:
        restored = self._restore(step, abstract_state, data_iterator)
        ok = True
      except CorruptCheckpointError as e:
        failures.append((step, e))
        log(f"WARNING: checkpoint {self.step_path(step)} is damaged and is skipped: {e}")
        ok = False
      if not _all_processes_agree(ok):
        if ok:  # restored here but not on another process: treat the step as damaged everywhere
          failures.append((step, CorruptCheckpointError(f"{self.step_path(step)}: failed on another process")))
        continue
      for bad_step, _ in failures:
        self.move_aside(bad_step, log)
      return restored
    if failures:
      listing = "; ".join(str(e) for _, e in failures)
      raise NoUsableCheckpointError(f"no checkpoint in {self.directory} restores: {listing}")
    return None

  def move_aside(self, step: int, log, *, target_dir: str | None = None, what: str = "damaged") -> None:
    """Moves a step out of the checkpoint directory (to checkpoints_corrupt/ unless `target_dir` says otherwise):
    Orbax no longer lists it, nothing is deleted."""
    if jax.process_index() == 0:
      target_dir = target_dir or corrupt_dir(self.directory)
      os.makedirs(target_dir, exist_ok=True)
      target = os.path.join(target_dir, str(step))
      if os.path.exists(target):
        target += f".{int(time.time())}"
      os.replace(self.step_path(step), target)
      log(f"WARNING: moved the {what} checkpoint {self.step_path(step)} to {target}")
    _sync(f"jaxlm_move_aside_{step}")
    self.manager.reload()

  def restore_params(self, step: int, abstract_params):
    """Parameters only (for eval, sampling and fine-tuning), onto the given shardings, checked against the saved
    checksums. A step whose files cannot be read, or read back wrong, raises CorruptCheckpointError."""
    path = self.step_path(step)
    try:
      meta = self.metadata(step)
      expected = meta.get(CHECKSUM_KEY, {})
      if callable(abstract_params):  # the target depends on what the step holds (trained_only_target)
        abstract_params = abstract_params(meta)
      params = _restore_params_subset(path, abstract_params)
    except Exception as e:
      raise CorruptCheckpointError(f"{path}: {type(e).__name__}: {_first_line(e)}") from e
    verify_checksums({"params": params}, expected, path)
    return params

  def restore_params_falling_back(self, step: int, abstract_params, *, log: Callable[[str], None] = stderr_log
                                  ) -> tuple[int, Any]:
    """(step, parameters) from `step`, or, if it is damaged, from the newest earlier step that restores intact.

    For readers (eval, generate, predict, the test split): each damaged step is reported by name and left where it is
    (a reader never moves files); NoUsableCheckpointError names them all when none restores.
    """
    failures = []
    for candidate in [step] + [s for s in reversed(self.all_steps()) if s < step]:
      try:
        params = self.restore_params(candidate, abstract_params)
      except CorruptCheckpointError as e:
        failures.append(e)
        log(f"WARNING: checkpoint {self.step_path(candidate)} is damaged and is skipped: {e}")
        continue
      if failures:
        log(f"using the checkpoint of step {candidate} instead of step {step}")
      return candidate, params
    raise NoUsableCheckpointError(f"no checkpoint in {self.directory} restores intact: "
                                  + "; ".join(str(e) for e in failures))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  # TensorStore appends the repr of its whole spec ("See full TensorStore details: <bound method ...")
  return text[0].split(" See full TensorStore details")[0][:300] if text else ""


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _all_processes_agree(ok: bool) -> bool:
  """True only if `ok` on every process: all processes must fall back to the same step."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


def _skip_batches(data_iterator, step: int, saved_processes: int) -> None:
  """A fresh iterator moved past the `step` batches (one per train step) the saved run consumed: the same position
  whenever the global batches do not depend on how many processes read them."""
  if jax.process_index() == 0:
    stderr_log(f"the checkpoint at step {step} was written by {saved_processes} processes and is restored by "
               f"{jax.process_count()}: their data-iterator states do not apply, so the data restarts and skips the "
               f"{step} batches already trained on")
  for _ in range(step):
    next(data_iterator)


def _restore_params_subset(step_dir: str, abstract_params):
  """The parameters in `abstract_params` (any subset of those saved) from a step's state, onto their shardings."""
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype),
                              {"params": abstract_params})
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
        item={"params": abstract_params}, restore_args=restore_args, partial_restore=True))
  return restored["params"]


# ---- initialisation for fine-tuning -------------------------------------------------------------------------------


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
  values = _flat(_restore_params_subset(step_dir, subset))
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
