"""Will it fit? Per-device memory of a training run for a config and a device count that need not exist here:
parameter, gradient and optimizer-state bytes from the logical shardings, and an activation estimate for the
configured remat policy and dtype. Nothing is materialised: every shape comes from jax.eval_shape / make_jaxpr.

Frozen parameters (peft, optim.frozen) have no gradient and no optimiser state, are stored in model.frozen_dtype,
and the backward pass keeps only what the trained parameters' gradients need; a run with frozen parameters is shown
beside the full fine-tune of the same model.

Where JAX can compile for devices without running on them (the local devices, or a TPU topology through
jax.experimental.topologies, which needs libtpu), `compiled_memory` asks XLA itself.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.extend import core as jax_core
from jax.sharding import AbstractMesh, NamedSharding

from jaxlm import config as config_lib
from jaxlm import optim, peft, sharding, train
from jaxlm.models.decoder import DecoderConfig
from jaxlm.tasks import make_task

GIB = 1024**3


def abstract_mesh(config, num_devices: int) -> AbstractMesh:
  """The configured mesh over `num_devices` devices that need not exist (sizes only)."""
  return AbstractMesh(sharding.mesh_shape(config.mesh, num_devices), sharding.MESH_AXES)


def _shard_bytes(tree, shardings) -> int:
  """Bytes one device holds of `tree` (ShapeDtypeStructs) laid out by `shardings` (NamedShardings)."""
  def one(leaf, s):
    return math.prod(s.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  return int(sum(jax.tree.leaves(jax.tree.map(one, tree, shardings))))


def _task(config, check: bool = True):
  """The config's task with its LoRA adapters, and which parameters train (None = all)."""
  task = peft.attach(make_task(config), config)
  return task, train.trainable_mask(task, config, task.dummy_batch(1, config.data.seq_len), check=check)


def _state_shapes(config):
  """Boxed abstract (params, optimizer state) exactly as the train state builds them, on no device, and which
  parameters train."""
  task, trainable = _task(config)
  tx, _ = optim.make_optimizer(config.optim, config.train.steps, trainable)
  batch = task.dummy_batch(1, config.data.seq_len)

  def init(rng):
    params = peft.cast_frozen(task.init_params(rng, batch), trainable, config.model.frozen_dtype)
    return params, tx.init(params)

  return (*jax.eval_shape(init, jax.random.key(0)), trainable)


OPTIMIZER_STATE = {"adamw": "optimizer state (AdamW: 2 float32 moments)",
                   "adafactor": "optimizer state (Adafactor: factored moments)"}


def _unbox(tree):
  return nn.meta.unbox(tree)


