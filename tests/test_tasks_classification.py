"""Sequence classification task: metrics against sklearn, learning a toy task, starting from an HF checkpoint, errors;
fine-tuning all-MiniLM-L6-v2 on real SST-2 sentences (slow)."""

import csv
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from jaxlm import config as config_lib
from jaxlm import warm_start
from jaxlm.hf import bert as hf_bert
from jaxlm.models.encoder import Encoder
from jaxlm.tasks import make_task
from jaxlm.tasks.classification import macro_f1
from tests.conftest import BASE, PLAIN_ADAM, TINY_ENCODER, sampled_batches, train_steps

UNLABELLED = ["task.name=classification", *TINY_ENCODER, "model.d_ff=64", "task.head_dropout=0.0",
              "train.batch_size=16", "optim.learning_rate=3e-3", *PLAIN_ADAM]
TINY = [*UNLABELLED, "data.labels=('neg','pos','neutral')"]


def _config(*extra):
  return config_lib.load(BASE, TINY + list(extra))


def _task(*extra):
  return make_task(_config(*extra))


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


def test_learns_a_toy_task_and_reports_accuracy_and_macro_f1():
  task = _task()
  state, losses = train_steps(_config(), sampled_batches(_toy(0, 256), 16), 150, task=task)
  params = state.params
  assert losses[-1] < losses[0]
  held_out = _toy(1, 64)
  held_out["example_weights"][-4:] = 0.0  # padding rows never count
  held_out["labels"][-4:] = 0
  predict = jax.jit(task.predict)
  pairs = [({k: v[i:i + 16] for k, v in held_out.items()}, None) for i in range(0, 64, 16)]
  pairs = [(b, jax.device_get(predict(params, b))) for b, _ in pairs]
  metrics = task.host_metrics(pairs, None)
  pred = np.concatenate([p["labels"] for _, p in pairs])[:60]
  gold = held_out["labels"][:60]
  assert metrics["accuracy"] == pytest.approx(accuracy_score(gold, pred))
  assert metrics["f1"] == pytest.approx(f1_score(gold, pred, average="macro"))
  assert metrics["accuracy"] > 0.8, metrics
  # the eval loss's accuracy stat agrees with the host-side one
  _, stats = task.loss_fn(params, {k: v[:60] for k, v in held_out.items()}, jax.random.key(0), False)
  assert float(stats["accuracy"][0] / stats["accuracy"][1]) == pytest.approx(metrics["accuracy"])


def test_macro_f1_matches_sklearn_on_random_labels():
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
  return warm_start.init_from_tree(params, tree, source_name=name)


def test_starts_from_an_hf_checkpoint_and_refuses_one_that_does_not_fit(tmp_path):
  path = _hf_dir(tmp_path)
  task = _task(f"init.hf_path={path}", "model.norm_eps=1e-12")
  batch = _toy(0, 4)
  fresh = nn.meta.unbox(task.init_params(jax.random.key(0), batch))
  params, report = _from_hf(task, fresh)
  assert report.new == ["classifier/bias", "classifier/kernel"] and report.unused == []
  _, encoder, _ = hf_bert.load_hf_bert(path)
  hidden, _ = Encoder(task.model_cfg).apply({"params": params["encoder"]}, batch["input_ids"])
  want, _ = Encoder(task.model_cfg).apply({"params": encoder}, batch["input_ids"])
  np.testing.assert_array_equal(hidden, want)
  np.testing.assert_array_equal(params["classifier"]["kernel"], fresh["classifier"]["kernel"])
  with pytest.raises(hf_bert.ConvertError, match=r"model.vocab_size=512 but the checkpoint has 256.*"
                                                 r"--config.model.vocab_size=256"):
    _task(f"init.hf_path={path}", "model.vocab_size=512")
  with pytest.raises(hf_bert.ConvertError, match="model.d_ff=128 but the checkpoint has 64"):
    _task(f"init.hf_path={path}", "model.d_ff=128", "model.norm_eps=1e-12")
  with pytest.raises(hf_bert.ConvertError, match="model.norm_eps=1e-05 but the checkpoint has 1e-12"):
    _task(f"init.hf_path={path}")


def test_bad_input():
  task = _task()
  batch = _toy(0, 4)
  out = {"labels": np.zeros(4, np.int32), "probs": np.zeros((4, 3), np.float32)}
  task.host_metrics([(batch, out)], None)
  batch["labels"][1] = 3
  with pytest.raises(ValueError, match="label id 3 is outside data.labels"):
    task.host_metrics([(batch, out)], None)
  batch["example_weights"][1] = 0.0  # a padding row's label is not looked at
  task.host_metrics([(batch, out)], None)
  with pytest.raises(ValueError, match="task.head='crf' does not fit task.name='classification'"):
    _task("task.head=crf")
  with pytest.raises(ValueError, match="data.labels"):
    make_task(config_lib.load(BASE, UNLABELLED))
  with pytest.raises(ValueError, match="model.pooler=True"):
    _task("model.pooler=false").init_params(jax.random.key(0), batch)


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
def test_minilm_fine_tunes_on_sst2(shared_data, minilm):
  transformers = pytest.importorskip("transformers")
  hf_cfg, _, vocab = hf_bert.load_hf_bert(str(minilm))
  tokenizer = transformers.BertTokenizerFast(vocab, do_lower_case=True)
  config = config_lib.load(BASE, hf_bert.model_overrides(hf_cfg) + [
      "task.name=classification", "data.labels=('0','1')", f"init.hf_path={minilm}", "data.seq_len=32",
      "train.batch_size=16", "optim.learning_rate=1e-4", *PLAIN_ADAM])
  task = make_task(config)
  train = _sst2(shared_data / "sst2" / "train.tsv", 1024, tokenizer, 32)
  dev = _sst2(shared_data / "sst2" / "dev.tsv", 256, tokenizer, 48)
  state, _ = train_steps(config, sampled_batches(train, 16), 60, task=task, pretrained=True)
  predict = jax.jit(task.predict)
  pairs = [({k: v[i:i + 64] for k, v in dev.items()}, None) for i in range(0, 256, 64)]
  metrics = task.host_metrics([(b, jax.device_get(predict(state.params, b))) for b, _ in pairs], None)
  print(f"SST-2 dev[:256] after 60 steps of 16: {metrics}")
  assert metrics["accuracy"] > 0.75, metrics
