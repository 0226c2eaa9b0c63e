"""The device mesh from config, and the one place where logical axis names meet mesh axes.

Parameters are created with logical axis names (flax.linen.with_logical_partitioning); `config.mesh.rules`
maps each name to mesh axes. Everything that turns a logical name into a PartitionSpec goes through
`logical_to_spec` here, so there is exactly one resolution of the rules.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the axes a global batch is split over
DCN_KEYS = tuple(f"dcn_{name}" for name in MESH_AXES)


class MeshError(ValueError):
  """A mesh that does not fit the devices, or a batch that does not fit the mesh."""


def dcn_shape(mesh_cfg) -> tuple[int, int, int]:
  """Axis sizes across slices (mesh.dcn_*): (1, 1, 1) for one slice or host."""
  sizes = tuple(int(mesh_cfg[f"dcn_{name}"]) for name in MESH_AXES)
  if any(s < 1 for s in sizes):
    raise MeshError(f"mesh.dcn_* sizes must be at least 1, got {dict(zip(DCN_KEYS, sizes))}")
  return sizes


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """The whole mesh's axis sizes: within-slice sizes (one may be -1) resolved per slice, times mesh.dcn_*."""
  dcn = dcn_shape(mesh_cfg)
  slices = math.prod(dcn)
  if num_devices % slices:
    raise MeshError(f"mesh {dict(zip(DCN_KEYS, dcn))} asks for {slices} slices, which does not divide the "
                    f"{num_devices} devices available")
  return tuple(i * d for i, d in zip(ici_shape(mesh_cfg, num_devices // slices), dcn))


def ici_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolves mesh.data/fsdp/tensor (one of them may be -1) against the devices of one slice (all of them if one)."""
  sizes = [int(mesh_cfg[name]) for name in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise MeshError(f"only one of mesh.data/fsdp/tensor may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise MeshError(
          f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes use {fixed} devices, which does not divide "
          f"the {num_devices} devices available")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise MeshError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {num_devices} are available "
        f"(set mesh.data=-1 to use the rest)")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  dcn = dcn_shape(mesh_cfg)
  if math.prod(dcn) > 1:
    return Mesh(_hybrid_grid(tuple(s // d for s, d in zip(shape, dcn)), dcn, devices), MESH_AXES)
  try:  # topology-aware placement where JAX knows the interconnect (TPU, multi-GPU)
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def _hybrid_grid(ici: tuple[int, ...], dcn: tuple[int, ...], devices: list) -> np.ndarray:
  """Devices laid out so each slice holds a contiguous ICI block and only the dcn_* part of an axis crosses slices.

  Slices are what the devices' slice_index says (TPU slices; GPU hosts where the runtime sets it)
  where it names more than one, otherwise processes (one per host is the usual GPU and CPU launch).
  """
  by_process = len({getattr(d, "slice_index", None) for d in devices} - {None}) < 2
  granules = {d.process_index if by_process else d.slice_index for d in devices}
  if len(granules) != math.prod(dcn):
    unit = "processes" if by_process else "slices (device slice_index)"
    raise MeshError(f"mesh {dict(zip(DCN_KEYS, dcn))} asks for {math.prod(dcn)} slices but the devices belong to "
                    f"{len(granules)} {unit}")
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process)


def rules_from_config(mesh_cfg) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  rules = []
  for name, axes in mesh_cfg.rules:
    if isinstance(axes, list):
      axes = tuple(axes)
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise MeshError(f"mesh.rules: logical axis '{name}' maps to unknown mesh axis '{axis}' (known: {MESH_AXES})")
    rules.append((name, axes))
  names = [n for n, _ in rules]
  dupes = {n for n in names if names.count(n) > 1}
  if dupes:  # a second rule for a name would silently never apply: refuse it
    raise MeshError(f"mesh.rules: logical axis names listed more than once: {sorted(dupes)}")
  return tuple(rules)


def logical_to_spec(logical_axes: Sequence[str | None], rules, shape: Sequence[int] | None = None,
                    mesh_sizes: dict[str, int] | None = None) -> PartitionSpec:
  """One logical-axes tuple -> PartitionSpec.

  A mesh axis is used at most once per array (the first dimension that asks gets it). Given the array's shape
  and the mesh's axis sizes, a mesh axis that does not divide its dimension is left out, so that dimension is
  replicated over it (e.g. 4 heads on tensor=8) instead of failing deep inside XLA.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(logical_axes):
    axes = table.get(name) if name is not None else None
    axes = axes if isinstance(axes, tuple) else (axes,) if axes is not None else ()
    free = []
    for a in axes:
      if a in used:
        continue
      if shape is not None and mesh_sizes is not None and shape[i] % (math.prod(mesh_sizes[b] for b in free) * mesh_sizes[a]):
        continue
      free.append(a)
    used.update(free)
    spec.append(free[0] if len(free) == 1 else (tuple(free) or None))
  return PartitionSpec(*spec)


_ACTIVATIONS = threading.local()  # (mesh, rules) while a step is traced under activation_sharding


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
  """Within it, `constrain` pins activations to the rules on `mesh` (a step's tracing: see train.compile_train_step)."""
  before = getattr(_ACTIVATIONS, "value", None)
  _ACTIVATIONS.value = (mesh, rules)
  try:
    yield
  finally:
    _ACTIVATIONS.value = before


def constrain(x, logical_axes: Sequence[str | None]):
  """x laid out as its logical axes ask, inside activation_sharding; x itself anywhere else (init, decoding, tests).

  Without it XLA chooses activation layouts by propagation from the parameters, and the embedding lookup's table
  layout (vocab over tensor, embed over fsdp) reached the residual stream: all-to-alls around every step's layers.
  """
  active = getattr(_ACTIVATIONS, "value", None)
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, logical_to_spec(logical_axes, rules, x.shape, dict(mesh.shape))))


def shardings_for(abstract_tree, mesh: Mesh, rules):
  """NamedShardings for a tree of nn.Partitioned-boxed abstract values (from jax.eval_shape of an init).

  Boxed leaves follow their logical names; unboxed leaves (step counters, RNG keys) are replicated, and so are boxed
  leaves of another rank than their names: optimiser state that keeps a parameter's box over a reduced shape
  (Adafactor's row and column second moments of a matrix, its (1,) placeholders), a vector at most a row long.
  """
  sizes = dict(mesh.shape)

  def one(leaf):
    if isinstance(leaf, nn.Partitioned) and len(leaf.names) == len(leaf.value.shape):
      return NamedSharding(mesh, logical_to_spec(leaf.names, rules, leaf.value.shape, sizes))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
  """Sharding of an input array [batch, length, ...]: batch over the data axes, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def data_parallel_size(mesh: Mesh, rules) -> int:
  spec = logical_to_spec(("batch",), rules)[0]
  axes = spec if isinstance(spec, tuple) else (spec,) if spec else ()
  return math.prod(mesh.shape[a] for a in axes)


def check_batch(global_batch: int, mesh: Mesh, rules, what: str = "train.batch_size") -> None:
  dp = data_parallel_size(mesh, rules)
  if global_batch % dp:
    raise MeshError(
        f"{what}={global_batch} does not divide by the data-parallel size {dp} "
        f"(mesh {dict(mesh.shape)}); use a multiple of {dp}")


def describe(mesh: Mesh) -> str:
  return "x".join(f"{name}={size}" for name, size in mesh.shape.items())
