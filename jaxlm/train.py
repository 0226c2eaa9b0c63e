"""Training: the sharded train state, the train and eval steps (pure, jitted once), and the thin loop around them."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import config as config_lib
from jaxlm import optim, sharding
from jaxlm.tasks import make_task


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # optimiser steps taken
  params: Any
  opt_state: Any
  nonfinite_skips: jax.Array  # updates skipped because the loss or gradient norm was NaN/Inf


@dataclasses.dataclass
class Setup:
  """What a run is made of: built once from the config, passed explicitly (no ambient state)."""
  config: Any
  task: Any
  mesh: Mesh
  rules: tuple
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: Any
  batch_shardings: Any  # name -> NamedSharding for one global batch


def build(config, devices=None) -> Setup:
  """Mesh, task, optimiser and shardings; checks the mesh and batch size before any work."""
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules_from_config(config.mesh)
  sharding.check_batch(config.train.batch_size, mesh, rules)
  accum = config.optim.grad_accum_steps
  if config.train.batch_size % accum or (config.train.batch_size // accum) % sharding.data_parallel_size(mesh, rules):
    raise sharding.MeshError(
        f"train.batch_size={config.train.batch_size} split into optim.grad_accum_steps={accum} micro-batches must "
        f"leave micro-batches divisible by the data-parallel size {sharding.data_parallel_size(mesh, rules)}")
  task = make_task(config)
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
  dummy = task.dummy_batch(config.train.batch_size, config.data.seq_len)
  abstract = jax.eval_shape(functools.partial(_boxed_state, task, tx), jax.random.key(0), dummy)
  state_shardings = sharding.shardings_for(abstract, mesh, rules)
  batch_shardings = {k: sharding.batch_sharding(mesh, rules, v.ndim) for k, v in dummy.items()}
  return Setup(config, task, mesh, rules, tx, schedule, state_shardings, batch_shardings)


def _boxed_state(task, tx, rng, batch) -> TrainState:
  params = task.init_params(rng, batch)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    nonfinite_skips=jnp.zeros((), jnp.int32))


def init_state(setup: Setup, seed: int) -> TrainState:
  """The train state, created already sharded: nothing large is ever materialised on one device."""
  dummy = setup.task.dummy_batch(setup.config.train.batch_size, setup.config.data.seq_len)

  def init(rng):
    return nn.meta.unbox(_boxed_state(setup.task, setup.tx, rng, dummy))

  return jax.jit(init, out_shardings=setup.state_shardings)(jax.random.key(seed))


def abstract_state(setup: Setup) -> TrainState:
  """Shapes, dtypes and target shardings of the state, for restoring a checkpoint onto this mesh."""
  dummy = setup.task.dummy_batch(setup.config.train.batch_size, setup.config.data.seq_len)
  shapes = jax.eval_shape(
      lambda r: nn.meta.unbox(_boxed_state(setup.task, setup.tx, r, dummy)), jax.random.key(0))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, setup.state_shardings)


def _sum_stats(stats_list):
  return jax.tree.map(lambda *xs: sum(xs), *stats_list)


def train_step(state: TrainState, batch, *, task, tx, schedule, accum_steps: int, seed: int, skip_nonfinite: bool):
  """One optimiser step. Pure: (state, batch) -> (state, metrics)."""
  rng = jax.random.fold_in(jax.random.key(seed), state.step)  # dropout noise depends on the step only: exact resume
  grad_fn = jax.value_and_grad(lambda p, b, r: task.loss_fn(p, b, r, True), has_aux=True)

  if accum_steps == 1:
    (_, stats), grads = grad_fn(state.params, batch, rng)
  else:
    # micro-batch i takes rows i, i+A, i+2A, ...: every micro-batch stays evenly split over the data axes
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1),
                         batch)

    def body(carry, xs):
      grads_sum, stats_sum = carry
      mb, i = xs
      (_, st), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
      # loss_i is sum_i / count_i, so count_i * grad(loss_i) = grad(sum_i): the accumulated gradient is the
      # exact token-weighted mean, as if the whole batch had gone through at once
      count = st["loss"][1]
      grads_sum = jax.tree.map(lambda a, b: a + count * b, grads_sum, g)
      return (grads_sum, _sum_stats([stats_sum, st])), None

    zero_grads = jax.tree.map(jnp.zeros_like, state.params)
    zero_stats = jax.tree.map(lambda x: jnp.zeros_like(x), jax.eval_shape(
        lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), rng)[0][1]))
    (grads, stats), _ = jax.lax.scan(body, (zero_grads, zero_stats), (micro, jnp.arange(accum_steps)))
    grads = jax.tree.map(lambda g: g / jnp.maximum(stats["loss"][1], 1.0), grads)

  loss = stats["loss"][0] / jnp.maximum(stats["loss"][1], 1.0)
  grad_norm = optax.tree.norm(grads)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if skip_nonfinite:
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_params, new_opt_state = keep(new_params, state.params), keep(new_opt_state, state.opt_state)
  new_state = state.replace(step=state.step + 1, params=new_params, opt_state=new_opt_state,
                            nonfinite_skips=state.nonfinite_skips + (~finite).astype(jnp.int32))
  metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step), "finite": finite,
             "nonfinite_skips": new_state.nonfinite_skips}
  metrics.update({f"{k}_mean": v[0] / jnp.maximum(v[1], 1.0) for k, v in stats.items() if k != "loss"})
  return new_state, metrics


def eval_step(params, batch, *, task):
  _, stats = task.loss_fn(params, batch, jax.random.key(0), False)
  return stats


def compile_train_step(setup: Setup):
  """The train step jitted once with in/out shardings; the state is donated."""
  c = setup.config
  step = functools.partial(
      train_step, task=setup.task, tx=setup.tx, schedule=setup.schedule, accum_steps=c.optim.grad_accum_steps,
      seed=c.train.seed, skip_nonfinite=c.train.nonfinite == "skip")
  replicated = NamedSharding(setup.mesh, PartitionSpec())
  return jax.jit(step, in_shardings=(setup.state_shardings, setup.batch_shardings),
                 out_shardings=(setup.state_shardings, replicated), donate_argnums=(0,))


def compile_eval_step(setup: Setup):
  return jax.jit(functools.partial(eval_step, task=setup.task),
                 in_shardings=(setup.state_shardings.params, setup.batch_shardings))


def global_batch(local: dict[str, np.ndarray], batch_shardings) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over the data axes."""
  return {k: jax.make_array_from_process_local_data(batch_shardings[k], v) for k, v in local.items()
          if k in batch_shardings}


