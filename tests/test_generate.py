"""Sampling with the KV cache agrees with running the whole sequence through the model each step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.generate import sample
from jaxlm.models.decoder import Decoder, DecoderConfig


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_greedy_sampling_equals_full_recompute(style):
  extra = dict(num_kv_heads=2, tie_embeddings=False, use_bias=False) if style == "llama" else {}
  cfg = DecoderConfig(vocab_size=61, max_len=24, num_layers=2, d_model=32, num_heads=4, style=style, **extra)
  model = Decoder(cfg)
  prompt = jnp.asarray([[3, 14, 15, 9], [2, 7, 1, 8]], jnp.int32)
  params = model.init(jax.random.key(1), prompt)["params"]
  out = sample(model, params, prompt, jax.random.key(0), max_new_tokens=8, temperature=0.0, top_k=0)
  assert out.shape == (2, 8)
  seq = prompt
  for _ in range(8):  # the reference: no cache, full forward pass, argmax of the last position
    nxt = jnp.argmax(model.apply({"params": params}, seq)[:, -1], axis=-1).astype(jnp.int32)
    seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(seq[:, 4:]))


def test_top_k_sampling_stays_in_top_k():
  cfg = DecoderConfig(vocab_size=61, max_len=24, num_layers=1, d_model=32, num_heads=4)
  model = Decoder(cfg)
  prompt = jnp.asarray([[5, 6, 7]], jnp.int32)
  params = model.init(jax.random.key(2), prompt)["params"]
  first = sample(model, params, prompt, jax.random.key(3), max_new_tokens=1, temperature=1.0, top_k=3)
  allowed = np.argsort(np.asarray(model.apply({"params": params}, prompt)[0, -1]))[-3:]
  for seed in range(20):
    tok = sample(model, params, prompt, jax.random.key(seed), max_new_tokens=1, temperature=1.0, top_k=3)
    assert int(tok[0, 0]) in allowed
  assert int(first[0, 0]) in allowed
