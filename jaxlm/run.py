"""The run: `jaxlm train` (fresh, resumed, or started from pretrained weights), evaluation during training, the test
split with the best checkpoint at the end, and `jaxlm eval`. A thin loop around the step library (jaxlm/train.py):
everything that touches files, data and checkpoints for a run lives here."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
from jax.experimental import multihost_utils

from jaxlm import __version__, peft, peft_format, sharding, train
from jaxlm import config as config_lib
from jaxlm.checkpoint import (
  BASE_KEY,
  Checkpointer,
  base_reference,
  check_config,
  checkpoint_dir,
  finalized_steps,
  init_from_checkpoint,
  init_from_tree,
  read_json_item,
  saved_state,
  trained_only_target,
  with_base,
)
from jaxlm.data import builders, pipeline
from jaxlm.data.tokenizer import load_tokenizer, tokenizer_path, train_tokenizer, trained_here
from jaxlm.metric_writer import MetricWriter, drop_rows
from jaxlm.preemption import StopRequest
from jaxlm.tasks import task_class


class SetupError(ValueError):
  """Input that cannot be trained on (labels, vocabulary, head, data, workdir), found before the first step."""


class DivergedError(FloatingPointError):
  """train.nonfinite='skip' skipped more updates than train.max_(consecutive_)nonfinite_skips allow."""


# ---- the pieces of a run ------------------------------------------------------------------------------------------


def open_data(config) -> builders.Source:
  """The data of the config's task (its record kind), prepared or opened once for the whole run."""
  return builders.open_source(task_class(config.task.name).kind, config.data, f"task.name='{config.task.name}'")


def resolve_labels(config, source: builders.Source | None = None) -> None:
  """Fills data.labels from the train split when the task sizes its head by them and they are not set. The config
  written to the workdir then carries them, so eval and predict build the same head with the same ids."""
  if task_class(config.task.name).labels_from_data and not config.data.labels:
    config.data.labels = tuple((source or open_data(config)).labels)


def split_batches(setup: train.Setup, source: builders.Source, tokenizer, split: str, *, start: int = 0, rows=None):
  """This process's share of the global batches of one split, from global batch `start` on: the same global batches
  on any number of processes, devices or workers."""
  c = setup.config
  return pipeline.batches(setup.task, source.split(split).records, tokenizer, split, data_cfg=c.data,
                          batch_size=c.train.batch_size, seed=c.train.seed, local_rows=setup.local_rows, start=start,
                          cache_dir=source.rows_dir, fingerprint=source.fingerprint(split), rows=rows)


def local_batch(setup: train.Setup, local: dict):
  """A batch of this process's rows -> global arrays on the mesh."""
  return train.global_batch(local, setup.batch_shardings, setup.local_rows, setup.config.train.batch_size)


def check_vocab(config, tokenizer) -> None:
  if tokenizer.vocab_size != config.model.vocab_size:
    raise ValueError(
        f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={config.model.vocab_size}; "
        f"set --config.model.vocab_size={tokenizer.vocab_size} (or retrain the tokenizer)")


def write_config(config, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config_lib.to_json(config))
  os.replace(tmp, path)


def read_config(workdir: str):
  """WORKDIR/config.json, the config of the last run accepted there, over base.py's defaults (keys added since take
  their default) and validated like a loaded config."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise SetupError(f"--workdir {workdir} is a file, not a jaxlm workdir")
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a jaxlm workdir (made by `jaxlm train`)?")
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except UnicodeDecodeError as e:
    raise config_lib.ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise config_lib.ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
  if not isinstance(saved, dict):
    raise config_lib.ConfigError(f"{path}: expected a JSON object of config groups, got {type(saved).__name__}")
  return config_lib.from_saved(saved, path)


def check_workdir(workdir: str) -> None:
  """A workdir to train in is a directory, or a path one can be made at, and writable: checked before any work."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise SetupError(f"--workdir {workdir} is a file, not a directory")
  probe = os.path.abspath(workdir)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise SetupError(f"--workdir {workdir}: {probe} is a file, not a directory")
  for path in (probe, checkpoint_dir(workdir)):
    if os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
      raise SetupError(f"--workdir {workdir}: {path} is not writable")


# ---- what a checkpoint was saved with -----------------------------------------------------------------------------

