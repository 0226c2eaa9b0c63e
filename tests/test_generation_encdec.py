"""T5 through the generation module (generation.encdec_decoding): greedy decoding from the cache equals recomputing the
whole decoder each step, padded encoder rows decode as alone, beam scores are the outputs' log-probabilities, and
beam search over sharded parameters and batches gives the single-device outputs."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import generation, sharding
from jaxlm.models.encdec import EncDec, EncDecConfig
from tests.conftest import BASE, sliced_like

V, N, EOS = 40, 8, 3


@functools.cache
def _model(style="t5", scan=False):
  """A tiny random T5; init_factor 4 spreads the logits so that greedy choices are far from ties."""
  cfg = EncDecConfig(vocab_size=V, d_model=32, num_heads=4, head_dim=8, d_ff=64, num_encoder_layers=2,
                     num_decoder_layers=2, style=style, relative_attention_num_buckets=8,
                     relative_attention_max_distance=20, dropout=0.0, init_factor=4.0, scan_layers=scan)
  model = EncDec(cfg)
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1, impl="unsafe_rbg"), tokens, tokens)["params"])
  return model, params


@functools.cache
def _forward(model):
  return jax.jit(lambda params, enc, dec: model.apply({"params": params}, enc, dec))


def _log_probs(model, params, enc, prefix):
  """Log-probabilities [len(prefix), V] after each decoder prefix, by running the whole model without a cache (the
  decoder input zero-padded to N + 1 so that one compile serves all; it is causal)."""
  dec = np.zeros((1, N + 1), np.int32)
  dec[0, :len(prefix)] = prefix
  logits = np.asarray(_forward(model)(params, jnp.asarray([enc], jnp.int32), jnp.asarray(dec)), np.float64)[0]
  return (logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True))[:len(prefix)]


def _greedy_reference(model, params, enc, eos=None):
  seq = [0]  # the decoder start token (T5: the pad id)
  while len(seq) <= N:
    tok = int(np.argmax(_log_probs(model, params, enc, seq)[-1]))
    seq.append(tok)
    if tok == eos:
      break
  return seq[1:] + [0] * (N + 1 - len(seq))


def _inputs(rng, lengths, width=12):
  """Encoder rows right-padded with random tokens (segment 0 there: they must not matter)."""
  tokens = rng.integers(4, V, (len(lengths), width))
  segments = (np.arange(width)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(segments)


@pytest.mark.parametrize("style,scan", [("t5", False), ("t5_v1_1", True)])
def test_greedy_from_the_cache_equals_full_recomputation(style, scan):
  model, params = _model(style, scan)
  decoding = generation.encdec_decoding(model, N + 1)
  rng = np.random.default_rng(0)
  lengths = [12, 7, 3]
  tokens, segments = _inputs(rng, lengths)
  start = jnp.zeros((3, 1), jnp.int32)
  for eos in (None, EOS):
    out = generation.sample(decoding, params, start, max_new_tokens=N, eos_id=eos, context=(tokens, segments))
    for b, n in enumerate(lengths):  # each row alone, its padding cut off
      want = _greedy_reference(model, params, np.asarray(tokens[b, :n]), eos)
      np.testing.assert_array_equal(out.tokens[b], want)
      assert int(out.lengths[b]) == (want.index(eos) + 1 if eos in want else N)


def test_beam_scores_are_log_probabilities_and_one_beam_is_greedy():
  model, params = _model()
  decoding = generation.encdec_decoding(model, N + 1)
  lengths = [10, 5, 8]  # three rows of width 12, as above: the greedy search compiled there serves here
  tokens, segments = _inputs(np.random.default_rng(1), lengths)
  start = jnp.zeros((3, 1), jnp.int32)
  greedy = generation.sample(decoding, params, start, max_new_tokens=N, eos_id=EOS, context=(tokens, segments))
  one = generation.beam_search(decoding, params, start, beam_size=1, max_new_tokens=N, eos_id=EOS,
                               context=(tokens, segments))
  np.testing.assert_array_equal(one.tokens, greedy.tokens)
  beams = generation.beam_search(decoding, params, start, beam_size=3, max_new_tokens=N, alpha=0.0, eos_id=EOS,
                                 context=(tokens, segments), return_all=True)
  for b, n in enumerate(lengths):
    for j in range(3):
      m = int(beams.lengths[b, j])
      hyp = [int(t) for t in beams.tokens[b, j, :m]]
      lp = _log_probs(model, params, np.asarray(tokens[b, :n]), [0] + hyp)
      np.testing.assert_allclose(float(beams.scores[b, j]), sum(lp[i, t] for i, t in enumerate(hyp)), rtol=1e-4)
    assert float(beams.scores[b, 0]) >= float(beams.scores[b, 1]) >= float(beams.scores[b, 2])


def test_sharded_beam_search_gives_the_single_device_outputs():
  model, params = _model("t5_v1_1", scan=True)
  decoding = generation.encdec_decoding(model, N + 1)
  config = config_lib.load(BASE, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:8])
  rules = sharding.rules_from_config(config.mesh)
  tokens = jnp.zeros((1, 4), jnp.int32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(1), tokens, tokens)["params"])
  sharded = jax.device_put(params, sharding.shardings_for(abstract, mesh, rules))
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded))
  enc, seg = _inputs(np.random.default_rng(2), [12, 4, 9, 6])
  start = jnp.zeros((4, 1), jnp.int32)
  placed = [jax.device_put(x, sharding.batch_sharding(mesh, rules)) for x in (enc, seg, start)]

  def run(p, e, s, x):
    return generation.beam_search(decoding, p, x, beam_size=3, max_new_tokens=N, alpha=0.6, eos_id=EOS, context=(e, s))

  np.testing.assert_array_equal(run(sharded, *placed).tokens, run(params, enc, seg, start).tokens)


def test_a_decoding_step_of_scanned_layers_slices_no_weights():
  """A T5 with scanned layers decodes unrolled from parameters taken apart once per search: its compiled step slices
  no layer's weights out of the stacks (scanned, each step copied every decoder layer's weights into new buffers)."""
  model, params = _model("t5_v1_1", scan=True)
  decoding = generation.encdec_decoding(model, N + 1)
  prepared = jax.jit(decoding.prepare)(params)
  assert "layers_1" in prepared["decoder"] and "layers" not in prepared["decoder"]
  enc, seg = _inputs(np.random.default_rng(3), [12, 5])
  cache = decoding.init_cache(prepared, 2, (enc, seg))
  tokens, positions = jnp.zeros((2, 1), jnp.int32), jnp.full((2, 1), 3, jnp.int32)
  hlo = jax.jit(decoding.step, donate_argnums=1).lower(prepared, cache, tokens, positions).compile().as_text()
  weights = {tuple(x.shape[1:]) for x in jax.tree.leaves(params["decoder"]["layers"])}
  assert not sliced_like(hlo, weights), (weights, sliced_like(hlo, weights))


def test_a_decoding_step_copies_no_cache():
  """One T5 decoding step of 6 rows, its cache donated as a search's loop carries it: no copy of a layer's
  self-attention cache nor of its cross-attention keys/values (in the [B, S, H, E] layout XLA:CPU copied them
  transposed at every token; the beam-4 decode of Multi30k's test split took ~30% longer)."""
  model, params = _model()
  decoding = generation.encdec_decoding(model, N + 1)
  rng = np.random.default_rng(0)
  cache = decoding.init_cache(params, 6, (jnp.asarray(rng.integers(4, V, (6, 12)), jnp.int32),
                                          jnp.ones((6, 12), jnp.int32)))
  tokens, positions = jnp.ones((6, 1), jnp.int32), jnp.arange(6, dtype=jnp.int32)[:, None]
  hlo = jax.jit(decoding.step, donate_argnums=1).lower(params, cache, tokens, positions).compile().as_text()
  sizes = {6 * 4 * 8 * (N + 1), 6 * 4 * 8 * 12}  # rows x heads x head_dim x (decoder slots | encoder positions)
  copies = [line for line in hlo.splitlines()
            if re.match(r"\s*(ROOT )?%[a-z_]*(copy|transpose)[a-z_.0-9]* = f32\[([0-9,]+)\]", line)
            and np.prod([int(n) for n in re.search(r"= f32\[([0-9,]+)\]", line).group(1).split(",")]) in sizes]
  assert copies == [], copies[:3]
