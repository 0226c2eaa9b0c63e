"""Training on real text: both decoder styles learn (the loss falls well below its starting value)."""

import json
import math
import os

import pytest

from jaxlm import config as config_lib
from jaxlm import run
from tests.conftest import REPO


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt_tiny", "llama_tiny"])
def test_loss_falls_on_real_text(name, shared_data, tmp_path):
  text = shared_data / "text" / "tinyshakespeare.txt"
  c = config_lib.load(str(REPO / "configs" / f"{name}.py"), [
      "data.source=text", f"data.train_files={text}", "data.doc_split=blank_lines", "data.eval_fraction=0.05",
      "train.steps=120", "train.log_every=1", "train.eval_every=0", "train.eval_batches=4",
      "checkpoint.every_steps=1000", "tokenizer.max_sentences=5000",
      "optim.learning_rate=3e-3", "optim.warmup_steps=10", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
  run.run(c, str(tmp_path))
  rows = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
  losses = [r["loss"] for r in rows if r["split"] == "train"]
  evals = [r for r in rows if r["split"] == "eval"]
  assert losses[0] > math.log(512) - 0.5  # starts near uniform over the vocabulary
  assert losses[-1] < losses[0] - 1.0, losses
  assert evals[-1]["loss"] < math.log(512) - 1.0
  assert evals[-1]["perplexity"] == pytest.approx(math.exp(evals[-1]["loss"]), rel=1e-6)