def evaluate(setup: Setup, params, batches, eval_fn, max_batches: int = 0) -> dict[str, float]:
  """Averages the task's stats over an eval pass (stats are sums, so the mean is exact)."""
  totals = None
  pairs = []
  predict = setup.task.predict_fn
  for i, local in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    batch = global_batch(local, setup.batch_shardings)
    stats = jax.device_get(eval_fn(params, batch))
    totals = stats if totals is None else jax.tree.map(lambda a, b: a + b, totals, stats)
    if predict is not None:
      pairs.append((local, jax.device_get(predict(params, batch))))
  if totals is None:
    raise ValueError("the eval split produced no batches")
  out = {k: float(s) / max(float(n), 1.0) for k, (s, n) in totals.items()}
  if "loss" in out:
    out["perplexity"] = float(math.exp(min(out["loss"], 80.0)))
  out.update(setup.task.host_metrics(pairs))
  return out


def evaluate_split(setup: Setup, params, tokenizer, split: str, eval_fn, max_batches: int = 0) -> dict:
  """One eval pass over `split`; QA first learns the split's contexts and gold answers (its metrics need the text)."""
  from jaxlm.data import builders
  set_examples = getattr(setup.task, "set_examples", None)
  if set_examples is not None:
    set_examples(builders.open_split(setup.config, split).records)
  return evaluate(setup, params, make_batches(setup.config, tokenizer, split), eval_fn, max_batches)


