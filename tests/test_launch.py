"""The launch scripts: shell syntax, the variables each names at its top, and the exact command each runs, checked
by running it with stand-ins for jaxlm / srun / gcloud on PATH that record their arguments and environment."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, child_env
from jaxlm import distributed

LAUNCH = REPO / "launch"
SCRIPTS = ("local.sh", "local_multiprocess.sh", "slurm.sbatch", "tpu_vm.sh")

# Writes its argv (NUL-separated) and environment to $RECORD_DIR/<name>.<pid>.{argv,env}; sleeps or fails on demand.
RECORDER = """#!/usr/bin/env bash
out="$RECORD_DIR/$(basename "$0").$$"
printf '%s\\0' "$@" > "$out.argv"
env -0 > "$out.env"
if [[ -n "${FAIL_PROCESS_ID:-}" && "${JAXLM_PROCESS_ID:-}" == "$FAIL_PROCESS_ID" ]]; then exit 5; fi
if [[ -n "${SLEEP_S:-}" ]]; then exec sleep "$SLEEP_S"; fi
"""


@pytest.fixture
def fakes(tmp_path):
  """A PATH whose jaxlm, srun and gcloud are recorders; returns (env, record_dir)."""
  bin_dir, record = tmp_path / "bin", tmp_path / "record"
  bin_dir.mkdir()
  record.mkdir()
  for name in ("jaxlm", "srun", "gcloud"):
    (bin_dir / name).write_text(RECORDER)
    (bin_dir / name).chmod(0o755)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXLM_", "SLURM_"))}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", RECORD_DIR=str(record), PYTHON=sys.executable)
  return env, record


def recorded(record, name):
  """[(argv, env)] of every run of the recorder `name`."""
  runs = []
  for argv_file in sorted(record.glob(f"{name}.*.argv")):
    argv = argv_file.read_bytes().split(b"\0")[:-1]
    env_items = argv_file.with_suffix(".env").read_bytes().split(b"\0")[:-1]
    runs.append(([a.decode() for a in argv], dict(item.decode().split("=", 1) for item in env_items)))
  return runs


def run(script, args, env, **kwargs):
  return subprocess.run(["bash", str(LAUNCH / script), *args], env=env, cwd=REPO, capture_output=True, text=True,
                        timeout=60, **kwargs)


def header_variables(path) -> list[str]:
  """Names assigned at the top level before the first command that does work; each must say what it is, in a
  comment or in the message of a ${NAME:?message} that demands it."""
  names = []
  for line in path.read_text().splitlines():
    m = re.match(r'^([A-Z][A-Z0-9_]*)="', line)
    if m:
      assert re.search(r"\s# \w|:\?\w", line), f"{path.name}: {m.group(1)} is not described: {line}"
      names.append(m.group(1))
    elif re.match(r"^(exec |srun |gcloud |for |case |if |remote=|pids=)", line):
      break
  return names


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_syntax(script):
  result = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert os.access(LAUNCH / script, os.X_OK), f"launch/{script} is not executable"


@pytest.mark.parametrize("script, names", [
    ("local.sh", ["CONFIG", "WORKDIR", "JAXLM"]),
    ("local_multiprocess.sh", ["NUM_PROCESSES", "DEVICES_PER_PROCESS", "COORDINATOR_HOST", "COORDINATOR_PORT",
                               "LOG_DIR", "GRACE_S", "PYTHON"]),
    ("slurm.sbatch", ["CONFIG", "WORKDIR", "PROCESS_PER", "GPUS_PER_NODE", "JAXLM", "SRUN_ARGS"]),
    ("tpu_vm.sh", ["TPU_NAME", "ZONE", "PROJECT", "CONFIG", "WORKDIR", "REPO_DIR", "SETUP", "JAXLM", "GCLOUD_ARGS"]),
])
def test_variables_named_at_top(script, names):
  assert header_variables(LAUNCH / script) == names


def test_local_runs_jaxlm_train(fakes):
  env, record = fakes
  env.update(CONFIG="configs/gpt_tiny.py", WORKDIR="/tmp/w d")
  result = run("local.sh", ["--config.train.steps=3"], env)
  assert result.returncode == 0, result.stderr
  [(argv, child_env)] = recorded(record, "jaxlm")
  assert argv == ["train", "--config", "configs/gpt_tiny.py", "--workdir", "/tmp/w d", "--config.train.steps=3"]
  assert distributed.plan(env=child_env).how == "single"


def test_local_multiprocess_sets_each_process(fakes):
  env, record = fakes
  env["XLA_FLAGS"] = "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8"
  result = run("local_multiprocess.sh", ["3", "2", "--", "jaxlm", "train", "--config", "c.py", "--workdir", "w"], env)
  assert result.returncode == 0, result.stderr
  runs = recorded(record, "jaxlm")
  assert [a for a, _ in runs] == [["train", "--config", "c.py", "--workdir", "w"]] * 3
  plans = sorted((distributed.plan(env=e) for _, e in runs), key=lambda p: p.process_id)
  assert [p.process_id for p in plans] == [0, 1, 2]
  assert {p.num_processes for p in plans} == {3} and {p.how for p in plans} == {"explicit"}
  [coordinator] = {p.coordinator for p in plans}
  assert re.fullmatch(r"127\.0\.0\.1:\d+", coordinator)
  for _, e in runs:
    assert e["JAX_NUM_CPU_DEVICES"] == "2" and e["JAX_PLATFORMS"] == "cpu"
    assert re.findall(r"--xla_force_host_platform_device_count=(\d+)", e["XLA_FLAGS"]) == ["2"]
    assert "--xla_cpu_enable_fast_math=false" in e["XLA_FLAGS"]


def test_local_multiprocess_stops_the_rest_when_one_fails(fakes):
  env, record = fakes
  env.update(FAIL_PROCESS_ID="1", SLEEP_S="120")
  start = time.time()
  result = run("local_multiprocess.sh", ["3", "1", "--", "jaxlm"], env)
  assert result.returncode == 5, result.stderr
  assert time.time() - start < 30
  assert "process 1 exited with code 5" in result.stderr
  survivors = [int(f.name.split(".")[1]) for f in record.glob("jaxlm.*.argv")]
  assert len(survivors) == 3
  for pid in survivors:  # the sleepers were stopped, not left behind
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)


def test_local_multiprocess_cleans_up_when_stopped(fakes):
  env, record = fakes
  env["SLEEP_S"] = "120"
  proc = subprocess.Popen(["bash", str(LAUNCH / "local_multiprocess.sh"), "2", "1", "--", "jaxlm"], env=env, cwd=REPO,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 20
  while len(list(record.glob("jaxlm.*.env"))) < 2 and time.time() < deadline:
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=30) == 143  # 128 + SIGTERM, as if the script itself had been terminated
  for f in record.glob("jaxlm.*.argv"):
    with pytest.raises(ProcessLookupError):
      os.kill(int(f.name.split(".")[1]), 0)


@pytest.mark.parametrize("args", [["2", "--", "jaxlm"], ["0", "2", "--", "jaxlm"], ["2", "x", "--", "jaxlm"],
                                  ["2", "2", "jaxlm"]])
def test_local_multiprocess_usage_errors(fakes, args):
  env, record = fakes
  result = run("local_multiprocess.sh", args, env)
  assert result.returncode == 2
  assert not list(record.glob("jaxlm.*"))


def sbatch_options(path) -> dict[str, str]:
  return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", path.read_text(), re.M))


SLURM_ENV = dict(SLURM_JOB_ID="77", SLURM_JOB_NAME="jaxlm", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="16",
                 SLURM_GPUS_ON_NODE="8")


def test_slurm_runs_srun_jaxlm_train(fakes):
  env, record = fakes
  env.update(SLURM_ENV, CONFIG="configs/llama_7b.py", WORKDIR="/shared/run")
  result = run("slurm.sbatch", ["--config.train.steps=3"], env)
  assert result.returncode == 0, result.stderr
  [(argv, child_env)] = recorded(record, "srun")
  assert argv == ["--kill-on-bad-exit=1", "jaxlm", "train", "--config", "configs/llama_7b.py", "--workdir",
                  "/shared/run", "--config.train.steps=3"]
  assert "JAX_LOCAL_DEVICE_IDS" not in child_env  # one process per GPU: JAX picks the GPU from SLURM_LOCALID
  options = sbatch_options(LAUNCH / "slurm.sbatch")
  assert options["ntasks-per-node"] == options["gpus-per-node"]  # the default is one process per GPU


def test_slurm_one_process_per_node(fakes):
  env, record = fakes
  env.update(SLURM_ENV, PROCESS_PER="node", GPUS_PER_NODE="4", SRUN_ARGS="--mpi=none --label")
  result = run("slurm.sbatch", [], env)
  assert result.returncode == 0, result.stderr
  [(argv, child_env)] = recorded(record, "srun")
  assert argv[:3] == ["--kill-on-bad-exit=1", "--mpi=none", "--label"]
  assert argv[3:5] == ["jaxlm", "train"] and argv[argv.index("--workdir") + 1].endswith("jaxlm-77")
  assert child_env["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"


def test_slurm_rejects_unknown_process_per(fakes):
  env, record = fakes
  env.update(SLURM_ENV, PROCESS_PER="socket")
  result = run("slurm.sbatch", [], env)
  assert result.returncode == 2 and "PROCESS_PER" in result.stderr
  assert not recorded(record, "srun")


def test_tpu_vm_runs_jaxlm_train_on_every_worker(fakes, tmp_path):
  env, record = fakes
  repo = tmp_path / "remote home" / "jaxlm"
  repo.mkdir(parents=True)
  env.update(TPU_NAME="v5p-64", ZONE="us-east5-a", PROJECT="proj", CONFIG="configs/llama_7b.py",
             WORKDIR="/mnt/shared/run", REPO_DIR=str(repo), GCLOUD_ARGS="--internal-ip")
  override = "--config.name=It's a test"
  result = run("tpu_vm.sh", [override], env)
  assert result.returncode == 0, result.stderr
  [(argv, _)] = recorded(record, "gcloud")
  assert argv[:-1] == ["compute", "tpus", "tpu-vm", "ssh", "v5p-64", "--zone=us-east5-a", "--project=proj",
                       "--worker=all", "--internal-ip"]
  assert argv[-1].startswith("--command=")
  # what each worker's shell runs: the same jaxlm command, arguments intact
  subprocess.run(["bash", "-c", argv[-1][len("--command="):]], env=env, check=True, timeout=30)
  [(remote_argv, _)] = recorded(record, "jaxlm")
  assert remote_argv == ["train", "--config", "configs/llama_7b.py", "--workdir", "/mnt/shared/run", override]


def test_tpu_vm_needs_a_name(fakes):
  env, record = fakes
  env["ZONE"] = "us-east5-a"
  result = run("tpu_vm.sh", [], env)
  assert result.returncode != 0 and "TPU_NAME" in result.stderr
  assert not recorded(record, "gcloud")


def jobset_docs():
  docs = list(yaml.safe_load_all((LAUNCH / "gke_jobset.yaml").read_text()))
  assert [d["kind"] for d in docs] == ["ConfigMap", "JobSet"]
  return docs


def test_gke_jobset_is_consistent():
  config_map, jobset = jobset_docs()
  variables = config_map["data"]
  assert set(variables) == {"CONFIG", "WORKDIR", "EXTRA_ARGS", "ACCELERATOR", "NUM_PROCESSES", "COORDINATOR_PORT"}
  assert all(isinstance(v, str) for v in variables.values())  # ConfigMap values must be strings
  [workers] = jobset["spec"]["replicatedJobs"]
  job = workers["template"]["spec"]
  assert job["parallelism"] == job["completions"] and job["completionMode"] == "Indexed"
  [container] = job["template"]["spec"]["containers"]
  assert container["envFrom"] == [{"configMapRef": {"name": config_map["metadata"]["name"]}}]
  env = {e["name"]: e for e in container["env"]}
  assert env["PODS_PER_JOB"]["value"] == str(job["parallelism"])
  assert int(variables["NUM_PROCESSES"]) == workers["replicas"] * job["parallelism"]
  assert [p["containerPort"] for p in container["ports"]] == [int(variables["COORDINATOR_PORT"])]
  assert container["command"][:2] == ["bash", "-c"]


@pytest.mark.parametrize("accelerator", ["tpu", "gpu"])
def test_gke_jobset_command(fakes, accelerator):
  env, record = fakes
  config_map, jobset = jobset_docs()
  [container] = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"]
  env.update(config_map["data"], ACCELERATOR=accelerator, EXTRA_ARGS="--config.train.steps=3 --config.train.seed=1")
  # what Kubernetes and the JobSet controller give pod 2 of job 0
  env.update(JOBSET_NAME=jobset["metadata"]["name"], REPLICATED_JOB_NAME="workers", JOB_INDEX="0",
             JOB_COMPLETION_INDEX="2", PODS_PER_JOB=next(e["value"] for e in container["env"]
                                                            if e["name"] == "PODS_PER_JOB"))
  subprocess.run(container["command"], env=env, check=True, timeout=30)
  [(argv, child_env)] = recorded(record, "jaxlm")
  data = config_map["data"]
  assert argv == ["train", "--config", data["CONFIG"], "--workdir", data["WORKDIR"], *shlex.split(env["EXTRA_ARGS"])]
  plan = distributed.plan(env=child_env, on_cloud_tpu=False)
  if accelerator == "tpu":  # JAX finds the TPU hosts itself
    assert plan.how == "single" and not any(k.startswith("JAXLM_") for k in child_env)
  else:
    assert plan == distributed.Plan("explicit", f"jaxlm-workers-0-0.jaxlm:{data['COORDINATOR_PORT']}",
                                    int(data["NUM_PROCESSES"]), 2)


@pytest.mark.slow
def test_gpu_check_runs_its_cpu_path(tmp_path):
  """launch/gpu_check.sh on the CPU (a tiny config, XLA attention on both sides): two bench runs and a verdict."""
  env = child_env(1, CONFIG="configs/llama_tiny.py", ATTENTION="xla", PEAK_GFLOPS="200", STEPS="2", WARMUP="1",
                  OUT=str(tmp_path), JAXLM=f"{sys.executable} -m jaxlm")
  result = subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh"), "--config.model.dtype=bfloat16"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  verdict = json.loads(result.stdout.strip().splitlines()[-1])
  assert verdict["check"] == "ok" and verdict["max_rel_loss_diff"] == 0.0 and verdict["platform"] == "cpu"
  fused = json.loads((tmp_path / "fused.json").read_text())
  assert fused["dtype"] == "bfloat16" and len(fused["losses"]) == 3 and fused["tokens_per_s"] > 0