# Keys whose change makes a checkpoint mean something else: the shapes of its arrays (model.*), what token ids stand
# for (tokenizer.*; the tokenizer file itself is compared by fingerprint), what the head's outputs stand for (task,
# labels). A checkpoint restored under a config that differs in one of them is refused, naming each difference.
SAME_AS_CHECKPOINT = ("model.", "tokenizer.", "task.name", "task.head", "data.labels", "data.tag_scheme", "peft.",
                      "optim.trainable", "optim.frozen")
# ... except these, which change how the same arrays are computed or trained, or how a new tokenizer would be made.
FREE_ON_RESUME = ("model.dropout", "model.attention_dropout", "model.dtype", "model.remat", "model.attention",
                  "model.init_std", "model.init_factor", "tokenizer.path", "tokenizer.max_sentences", "peft.dropout")


@dataclasses.dataclass
class SavedStep:
  """The JSON items saved with one checkpoint step (None where missing or unreadable)."""
  path: str
  config: dict | None
  metadata: dict | None


def saved_step(step_dir: str) -> SavedStep:
  return SavedStep(step_dir, read_json_item(step_dir, "config"), read_json_item(step_dir, "metadata"))


def newest_saved_step(workdir: str) -> SavedStep | None:
  """The newest step of the workdir whose config item reads (a damaged step is the restore's to report)."""
  for step in finalized_steps(checkpoint_dir(workdir)):
    saved = saved_step(os.path.join(checkpoint_dir(workdir), str(step)))
    if saved.config is not None:
      return saved
  return None


def _shown(value) -> str:
  return repr(value) if isinstance(value, str) else str(tuple(value) if isinstance(value, list) else value)


def check_same_model(config, saved: SavedStep) -> None:
  """Refuses `config` where it differs from the config saved with the checkpoint in a key of SAME_AS_CHECKPOINT;
  the message names each key: 'model.d_model: checkpoint 64, config 128'."""
  if saved.config is None:
    return
  before = config_lib.from_json_dict(saved.config)
  differences = []
  for key in config_lib.all_keys(config):
    if not key.startswith(SAME_AS_CHECKPOINT) or key in FREE_ON_RESUME:
      continue
    try:
      old = config_lib.get_key(before, key)
    except (KeyError, AttributeError):
      continue  # a key added since the checkpoint was saved
    new = config_lib.get_key(config, key)
    if (tuple(old) if isinstance(old, list) else old) != (tuple(new) if isinstance(new, list) else new):
      differences.append(f"{key}: checkpoint {_shown(old)}, config {_shown(new)}")
  if differences:
    raise SetupError(f"{saved.path} was saved with another model: {'; '.join(differences)} (set these back, or use "
                     "another --workdir)")


def check_tokenizer(saved: SavedStep, tokenizer) -> None:
  """The tokenizer must be the one the checkpoint was trained with (its recorded fingerprint), or every token id
  would stand for another piece of text."""
  recorded = (saved.metadata or {}).get("tokenizer_fingerprint", "")
  if recorded and recorded != tokenizer.fingerprint():
    raise SetupError(f"{saved.path} was trained with tokenizer {recorded} but the tokenizer loaded now is "
                     f"{tokenizer.fingerprint()}: its token ids would mean other text (set tokenizer.path to the "
                     "tokenizer it was trained with)")


def metadata(config, setup: train.Setup, tokenizer_fingerprint: str = "") -> dict:
  """What a checkpoint records besides the state: version, mesh, processes and the tokenizer it was trained with."""
  return {"jaxlm_version": __version__, "mesh": dict(setup.mesh.shape), "name": config.name,
          "process_count": jax.process_count(), "tokenizer_fingerprint": tokenizer_fingerprint}


# ---- evaluation ---------------------------------------------------------------------------------------------------


def evaluate(setup: train.Setup, params, batches, eval_fn, predict_fn, records, max_batches: int = 0) -> dict:
  """One eval pass: the task's stats averaged exactly (they are sums), perplexity from the loss, and the task's
  host-side metrics from its predictions and the split's records."""
  totals, pairs = None, []
  for i, local in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    batch = local_batch(setup, local)
    stats = jax.device_get(eval_fn(params, batch))
    totals = stats if totals is None else jax.tree.map(lambda a, b: a + b, totals, stats)
    predicted = predict_fn(params, batch)
    if predicted is not None:
      pairs.append((local, jax.device_get(predicted)))
  if totals is None:
    raise ValueError("the eval split produced no batches")
  out = {k: float(s) / max(float(n), 1.0) for k, (s, n) in totals.items()}
  if "loss" in out:
    out["perplexity"] = float(math.exp(min(out["loss"], 80.0)))
  out.update(setup.task.host_metrics(pairs, records))
  return out


