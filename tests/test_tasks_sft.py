"""The sft task: packed rows give each conversation the logits it has alone and the loss a direct computation gives,
a tiny decoder learns a toy chat task through the real train step and its dev replies score as sacreBLEU scores them,
LoRA fine-tuning through the same task, and `jaxlm train` + `jaxlm generate --chat` end to end against a greedy
decode by full recomputation."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu

from jaxlm import config as config_lib
from jaxlm import evaluation, generate, text_metrics, train
from jaxlm import workdir as workdir_lib
from jaxlm.data import builders, chat
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.tasks import make_task
from tests.conftest import BASE, PLAIN_ADAM, REPO, child_env, devices_for, task_batches, train_steps
from tests.test_data_chat import WordTokenizer

TINY = ["task.name=sft", "model.style=llama", "model.vocab_size=64", "model.max_len=48", "model.num_layers=2",
        "model.d_model=64", "model.num_heads=4", "model.num_kv_heads=2", "model.tie_embeddings=False",
        "model.use_bias=False", "data.seq_len=24", "data.prefetch=0", "data.pack_bins=4", "train.batch_size=8",
        "task.metrics=bleu1,bleu2,distinct1,distinct2", "task.max_decode_len=6", "data.source=chat"]


def _toy(n, seed, turns=1):
  """Conversations in which the assistant answers each word w<i> of the user (one or two) with w<i+1>."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    messages = []
    for _ in range(turns):
      words = rng.integers(0, 20, rng.integers(1, 3))
      messages += [{"role": "user", "content": " ".join(f"w{w}" for w in words)},
                   {"role": "assistant", "content": " ".join(f"w{w + 1}" for w in words)}]
    out.append({"messages": messages})
  return out


def _config(tmp_path, *overrides, n_train=512, n_dev=16, turns=1):
  for name, n, seed in (("train", n_train, 0), ("dev", n_dev, 1)):
    path = tmp_path / f"{name}.jsonl"
    if not path.exists():
      path.write_text("".join(json.dumps(c) + "\n" for c in _toy(n, seed, turns)))
  return config_lib.load(BASE, TINY + [f"data.train_files={tmp_path / 'train.jsonl'}",
                                       f"data.dev_files={tmp_path / 'dev.jsonl'}",
                                       f"data.tfds_data_dir={tmp_path / 'tfds'}", *overrides])


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def test_packed_rows_give_each_conversation_its_own_logits_and_loss(tmp_path):
  config = _config(tmp_path, "data.seq_len=48", turns=2)
  task = make_task(config)
  batch = next(task_batches(config, WordTokenizer(), "train", task=task))
  assert (batch["segment_ids"].max(axis=1) > 1).any()  # rows hold several conversations
  params = nn.meta.unbox(jax.jit(task.init_params)(jax.random.key(0), batch))
  # every conversation of the batch alone in a row of its own, from position 0
  alone = {k: np.zeros((0, batch[k].shape[1]), batch[k].dtype) for k in ("inputs", "targets", "weights")}
  for r in range(len(batch["inputs"])):
    for s in range(1, int(batch["segment_ids"][r].max()) + 1):
      at = batch["segment_ids"][r] == s
      for k, rows in alone.items():
        row = np.zeros((1, batch[k].shape[1]), batch[k].dtype)
        row[0, :at.sum()] = batch[k][r][at]
        alone[k] = np.concatenate([rows, row])
  logits = jax.jit(lambda p, x: task.model.apply({"params": p}, x))  # one document a row, positions from 0
  packed_logits = np.asarray(jax.jit(task.model.apply)({"params": params}, batch["inputs"], batch["positions"],
                                                       batch["segment_ids"]))
  alone_logits = np.asarray(logits(params, alone["inputs"]))
  nll_sum, count, seen = 0.0, 0.0, 0
  for r in range(len(batch["inputs"])):
    for s in range(1, int(batch["segment_ids"][r].max()) + 1):
      at = batch["segment_ids"][r] == s
      n = int(at.sum())
      np.testing.assert_allclose(packed_logits[r][at], alone_logits[seen][:n], atol=2e-5)
      logp = _log_softmax(alone_logits[seen][:n])
      targets, weights = alone["targets"][seen][:n], alone["weights"][seen][:n]
      nll_sum += float(-np.sum(np.take_along_axis(logp, targets[:, None], -1)[:, 0] * weights))
      count += float(weights.sum())
      seen += 1
  assert seen > len(batch["inputs"])
  loss, stats = jax.jit(task.loss_fn, static_argnums=3)(params, batch, jax.random.key(0), False)
  np.testing.assert_allclose(float(stats["loss"][0]), nll_sum, rtol=1e-5)
  assert float(stats["loss"][1]) == count
  np.testing.assert_allclose(float(loss), nll_sum / count, rtol=1e-5)


