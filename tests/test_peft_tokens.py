"""Trained token rows (peft.trainable_token_ids) beside LoRA adapters on decoders: zero rows are the base model, trained
rows equal the base model with those embedding / output rows edited by hand, merged weights, cached decoding, what
the real train step moves, and the errors of bad ids, other families and an export that cannot hold them."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import export, generation, peft, train
from jaxlm import workdir as workdir_lib
from jaxlm.models import layers
from jaxlm.models.decoder import Decoder, DecoderConfig
from jaxlm.models.encoder import EncoderConfig
from jaxlm.models.heads import SequenceClassifier
from jaxlm.tasks import make_task
from jaxlm.hf.io import ConvertError
from tests.conftest import BASE, PLAIN_ADAM, task_batches, train_steps
from tests.test_data_chat import WordTokenizer
from tests.test_tasks_sft import _config as sft_config

IDS = (3, 7, 60)
SPEC = layers.LoraSpec(rank=2, alpha=4.0, targets="attn/", token_ids=IDS)
GPT2 = DecoderConfig(vocab_size=64, max_len=16, num_layers=2, d_model=32, num_heads=4, style="gpt2")
LLAMA = DecoderConfig(vocab_size=64, max_len=16, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, style="llama",
                      tie_embeddings=False, use_bias=False)
MODELS = {"gpt2_tied": GPT2, "llama": LLAMA, "llama_scan": dataclasses.replace(LLAMA, scan_layers=True)}


def _tokens():
  """Two rows that hold every trained id, besides other tokens."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, (2, 10))
  tokens[0, [1, 4]] = IDS[:2]
  tokens[1, [0, 6]] = IDS[2], IDS[0]
  return jnp.asarray(tokens, jnp.int32)


def _out(model, params, tokens):
  return np.asarray(model.apply({"params": params}, tokens))