@dataclasses.dataclass
class Evaluator:
  """Evaluates a split of one run: compiled steps, data and tokenizer, built once."""
  setup: train.Setup
  source: builders.Source
  tokenizer: object

  def __post_init__(self):
    self.eval_fn = train.compile_eval_step(self.setup)
    self.predict_fn = jax.jit(self.setup.task.predict)
    self._rows = {}  # split -> its prepared rows, looked up once per run

  def __call__(self, params, split: str, max_batches: int = 0) -> dict:
    if split not in self._rows:
      self._rows[split] = pipeline.prepare_rows(
          self.setup.task, self.source.split(split).records, self.tokenizer, split, self.setup.config.data,
          self.source.rows_dir, self.source.fingerprint(split))
    batches = split_batches(self.setup, self.source, self.tokenizer, split, rows=self._rows[split])
    records = self.source.split(split).records
    return evaluate(self.setup, params, batches, self.eval_fn, self.predict_fn, records, max_batches)


def write_eval(writer: MetricWriter, workdir: str, step: int, split: str, result: dict, write_report: bool) -> dict:
  """An eval result -> a metrics.jsonl row and a log line; a text report (seqeval's) is printed and written to
  WORKDIR/report_{split}_step{step}.txt. Returns the numeric metrics."""
  result = dict(result)
  report = result.pop("report", None)
  writer.write(step, split, result)
  writer.log(f"step {step} {split}: " + " ".join(f"{k}={v:.4f}" for k, v in result.items()))
  if report and write_report:
    writer.log(report)
    with open(os.path.join(workdir, f"report_{split}_step{step}.txt"), "w") as f:
      f.write(report)
  return result


def best_or_latest_step(ckpt: Checkpointer, config) -> int | None:
  """The checkpoint predictions and the test split use: the best by checkpoint.best_metric, else the latest."""
  ckpt.wait()
  step = ckpt.best_step() if config.checkpoint.best_metric else None
  return step if step is not None else ckpt.latest_step()


def restore_params(setup: train.Setup, ckpt: Checkpointer, *, log=None, tokenizer=None) -> tuple[int, object]:
  """(step, parameters) of the best (by checkpoint.best_metric) else latest checkpoint, restored onto this run's
  mesh; a damaged step is named and skipped for the newest intact one before it. For eval, test, predict and
  generate alike. The config must agree with the checkpoint's on the keys that give its arrays their shapes and
  meaning, and `tokenizer` (if given) must be the one it was trained with."""
  step = best_or_latest_step(ckpt, setup.config)
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: run `jaxlm train` first")
  saved = saved_step(ckpt.step_path(step))
  check_same_model(setup.config, saved)
  if tokenizer is not None:
    check_tokenizer(saved, tokenizer)
  kwargs = {"log": log} if log is not None else {}
  target = trained_only_target(train.abstract_state(setup).params, setup.trainable, params_only=True)
  step, params = ckpt.restore_params_falling_back(step, target, **kwargs)
  return step, with_frozen_base(setup, ckpt.step_path(step), params, log)


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


class _Profiler:
  """train.profile = "START:STOP": a jax.profiler trace of steps START..STOP-1 (counted from 0) in WORKDIR/profile,
  which TensorBoard's profile plugin and Perfetto (ui.perfetto.dev) open."""

  def __init__(self, spec: str, workdir: str, log):
    self.start, self.stop = (int(x) for x in spec.split(":")) if spec else (None, None)
    self.directory, self.log, self.active = os.path.join(workdir, "profile"), log, False

  def before(self, step: int) -> None:
    if self.start is not None and step == self.start and jax.process_index() == 0:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, state, last: bool = False) -> None:
    if self.active and (step >= self.stop or last):
      jax.block_until_ready(state)  # the traced steps finish inside the trace
      jax.profiler.stop_trace()
      self.active = False
      self.log(f"profile of steps {self.start}..{step - 1} written to {self.directory}")


class _Clock:
  """Training seconds: wall time of this run's loop without evaluation, plus the earlier runs' (from checkpoints)."""

  def __init__(self, prior: float):
    self.prior, self.start, self.eval_seconds = prior, time.time(), 0.0

  def train_seconds(self) -> float:
    return self.prior + time.time() - self.start - self.eval_seconds


