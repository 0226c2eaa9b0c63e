"""Multi-process start-up: joins this process to the others through jax.distributed before any JAX computation,
so that one global mesh spans every process's devices. A single process needs nothing and gets nothing.

Where the processes come from, in the order they are looked for:
  1. flags (`jaxlm train --coordinator --num-processes --process-id`) or the environment variables
       JAXLM_COORDINATOR     host:port of process 0's coordinator service, the same for every process
       JAXLM_NUM_PROCESSES   how many processes take part (1 = single process, even inside SLURM or on a TPU VM)
       JAXLM_PROCESS_ID      this process's id, 0 .. JAXLM_NUM_PROCESSES-1
     a flag wins over its variable;
  2. SLURM (an `srun` step with more than one task) and Cloud TPU VMs (GCE or GKE), which JAX detects itself;
  3. otherwise: one process, no-op.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping

import jax

ENV_COORDINATOR = "JAXLM_COORDINATOR"
ENV_NUM_PROCESSES = "JAXLM_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXLM_PROCESS_ID"

# The variables JAX's own SLURM detection needs (jax/_src/clusters/slurm_cluster.py); only an `srun` step has all.
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


class DistributedError(RuntimeError):
  """Processes that cannot be joined: a missing or inconsistent setting, named with where it came from."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process starts: `how` is single | explicit | slurm | cloud_tpu; the rest is set for explicit only."""
  how: str
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def describe(self) -> str:
    if self.how == "single":
      return "single process"
    if self.how == "explicit":
      return f"process {self.process_id} of {self.num_processes}, coordinator {self.coordinator}"
    return f"{self.how} (detected by JAX)"


def _int_setting(flag_value, flag: str, env: Mapping[str, str], var: str) -> int | None:
  if flag_value is not None:
    return int(flag_value)
  text = env.get(var, "").strip()
  if not text:
    return None
  try:
    return int(text)
  except ValueError:
    raise DistributedError(f"{var}={text!r} is not an integer (or pass {flag})") from None


def _on_cloud_tpu_vm() -> bool:
  # Set when jax is imported, from libtpu and the TPU chips present (jax/_src/cloud_tpu_init.py); JAX has no
  # public name for it. Only consulted when no process settings were given, so a rename costs auto-detection only.
  try:
    from jax._src import cloud_tpu_init  # private: imported only here, where a missing module means "not a TPU VM"
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def plan(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
         env: Mapping[str, str] | None = None, on_cloud_tpu: bool | None = None) -> Plan:
  """Decides how this process starts, from flags, then JAXLM_* variables, then the cluster; checks them first."""
  env = os.environ if env is None else env
  coordinator = coordinator or env.get(ENV_COORDINATOR, "").strip() or None
  num = _int_setting(num_processes, "--num-processes", env, ENV_NUM_PROCESSES)
  pid = _int_setting(process_id, "--process-id", env, ENV_PROCESS_ID)

  if coordinator is not None or num is not None or pid is not None:
    if num is None:
      raise DistributedError(
          f"a coordinator or process id was given but not the number of processes: set {ENV_NUM_PROCESSES} "
          f"(or --num-processes)")
    if num < 1:
      raise DistributedError(f"{ENV_NUM_PROCESSES} / --num-processes must be at least 1, got {num}")
    if num == 1:
      if pid not in (None, 0):
        raise DistributedError(f"{ENV_PROCESS_ID} / --process-id is {pid}, but there is only 1 process")
      return Plan("single")
    if coordinator is None:
      raise DistributedError(
          f"{num} processes asked for but no coordinator: set {ENV_COORDINATOR}=HOST:PORT (or --coordinator), "
          f"the address of process 0, the same for every process")
    if not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^\s:\[\]]+):\d{1,5}", coordinator):
      raise DistributedError(f"{ENV_COORDINATOR} / --coordinator must be HOST:PORT, got {coordinator!r}")
    if pid is None:
      raise DistributedError(f"{num} processes asked for but no process id: set {ENV_PROCESS_ID} (or --process-id)")
    if not 0 <= pid < num:
      raise DistributedError(f"{ENV_PROCESS_ID} / --process-id must be in 0..{num - 1}, got {pid}")
    return Plan("explicit", coordinator, num, pid)

  if all(v in env for v in SLURM_VARS):
    try:
      tasks = int(env["SLURM_NTASKS"])
    except ValueError:
      raise DistributedError(f"SLURM_NTASKS={env['SLURM_NTASKS']!r} is not an integer") from None
    return Plan("slurm") if tasks > 1 else Plan("single")
  if on_cloud_tpu if on_cloud_tpu is not None else _on_cloud_tpu_vm():
    # a one-host TPU VM joins a one-process cluster: harmless, and JAX alone knows the host count
    return Plan("cloud_tpu")
  return Plan("single")


def initialize(dist_cfg, *, coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, env: Mapping[str, str] | None = None) -> Plan:
  """Joins the other processes (or does nothing for one); call before any JAX computation.

  The timeouts in `dist_cfg` (config.distributed) bound every wait: a process that never arrives fails start-up
  after initialization_timeout_s, and one that dies mid-run is declared dead after heartbeat_timeout_s, which
  stops the others with an error instead of leaving them blocked in a collective forever.
  """
  p = plan(coordinator, num_processes, process_id, env)
  if p.how == "single":
    return p
  if jax.distributed.is_initialized():
    raise DistributedError("jax.distributed is already initialized in this process; initialize() runs once")
  timeouts = dict(initialization_timeout=int(dist_cfg.initialization_timeout_s),
                  heartbeat_timeout_seconds=int(dist_cfg.heartbeat_timeout_s),
                  shutdown_timeout_seconds=int(dist_cfg.shutdown_timeout_s))
  # JAX aborts the process (it does not raise) when a peer never arrives or dies, so say first what is attempted:
  # the last line a stuck or aborted process printed then names the coordinator and the limits it was given.
  print(f"jaxlm: joining processes: {p.describe()}; waiting up to {timeouts['initialization_timeout']}s for all "
        f"to arrive, a peer silent for {timeouts['heartbeat_timeout_seconds']}s stops the run", file=sys.stderr,
        flush=True)
  try:
    if p.how == "explicit":
      jax.distributed.initialize(coordinator_address=p.coordinator, num_processes=p.num_processes,
                                 process_id=p.process_id, **timeouts)
    else:  # JAX reads the coordinator, process count and id from the SLURM step or the TPU metadata
      jax.distributed.initialize(**timeouts)
  except (RuntimeError, ValueError, TypeError) as e:
    raise DistributedError(f"could not join the other processes ({p.describe()}): {e}") from e
  return p