def write_eval(writer, workdir: str, step: int, split: str, result: dict, write_report: bool) -> dict:
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


class SetupError(ValueError):
  """Input that cannot be trained on (labels, vocabulary, head, data), found before the first step."""


def resolve_labels(config) -> None:
  """Fills data.labels from the train split when it is empty (classification, NER), before the task sizes its head.

  The config written to the workdir then carries them, so eval and predict build the same head with the same ids.
  """
  from jaxlm.data import builders
  if builders.KIND_OF_TASK.get(config.task.name) in ("classification", "ner") and not config.data.labels:
    config.data.labels = tuple(builders.open_split(config, "train").labels)


def write_config(config, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config_lib.to_json(config))
  os.replace(tmp, path)


def read_config(workdir: str):
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a jaxlm workdir (made by `jaxlm train`)?")
  with open(path) as f:
    return config_lib.from_json(f.read())


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def json_line(obj) -> str:
  return json.dumps(obj, sort_keys=True)


def make_batches(config, tokenizer, split: str):
  """The task's per-process batch iterator for a split."""
  from jaxlm.data import pipeline
  kwargs = dict(process_index=jax.process_index(), process_count=jax.process_count())
  if config.task.name == "lm":
    return pipeline.lm_batches(config, tokenizer, split, **kwargs)
  return pipeline.task_batches(config, tokenizer, split, **kwargs)


def check_vocab(config, tokenizer) -> None:
  if tokenizer.vocab_size != config.model.vocab_size:
    raise ValueError(
        f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={config.model.vocab_size}; "
        f"set --config.model.vocab_size={tokenizer.vocab_size} (or retrain the tokenizer)")


def metadata(config, setup: Setup, tokenizer_fingerprint: str = "") -> dict:
  from jaxlm import __version__
  return {"jaxlm_version": __version__, "mesh": dict(setup.mesh.shape), "name": config.name,
          "process_count": jax.process_count(), "tokenizer_fingerprint": tokenizer_fingerprint}


def run(config, workdir: str, *, stop_requested=None) -> TrainState:
  """Trains config.train.steps steps in `workdir`, resuming from its latest checkpoint if there is one.

  SIGTERM or SIGINT (or `stop_requested(step)` returning True) ends the run after the current step, with a
  checkpoint saved and written; with several processes they all stop at the same step.
  """
  from jaxlm.preemption import StopRequest
  with StopRequest() as signals:
    # the signals are asked first, at every step: the multi-process sync point needs every call
    stop = signals if stop_requested is None else lambda step: signals(step) | bool(stop_requested(step))
    return _train(config, workdir, stop, signals)


def _train(config, workdir: str, stop_requested, signals) -> TrainState:
  try:
    return _train_checked(config, workdir, stop_requested, signals)
  except _SetupFailed as e:
    raise SetupError(str(e.__cause__)) from e.__cause__


class _SetupFailed(Exception):
  """Carries a ValueError raised while setting a run up (before the first step) out to _train."""