class _Throughput:
  """Token counts since the last train row: slots run (bucketed batches vary) and, for fine-tuning batches that carry
  attention_mask, non-padding tokens."""

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self.since = time.time()
    self.real = self.slots = 0

  def count(self, local: dict) -> None:
    if "attention_mask" in local:
      self.real += int(local["attention_mask"].sum())
      self.slots += local["attention_mask"].size
    else:
      self.slots += self.tokens_per_step // jax.process_count()

  def row(self) -> tuple[float, dict]:
    """(tokens/s, extra row values) since the last row; starts the next interval."""
    now = time.time()
    elapsed = max(now - self.since, 1e-9)
    extra = {"nonpad_tokens_per_s": self.real * jax.process_count() / elapsed} if self.real else {}
    rate = self.slots * jax.process_count() / elapsed
    self.since, self.real, self.slots = now, 0, 0
    return rate, extra


STREAK_KEY = "nonfinite_streak_start"  # checkpoint metadata: first step of the run of skipped updates it is in; 0 = none


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
  clock: _Clock
  skips: _Skips
  base: dict | None = None  # where the frozen parameters come from, when checkpoints leave them out

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
    _check_tokenizer_to_train(c, workdir, steps)
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
    return cls(c, workdir, setup, source, tokenizer, writer, ckpt, train_iter, state, _Clock(prior), skips, base)

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
    throughput = _Throughput(c.train.batch_size * c.data.seq_len)
    pending = None  # (step, metrics on device, tokens/s, extra) of the last logged step, pulled after the next dispatch
    step, stopping, last_eval = int(self.state.step), False, None

    profiler = _Profiler(c.train.profile, self.workdir, writer.log)
    while step < c.train.steps:
      local = next(self.train_iter)
      throughput.count(local)
      profiler.before(step)
      self.state, metrics = step_fn(self.state, local_batch(setup, local))
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
      if step % c.train.log_every == 0 or step == c.train.steps:
        if step == c.train.steps:
          jax.block_until_ready(metrics)  # the last row's train_seconds counts the last step's work
        rate, extra = throughput.row()
        pending = (step, metrics, rate, {"train_seconds": self.clock.train_seconds(), **extra})
      stopping = stop_requested(step)  # every process asks at every step: the multi-process sync point needs it
      save_due = save_due or step % c.checkpoint.every_steps == 0
      saving = stopping or save_due or step == c.train.steps
      # With 'stop', the non-finite counter in the state is read at every log row and before every save (which waits
      # for the state anyway): a poisoned state is never written.
      if saving and c.train.nonfinite == "stop":
        nonfinite = nonfinite or int(self.state.nonfinite_skips) > nonfinite_seen
      if nonfinite and c.train.nonfinite == "stop":
        self._stop_nonfinite(step, pending)
      ranked = None  # the dev metrics a best-by-metric checkpoint is ranked by
      if not stopping and (step == c.train.steps or (eval_every and step % eval_every == 0)):
        if pending is not None and step == c.train.steps:  # the last train row comes before the last eval rows
          self._emit(pending)
          pending = None
        results = self._evaluate(evaluator, step, throughput, is_main)
        last_eval = step
        ranked = results[setup.task.eval_splits[0]] if c.checkpoint.best_metric else None
      if skipping and (saving or ranked is not None):
        self._count_skips(step, pending)  # a save waits for this step anyway
        if self.skips.streak_start and not (stopping or step == c.train.steps):
          # no checkpoint from inside a run of skips: if it ends in divergence, the newest one predates it, and the
          # keep policy never deletes it for checkpoints of the same parameters
          saving, ranked = False, None
      if saving or ranked is not None:
        # the final save follows the final eval, so that the last step is ranked too
        ckpt.save(step, saved_state(self.state, setup.trainable, self.base), None, c,
                  dict(meta, train_seconds=self.clock.train_seconds(), **{STREAK_KEY: self.skips.streak_start},
                       **({BASE_KEY: self.base} if self.base else {})), metrics=ranked)
        save_due = False
      if stopping:
        break
    profiler.after(step, self.state, last=True)
    if pending is not None:
      self._emit(pending)
    finished = step >= c.train.steps and not stopping
    if finished and last_eval != step:
      self._evaluate(evaluator, step, throughput, is_main)
    if finished:
      writer.log(f"trained {step} steps in {self.clock.train_seconds():.1f} s (evaluation excluded)")
      if setup.task.test_split:
        self._test_best(evaluator, is_main)
    ckpt.close()  # waits for the async write: a checkpoint is never left half-written at exit
    if stopping:
      writer.log(f"stopped by {signals.reason()} at step {step}; checkpoint saved in {ckpt.step_path(step)}")
    writer.close()
    return self.state

  def _evaluate(self, evaluator: Evaluator, step: int, throughput: _Throughput, is_main: bool) -> dict:
    # The host runs up to a log interval ahead of the device: the train steps still queued are training time, so
    # they finish before the evaluation clock starts.
    jax.block_until_ready(self.state)
    t_eval = time.time()
    results = {}
    for split in self.setup.task.eval_splits:
      result = evaluator(self.state.params, split, self.config.train.eval_batches)
      results[split] = write_eval(self.writer, self.workdir, step, split, result, is_main)
    spent = time.time() - t_eval
    self.clock.eval_seconds += spent
    throughput.since += spent  # the next row's throughput counts training time only
    return results

  def _emit(self, pending) -> dict:
    step, metrics, tokens_per_s, extra = pending
    m = jax.device_get(metrics)
    row = {"loss": m["loss"], "learning_rate": m["learning_rate"], "grad_norm": m["grad_norm"],
           "tokens_per_s": tokens_per_s, "nonfinite_skips": m["nonfinite_skips"], **extra}
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


