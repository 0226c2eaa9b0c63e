"""The span-corruption task: its loss against a direct computation (padding included), pretraining on real text
through the real train step, and pretrain -> fine-tune (seq2seq from its checkpoint and tokenizer) -> generate end to
end."""

import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.data import builders
from jaxlm.data import span_corruption as spans
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.tasks import make_task
from jaxlm.tasks.span_corruption import SegmentIds
from tests.conftest import BASE, PLAIN_ADAM, REPO, child_env, task_batches, train_steps

T5 = ["task.name=span_corruption", "model.family=encoder_decoder", "model.style=t5", "model.vocab_size=512",
      "model.d_model=32", "model.num_heads=4", "model.head_dim=8", "model.d_ff=64", "model.num_layers=2",
      "model.relative_attention_num_buckets=8", "model.relative_attention_max_distance=20", "model.dropout=0.0",
      "data.seq_len=32", "data.prefetch=0", "train.batch_size=8", "tokenizer.vocab_size=512",
      "tokenizer.num_sentinels=8", "tokenizer.max_sentences=3000"]


def _config(tmp_path, *overrides):
  (tmp_path / "notes.txt").write_text("First note about gardens.\nIt has two lines.\n\nA second note on rivers.\n")
  return config_lib.load(BASE, T5 + [f"data.train_files={tmp_path / 'notes.txt'}",
                                     f"data.tfds_data_dir={tmp_path / 'tfds'}", *overrides])


def _batch(task, b=8, seed=0):
  """Span-corruption rows of random tokens, as the row steps make them (the last chunk shorter: padded)."""
  rng = np.random.default_rng(seed)
  tokens_length, targets_length = spans.chunk_lengths(32, 0.15, 3.0)
  assert targets_length == task.targets_length
  corrupt = spans.SpanCorruption(tuple(range(500, 508)), eos_id=3, pad_id=0, inputs_length=32,
                                 targets_length=targets_length, noise_density=0.15, mean_span=3.0)
  rows = []
  for i in range(b):
    n = tokens_length if i < b - 1 else tokens_length // 2
    seg = (np.arange(tokens_length) < n).astype(np.int32)
    row = corrupt({"tokens": rng.integers(10, 500, tokens_length).astype(np.int32), "tokens_segment_ids": seg}, rng)
    rows.append(SegmentIds(0)(row, rng))
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_loss_matches_a_direct_computation(tmp_path):
  task = make_task(_config(tmp_path))
  batch = _batch(task)
  assert (batch["encoder_segment_ids"][-1] == 0).any()  # the short chunk's encoder input is padded
  params = nn.meta.unbox(jax.jit(task.init_params)(jax.random.key(0), batch))
  loss, stats = jax.jit(task.loss_fn, static_argnums=3)(params, batch, jax.random.key(0), False)
  logits = task.model.apply({"params": params}, batch["encoder_input_ids"], batch["decoder_input_ids"],
                            batch["encoder_segment_ids"], batch["decoder_segment_ids"])
  logp = np.asarray(logits, np.float64)
  logp = logp - np.logaddexp.reduce(logp, axis=-1, keepdims=True)
  w, t = batch["decoder_weights"], batch["decoder_target_ids"]
  nll = -np.take_along_axis(logp, t[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), np.sum(nll * w) / np.sum(w), rtol=1e-5)
  np.testing.assert_allclose(float(stats["accuracy"][0]), np.sum((logp.argmax(-1) == t) * w))
  # the padding of the short row changes nothing: it alone, without padding, gives its own logits
  n = int(batch["encoder_segment_ids"][-1].sum())
  alone = task.model.apply({"params": params}, batch["encoder_input_ids"][-1:, :n], batch["decoder_input_ids"][-1:])
  m = int(w[-1].sum())
  np.testing.assert_allclose(np.asarray(logits)[-1, :m], np.asarray(alone)[0, :m], atol=2e-5)


def test_pretraining_on_real_text_lowers_the_loss(tmp_path, shared_data):
  c = _config(tmp_path, *PLAIN_ADAM, "optim.learning_rate=3e-3",
              f"data.train_files={shared_data / 'text' / 'wikitext-2' / 'wiki.valid.tokens'}")
  tokenizer_lib.train_tokenizer(c, str(tmp_path), builders.open_source(make_task(c).kind, c.data).texts())
  tok = tokenizer_lib.load_tokenizer(c, str(tmp_path))
  task = make_task(c)
  batches = task_batches(c, tok, "train", task=task)
  first = next(batches)
  assert (first["encoder_input_ids"] == tok.piece_to_id("<extra_id_0>")).any(axis=1).all()
  _, losses = train_steps(c, batches, 30, task=task)
  assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:3])


def _jaxlm(*args, timeout=900):
  return subprocess.run([sys.executable, "-m", "jaxlm", *args], capture_output=True, text=True, timeout=timeout,
                        env=child_env(2), cwd=REPO, check=False)


@pytest.mark.slow
def test_pretrain_then_fine_tune_from_it_then_generate(tmp_path):
  """`jaxlm train` span corruption on pydoc text, then seq2seq from its checkpoint and tokenizer (every parameter
  loaded), then `jaxlm generate` on both workdirs."""
  pre, fine = str(tmp_path / "pre"), str(tmp_path / "fine")
  model = [f"--config.{o}" for o in T5 if o.startswith(("model.", "tokenizer."))]
  common = ["--config.train.progress_bar=false", f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
            "--config.data.prefetch=0", "--config.train.batch_size=8", "--config.train.steps=6",
            "--config.checkpoint.every_steps=6", "--config.mesh.data=2"]
  r = _jaxlm("train", "--config", BASE, "--workdir", pre, *model, *common, "--config.task.name=span_corruption",
             "--config.data.source=pydoc", "--config.data.seq_len=32", "--config.train.eval_batches=1")
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(pre, "metrics.jsonl")) as f:
    evals = [row for row in map(json.loads, f) if row["split"] == "eval"]
  assert evals and evals[-1]["perplexity"] > 1 and "accuracy" in evals[-1]

  data = tmp_path / "pairs.jsonl"
  data.write_text("".join(json.dumps({"source": f"topic {i}: see the manual", "target": f"manual {i}"}) + "\n"
                          for i in range(40)))
  r = _jaxlm("train", "--config", BASE, "--workdir", fine, *model, *common, "--config.task.name=seq2seq",
             "--config.data.source=pairs", f"--config.data.train_files={data}", "--config.data.seq_len=16",
             f"--config.init.checkpoint_dir={pre}", f"--config.tokenizer.path={pre}/tokenizer/spm.model",
             "--config.task.metrics=bleu", "--config.task.max_decode_len=6")
  assert r.returncode == 0, r.stderr[-3000:]
  loaded = re.search(r"(\d+) parameters loaded, (\d+) newly initialised", r.stdout + r.stderr)
  assert loaded and int(loaded.group(1)) > 0 and loaded.group(2) == "0"  # the whole T5 carries over

  r = _jaxlm("generate", "--workdir", pre, "--prompt", "The <extra_id_0> of a module", "--max-new-tokens", "6",
             "--temperature", "0")
  assert r.returncode == 0, r.stderr[-3000:]
  r = _jaxlm("generate", "--workdir", fine, "--prompt", "topic 3: see the manual", "--max-new-tokens", "6",
             "--temperature", "0", "--top-k", "0")
  assert r.returncode == 0, r.stderr[-3000:]
