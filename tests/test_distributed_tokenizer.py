"""A multi-process `jaxlm train` whose workdir has no tokenizer yet: process 0 trains it while the other waits at a
barrier, then both load the same file and train (2 processes x 1 CPU device, joined over loopback)."""

import json
import subprocess
import sys

import pytest
import sentencepiece as spm

from tests.conftest import REPO, child_env


@pytest.mark.slow
def test_two_processes_share_the_tokenizer_process_0_trains(tmp_path):
  workdir, logs = tmp_path / "run", tmp_path / "logs"
  args = ["--config", str(REPO / "configs" / "gpt_tiny.py"), "--workdir", str(workdir), "--config.train.steps=2",
          "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.eval_batches=1",
          "--config.checkpoint.every_steps=2", "--config.tokenizer.max_sentences=3000", "--config.mesh.data=1",
          "--config.mesh.dcn_data=2", "--config.distributed.initialization_timeout_s=120"]
  r = subprocess.run(["bash", str(REPO / "launch" / "local_multiprocess.sh"), "2", "1", "--", sys.executable, "-m",
                      "jaxlm", "train", *args], env=child_env(1, LOG_DIR=str(logs), GRACE_S="5"), cwd=REPO,
                     capture_output=True, text=True, timeout=400, check=False)
  out = [(logs / f"process_{i}.log").read_text() for i in range(2)]
  assert r.returncode == 0, r.stderr[-2000:] + "\n".join(o[-3000:] for o in out)
  model = workdir / "tokenizer" / "spm.model"
  assert "training the tokenizer first" in out[0] and "training the tokenizer" not in out[1]
  assert spm.SentencePieceProcessor(model_file=str(model)).get_piece_size() == 512
  assert "2 processes" in out[0]
  # both trained with it: the checkpoint records its fingerprint, and the run reached its last step
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows if row["split"] == "train"] == [1, 2]