def prepare_tokenizer(c, workdir: str, source: builders.Source):
  """The run's tokenizer; a workdir-owned sentencepiece model that does not exist yet is trained first, as
  `jaxlm tokenizer` would: by process 0, while the other processes wait for it at a barrier, then all load it."""
  path = tokenizer_path(c, workdir)
  # Decided from the config alone, so that every process takes the barrier below or none does (whether the file
  # exists yet depends on when a process looks).
  if trained_here(c):
    if jax.process_index() == 0 and not os.path.isfile(path):
      print(f"training the tokenizer first: {train_tokenizer(c, workdir, source.texts())}", flush=True)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("jaxlm: the workdir's tokenizer is ready")
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: process 0 trained the tokenizer there, but process {jax.process_index()} "
                                "does not see it: the workdir must be one directory shared by every process (or run "
                                "`jaxlm tokenizer` first and set tokenizer.path to its file)")
  return load_tokenizer(c, workdir)


def _check_tokenizer_to_train(c, workdir: str, steps: list[int]) -> None:
  """When the run will train its tokenizer into the workdir: never where checkpoints exist (they were trained with the
  one that is missing), and only one that will fit model.vocab_size (checked before, not after, it is written)."""
  path = tokenizer_path(c, workdir)
  if c.tokenizer.path or c.tokenizer.kind != "sentencepiece" or os.path.isfile(path):
    return  # nothing is trained: load_tokenizer reads the file, or names the one that is missing
  if steps:
    raise SetupError(f"{path} is missing but {checkpoint_dir(workdir)} holds checkpoints trained with it: a newly "
                     "trained tokenizer would give other token ids (put the file back, or set tokenizer.path to it)")
  if c.tokenizer.vocab_size != c.model.vocab_size:
    raise SetupError(f"tokenizer.vocab_size={c.tokenizer.vocab_size} but model.vocab_size={c.model.vocab_size}: the "
                     f"tokenizer this run would train does not fit the model; set --config.model.vocab_size="
                     f"{c.tokenizer.vocab_size}")


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


# ---- jaxlm eval ---------------------------------------------------------------------------------------------------


def run_eval_only(config, workdir: str) -> dict:
  """`jaxlm eval`: evaluates the best (by checkpoint.best_metric) else the latest checkpoint in workdir on the task's
  eval splits and its test split."""
  if not os.path.isdir(workdir):
    raise SetupError(f"--workdir {workdir} is a file, not a jaxlm workdir" if os.path.exists(workdir) else
                     f"--workdir {workdir} does not exist")
  source = open_data(config)
  resolve_labels(config, source)
  setup = train.build(config)
  tokenizer = load_tokenizer(config, workdir)
  check_vocab(config, tokenizer)
  ckpt = Checkpointer(workdir, config.checkpoint, read_only=True)
  step, params = restore_params(setup, ckpt, tokenizer=tokenizer)
  ckpt.close()
  evaluator = Evaluator(setup, source, tokenizer)
  test_split = setup.task.test_split
  splits = setup.task.eval_splits + ((test_split,) if test_split else ())
  results = {split: evaluator(params, split) for split in splits}
  if jax.process_index() == 0:  # rows of this step written by training are replaced: each (step, split) once
    drop_rows(os.path.join(workdir, "metrics.jsonl"), step, splits)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0, progress=False)
  for split, result in results.items():
    result.pop("report", None)
    writer.write(step, split, result)
  writer.close()
  return {"step": step, **results}