def test_a_tiny_decoder_learns_a_toy_chat_task(tmp_path):
  config = _config(tmp_path, *PLAIN_ADAM, "optim.learning_rate=5e-3")
  task = make_task(config)
  tok = WordTokenizer()
  state, losses = train_steps(config, task_batches(config, tok, "train", task=task), 80, task=task)
  assert np.mean(losses[-5:]) < 0.15 * losses[0], losses
  # the dev pass of a run: response perplexity, and every assistant turn generated from its context
  setup = train.build(config, devices_for(config), task=task)  # where train_steps put the parameters
  source = builders.open_source(task.kind, config.data)
  evaluator = evaluation.Evaluator(setup, source, tok)
  result = evaluator(state.params, "dev")
  records = source.split("dev").records
  pairs = [(b, jax.device_get(evaluator.predict_fn(state.params, evaluation.local_batch(setup, b))))
           for b in task_batches(config, tok, "dev", task=task)]
  replies = task.replies(pairs)
  assert sorted(replies) == [(i, 1) for i in range(len(records))]
  hyps = [replies[i, 1] for i in range(len(records))]
  refs = [r["contents"][1] for r in records]
  for n in (1, 2):
    assert result[f"bleu{n}"] == pytest.approx(sacrebleu.metrics.BLEU(max_ngram_order=n).corpus_score(
        hyps, [refs]).score)
    assert result[f"distinct{n}"] == pytest.approx(text_metrics.distinct(hyps, n))
  assert result["bleu1"] > 80, result["report"]
  assert result["perplexity"] == pytest.approx(np.exp(result["loss"]))


def test_lora_trains_the_adapters_only(tmp_path):
  config = _config(tmp_path, *PLAIN_ADAM, "optim.learning_rate=1e-2", "peft.method=lora", "peft.rank=4",
                   "task.metrics=")
  task = make_task(config)
  batches = task_batches(config, WordTokenizer(), "train", task=task)
  first = next(batches)
  setup = train.build(config, devices_for(config), task=task)
  before = train.init_state(setup, config.train.seed).params
  state, losses = train_steps(config, iter([first] * 8), 8, task=task)
  assert losses[-1] < losses[0]
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, state.params)
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(changed)[0]}
  assert any(flat.values()) and all("lora" in p for p, v in flat.items() if v), flat


def _jaxlm(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "jaxlm", *args], capture_output=True, text=True, timeout=timeout,
                        env=child_env(2), cwd=REPO, check=False)


def _greedy_by_recomputation(model, params, ids, end_id, max_new):
  """Greedy decoding that runs the whole sequence through the model at every step (no cache): right-padded to
  model.max_len, which a causal model's logits at the real positions do not see."""
  logits = jax.jit(lambda p, x: model.apply({"params": p}, x))
  out = []
  for _ in range(max_new):
    seq = ids + out
    padded = np.zeros((1, model.cfg.max_len), np.int32)
    padded[0, :len(seq)] = seq
    out.append(int(np.argmax(logits(params, padded)[0, len(seq) - 1])))
    if out[-1] == end_id:
      break
  return out


@pytest.mark.slow
def test_train_then_chat_from_a_file_of_turns(tmp_path):
  """`jaxlm train` (a sentencepiece model with the chat markers trained on first use, dev generation metrics), then
  `jaxlm generate --chat --chat-input` with a user turn per line: each reply is the greedy decode of the history."""
  data = tmp_path / "data"
  data.mkdir()
  for name, n, seed in (("train", 300, 0), ("dev", 8, 1)):
    (data / f"{name}.jsonl").write_text("".join(json.dumps(c) + "\n" for c in _toy(n, seed, turns=2)))
  wd = str(tmp_path / "run")
  overrides = [f"--config.{o}" for o in TINY if not o.startswith(("model.vocab_size", "model.max_len"))] + [
      "--config.model.vocab_size=32", "--config.tokenizer.vocab_size=32", "--config.model.max_len=40",
      "--config.tokenizer.user_defined_symbols=('<|system|>','<|user|>','<|assistant|>','<|end|>')",
      f"--config.data.train_files={data / 'train.jsonl'}", f"--config.data.dev_files={data / 'dev.jsonl'}",
      f"--config.data.tfds_data_dir={tmp_path / 'tfds'}", "--config.train.steps=6", "--config.train.eval_every=6",
      "--config.checkpoint.every_steps=6", "--config.mesh.data=2", "--config.train.progress_bar=false"]
  r = _jaxlm("train", "--config", BASE, "--workdir", wd, *overrides)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    dev = [row for row in map(json.loads, f) if row["split"] == "dev"]
  assert [row["step"] for row in dev] == [6] and {"bleu1", "bleu2", "distinct1", "distinct2", "perplexity"} <= set(
      dev[0])

  turns = ["w1 w2", "w3", "w4 w5 w6"]
  (tmp_path / "turns.txt").write_text("\n".join(turns) + "\n")
  r = _jaxlm("generate", "--workdir", wd, "--chat", "--chat-input", str(tmp_path / "turns.txt"), "--temperature", "0",
             "--max-new-tokens", "5", "--chat-output", str(tmp_path / "out.jsonl"))
  assert r.returncode == 0, r.stderr[-3000:]
  lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert len(lines) == len(turns)

  config = workdir_lib.read_config(wd)
  config.mesh.data = -1  # this process's 8 devices
  tok = tokenizer_lib.load_tokenizer(config, wd)
  task = make_task(config)
  _, params, _ = generate.load_params(config, wd, tok)
  encoder = chat.ChatEncoder(tok, chat.ChatTemplate.from_config(config.data))
  roles, contents = [], []
  for turn, line in zip(turns, lines):
    roles.append("user")
    contents.append(turn)
    ids = encoder.prompt(roles, contents, config.model.max_len - 5)
    new = _greedy_by_recomputation(task.model, params, ids, encoder.end_id, 5)
    reply = tok.decode(new[:-1] if new and new[-1] == encoder.end_id else new)
    roles.append("assistant")
    contents.append(reply)
    assert line["messages"] == [{"role": r, "content": c} for r, c in zip(roles, contents)]
