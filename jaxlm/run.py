"""The run: `jaxlm train` (fresh, resumed, or started from pretrained weights), evaluation during training, the test
split with the best checkpoint at the end, and `jaxlm eval`. A thin loop around the step library (jaxlm/train.py):
everything that touches files, data and checkpoints for a run lives here."""

from __future__ import annotations

import dataclasses
import time

import jax

from jaxlm import sharding, train
from jaxlm.checkpoint import Checkpointer, check_config, checkpoint_dir, finalized_steps
from jaxlm.data import builders
from jaxlm.evaluation import Evaluator, local_batch, restore_params, split_batches, write_eval
from jaxlm.loop_timing import Clock, Profiler, Throughput, TimeBudget
from jaxlm.metric_writer import MetricWriter
from jaxlm.preemption import StopRequest
from jaxlm.warm_start import BASE_KEY, saved_state, start_state, trained_only_target, with_frozen_base
from jaxlm.workdir import (
  SetupError,
  check_same_model,
  check_tokenizer,
  check_tokenizer_to_train,
  check_vocab,
  check_workdir,
  metadata,
  newest_saved_step,
  open_data,
  prepare_tokenizer,
  resolve_labels,
  saved_step,
  write_config,
)


class DivergedError(FloatingPointError):
  """train.nonfinite='skip' skipped more updates than train.max_(consecutive_)nonfinite_skips allow."""


# ---- training -----------------------------------------------------------------------------------------------------


def run(config, workdir: str, *, stop_requested=None) -> train.TrainState:
  """Trains config.train.steps steps in `workdir`, resuming from its latest checkpoint if there is one.

  SIGTERM or SIGINT (or `stop_requested(step)` returning True) ends the run after the current step, with a
  checkpoint saved and written; with several processes they all stop at the same step.
  """
  with StopRequest() as signals:
    # the signals are asked first, at every step: the multi-process sync point needs every call
    stop = signals if stop_requested is None else lambda step: signals(step) | bool(stop_requested(step))
    try:
      loop = _Loop.set_up(config, workdir)
    except ValueError as e:
      # a head or vocabulary that does not fit, a label the data lacks: a clean message before any step. The named
      # kinds (DataError, ConvertError, MeshError, ...) keep their type; `jaxlm` prints every one without a traceback.
      if type(e) is ValueError:
        raise SetupError(str(e)) from e
      raise
    return loop.train(stop, signals)


STREAK_KEY = "nonfinite_streak_start"  # checkpoint metadata: first step of the skipped run it is in; 0 = none


class _Skips:
  """Updates skipped for a non-finite loss or gradient norm (train.nonfinite='skip'), step by step. Each step's
  `finite` flag stays on the device until that step is known to be done (a metrics row was pulled, a save waits for
  the state), so counting them adds no host-device sync."""

  def __init__(self, total: int, streak_start: int):
    self.total = total  # over the whole run, resumes included (the state's counter)
    self.streak_start = streak_start  # the first step of the current run of skips; 0 = the last step read updated
    self.last = 0  # the last step read
    self._flags = []  # (step, finite flag on the device) not read yet

  def add(self, step: int, finite) -> None:
    self._flags.append((step, finite))

  def read(self, upto: int) -> list[int]:
    """Reads the flags of the steps up to `upto` (all done); returns those of them whose update was skipped."""
    ready = [(s, f) for s, f in self._flags if s <= upto]
    self._flags = [(s, f) for s, f in self._flags if s > upto]
    skipped = []
    for (s, _), finite in zip(ready, jax.device_get([f for _, f in ready])):
      if finite:
        self.streak_start = 0
      else:
        skipped.append(s)
        self.total += 1
        self.streak_start = self.streak_start or s
      self.last = s
    return skipped

  def in_a_row(self) -> int:
    return self.last - self.streak_start + 1 if self.streak_start else 0


def _steps_text(steps: list[int]) -> str:
  if len(steps) == 1:
    return f"step {steps[0]}"
  if steps[-1] - steps[0] == len(steps) - 1:
    return f"steps {steps[0]}-{steps[-1]}"
  return f"{len(steps)} steps from {steps[0]} to {steps[-1]}"