def _train_checked(config, workdir: str, stop_requested, signals) -> TrainState:
  c = config
  is_main = jax.process_index() == 0
  try:
    setup, tokenizer, writer, ckpt, train_iter, state, prior_seconds = _set_up(c, workdir, is_main)
  except ValueError as e:
    # a head or vocabulary that does not fit, a label the data lacks: a clean message, before any step. The named
    # kinds (DataError, ConvertError, MeshError, ...) keep their type; `jaxlm` prints every one without a traceback.
    if type(e) is ValueError:
      raise _SetupFailed() from e
    raise
  step_fn = compile_train_step(setup)
  eval_fn = compile_eval_step(setup)
  meta = metadata(c, setup, tokenizer.fingerprint())
  nonfinite_seen = int(state.nonfinite_skips)  # with train.nonfinite='stop', any increase stops the run unsaved
  tokens_per_step = c.train.batch_size * c.data.seq_len
  eval_every = c.train.eval_every
  if c.train.eval_each_epoch:
    from jaxlm.data import builders
    eval_every = max(1, len(builders.open_split(c, "train").records) // c.train.batch_size)
  best_metric = c.checkpoint.best_metric

  def run_eval(step):
    results = {}
    for split in setup.task.eval_splits:
      result = evaluate_split(setup, state.params, tokenizer, split, eval_fn, c.train.eval_batches)
      results[split] = write_eval(writer, workdir, step, split, result, is_main)
    return results

  step = int(state.step)
  stopping = False
  pending = None  # (step, metrics on device, time) of the last logged step, pulled after the next dispatch
  t_last = time.time()
  # training seconds: wall time of this loop without evaluation, added to the earlier runs' (saved in checkpoints)
  t_start, eval_seconds, last_eval = time.time(), 0.0, None
  real_tokens = 0  # non-padding tokens since the last log row (fine-tuning batches carry attention_mask)
  batch_tokens = 0  # token slots (padding included) since the last log row: bucketed batches vary in length

  def train_seconds():
    return prior_seconds + time.time() - t_start - eval_seconds

  while step < c.train.steps:
    local = next(train_iter)
    if "attention_mask" in local:
      real_tokens += int(local["attention_mask"].sum())
      batch_tokens += local["attention_mask"].size
    else:
      batch_tokens += tokens_per_step // jax.process_count()
    batch = global_batch(local, setup.batch_shardings)
    state, metrics = step_fn(state, batch)
    step += 1
    # Pull the previous log step's metrics only now that this step is dispatched: the host never idles the device.
    nonfinite = False
    if pending is not None:
      nonfinite = _emit(writer, pending, c, tokens_per_step)["nonfinite_skips"] > nonfinite_seen
      pending = None
    if step % c.train.log_every == 0 or step == c.train.steps:
      if step == c.train.steps:
        jax.block_until_ready(metrics)  # the last row's train_seconds counts the last step's work
      now = time.time()
      extra = {"train_seconds": train_seconds()}
      if real_tokens:
        extra["nonpad_tokens_per_s"] = real_tokens * jax.process_count() / max(now - t_last, 1e-9)
      pending = (step, metrics, batch_tokens * jax.process_count() / max(now - t_last, 1e-9), extra)
      t_last, real_tokens, batch_tokens = now, 0, 0
    stopping = stop_requested(step)  # every process asks at every step: the multi-process sync point needs it
    saving = stopping or step % c.checkpoint.every_steps == 0 or step == c.train.steps
    # With 'stop', the non-finite counter in the state is read at every log row and before every save (which waits
    # for the state anyway): a poisoned state is never written.
    if saving and c.train.nonfinite == "stop":
      nonfinite = nonfinite or int(state.nonfinite_skips) > nonfinite_seen
    if nonfinite and c.train.nonfinite == "stop":
      if pending is not None:
        _emit(writer, pending, c, tokens_per_step)
      writer.close()
      ckpt.close()
      last = ckpt.latest_step()
      kept = f"the last good checkpoint is {ckpt.step_path(last)}" if last is not None else "no checkpoint was saved"
      raise FloatingPointError(
          f"non-finite loss or gradient norm by step {step} (train.nonfinite='stop'); {kept}, nothing after it")
    evaluating = not stopping and (step == c.train.steps or (eval_every and step % eval_every == 0))
    ranked = None  # the dev metrics a best-by-metric checkpoint is ranked by
    if evaluating:
      if pending is not None and step == c.train.steps:  # the last train row comes before the last eval rows
        _emit(writer, pending, c, tokens_per_step)
        pending = None
      # The host runs up to a log interval ahead of the device: the train steps still queued are training time,
      # so they finish before the evaluation clock starts.
      jax.block_until_ready(state)
      t_eval = time.time()
      results = run_eval(step)
      eval_seconds += time.time() - t_eval
      t_last += time.time() - t_eval  # the next row's throughput counts training time only
      last_eval = step
      ranked = results[setup.task.eval_splits[0]] if best_metric else None
    if saving or ranked is not None:
      # the final save follows the final eval, so that the last step is ranked too
      ckpt.save(step, state, train_iter, c, dict(meta, train_seconds=train_seconds()), metrics=ranked)
    if stopping:
      break
  if pending is not None:
    _emit(writer, pending, c, tokens_per_step)
  if step >= c.train.steps and not stopping and last_eval != step:
    run_eval(step)
  if step >= c.train.steps and not stopping:
    writer.log(f"trained {step} steps in {train_seconds():.1f} s (evaluation excluded)")
    test_split = getattr(setup.task, "test_split", None)
    if test_split:
      _test_best(setup, ckpt, tokenizer, eval_fn, writer, workdir, is_main)
  ckpt.close()  # waits for the async write: a checkpoint is never left half-written at exit
  if stopping:
    writer.log(f"stopped by {signals.reason()} at step {step}; checkpoint saved in {ckpt.step_path(step)}")
  writer.close()
  return state


def best_or_latest_step(ckpt, config) -> int | None:
  """The checkpoint predictions and the test split use: the best by checkpoint.best_metric, else the latest."""
  ckpt.wait()
  step = ckpt.best_step() if config.checkpoint.best_metric else None
  return step if step is not None else ckpt.latest_step()


def _test_best(setup: Setup, ckpt, tokenizer, eval_fn, writer, workdir: str, is_main: bool) -> dict:
  """Evaluates the best checkpoint (by checkpoint.best_metric; else the latest) on the test split, once."""
  c = setup.config
  chosen = f"best by dev {c.checkpoint.best_metric}" if c.checkpoint.best_metric else "latest"
  step = best_or_latest_step(ckpt, c)
  step, params = ckpt.restore_params_falling_back(step, abstract_state(setup).params, log=writer.log)
  writer.log(f"test split: the checkpoint of step {step} ({chosen})")
  result = evaluate_split(setup, params, tokenizer, setup.task.test_split, eval_fn, 0)
  return write_eval(writer, workdir, step, setup.task.test_split, result, is_main)


def _set_up(c, workdir: str, is_main: bool):
  """Labels, mesh, tokenizer, writer, checkpointer, train batches and the first state (restored, pretrained or new)."""
  from jaxlm.checkpoint import Checkpointer
  from jaxlm.data.tokenizer import load_tokenizer, tokenizer_path, train_tokenizer
  from jaxlm.metric_writer import MetricWriter

  resolve_labels(c)  # before the task is built: the head's size comes from them
  setup = build(c)  # mesh and batch checks come first: a bad mesh stops before any work
  if not c.tokenizer.path and c.tokenizer.kind == "sentencepiece" and not os.path.isfile(tokenizer_path(c, workdir)):
    # a workdir-owned tokenizer that does not exist yet is trained first, as `jaxlm tokenizer` would
    if jax.process_count() > 1:
      raise FileNotFoundError(f"{tokenizer_path(c, workdir)} is missing: run `jaxlm tokenizer` before a "
                              "multi-process run")
    print(f"training the tokenizer first: {train_tokenizer(c, workdir)}", flush=True)
  tokenizer = load_tokenizer(c, workdir)
  check_vocab(c, tokenizer)
  if is_main:
    write_config(c, workdir)
  writer = MetricWriter(workdir, enabled=is_main, total_steps=c.train.steps, progress=c.train.progress_bar)
  ckpt = Checkpointer(workdir, c.checkpoint)
  train_iter = make_batches(c, tokenizer, "train")

  restored = ckpt.restore_latest(abstract_state(setup), train_iter)  # skips damaged steps, with a warning
  prior_seconds = 0.0
  if restored is not None:
    state = restored.state
    _check_resume(restored, tokenizer, setup, writer.log)
    prior_seconds = float(restored.metadata.get("train_seconds", 0.0))
    writer.log(f"resumed from {restored.path} (step {int(state.step)})")
  else:
    state = _init_from_pretrained(init_state(setup, c.train.seed), setup.task, c, writer.log)
  writer.log(f"jaxlm: {count_params(state.params):,} parameters, mesh {sharding.describe(setup.mesh)}, "
             f"{jax.device_count()} devices, {jax.process_count()} processes")
  return setup, tokenizer, writer, ckpt, train_iter, state, prior_seconds


def _check_resume(restored, tokenizer, setup: Setup, log) -> None:
  saved = restored.metadata.get("tokenizer_fingerprint", "")
  if saved and saved != tokenizer.fingerprint():
    raise ValueError(f"{restored.path} was trained with tokenizer {saved} but the tokenizer now loaded is "
                     f"{tokenizer.fingerprint()}: resuming would change what every token id means")
  if restored.metadata.get("mesh") not in (None, dict(setup.mesh.shape)):
    log(f"resharding {restored.path} from mesh {restored.metadata['mesh']} onto {dict(setup.mesh.shape)}")


def _init_from_pretrained(state: TrainState, task, config, log) -> TrainState:
  """A fresh run starts from pretrained parameters where they match: a jaxlm checkpoint's (init.checkpoint_dir) or
  a converted one's (the task's pretrained_source(), e.g. from init.hf_path). Optimiser state and step stay fresh."""
  from jaxlm.checkpoint import init_from_checkpoint, init_from_tree
  pretrained_source = getattr(task, "pretrained_source", None)  # tasks that can start from a converted checkpoint
  source = pretrained_source() if pretrained_source is not None else None
  if source is not None and config.init.checkpoint_dir:
    raise ValueError(f"init.checkpoint_dir={config.init.checkpoint_dir} and {source[0]} both name the parameters "
                     "to start from: set one")
  if config.init.checkpoint_dir:
    params, report = init_from_checkpoint(state.params, config.init.checkpoint_dir)
  elif source is not None:
    params, report = init_from_tree(state.params, source[1], source_name=source[0], key="init.hf_path")
  else:
    return state
  log(report.describe())
  return state.replace(params=params)


def _emit(writer, pending, c, tokens_per_step):
  step, metrics, tokens_per_s, extra = pending
  m = jax.device_get(metrics)
  row = {"loss": m["loss"], "learning_rate": m["learning_rate"], "grad_norm": m["grad_norm"],
         "tokens_per_s": tokens_per_s, "nonfinite_skips": m["nonfinite_skips"], **extra}
  row.update({k: v for k, v in m.items() if k.endswith("_mean")})
  writer.write(step, "train", row)
  writer.progress_bar(step, float(m["loss"]), tokens_per_s)
  if not c.train.progress_bar:
    writer.log(f"step {step} loss={float(m['loss']):.4f} lr={float(m['learning_rate']):.2e} "
               f"{tokens_per_s:,.0f} tok/s")
  return m


def run_eval_only(config, workdir: str) -> dict:
  """`jaxlm eval`: evaluates the best (by checkpoint.best_metric) else the latest checkpoint in workdir on the task's
  eval splits and its test split."""
  from jaxlm.checkpoint import Checkpointer
  from jaxlm.data.tokenizer import load_tokenizer
  from jaxlm.metric_writer import MetricWriter

  resolve_labels(config)
  setup = build(config)
  tokenizer = load_tokenizer(config, workdir)
  check_vocab(config, tokenizer)
  ckpt = Checkpointer(workdir, config.checkpoint, read_only=True)
  step = best_or_latest_step(ckpt, config)
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.manager.directory}: run `jaxlm train` first")
  step, params = ckpt.restore_params_falling_back(step, abstract_state(setup).params)
  eval_fn = compile_eval_step(setup)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0, progress=False)
  results = {}
  test_split = getattr(setup.task, "test_split", None)
  for split in setup.task.eval_splits + ((test_split,) if test_split else ()):
    result = evaluate_split(setup, params, tokenizer, split, eval_fn, 0)
    result.pop("report", None)
    writer.write(step, split, result)
    results[split] = result
  writer.close()
  ckpt.close()
  return {"step": step, **results}