@pytest.mark.parametrize("name", list(MODELS))
def test_token_rows_are_the_base_at_zero_and_the_edited_tables_once_trained(name):
  base_model = Decoder(MODELS[name])
  model = peft.with_lora(base_model, SPEC)
  tokens = _tokens()
  params = nn.meta.unbox(model.init(jax.random.key(1), tokens)["params"])
  tied = MODELS[name].tie_embeddings
  assert ("lm_head_token_delta" in params) == (not tied) and params["embedding_token_delta"].shape == (3, 32)
  base = peft.strip_adapters(params)
  np.testing.assert_array_equal(_out(model, params, tokens), _out(base_model, base, tokens))  # zero rows: the base

  rng = np.random.default_rng(2)
  trained = dict(params)
  trained["embedding_token_delta"] = jnp.asarray(rng.normal(0, 0.5, (3, 32)), jnp.float32)
  edited = jax.tree.map(np.array, base)  # the reference: the base model with those rows changed in numpy
  edited["embedding"][list(IDS)] += np.asarray(trained["embedding_token_delta"])
  if not tied:
    trained["lm_head_token_delta"] = jnp.asarray(rng.normal(0, 0.5, (32, 3)), jnp.float32)
    edited["lm_head"][:, list(IDS)] += np.asarray(trained["lm_head_token_delta"])
  adapted = _out(model, trained, tokens)
  reference = _out(base_model, edited, tokens)
  assert np.max(np.abs(adapted - _out(base_model, base, tokens))) > 0.1  # the rows matter
  np.testing.assert_allclose(adapted, reference, atol=2e-5 * float(np.max(np.abs(reference))), rtol=0)
  merged = peft.merge_adapters(trained, SPEC)
  assert set(peft.paths(merged)) == set(peft.paths(base))
  np.testing.assert_allclose(merged["embedding"], edited["embedding"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(_out(base_model, merged, tokens), reference, atol=2e-5 * float(np.max(np.abs(reference))),
                             rtol=0)


def test_cached_greedy_decoding_sees_the_trained_rows():
  model = peft.with_lora(Decoder(LLAMA), SPEC)
  tokens = _tokens()
  params = nn.meta.unbox(model.init(jax.random.key(1), tokens)["params"])
  rng = np.random.default_rng(3)
  params["embedding_token_delta"] = jnp.asarray(rng.normal(0, 1.0, (3, 32)), jnp.float32)
  params["lm_head_token_delta"] = jnp.asarray(rng.normal(0, 1.0, (32, 3)), jnp.float32)
  out = generation.sample(generation.decoder_decoding(model), params, tokens[:, :4], max_new_tokens=6)
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
  for b in range(2):
    seq = list(np.asarray(tokens[b, :4]))
    for _ in range(6):  # greedy by recomputing the whole sequence, right-padded (a causal model does not see it)
      padded = np.zeros((1, 16), np.int32)
      padded[0, :len(seq)] = seq
      seq.append(int(np.argmax(np.asarray(forward(params, padded))[0, len(seq) - 1])))
    np.testing.assert_array_equal(out.tokens[b], seq[4:])
  assert any(t in IDS for t in np.asarray(out.tokens).ravel())  # the trained output rows are chosen


def test_the_train_step_moves_adapters_and_token_rows_only(tmp_path):
  """Chat fine-tuning with LoRA and the rows of the chat markers (whose ids the tokenizer gives) trained."""
  tok = WordTokenizer()
  config = sft_config(tmp_path, *PLAIN_ADAM, "optim.learning_rate=1e-2", "peft.method=lora", "peft.rank=4",
                      "task.metrics=")
  task = make_task(config)
  batch = next(task_batches(config, tok, "train", task=task))
  markers = sorted({int(t) for t in np.unique(batch["inputs"])} & {4, 5, 6, 7})  # WordTokenizer's chat markers
  assert len(markers) >= 2
  config = sft_config(tmp_path, *PLAIN_ADAM, "optim.learning_rate=1e-2", "peft.method=lora", "peft.rank=4",
                      "task.metrics=", f"peft.trainable_token_ids={tuple(markers)}")
  task = make_task(config)
  setup = train.build(config, jax.devices()[:1], task=task)
  before = jax.device_get(train.init_state(setup, config.train.seed).params)
  state, losses = train_steps(config, iter([batch] * 6), 6, task=task)
  assert losses[-1] < losses[0]
  after = jax.device_get(state.params)
  moved = {p: not np.array_equal(x, y) for p, x, y in zip(peft.paths(before), jax.tree.leaves(before),
                                                           jax.tree.leaves(after))}
  assert moved["embedding_token_delta"] and moved["lm_head_token_delta"]
  for path, m in moved.items():
    assert m == peft.is_adapter(path), path
  mask = setup.trainable
  assert dict(zip(peft.paths(mask), jax.tree.leaves(mask)))["embedding_token_delta"]


@pytest.mark.parametrize("ids,words", [((64,), ["peft.trainable_token_ids", "0..model.vocab_size-1"]),
                                       ((3, 3), ["distinct"])])
def test_bad_token_ids_name_the_key(ids, words):
  with pytest.raises(ValueError) as err:
    peft.with_lora(Decoder(LLAMA), dataclasses.replace(SPEC, token_ids=ids)).init(jax.random.key(0), _tokens())
  assert all(w in str(err.value) for w in words), str(err.value)


def test_other_families_refuse_token_rows():
  encoder = EncoderConfig(vocab_size=64, max_len=16, num_layers=1, d_model=32, num_heads=4, d_ff=64)
  with pytest.raises(config_lib.ConfigError, match="peft.trainable_token_ids=.*decoders"):
    peft.with_lora(SequenceClassifier(encoder, 2, 0.0), SPEC)


def test_export_without_merge_refuses_token_rows_before_reading_any_checkpoint(tmp_path):
  config = config_lib.load(BASE, ["peft.method=lora", "peft.trainable_token_ids=(4,5)"])
  workdir_lib.write_config(config, str(tmp_path))
  with pytest.raises(ConvertError, match="--merge"):
    export.export(str(tmp_path), str(tmp_path / "hf"))
