"""Multi-process start-up: how the processes are found (flags, JAXLM_* variables, SLURM, Cloud TPU), a real
2-process x 4-device run joined over loopback with the hybrid (ICI x DCN) mesh, and a dead peer stopping the rest."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import jax
import pytest

from conftest import REPO, child_env
from jaxlm import config as config_lib
from jaxlm import distributed, sharding

TINY = str(REPO / "configs" / "gpt_tiny.py")
SLURM = {"SLURM_JOB_ID": "12", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "16", "SLURM_PROCID": "3",
         "SLURM_LOCALID": "3"}


def explicit(n=2, pid=1, coordinator="10.0.0.1:1234"):
  return {"JAXLM_COORDINATOR": coordinator, "JAXLM_NUM_PROCESSES": str(n), "JAXLM_PROCESS_ID": str(pid)}


def test_plan_from_environment_and_flags():
  assert distributed.plan(env={}, on_cloud_tpu=False) == distributed.Plan("single")
  assert distributed.plan(env=explicit()) == distributed.Plan("explicit", "10.0.0.1:1234", 2, 1)
  # a flag wins over its variable
  assert distributed.plan(process_id=0, env=explicit()) == distributed.Plan("explicit", "10.0.0.1:1234", 2, 0)
  assert distributed.plan("[::1]:99", 4, 3, env={}) == distributed.Plan("explicit", "[::1]:99", 4, 3)
  assert distributed.plan(env={"JAXLM_NUM_PROCESSES": "1"}) == distributed.Plan("single")


def test_plan_leaves_slurm_and_cloud_tpu_to_jax():
  assert distributed.plan(env=SLURM, on_cloud_tpu=False).how == "slurm"
  assert distributed.plan(env={**SLURM, "SLURM_NTASKS": "1"}, on_cloud_tpu=False).how == "single"
  # an sbatch script outside `srun` has no step node list: not a multi-process launch
  assert distributed.plan(env={k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"},
                          on_cloud_tpu=False).how == "single"
  assert distributed.plan(env={}, on_cloud_tpu=True).how == "cloud_tpu"
  # explicit settings win over what the cluster says; one process is a way to opt out
  assert distributed.plan(env={**SLURM, **explicit()}).how == "explicit"
  assert distributed.plan(env={**SLURM, "JAXLM_NUM_PROCESSES": "1"}, on_cloud_tpu=True).how == "single"


@pytest.mark.parametrize("env, message", [
    ({"JAXLM_COORDINATOR": "h:1", "JAXLM_PROCESS_ID": "0"}, "JAXLM_NUM_PROCESSES"),
    ({"JAXLM_NUM_PROCESSES": "2", "JAXLM_PROCESS_ID": "0"}, "JAXLM_COORDINATOR=HOST:PORT"),
    ({"JAXLM_NUM_PROCESSES": "2", "JAXLM_COORDINATOR": "h:1"}, "JAXLM_PROCESS_ID"),
    (explicit(pid=2), "must be in 0..1"),
    (explicit(coordinator="host-without-port"), "must be HOST:PORT"),
    ({**explicit(), "JAXLM_NUM_PROCESSES": "two"}, "JAXLM_NUM_PROCESSES='two' is not an integer"),
    ({"JAXLM_NUM_PROCESSES": "0"}, "at least 1"),
    ({"JAXLM_NUM_PROCESSES": "1", "JAXLM_PROCESS_ID": "1"}, "only 1 process"),
])
def test_plan_errors_name_the_setting(env, message):
  with pytest.raises(distributed.DistributedError, match=message.replace("(", r"\(").replace(".", r"\.")):
    distributed.plan(env=env, on_cloud_tpu=False)


def test_single_process_is_a_no_op():
  config = config_lib.load(TINY)
  assert distributed.initialize(config.distributed, env={}).how == "single"
  assert not jax.distributed.is_initialized()


def test_dcn_mesh_needs_as_many_slices_as_processes():
  # this process alone is one slice, so two across DCN cannot be laid out
  config = config_lib.load(TINY, ["mesh.data=1", "mesh.fsdp=4", "mesh.dcn_data=2"])
  assert sharding.mesh_shape(config.mesh, 8) == (2, 4, 1)
  with pytest.raises(sharding.MeshError, match="asks for 2 slices but the devices belong to 1 processes"):
    sharding.make_mesh(config.mesh)
  with pytest.raises(sharding.MeshError, match="does not divide"):
    sharding.mesh_shape(config_lib.load(TINY, ["mesh.dcn_data=3"]).mesh, 8)


WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, {repo!r})
    from jaxlm import config as config_lib, distributed, sharding
    config = config_lib.load({tiny!r}, ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "mesh.dcn_data=2",
                                        "distributed.initialization_timeout_s=60"])
    plan = distributed.initialize(config.distributed)
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec
    mesh = sharding.make_mesh(config.mesh)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    local = np.full((4,), jax.process_index() + 1.0, np.float32)  # this process's rows of a global [8] array
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))(
        jax.make_array_from_process_local_data(rows, local))
    print("RESULT", json.dumps(dict(
        plan=plan.how, process=jax.process_index(), processes=jax.process_count(), devices=jax.device_count(),
        local_devices=jax.local_device_count(), mesh=dict(mesh.shape), total=float(total),
        data_row_processes=[sorted({{d.process_index for d in mesh.devices[i].flat}}) for i in range(2)])),
        flush=True)  # a file is block-buffered: flush before jax's own exit handlers run
""").format(repo=str(REPO), tiny=TINY)


