"""The step library: the sharded train state, the train and eval steps (pure, jitted once with in/out shardings) and
global batches. No I/O: the loop (jaxlm/run.py), `jaxlm bench`, the memory planner and research code import this."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import optim, peft, sharding
from jaxlm.tasks import Task, make_task


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
  task: Task
  mesh: Mesh
  rules: tuple
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: Any
  batch_shardings: Any  # name -> NamedSharding for one global batch
  local_rows: tuple[int, ...]  # positions of a global batch that this process's devices hold (its share to load)
  trainable: Any = None  # bool per parameter (peft.trainable_mask): only these get gradients and updates; None = all


def build(config, devices=None, task: Task | None = None) -> Setup:
  """Mesh, task (config.task.name's unless given), optimiser and shardings; checks the mesh and batch size before
  any work."""
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules_from_config(config.mesh)
  sharding.check_batch(config.train.batch_size, mesh, rules)
  accum = config.optim.grad_accum_steps
  if config.train.batch_size % accum or (config.train.batch_size // accum) % sharding.data_parallel_size(mesh, rules):
    raise sharding.MeshError(
        f"train.batch_size={config.train.batch_size} split into optim.grad_accum_steps={accum} micro-batches must "
        f"leave micro-batches divisible by the data-parallel size {sharding.data_parallel_size(mesh, rules)}")
  task = peft.attach(task if task is not None else make_task(config), config)
  dummy = task.dummy_batch(config.train.batch_size, config.data.seq_len)
  trainable = trainable_mask(task, config, dummy)
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps, trainable)
  abstract = jax.eval_shape(functools.partial(_boxed_state, task, tx, trainable, config.model.frozen_dtype),
                            jax.random.key(0), dummy)
  state_shardings = sharding.shardings_for(abstract, mesh, rules)
  batch_shardings = {k: sharding.batch_sharding(mesh, rules, v.ndim) for k, v in dummy.items()}
  rows = sharding.batch_sharding(mesh, rules, 1).addressable_devices_indices_map((config.train.batch_size,))
  local_rows = tuple(sorted({r for index in rows.values() for r in range(*index[0].indices(config.train.batch_size))}))
  return Setup(config, task, mesh, rules, tx, schedule, state_shardings, batch_shardings, local_rows,
               trainable=trainable)


def trainable_mask(task, config, batch, *, check: bool = True):
  """Which parameters of the task's model train (peft.trainable_mask: LoRA adapters and heads, optim.trainable,
  optim.frozen); None when all do. `check` refuses regexes that match nothing."""
  if config.model.frozen_dtype not in peft.FROZEN_DTYPES:
    raise peft.PeftError(f"model.frozen_dtype='{config.model.frozen_dtype}': expected one of "
                         f"{', '.join(peft.FROZEN_DTYPES)}")
  params = jax.eval_shape(task.init_params, jax.random.key(0), batch)
  return peft.trainable_mask(params, task.model, config, check=check,
                             projections=lambda: peft.projection_paths(task, batch))


def _boxed_state(task, tx, trainable, frozen_dtype, rng, batch) -> TrainState:
  params = peft.cast_frozen(task.init_params(rng, batch), trainable, frozen_dtype)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    nonfinite_skips=jnp.zeros((), jnp.int32))


def init_state(setup: Setup, seed: int) -> TrainState:
  """The train state, created already sharded: nothing large is ever materialised on one device."""
  dummy = setup.task.dummy_batch(setup.config.train.batch_size, setup.config.data.seq_len)

  def init(rng):
    return nn.meta.unbox(_boxed_state(setup.task, setup.tx, setup.trainable, setup.config.model.frozen_dtype, rng,
                                      dummy))

  # The "rbg" generator for initialisation: XLA:CPU compiles a model's init 4x faster than with threefry (a tiny
  # encoder: 6 s instead of 25 s), and the values do not depend on the mesh either (tests/test_sharding.py).
  return jax.jit(init, out_shardings=setup.state_shardings)(jax.random.key(seed, impl="rbg"))


def abstract_state(setup: Setup) -> TrainState:
  """Shapes, dtypes and target shardings of the state, for restoring a checkpoint onto this mesh."""
  dummy = setup.task.dummy_batch(setup.config.train.batch_size, setup.config.data.seq_len)
  shapes = jax.eval_shape(
      lambda r: nn.meta.unbox(_boxed_state(setup.task, setup.tx, setup.trainable, setup.config.model.frozen_dtype, r,
                                           dummy)), jax.random.key(0))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, setup.state_shardings)


def _sum_stats(stats_list):
  return jax.tree.map(lambda *xs: sum(xs), *stats_list)


def train_step(state: TrainState, batch, *, task, tx, schedule, accum_steps: int, seed: int, skip_nonfinite: bool,
               trainable=None):
  """One optimiser step. Pure: (state, batch) -> (state, metrics). With a `trainable` mask, gradients are taken with
  respect to the trained parameters only (frozen weights get no gradient buffers) and only they change."""
  rng = jax.random.fold_in(jax.random.key(seed, impl="rbg"), state.step)  # dropout noise depends on the step only: exact resume
  trained, frozen = peft.split(state.params, trainable)
  grad_fn = jax.value_and_grad(lambda p, b, r: task.loss_fn(peft.join(p, frozen, trainable), b, r, True),
                               has_aux=True)

  if accum_steps == 1:
    (_, stats), grads = grad_fn(trained, batch, rng)
  else:
    # micro-batch i takes rows i, i+A, i+2A, ...: every micro-batch stays evenly split over the data axes
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1),
                         batch)

    def body(carry, xs):
      grads_sum, stats_sum = carry
      mb, i = xs
      (_, st), g = grad_fn(trained, mb, jax.random.fold_in(rng, i))
      # loss_i is sum_i / count_i, so count_i * grad(loss_i) = grad(sum_i): the accumulated gradient is the
      # exact token-weighted mean, as if the whole batch had gone through at once
      count = st["loss"][1]
      grads_sum = jax.tree.map(lambda a, b: a + count * b, grads_sum, g)
      return (grads_sum, _sum_stats([stats_sum, st])), None

    zero_grads = jax.tree.map(jnp.zeros_like, trained)
    zero_stats = jax.tree.map(lambda x: jnp.zeros_like(x), jax.eval_shape(
        lambda: grad_fn(trained, jax.tree.map(lambda x: x[0], micro), rng)[0][1]))
    (grads, stats), _ = jax.lax.scan(body, (zero_grads, zero_stats), (micro, jnp.arange(accum_steps)))
    grads = jax.tree.map(lambda g: g / jnp.maximum(stats["loss"][1], 1.0), grads)

  loss = stats["loss"][0] / jnp.maximum(stats["loss"][1], 1.0)
  grad_norm = optax.tree.norm(grads)
  # the frozen partition's transform ignores its gradients: zeros stand in for them and compile away
  full_grads = peft.join(grads, jax.tree.map(jnp.zeros_like, frozen), trainable)
  updates, new_opt_state = tx.update(full_grads, state.opt_state, state.params)
  new_trained = optax.apply_updates(trained, peft.split(updates, trainable)[0])
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if skip_nonfinite:
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_trained, new_opt_state = keep(new_trained, trained), keep(new_opt_state, state.opt_state)
  new_state = state.replace(step=state.step + 1, params=peft.join(new_trained, frozen, trainable),
                            opt_state=new_opt_state,
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
      seed=c.train.seed, skip_nonfinite=c.train.nonfinite == "skip", trainable=setup.trainable)
  replicated = NamedSharding(setup.mesh, PartitionSpec())
  return jax.jit(pinned(step, setup, train_step), in_shardings=(setup.state_shardings, setup.batch_shardings),
                 out_shardings=(setup.state_shardings, replicated), donate_argnums=(0,))


def pinned(fn, setup: Setup, like):
  """fn traced with the models' activations pinned to the rules on the mesh (sharding.constrain), named as `like`."""
  def traced(*args):
    with sharding.activation_sharding(setup.mesh, setup.rules):
      return fn(*args)
  traced.__name__ = traced.__qualname__ = like.__name__  # as traces and profiles show it
  return traced


