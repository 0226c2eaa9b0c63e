"""Training across processes, end to end: 2 processes x 4 simulated CPU devices train on a 2x2x2 mesh (the data
axis across the processes), checkpoint together and stop; 1 process with 8 devices restores and continues; every
step's loss matches one process that trained the same steps straight through.

The corpus makes the global batch independent of the process count: every document is exactly one packed row and
nothing is shuffled, so a global batch holds the same documents however the processes split the files (and the
loss, a mean over those documents' tokens, does not depend on their order).
"""

import json
import os
import random
import subprocess
import sys

import pytest

from conftest import REPO

SEQ_LEN = 32
STOP_AT, STEPS = 3, 6


def jaxlm_env(devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAXLM_")}
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def train_losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [r for r in map(json.loads, f) if r["split"] == "train"]
  steps = [r["step"] for r in rows]
  assert len(steps) == len(set(steps)), f"steps logged more than once (by more than one process?): {steps}"
  return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """(common jaxlm train arguments, tmp dir): a tokenizer, and documents of exactly SEQ_LEN tokens + EOS."""
  root = tmp_path_factory.mktemp("multiprocess")
  r = subprocess.run([sys.executable, "-m", "jaxlm", "tokenizer", "--config", str(REPO / "configs" / "gpt_tiny.py"),
                      "--workdir", str(root / "tok")], env=jaxlm_env(1), cwd=REPO, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  tokenizer_path = root / "tok" / "tokenizer" / "spm.model"
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
  pieces = (sp.id_to_piece(i) for i in range(sp.get_piece_size()))
  words = [p[1:] for p in pieces if p.startswith("\u2581") and p[1:].isalpha() and len(p) > 2]
  words = [w for w in words if len(sp.encode(w)) == 1][:40]
  rng = random.Random(0)
  docs = []
  for _ in range(400):  # runs of consecutive words from a random start: a next-word rule the model can learn
    start = rng.randrange(len(words))
    docs.append(" ".join(words[(start + j) % len(words)] for j in range(SEQ_LEN)))
  assert len(words) == 40 and all(len(sp.encode(d)) == SEQ_LEN for d in docs)
  (root / "corpus.txt").write_text("\n".join(docs) + "\n")
  common = [
      "--config", str(REPO / "configs" / "gpt_tiny.py"), "--config.data.source=text",
      f"--config.data.train_files={root / 'corpus.txt'}", "--config.data.doc_split=lines",
      "--config.data.shuffle=false", f"--config.data.seq_len={SEQ_LEN}", f"--config.tokenizer.path={tokenizer_path}",
      # a schedule that does not depend on train.steps, so stopping early and continuing is one run
      "--config.optim.schedule=constant", "--config.optim.warmup_steps=2",
      "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.eval_batches=1",
      "--config.train.progress_bar=false", f"--config.checkpoint.every_steps={STOP_AT}",
      "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.distributed.initialization_timeout_s=120",
      "--config.distributed.heartbeat_timeout_s=30"]
  return common, root


def run_one_process(common, workdir, steps, timeout=300):
  r = subprocess.run([sys.executable, "-m", "jaxlm", "train", *common, "--workdir", str(workdir),
                      f"--config.train.steps={steps}", "--config.mesh.data=2"], env=jaxlm_env(8), cwd=REPO,
                     capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  return r


@pytest.mark.slow
def test_two_processes_then_one_match_one_process(corpus):
  common, root = corpus
  reference = root / "reference"
  run_one_process(common, reference, STEPS)

  workdir, logs = root / "multiprocess", root / "logs"
  # within each process a 1x2x2 block; across the two processes the data axis (mesh.dcn_data)
  r = subprocess.run(["bash", str(REPO / "launch" / "local_multiprocess.sh"), "2", "4", "--", sys.executable, "-m",
                      "jaxlm", "train", *common, "--workdir", str(workdir), f"--config.train.steps={STOP_AT}",
                      "--config.mesh.data=1", "--config.mesh.dcn_data=2"],
                     env=dict(jaxlm_env(4), LOG_DIR=str(logs), GRACE_S="5"), cwd=REPO, capture_output=True, text=True,
                     timeout=400)
  process_logs = "\n".join(p.read_text()[-3000:] for p in sorted(logs.glob("process_*.log")))
  assert r.returncode == 0, r.stderr[-2000:] + process_logs
  assert "2 processes" in (logs / "process_0.log").read_text()
  step_dir = workdir / "checkpoints" / str(STOP_AT)
  assert sorted(p.name for p in (step_dir / "data").glob("process_*.json")) == \
      ["process_0-of-2.json", "process_1-of-2.json"]  # both processes wrote their part of the checkpoint

  resumed = run_one_process(common, workdir, STEPS)
  assert f"(step {STOP_AT})" in resumed.stdout

  expected, got = train_losses(reference), train_losses(workdir)
  assert sorted(expected) == sorted(got) == list(range(1, STEPS + 1))
  for step in expected:
    assert got[step] == pytest.approx(expected[step], rel=1e-5), (step, got, expected)
  assert expected[STEPS] < expected[1]  # it trained
