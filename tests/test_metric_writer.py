"""The metric writer's progress output: a tqdm bar redrawn in place on a terminal (a real pseudo-terminal), plain
lines every train.progress_every steps elsewhere, log lines that never land inside the bar, and metrics.jsonl rows."""

import fcntl
import io
import json
import os
import pty
import re
import struct
import termios

from jaxlm.metric_writer import MetricWriter


def _read_all(fd: int) -> str:
  chunks = []
  while True:
    try:
      chunk = os.read(fd, 65536)
    except OSError:  # the terminal's other end is closed: everything has been read
      break
    if not chunk:
      break
    chunks.append(chunk)
  return b"".join(chunks).decode("utf-8", "replace")


def _steps(writer: MetricWriter, upto: int, every: int, at_log=None) -> None:
  for step in range(every, upto + 1, every):
    writer.progress_bar(step, 10.0 / step, 1234.0)
    if at_log is not None and step == at_log:
      writer.log(f"evaluation at step {step}")


def test_plain_lines_when_stderr_is_not_a_terminal(tmp_path, capsys):
  stream = io.StringIO()
  writer = MetricWriter(str(tmp_path), enabled=True, total_steps=100, progress_every=25, stream=stream)
  _steps(writer, 100, 5)  # progress_bar is called at each train row (every 5 steps here)
  writer.write(5, "train", {"loss": 2.0})
  writer.close()
  out = stream.getvalue()
  assert "\r" not in out and "\x1b" not in out  # no carriage returns or escape codes in a log file
  lines = out.splitlines()
  # the first row, then every 25 steps, and the last step
  assert [int(re.match(r"step (\d+)/100 ", line).group(1)) for line in lines] == [5, 30, 55, 80, 100]
  assert "loss 0.1000" in lines[-1] and "1,234 tok/s" in lines[-1] and "ETA" in lines[-1]
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows == [{"step": 5, "split": "train", "loss": 2.0}]
  # 0: a line at every call
  stream = io.StringIO()
  writer = MetricWriter(str(tmp_path / "b"), enabled=True, total_steps=20, progress_every=0, stream=stream)
  _steps(writer, 20, 5)
  writer.close()
  assert len(stream.getvalue().splitlines()) == 4


def test_tqdm_bar_on_a_terminal(tmp_path, capsys):
  master, slave = pty.openpty()
  fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows x 100 columns
  try:
    with os.fdopen(slave, "w", closefd=False) as terminal:
      assert terminal.isatty()
      writer = MetricWriter(str(tmp_path), enabled=True, total_steps=40, progress_every=25, stream=terminal)
      _steps(writer, 40, 4, at_log=20)
      writer.close()
      terminal.flush()
    os.close(slave)
    slave = None
    out = _read_all(master)
  finally:
    os.close(master)
    if slave is not None:
      os.close(slave)
  assert out.count("\r") >= 5  # the bar is redrawn in place, not one line per update
  assert "40/40" in out and "loss 0.2500" in out and "1,234 tok/s" in out
  assert not re.search(r"step \d+/40 \(", out)  # none of the plain lines meant for log files
  # the log message went to stdout while the bar was cleared from the terminal first
  assert "evaluation at step 20" in capsys.readouterr().out


def test_disabled_and_other_processes_write_nothing(tmp_path):
  stream = io.StringIO()
  for writer in (MetricWriter(str(tmp_path / "a"), enabled=True, total_steps=10, progress=False, stream=stream),
                 MetricWriter(str(tmp_path / "b"), enabled=False, total_steps=10, stream=stream)):
    _steps(writer, 10, 2)
    writer.close()
  assert stream.getvalue() == "" and not (tmp_path / "b").exists()
