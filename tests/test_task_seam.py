"""The task seam: a task written outside the package (here) trains, evaluates and predicts through the loop, the
pipeline and `jaxlm predict` without any edit to jaxlm; the step library imports no input or checkpoint library;
nothing outside the registry switches on task or record-kind names."""

import dataclasses
import json
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxlm import config as config_lib
from jaxlm import predict, run, tasks
from jaxlm.data import records, rows
from jaxlm.models import layers
from jaxlm.tasks.common import cross_entropy
from tests.conftest import BASE, REPO

LENGTH = 16


class BagOfTokens(nn.Module):
  """Mean token embedding -> two logits: is the document's first token id even?"""
  vocab_size: int

  @nn.compact
  def __call__(self, tokens, mask):
    emb = layers.param(self, "embedding", layers.normal(0.5), (self.vocab_size, 32), ("vocab", "embed"))
    x = jnp.take(emb, tokens, axis=0) * mask[..., None]  # [B, L, D]
    pooled = x.sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1.0)
    w = layers.param(self, "out", layers.normal(0.5), (32, 2), ("embed", None))
    return jnp.einsum("bd,dc->bc", pooled, w)


@dataclasses.dataclass
class EncodeParity:
  tokenizer: object

  def __call__(self, item):
    index, record = item
    ids = self.tokenizer.encode(record["text"])[:LENGTH] or [self.tokenizer.unk_id]
    tokens = np.zeros(LENGTH, np.int32)
    tokens[:len(ids)] = ids
    return {"tokens": tokens, "mask": (np.arange(LENGTH) < len(ids)).astype(np.float32),
            "labels": np.int32(ids[0] % 2), "example_ids": np.int32(index)}


class ParityTask:
  """A toy task: which parity has a document's first token id (the model must look at position 0)."""
  name = "toy_parity"
  kind = records.TEXT
  labels_from_data = False
  eval_splits = ("eval",)
  test_split = None
  labels = ("even", "odd")

  def __init__(self, config):
    self.model = BagOfTokens(config.model.vocab_size)

  def dummy_batch(self, batch_size, seq_len):
    return {"tokens": np.zeros((batch_size, LENGTH), np.int32), "mask": np.ones((batch_size, LENGTH), np.float32),
            "labels": np.zeros((batch_size,), np.int32), "example_ids": np.zeros((batch_size,), np.int32)}

  def init_params(self, rng, batch):
    return self.model.init(rng, batch["tokens"], batch["mask"])["params"]

  def loss_fn(self, params, batch, rng, train):
    logits = self.model.apply({"params": params}, batch["tokens"], batch["mask"])
    ce = cross_entropy(logits, batch["labels"], (batch["example_ids"] >= 0).astype(jnp.float32))
    return ce.loss / jnp.maximum(ce.count, 1.0), {"loss": (ce.loss, ce.count), "accuracy": (ce.correct, ce.count)}

  def predict(self, params, batch):
    return {"labels": jnp.argmax(self.model.apply({"params": params}, batch["tokens"], batch["mask"]), -1)}

  def host_metrics(self, pairs, records_):
    keep = [np.asarray(b["example_ids"]) >= 0 for b, _ in pairs]
    gold = np.concatenate([b["labels"][k] for (b, _), k in zip(pairs, keep)])
    pred = np.concatenate([o["labels"][k] for (_, o), k in zip(pairs, keep)])
    return {"host_accuracy": float(np.mean(gold == pred))}

  def pretrained_source(self):
    return None

  def row_steps(self, ctx):
    return [rows.Map(EncodeParity(ctx.tokenizer))]

  def pad_values(self, tokenizer):
    return {"example_ids": -1}

  def bucketed(self):
    return False

  def read_predict_input(self, path, input_format):
    return [{"text": line} for line in pathlib.Path(path).read_text().splitlines() if line.strip()]

  def write_predictions(self, records_, pairs, out, jsonl):
    by_id = {int(i): int(p) for b, o in pairs for i, p in zip(b["example_ids"], o["labels"]) if i >= 0}
    for i, record in enumerate(records_):
      out.write(json.dumps({"text": record["text"], "label": self.labels[by_id[i]]}) + "\n")
    return len(by_id)


def test_a_task_from_outside_the_package_trains_evaluates_and_predicts(tmp_path):
  tasks.register(ParityTask)
  config = config_lib.load(BASE, [
      "task.name=toy_parity", "data.source=pydoc", f"data.tfds_data_dir={tmp_path / 'tfds'}", "model.vocab_size=300",
      "tokenizer.vocab_size=300", "tokenizer.max_sentences=2000", "train.steps=60", "train.batch_size=16",
      "train.eval_every=0", "train.eval_batches=4", "train.log_every=1", "train.progress_bar=false",
      "optim.learning_rate=3e-2", "optim.warmup_steps=0", "checkpoint.every_steps=60"])
  workdir = tmp_path / "w"
  run.run(config, str(workdir))
  rows_ = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows_ if r["split"] == "train"]
  [evaluation] = [r for r in rows_ if r["split"] == "eval"]
  assert train_rows[-1]["loss"] < 0.5 * train_rows[0]["loss"]
  assert evaluation["accuracy"] == evaluation["host_accuracy"] > 0.8, evaluation
  (tmp_path / "in.txt").write_text("def f(x):\n\nreturn the value\nclass C:\n")
  assert predict.predict(str(workdir), str(tmp_path / "in.txt"), str(tmp_path / "out.jsonl")) == 3
  assert [json.loads(line)["label"] in ("even", "odd") for line in (tmp_path / "out.jsonl").read_text().splitlines()
          ] == [True] * 3


def test_the_step_library_imports_no_input_or_checkpoint_library():
  check = ("import jaxlm.train, sys; "
           "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow_datasets', 'grain', 'orbax'}))")
  r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120,
                     env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == "[]"


def test_no_switch_on_task_or_kind_names_outside_the_registry():
  hits = []
  for path in (REPO / "jaxlm").rglob("*.py"):
    for number, line in enumerate(path.read_text().splitlines(), 1):
      if re.search(r"task\.name ==|kind ==", line) and path != REPO / "jaxlm" / "tasks" / "__init__.py":
        hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
  assert not hits, "\n".join(hits)


def test_every_module_is_short_and_imports_at_the_top():
  long, inner = [], []
  for path in (REPO / "jaxlm").rglob("*.py"):
    lines = path.read_text().splitlines()
    if len(lines) > 450:
      long.append(f"{path.relative_to(REPO)}: {len(lines)} lines")
    for number, line in enumerate(lines, 1):
      if re.match(r"\s+(import |from \S+ import )", line):
        before = lines[number - 2] if number > 1 else ""
        if "#" not in line and not before.strip().startswith("#") and "TYPE_CHECKING" not in before:
          inner.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
  assert not long, long
  assert not inner, "imports inside functions need a one-line comment saying why:\n" + "\n".join(inner)


