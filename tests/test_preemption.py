"""StopRequest: signals only set a flag (a second Ctrl-C aborts), handlers are put back afterwards; with two processes
a SIGTERM to one of them stops both at the same step, with one checkpoint written by both."""

import json
import os
import re
import signal
import socket
import threading
import time

import pytest

from jaxlm.preemption import StopRequest
from tests.test_fault_resume import Train, common  # noqa: F401 - `common` is a fixture used here too


def deliver(signum):
  os.kill(os.getpid(), signum)
  time.sleep(0.05)  # Python runs the handler in the main thread between bytecodes


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_asks_to_stop_and_handlers_are_restored(signum):
  before = signal.getsignal(signum)
  with StopRequest() as stop:
    assert not stop(1) and stop.received is None
    deliver(signum)
    assert stop(2) and stop.received == signal.Signals(signum).name
    deliver(signal.SIGTERM)  # a repeated notice changes nothing
    assert stop.received == signal.Signals(signum).name
  assert signal.getsignal(signum) is before


def test_a_second_ctrl_c_aborts_at_once():
  with StopRequest():
    deliver(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
      deliver(signal.SIGINT)


def test_outside_the_main_thread_no_handler_is_installed():
  before = signal.getsignal(signal.SIGTERM)
  seen = []

  def body():
    with StopRequest() as stop:
      seen.append((signal.getsignal(signal.SIGTERM), stop(1)))

  t = threading.Thread(target=body)
  t.start()
  t.join()
  assert seen == [(before, False)]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def two_processes(shared, workdir, *extra) -> list[Train]:
  """`jaxlm train` as processes 0 and 1 of one run (data parallel across them), training until stopped."""
  env = {"JAXLM_COORDINATOR": f"127.0.0.1:{free_port()}", "JAXLM_NUM_PROCESSES": "2",
         "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
  extra = ["--config.train.steps=100000", "--config.checkpoint.every_steps=100000", "--config.mesh.data=1",
           "--config.mesh.dcn_data=2", "--config.distributed.initialization_timeout_s=120", *extra]
  return [Train(shared, workdir, *extra, env={**env, "JAXLM_PROCESS_ID": str(i)}) for i in range(2)]


def both_end(runs: list[Train], prefix: str, timeout: float) -> tuple[str, int]:
  """Waits for both processes to exit 0; process 0's log line starting with `prefix` and the step it names."""
  try:
    codes = [run.finish(timeout=timeout) for run in runs]
  finally:
    for run in runs:
      run.kill()
  assert codes == [0, 0], "\n".join(run.output[-2000:] for run in runs)
  line = next((x for x in runs[0].lines if x.startswith(prefix)), None)
  assert line is not None, runs[0].output[-3000:]
  return line, int(line.split(" at step ")[1].split(";")[0])


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(common, tmp_path):
  runs = two_processes(common, tmp_path)
  try:
    runs[0].wait_for("step 1 loss")  # both are training, in step
    runs[1].proc.send_signal(signal.SIGTERM)  # the scheduler preempts one host
  except BaseException:
    for run in runs:
      run.kill()
    raise
  line, step = both_end(runs, "stopped by a preemption notice", timeout=120)
  step_dir = tmp_path / "checkpoints" / str(step)
  assert f"checkpoint saved in {step_dir}" in line
  assert os.listdir(tmp_path / "checkpoints") == [str(step)]
  # one checkpoint, written by both processes at the same step (the data position is that step: nothing else to save)
  assert (step_dir / "state").is_dir() and json.loads((step_dir / "metadata" / "metadata").read_text())[
      "process_count"] == 2


@pytest.mark.slow
def test_a_time_budget_ends_two_processes_at_the_same_step(common, tmp_path):
  """train.time_limit_s with two processes: process 0's clock decides, both end at the same step, exit 0 and write
  one checkpoint together."""
  runs = two_processes(common, tmp_path, "--config.train.time_limit_s=15")
  line, step = both_end(runs, "time budget: ", timeout=240)
  assert "train.time_limit_s=15: training ends here" in line
  assert f"trained {step} steps in " in runs[0].output
  assert os.listdir(tmp_path / "checkpoints") == [str(step)]
  meta = json.loads((tmp_path / "checkpoints" / str(step) / "metadata" / "metadata").read_text())
  # it ended because one more interval would pass 15 s, not before (an interval is a step here, under a second on an
  # idle machine, seconds on a loaded one); the save reads the clock a little later
  seconds, interval = (float(x) for x in re.search(r"time budget: ([\d.]+) s .*\(~([\d.]+) s\)", line).groups())
  assert seconds <= 15.05 and 15 < seconds + interval + 0.1, line  # the line rounds both to 0.1 s
  assert meta["process_count"] == 2 and seconds - 0.1 <= meta["train_seconds"] < 17
