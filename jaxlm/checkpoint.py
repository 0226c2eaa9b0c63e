"""The one Orbax wrapper: the train state, the data-iterator state, the resolved config and metadata are saved
and restored together, as items of one checkpoint step; restoring falls back past damaged steps.

The train state holds the step, parameters, optimiser state and the non-finite counter. It holds no RNG key: the
train step derives its key from train.seed and the step, so restoring the step restores the random stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxlm.checksums import CorruptCheckpointError, checksums, verify_checksums

ITEMS = ("state", "data", "config", "metadata")
CHECKSUM_KEY = "checksums"  # metadata entry: state array path -> two uint32 sums of its bits (see checksums)


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


def _closed_loop_callback(unraisable) -> bool:
  """A read callback of a failed restore that found Orbax's asyncio loop already closed."""
  tb = unraisable.exc_traceback
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
          and tb is not None and tb.tb_frame.f_code.co_name == "_check_closed")


def _abandoned_orbax_read(unraisable) -> bool:
  """An Orbax read coroutine of a failed restore, closed when it is garbage-collected: Orbax turns the GeneratorExit
  into 'Encountered error while reading array index' with the TensorStore spec, which Python prints as unraisable."""
  code = getattr(unraisable.object, "cr_code", None)
  exc = unraisable.exc_value
  return (code is not None and code.co_filename.startswith(_ORBAX_DIR) and exc is not None
          and isinstance(exc.__cause__, GeneratorExit))


_ORBAX_DIR = os.path.dirname(ocp.__file__) + os.sep

# Step directories being read, and those whose read failed (already reported in one line): reports that the
# garbage collector prints later about their arrays say nothing new.
_UNREAD_STEPS: set[str] = set()


@contextlib.contextmanager
def _reading(path: str):
  """Marks `path` as being read; it stays marked if the read fails."""
  _UNREAD_STEPS.add(path)
  yield
  _UNREAD_STEPS.discard(path)


def _names_a_failed_read(exc: BaseException | None) -> bool:
  """Whether `exc` (or an error in its chain) names the directory of a step whose read failed or is going on:
  TensorStore's read errors carry the path of the array's step in their spec."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    text = str(exc)
    if any(os.path.join(path, "") in text for path in _UNREAD_STEPS):
      return True
    exc = exc.__cause__ or exc.__context__
  return False


class _FailedReadFutures(logging.Filter):
  """asyncio's 'Future/Task exception was never retrieved', logged when the collector finds a read future of a failed
  restore (late, even after the one-line error): dropped when its error names a step whose read failed."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and _names_a_failed_read(record.exc_info[1]))


def ignore_closed_loop_callbacks() -> None:
  """Drops what a failed restore leaves behind on stderr. When one array of a damaged step fails to read, Orbax's
  asyncio loop ends while TensorStore still has reads of the other arrays in flight: as each finishes, its callback
  calls loop.call_soon_threadsafe on the closed loop, the read coroutines never awaited again are closed when they
  are garbage-collected, and futures holding a read error nobody retrieved are logged by asyncio when collected.
  Python prints all of these, a traceback per array (when the collector runs, so not on every run), around the
  one-line message that names the step. Every other unraisable report and log record is kept."""
  asyncio_logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _FailedReadFutures) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_FailedReadFutures())
  previous = sys.unraisablehook
  if getattr(previous, "_jaxlm_closed_loop_filter", False):
    return

  def hook(unraisable):
    if (_closed_loop_callback(unraisable) or _abandoned_orbax_read(unraisable)
        or _names_a_failed_read(unraisable.exc_value)):
      return
    previous(unraisable)

  hook._jaxlm_closed_loop_filter = True
  sys.unraisablehook = hook


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
    metrics = None if metrics is None else self._ranking(step, metrics)
    meta = dict(metadata, **{CHECKSUM_KEY: checksums(state), "saved_at": time.time()})
    items = {
        "state": ocp.args.PyTreeSave(state),
        "config": ocp.args.JsonSave(config.to_dict()),
        "metadata": ocp.args.JsonSave(meta),
    }
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def _ranking(self, step: int, metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics a step is ranked by, as floats; they must hold checkpoint.best_metric when one is tracked."""
    if self.best_metric and self.best_metric not in metrics:
      raise KeyError(f"checkpoint.best_metric='{self.best_metric}' is not among the metrics given for step {step}: "
                     f"{sorted(metrics)}")
    return {k: float(v) for k, v in metrics.items()}

  def rank(self, step: int, metrics: Mapping[str, float]) -> bool:
    """Ranks a checkpoint saved without metrics (a stop saves before any evaluation) by dev metrics found later;
    False if the step is gone, already ranked, or no checkpoint.best_metric is tracked.

    The metrics go where Orbax keeps the ones given to save() (STEP/metrics/metrics, the JSON its manager reads
    back when it lists the steps), written beside the step and moved in by one rename: a process killed meanwhile
    leaves the step as it was. Nothing of the step is rewritten."""
    self.wait()
    if not self.best_metric or step not in self.manager.all_steps() or self.manager.metrics(step) is not None:
      return False
    ranking = self._ranking(step, metrics)
    if jax.process_index() == 0:
      final = os.path.join(self.step_path(step), "metrics")
      partial = final + ".jaxlm-tmp"
      os.makedirs(partial, exist_ok=True)
      with open(os.path.join(partial, "metrics"), "w") as f:
        json.dump(ranking, f)
        f.flush()
        os.fsync(f.fileno())
      os.rename(partial, final)
    _sync(f"jaxlm_rank_{step}")
    self.manager.reload()
    return True

  def metadata(self, step: int) -> dict:
    return dict(self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"])

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the state onto the shardings in `abstract_state` (any mesh), and the iterator in place; checks the
    restored arrays against the checksums saved with them."""
    return self._restore(step, abstract_state, data_iterator).state

  def _restore(self, step: int, abstract_state, data_iterator) -> Restored:
    path = self.step_path(step)
    try:
      with _reading(path):
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
      with _reading(path):
        meta = self.metadata(step)
        expected = meta.get(CHECKSUM_KEY, {})
        if callable(abstract_params):  # the target depends on what the step holds (trained_only_target)
          abstract_params = abstract_params(meta)
        params = restore_params_subset(path, abstract_params)
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
    multihost_utils.sync_global_devices(name)


def _all_processes_agree(ok: bool) -> bool:
  """True only if `ok` on every process: all processes must fall back to the same step."""
  if jax.process_count() == 1:
    return ok
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


def restore_params_subset(step_dir: str, abstract_params):
  """The parameters in `abstract_params` (any subset of those saved) from a step's state, onto their shardings."""
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype),
                              {"params": abstract_params})
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
        item={"params": abstract_params}, restore_args=restore_args, partial_restore=True))
  return restored["params"]