def compile_eval_step(setup: Setup):
  return jax.jit(pinned(functools.partial(eval_step, task=setup.task), setup, eval_step),
                 in_shardings=(setup.state_shardings.params, setup.batch_shardings))


def global_batch(local: dict[str, np.ndarray], batch_shardings, local_rows=None,
                 batch_size: int | None = None) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over the data axes.

  With `local_rows` (the positions of the global batch of `batch_size` rows that `local` holds, in order), each device
  gets exactly its positions whatever the device layout; without, `local` is this process's contiguous block.
  """
  if local_rows is None:
    return {k: jax.make_array_from_process_local_data(batch_shardings[k], v) for k, v in local.items()
            if k in batch_shardings}
  where = np.full(batch_size, -1, np.int64)
  where[np.asarray(local_rows)] = np.arange(len(local_rows))

  def one(sharding, v):
    def shard(index):
      return v[(where[index[0]],) + tuple(index[1:])]
    return jax.make_array_from_callback((batch_size,) + v.shape[1:], sharding, shard)

  return {k: one(batch_shardings[k], v) for k, v in local.items() if k in batch_shardings}


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def state_bytes(tree) -> int:
  """Bytes of the arrays in a (part of the) train state, e.g. its optimiser state."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def describe_params(setup: Setup, state: TrainState) -> str:
  """'trained: T of N parameters (P%); optimiser state B MiB': the start-up line's account of what trains."""
  total = count_params(state.params)
  trained = peft.count(state.params, setup.trainable)
  return (f"trained: {trained:,} of {total:,} parameters ({100.0 * trained / max(total, 1):.2f}%); optimiser state "
          f"{state_bytes(state.opt_state) / 2**20:,.2f} MiB")