def test_two_processes_join_over_loopback(tmp_path):
  """launch/local_multiprocess.sh 2 4: one global 8-device mesh whose data axis is the one crossing processes."""
  logs = tmp_path / "logs"
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAXLM_")}
  env["LOG_DIR"] = str(logs)
  result = subprocess.run(["bash", str(REPO / "launch" / "local_multiprocess.sh"), "2", "4", "--", sys.executable,
                           "-c", WORKER], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
  outputs = [(logs / f"process_{i}.log").read_text() for i in range(2)]
  assert result.returncode == 0, result.stderr + "\n".join(outputs)
  results = []
  for i, out in enumerate(outputs):
    found = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert found, f"process {i} printed no RESULT line:\n{out[-4000:]}\nlauncher:\n{result.stderr[-2000:]}"
    results.append(json.loads(found[0][7:]))
  assert [r["process"] for r in results] == [0, 1]
  for r in results:
    assert (r["plan"], r["processes"], r["devices"], r["local_devices"]) == ("explicit", 2, 8, 4)
    assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert r["data_row_processes"] == [[0], [1]]  # each process holds one whole ICI block; DCN is the data axis
    assert r["total"] == 4 * 1.0 + 4 * 2.0
  assert "joining processes: process 0 of 2" in outputs[0]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


DEAD_PEER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from jaxlm import config as config_lib, distributed
    config = config_lib.load({tiny!r}, ["distributed.heartbeat_timeout_s=3", "distributed.initialization_timeout_s=60"])
    distributed.initialize(config.distributed)
    import jax
    if jax.process_index() == 1:
      os._exit(7)  # dies without a word to the coordinator, as a crashed host would
    print("waiting", flush=True)
    time.sleep(60)  # the run would block here (or in a collective) forever without the heartbeat
    print("still alive", flush=True)
""").format(repo=str(REPO), tiny=TINY)


@pytest.mark.slow
def test_dead_peer_stops_the_others():
  env = child_env(1, JAXLM_COORDINATOR=f"127.0.0.1:{free_port()}", JAXLM_NUM_PROCESSES="2")
  procs = [subprocess.Popen([sys.executable, "-c", DEAD_PEER], env={**env, "JAXLM_PROCESS_ID": str(i)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    start = time.time()
    out0, _ = procs[0].communicate(timeout=50)
    elapsed = time.time() - start
    assert procs[1].wait(timeout=10) == 7
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert "waiting" in out0 and "still alive" not in out0
  assert procs[0].returncode != 0
  assert "stopped sending heartbeats" in out0 or "another task died" in out0, out0[-2000:]
  assert elapsed < 45