@dataclasses.dataclass
class _Loop:
  config: object
  workdir: str
  setup: train.Setup
  source: builders.Source
  tokenizer: object
  writer: MetricWriter
  ckpt: Checkpointer
  train_iter: object
  state: train.TrainState
  clock: Clock
  skips: _Skips
  base: dict | None = None  # where the frozen parameters come from, when checkpoints leave them out
  throughput: Throughput | None = None  # set when the loop starts

  @classmethod
  def set_up(cls, c, workdir: str) -> _Loop:
    """Data, labels, mesh, workdir, tokenizer, checkpoints and the first state (restored, pretrained or new). Every
    check comes before the first write: a refused command leaves the workdir as it was, and config.json always holds
    the config of the last run accepted there."""
    check_workdir(workdir)
    check_config(c.checkpoint)
    source = open_data(c)
    resolve_labels(c, source)  # before the task is built: the head's size comes from them
    setup = train.build(c)  # mesh and batch checks come first: a bad mesh stops before any work
    steps = finalized_steps(checkpoint_dir(workdir))
    saved = newest_saved_step(workdir)
    if saved is not None:
      check_same_model(c, saved)  # names the keys, instead of every step failing to restore
    check_tokenizer_to_train(c, workdir, steps)
    notes, state, restored, base = [], None, None, None
    if not steps:  # a fresh run: pretrained weights that do not fit stop it before a tokenizer is trained
      state, base = start_state(setup, notes.append)
    tokenizer = prepare_tokenizer(c, workdir, source)
    check_vocab(c, tokenizer)
    if steps:
      if saved is not None:
        check_tokenizer(saved, tokenizer)
      # read-only: nothing is created or cleaned up until the run is accepted (damaged steps found on the way are
      # moved to checkpoints_corrupt/ once a step before them restores)
      reader = Checkpointer(workdir, c.checkpoint, read_only=True)
      try:
        # skips damaged steps, with a warning; a step of the trained parameters alone restores those
        restored = reader.restore_latest(trained_only_target(train.abstract_state(setup), setup.trainable))
      finally:
        reader.close()
    if restored is not None:
      check_tokenizer(saved_step(restored.path), tokenizer)
      base = restored.metadata.get(BASE_KEY)
      state = restored.state.replace(params=with_frozen_base(setup, restored.path, restored.state.params))
    elif state is None:
      state, base = start_state(setup, notes.append)
    # one global batch per step: the data continues at the restored step, whatever the number of processes
    train_iter = split_batches(setup, source, tokenizer, "train", start=int(state.step))
    # accepted: from here on the workdir is written
    is_main = jax.process_index() == 0
    if is_main:
      write_config(c, workdir)
    writer = MetricWriter(workdir, enabled=is_main, total_steps=c.train.steps, progress=c.train.progress_bar,
                          resume_step=int(state.step), progress_every=c.train.progress_every)
    ckpt = Checkpointer(workdir, c.checkpoint)  # creates checkpoints/, removes the files of a save cut short
    for note in notes:
      writer.log(note)
    if restored is not None:
      prior = float(restored.metadata.get("train_seconds", 0.0))
      if restored.metadata.get("mesh") not in (None, dict(setup.mesh.shape)):
        writer.log(f"resharding {restored.path} from mesh {restored.metadata['mesh']} onto {dict(setup.mesh.shape)}")
      writer.log(f"resumed from {restored.path} (step {int(state.step)})")
    else:
      prior = 0.0
    writer.log(f"jaxlm: {train.count_params(state.params):,} parameters, mesh {sharding.describe(setup.mesh)}, "
               f"{jax.device_count()} devices, {jax.process_count()} processes")
    writer.log(train.describe_params(setup, state))
    skips = _Skips(int(state.nonfinite_skips), int((restored.metadata if restored else {}).get(STREAK_KEY, 0)))
    if base is not None:
      writer.log(f"checkpoints hold the trained parameters only; the frozen ones are {base['key']}={base['source']}")
    return cls(c, workdir, setup, source, tokenizer, writer, ckpt, train_iter, state, Clock(prior), skips, base)

  def train(self, stop_requested, signals) -> train.TrainState:
    c, setup, writer, ckpt = self.config, self.setup, self.writer, self.ckpt
    step_fn = train.compile_train_step(setup)
    evaluator = Evaluator(setup, self.source, self.tokenizer)
    meta = metadata(c, setup, self.tokenizer.fingerprint())
    is_main = jax.process_index() == 0
    nonfinite_seen = int(self.state.nonfinite_skips)  # with train.nonfinite='stop', any increase stops the run unsaved
    skipping = c.train.nonfinite == "skip"
    save_due = False  # with 'skip', a checkpoint due at a skipped step is taken at the next step that updates
    eval_every = c.train.eval_every
    if c.train.eval_each_epoch:
      eval_every = self.train_iter.batches_per_epoch  # an epoch is a pass over the rows made (windows included)
    self.throughput = throughput = Throughput(c.train.batch_size * c.data.seq_len)
    pending = None  # (step, metrics on device, token counts) of the last logged step, pulled after the next dispatch
    step, stopping, last_eval = int(self.state.step), False, None
    first_step = step
    budget = TimeBudget(c.train.time_limit_s, self.clock, c.train.log_every, writer.log)
    out_of_time = budget.spent(step)  # a resume of a run that ended on its budget trains no further

    profiler = Profiler(c.train.profile, self.workdir, writer.log)
    while step < c.train.steps and not out_of_time:
      local = next(self.train_iter)
      throughput.count(local)
      profiler.before(step)
      self.state, metrics = step_fn(self.state, local_batch(setup, local))
      if step == first_step:  # compiled and dispatched; once it has run, the rows count device time from there
        dispatched = self.clock.train_seconds()
        jax.block_until_ready(self.state)
        throughput.first_done(dispatched, self.clock.train_seconds())
      step += 1
      profiler.after(step, self.state)
      if skipping:
        self.skips.add(step, metrics["finite"])
      # Pull the previous log step's metrics only now that this step is dispatched: the host never idles the device.
      nonfinite = False
      if pending is not None:
        nonfinite = self._emit(pending)["nonfinite_skips"] > nonfinite_seen
        if skipping:
          self._count_skips(pending[0], None)  # the steps up to the row just pulled are done: no extra sync
        pending = None
      logged = step % c.train.log_every == 0 or step == c.train.steps
      if logged:
        pending = (step, metrics, throughput.cut())
        # the last row is stamped when its step is done, before the final save and eval; with a time budget every
        # row is, to read how long training has taken
        if step == c.train.steps or budget:
          nonfinite = self._emit(pending)["nonfinite_skips"] > nonfinite_seen or nonfinite
          pending = None
      out_of_time = logged and step < c.train.steps and budget.spent(step)
      last = step == c.train.steps or out_of_time
      stopping = stop_requested(step)  # every process asks at every step: the multi-process sync point needs it
      save_due = save_due or step % c.checkpoint.every_steps == 0
      saving = stopping or save_due or last
      # With 'stop', the non-finite counter in the state is read at every log row and before every save (which waits
      # for the state anyway): a poisoned state is never written.
      if saving and c.train.nonfinite == "stop":
        nonfinite = nonfinite or int(self.state.nonfinite_skips) > nonfinite_seen
      if nonfinite and c.train.nonfinite == "stop":
        self._stop_nonfinite(step, pending)
      ranked = None  # the dev metrics a best-by-metric checkpoint is ranked by
      if not stopping and (last or (eval_every and step % eval_every == 0)):
        results = self._evaluate(evaluator, step, is_main)
        last_eval = step
        ranked = results[setup.task.eval_splits[0]] if c.checkpoint.best_metric else None
      if skipping and (saving or ranked is not None):
        self._count_skips(step, pending)  # a save waits for this step anyway
        if self.skips.streak_start and not (stopping or last):
          # no checkpoint from inside a run of skips: if it ends in divergence, the newest one predates it, and the
          # keep policy never deletes it for checkpoints of the same parameters
          saving, ranked = False, None
      if saving or ranked is not None:
        # the final save follows the final eval, so that the last step is ranked too
        ckpt.save(step, saved_state(self.state, setup.trainable, self.base), None, c,
                  dict(meta, train_seconds=self.clock.train_seconds(), **{STREAK_KEY: self.skips.streak_start},
                       **({BASE_KEY: self.base} if self.base else {})), metrics=ranked)
        save_due = False
      if stopping or out_of_time:
        break
    profiler.after(step, self.state, last=True)
    if pending is not None:
      self._emit(pending)
    finished = (step >= c.train.steps or out_of_time) and not stopping
    if finished and last_eval != step:
      results = self._evaluate(evaluator, step, is_main)
      if c.checkpoint.best_metric and ckpt.rank(step, results[setup.task.eval_splits[0]]):
        # resumed from a stop's checkpoint with no steps left: it was saved before any evaluation
        writer.log(f"checkpoint {ckpt.step_path(step)} ranked by this dev pass ({c.checkpoint.best_metric})")
    if finished:
      writer.log(f"trained {step} steps in {self.clock.train_seconds():.1f} s (evaluation excluded)")
      if setup.task.test_split:
        self._test_best(evaluator, is_main)
    ckpt.close()  # waits for the async write: a checkpoint is never left half-written at exit
    if stopping:
      writer.log(f"stopped by {signals.reason()} at step {step}; checkpoint saved in {ckpt.step_path(step)}")
    writer.close()
    return self.state

  def _evaluate(self, evaluator: Evaluator, step: int, is_main: bool) -> dict:
    # The host runs up to a log interval ahead of the device: the train steps still queued are training time, so
    # they finish before the evaluation clock starts.
    jax.block_until_ready(self.state)
    t_eval = time.time()
    results = {}
    for split in self.setup.task.eval_splits:
      result = evaluator(self.state.params, split, self.config.train.eval_batches)
      results[split] = write_eval(self.writer, self.workdir, step, split, result, is_main)
    self.clock.eval_seconds += time.time() - t_eval
    return results

  def _emit(self, pending) -> dict:
    """Writes the train row of a logged step once its metrics are back from the device: its tokens/s and
    train_seconds are stamped then, when the step is done."""
    step, metrics, counts = pending
    m = jax.device_get(metrics)
    seconds = self.clock.train_seconds()  # evaluations are left out of it: the row after one counts training only
    tokens_per_s, extra = self.throughput.rate(counts, seconds)
    row = {"loss": m["loss"], "learning_rate": m["learning_rate"], "grad_norm": m["grad_norm"],
           "tokens_per_s": tokens_per_s, "nonfinite_skips": m["nonfinite_skips"], "train_seconds": seconds, **extra}
    row.update({k: v for k, v in m.items() if k.endswith("_mean")})
    self.writer.write(step, "train", row)
    self.writer.progress_bar(step, float(m["loss"]), tokens_per_s)
    if not self.config.train.progress_bar:
      self.writer.log(f"step {step} loss={float(m['loss']):.4f} lr={float(m['learning_rate']):.2e} "
                      f"{tokens_per_s:,.0f} tok/s")
    return m

  def _count_skips(self, upto: int, pending) -> None:
    """Reads the skip flags of the steps up to `upto`: one warning line for those skipped, and the stop past a limit
    (train.max_consecutive_nonfinite_skips, train.max_nonfinite_skips)."""
    skipped = self.skips.read(upto)
    if not skipped:
      return
    t = self.config.train
    limits = [f"{n} {what} ({key})" for n, what, key in (
        (t.max_consecutive_nonfinite_skips, "in a row", "train.max_consecutive_nonfinite_skips"),
        (t.max_nonfinite_skips, "in all", "train.max_nonfinite_skips")) if n]
    stops = f"; the run stops at {' or '.join(limits)}" if limits else ""
    self.writer.log(f"WARNING: non-finite loss or gradient norm at {_steps_text(skipped)}: update skipped "
                    f"({self.skips.in_a_row()} in a row, {self.skips.total} in all{stops})")
    in_a_row, start = self.skips.in_a_row(), self.skips.streak_start
    if t.max_consecutive_nonfinite_skips and in_a_row >= t.max_consecutive_nonfinite_skips:
      self._stop_diverged(f"{in_a_row} updates in a row skipped for a non-finite loss or gradient norm (steps "
                          f"{start}-{self.skips.last}; train.max_consecutive_nonfinite_skips="
                          f"{t.max_consecutive_nonfinite_skips})", pending)
    if t.max_nonfinite_skips and self.skips.total >= t.max_nonfinite_skips:
      self._stop_diverged(f"{self.skips.total} updates skipped in all for a non-finite loss or gradient norm "
                          f"(train.max_nonfinite_skips={t.max_nonfinite_skips})", pending)

  def _stop_diverged(self, why: str, pending) -> None:
    """Ends a diverged run: the checkpoints from the first step of the run of skips on (there are none unless a stop
    or a previous run's end saved one inside it) move to checkpoints_diverged/, so the latest is the last one from
    before it; then DivergedError says which that is."""
    if pending is not None:
      self._emit(pending)
    self.ckpt.wait()
    start = self.skips.streak_start
    target = checkpoint_dir(self.workdir) + "_diverged"
    moved = [s for s in self.ckpt.all_steps() if start and s >= start]
    for s in moved:
      self.ckpt.move_aside(s, self.writer.log, target_dir=target, what="diverged")
    last = self.ckpt.latest_step()
    self.writer.close()
    self.ckpt.close()
    before = f", from before step {start}" if start else ""
    kept = f"the latest checkpoint is {self.ckpt.step_path(last)}{before}" if last is not None else "no checkpoint kept"
    aside = f"; the checkpoints of steps {', '.join(map(str, moved))} were moved to {target}" if moved else ""
    raise DivergedError(f"training diverged: {why}; {kept}{aside}")

  def _stop_nonfinite(self, step: int, pending) -> None:
    if pending is not None:
      self._emit(pending)
    self.writer.close()
    self.ckpt.close()
    last = self.ckpt.latest_step()
    kept = f"the last good checkpoint is {self.ckpt.step_path(last)}" if last is not None else "no checkpoint was saved"
    raise FloatingPointError(
        f"non-finite loss or gradient norm by step {step} (train.nonfinite='stop'); {kept}, nothing after it")

  def _test_best(self, evaluator: Evaluator, is_main: bool) -> dict:
    """Evaluates the best checkpoint (by checkpoint.best_metric; else the latest) on the test split, once."""
    c = self.config
    chosen = f"best by dev {c.checkpoint.best_metric}" if c.checkpoint.best_metric else "latest"
    step, params = restore_params(self.setup, self.ckpt, log=self.writer.log)
    self.writer.log(f"test split: the checkpoint of step {step} ({chosen})")
    split = self.setup.task.test_split
    return write_eval(self.writer, self.workdir, step, split, evaluator(params, split), is_main)