def _per_device_model_config(config, mesh_sizes: dict[str, int]):
  """The model one device runs, for its activations: under tensor parallelism only the heads, MLP units and
  vocabulary it holds (each split only where the rules table splits it, as logical_to_spec decides). Weights stay
  whole along d_model, as FSDP gathers them for the layer that runs."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.scan_layers = False  # the residuals are the same; unrolled blocks let layers be counted one by one
  if config.model.family != "decoder":
    return c  # only the decoder pins head_dim, so only its per-device width can be derived exactly
  m = DecoderConfig.from_config(config.model)
  rules = sharding.rules_from_config(config.mesh)

  def split(name: str, size: int) -> int:
    spec = sharding.logical_to_spec((name,), rules, (size,), mesh_sizes)[0]
    axes = spec if isinstance(spec, tuple) else (spec,) if spec else ()
    return size // math.prod(mesh_sizes[a] for a in axes)

  with c.unlocked():
    c.model.head_dim = m.dim_per_head
    c.model.num_heads = split("heads", m.num_heads)
    c.model.num_kv_heads = split("kv_heads", m.kv_heads)
    if c.model.num_heads % c.model.num_kv_heads:  # heads split but kv heads not: each device keeps them all
      c.model.num_kv_heads = m.kv_heads
    c.model.d_ff = split("mlp", m.ffn_dim)
    c.model.vocab_size = split("vocab", m.vocab_size)
  return c


def _residual_bytes(config, rows: int, num_layers: int, remat: str, fused: bool) -> int:
  """Bytes the forward pass keeps for the backward pass (the vjp residuals), parameters and inputs excluded.

  `fused`: the run uses a fused attention kernel (model.attention=cudnn), which cannot be traced off its GPU; the
  XLA form (config.model.attention is xla here) is traced instead, and its [.., T, T] score matrices, which a fused
  kernel never stores, are replaced by the kernel's float32 softmax statistics (one per query and head).
  """
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.num_layers = num_layers
  c.model.remat = remat
  c.init.hf_path = ""  # shapes only: a pretrained checkpoint's depth would not match the 1- and 2-layer traces
  # the traced model has fewer layers than the real one: regexes naming layers it lacks are not an error here
  task, trainable = _task(c, check=False)
  batch = task.dummy_batch(rows, c.data.seq_len)
  params = jax.eval_shape(
      lambda r: _unbox(peft.cast_frozen(task.init_params(r, batch), trainable, c.model.frozen_dtype)),
      jax.random.key(0))
  trained, frozen = peft.split(params, trainable)

  def loss(p, f):
    return task.loss_fn(peft.join(p, f, trainable), batch, jax.random.key(0), True)[0]

  # gradients with respect to the trained parameters only, as the train step takes them
  closed = jax.make_jaxpr(lambda p, f: jax.vjp(lambda q: loss(q, f), p)[1])(trained, frozen)
  jaxpr = closed.jaxpr
  inputs = set(jaxpr.invars) | set(jaxpr.constvars)  # parameters and the batch: counted elsewhere or negligible
  saved = {v for v in jaxpr.outvars if isinstance(v, jax_core.Var) and v not in inputs}
  t = c.data.seq_len
  total = 0
  for v in saved:
    shape = v.aval.shape
    if jax.dtypes.issubdtype(v.aval.dtype, jax.dtypes.prng_key):
      continue  # dropout's keys: a few words, and no numpy itemsize
    if fused and len(shape) >= 4 and shape[-2:] == (t, t):
      continue
    total += math.prod(shape) * np.dtype(v.aval.dtype).itemsize
  if fused:
    total += num_layers * rows * c.model.num_heads * t * 4
  return int(total)


def activation_estimate(config, mesh_sizes: dict[str, int], fused: bool = False) -> dict:
  """Activation bytes per device for one micro-batch, from the residuals JAX saves under config.model.remat.

  Traced on the per-device shard of the model with 1 and 2 layers: the difference is one layer, the rest is the
  embedding, final norm, logits and loss. `saved` is what all layers keep between forward and backward;
  `recompute` is one layer's full residuals, live again while a rematerialised layer runs its backward.
  """
  dp = math.prod(mesh_sizes[a] for a in _batch_axes(config))
  rows_global = config.train.batch_size // config.optim.grad_accum_steps
  if rows_global % dp:
    raise sharding.MeshError(
        f"train.batch_size={config.train.batch_size} / optim.grad_accum_steps={config.optim.grad_accum_steps} "
        f"= {rows_global} rows per micro-batch do not split over the data-parallel size {dp}")
  rows = rows_global // dp
  c = _per_device_model_config(config, mesh_sizes)
  remat = config.model.remat
  one, two = _residual_bytes(c, rows, 1, remat, fused), _residual_bytes(c, rows, 2, remat, fused)
  per_layer = two - one
  outside = one - per_layer
  recompute = 0
  if remat != "none":
    full_one, full_two = _residual_bytes(c, rows, 1, "none", fused), _residual_bytes(c, rows, 2, "none", fused)
    recompute = full_two - full_one
  return {"rows_per_device": rows, "per_layer": per_layer, "outside_layers": outside,
          "saved": outside + config.model.num_layers * per_layer, "recompute": recompute}


def _batch_axes(config) -> tuple[str, ...]:
  spec = sharding.logical_to_spec(("batch",), sharding.rules_from_config(config.mesh))[0]
  return spec if isinstance(spec, tuple) else (spec,) if spec else ()


def _xla_form(config):
  """A config with model.attention=cudnn traced in its XLA form, which any machine can trace (activation_estimate
  corrects for the kernel); whether it was fused."""
  fused = config.model.attention == "cudnn"
  return (config_lib.apply_overrides(config, ["model.attention=xla"]) if fused else config), fused


def state_bytes(config, num_devices: int) -> dict:
  """Per-device bytes of the train state and batch of `config` on `num_devices` devices laid out as config.mesh
  says: parameters, gradients, optimizer state and the batch (no activations: `estimate` adds those)."""
  config, _ = _xla_form(config)
  mesh = abstract_mesh(config, num_devices)
  rules = sharding.rules_from_config(config.mesh)
  sharding.check_batch(config.train.batch_size, mesh, rules)
  boxed_params, boxed_opt, trainable = _state_shapes(config)
  params, opt = _unbox(boxed_params), _unbox(boxed_opt)
  param_shardings = sharding.shardings_for(boxed_params, mesh, rules)
  param_bytes = _shard_bytes(params, param_shardings)
  opt_bytes = _shard_bytes(opt, sharding.shardings_for(boxed_opt, mesh, rules))
  # gradients exist for the trained parameters only, float32 like them and laid out like them; accumulation keeps a
  # second running sum
  trained_bytes = _shard_bytes(peft.split(params, trainable)[0], peft.split(param_shardings, trainable)[0])
  grad_bytes = trained_bytes * (2 if config.optim.grad_accum_steps > 1 else 1)
  dummy = make_task(config).dummy_batch(config.train.batch_size, config.data.seq_len)
  batch_bytes = _shard_bytes({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in dummy.items()},
                             {k: NamedSharding(mesh, sharding.logical_to_spec(("batch",) + (None,) * (v.ndim - 1),
                                                                                rules)) for k, v in dummy.items()})
  return {"mesh": dict(mesh.shape), "param_count": int(sum(math.prod(x.shape) for x in jax.tree.leaves(params))),
          "trained_count": peft.count(params, trainable),
          "bytes_per_device": {"params": param_bytes, "gradients": grad_bytes, "optimizer": opt_bytes,
                               "batch": batch_bytes}}


def estimate(config, num_devices: int) -> dict:
  """Per-device bytes of a training run of `config` on `num_devices` devices laid out as config.mesh says."""
  config, fused = _xla_form(config)
  state = state_bytes(config, num_devices)
  act = activation_estimate(config, state["mesh"], fused)
  b = state["bytes_per_device"]
  total = b["params"] + b["gradients"] + b["optimizer"] + b["batch"] + act["saved"] + act["recompute"]
  return {
      "config": config.name, "num_devices": num_devices, "mesh": state["mesh"],
      "param_count": state["param_count"], "trained_count": state["trained_count"],
      "frozen_dtype": config.model.frozen_dtype,
      "remat": config.model.remat, "dtype": config.model.dtype, "seq_len": config.data.seq_len,
      "attention": "cudnn" if fused else config.model.attention,
      "micro_batch_rows_per_device": act["rows_per_device"], "grad_accum_steps": config.optim.grad_accum_steps,
      "optimizer": config.optim.name, "bytes_per_device": {
          **b, "activations_saved": act["saved"], "activations_recompute": act["recompute"], "total": total},
      "activations_per_layer": act["per_layer"],
  }


def _size(n: int) -> str:
  return f"{n / GIB:10.2f} GiB" if n >= GIB // 10 else f"{n / 2**20:10.2f} MiB"


def format_estimate(est: dict, device_memory_gib: float | None = None) -> str:
  """A table a person reads before queueing a run."""
  b = est["bytes_per_device"]
  mesh = " x ".join(f"{k}={v}" for k, v in est["mesh"].items())
  lines = [
      f"{est['config']}: {est['param_count']:,} parameters on {est['num_devices']} devices ({mesh})",
      f"micro-batch: {est['micro_batch_rows_per_device']} rows x {est['seq_len']} tokens per device, "
      f"compute dtype {est['dtype']}, remat {est['remat']}, attention {est['attention']}, "
      f"{est['grad_accum_steps']} micro-batch(es) per step",
      "per device:",
  ]
  grads = "gradients (float32, + running sum)" if est["grad_accum_steps"] > 1 else "gradients (float32)"
  frozen = est["param_count"] - est["trained_count"]
  if frozen:
    share = 100 * est["trained_count"] / est["param_count"]
    lines.insert(1, f"trained: {est['trained_count']:,} parameters ({share:.2f}%); frozen: {frozen:,}, stored in "
                    f"{est['frozen_dtype']}, with no gradient or optimizer state")
    grads = grads.replace("gradients (", "gradients of trained params (").replace("running sum", "sum")
  kinds = "float32" if not frozen or est["frozen_dtype"] == "float32" else f"float32, frozen {est['frozen_dtype']}"
  rows = [(f"parameters ({kinds})", b["params"]), (grads, b["gradients"]),
          (OPTIMIZER_STATE[est["optimizer"]], b["optimizer"]), ("input batch", b["batch"]),
          ("activations kept for backward", b["activations_saved"]),
          ("activations of one layer recomputed", b["activations_recompute"]), ("total", b["total"])]
  for name, value in rows:
    lines.append(f"  {name:<45} {_size(value)}")
  if device_memory_gib:
    verdict = "fits" if b["total"] / GIB <= device_memory_gib else "does NOT fit"
    lines.append(f"  {'device memory':<45} {device_memory_gib:10.2f} GiB -> {verdict}")
  lines.append("Activations are the residuals JAX plans to keep; XLA's fusion usually keeps fewer, its temporaries "
               "and fragmentation add some: a guide, not a promise. --compile or --topology ask XLA itself.")
  return "\n".join(lines)


def full_fine_tune(config):
  """The same run with every parameter trained (no adapters, nothing frozen, float32): what a run with frozen
  parameters is compared with."""
  return config_lib.apply_overrides(config, ["peft.method=none", "optim.trainable=", "optim.frozen=",
                                             "model.frozen_dtype=float32"])


def _activations(est: dict) -> int:
  return est["bytes_per_device"]["activations_saved"] + est["bytes_per_device"]["activations_recompute"]


def format_comparison(est: dict, full: dict, device_memory_gib: float | None = None) -> str:
  """This run's per-device bytes beside the full fine-tune's, on the same devices."""
  b, f = est["bytes_per_device"], full["bytes_per_device"]
  rows = [("parameters", b["params"], f["params"]), ("gradients", b["gradients"], f["gradients"]),
          ("optimizer state", b["optimizer"], f["optimizer"]),
          ("activations kept + one layer recomputed", _activations(est), _activations(full)),
          ("total", b["total"], f["total"])]
  title = (f"beside the full fine-tune of the same model ({full['param_count']:,} parameters trained, float32) on "
           f"{est['num_devices']} devices, per device:")
  lines = [title, f"  {'':<45} {'this run':>14} {'full fine-tune':>14}"]
  lines += [f"  {name:<45} {_size(mine)} {_size(theirs)}" for name, mine, theirs in rows]
  if device_memory_gib:
    def verdict(total):
      return "fits" if total / GIB <= device_memory_gib else "does NOT fit"
    lines.append(f"  {f'device memory {device_memory_gib:.2f} GiB':<45} {verdict(b['total']):>14} "
                 f"{verdict(f['total']):>14}")
  return "\n".join(lines)


def compiled_memory(config, devices) -> dict:
  """XLA's own per-device sizes for the train step compiled (not run) for `devices`: local devices, or the
  compile-only devices of a jax.experimental.topologies topology."""
  setup = train.build(config, devices)
  state = train.abstract_state(setup)
  dummy = setup.task.dummy_batch(config.train.batch_size, config.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_shardings[k]) for k, v in dummy.items()}
  analysis = train.compile_train_step(setup).lower(state, batch).compile().memory_analysis()
  if analysis is None:
    raise NotImplementedError(f"XLA reports no memory analysis for {devices[0].platform}")
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
  return {f: int(getattr(analysis, f)) for f in fields}


def topology_devices(name: str):
  """Compile-only devices of a TPU topology such as 'v5p:4x4x4' (needs libtpu, not TPU hardware)."""
  from jax.experimental import topologies  # only for --topology: it looks for libtpu when imported
  try:
    return topologies.get_topology_desc(name, "tpu").devices
  except (RuntimeError, NotImplementedError) as e:
    raise sharding.MeshError(f"cannot describe TPU topology '{name}' here ({e}); compiling for a TPU topology needs "
                       f"libtpu (pip install 'jax[tpu]'), though not the TPU itself") from e



def dry_run(config, num_devices: int | None = None, device_memory_gib: float | None = None,
            compile_here: bool = False, topology: str | None = None) -> str:
  """`jaxlm train --dry-run`: the estimate for `num_devices` (default: this machine's), and XLA's own numbers when
  asked to compile for this machine's devices (compile_here) or for a TPU topology."""
  devices = None
  if topology:
    devices = topology_devices(topology)
  elif compile_here:
    devices = jax.devices()
  if devices is not None and num_devices not in (None, len(devices)):
    where = f"topology {topology}" if topology else "this machine"
    raise sharding.MeshError(f"--devices {num_devices} but {where} has {len(devices)} devices to compile for; "
                             f"drop --devices (or use --topology for devices that are not here)")
  num_devices = num_devices or (len(devices) if devices is not None else jax.device_count())
  est = estimate(config, num_devices)
  text = format_estimate(est, device_memory_gib)
  if est["trained_count"] < est["param_count"]:
    text += "\n" + format_comparison(est, estimate(full_fine_tune(config), num_devices), device_memory_gib)
  if devices is not None:
    m = compiled_memory(config, devices)
    peak = m["argument_size_in_bytes"] + m["temp_size_in_bytes"] + m["output_size_in_bytes"] - m["alias_size_in_bytes"]
    text += (f"\nXLA, train step compiled for {len(devices)} {devices[0].platform} devices, per device:\n"
             f"  {'arguments (state + batch)':<45} {_size(m['argument_size_in_bytes'])}\n"
             f"  {'temporaries':<45} {_size(m['temp_size_in_bytes'])}\n"
             f"  {'outputs not aliased to arguments':<45} "
             f"{_size(m['output_size_in_bytes'] - m['alias_size_in_bytes'])}\n"
             f"  {'peak':<45} {_size(peak)}")
  return text
