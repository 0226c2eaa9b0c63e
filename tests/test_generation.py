"""Generation against independent references: greedy by full recomputation, the nucleus computed from the logits,
beam search against an exhaustive search over all sequences, per-row EOS, padded prompts, a sharded mesh."""

import functools
import itertools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import bench_generate, generation, sharding
from jaxlm import config as config_lib
from jaxlm.models.decoder import Decoder, DecoderConfig
from tests.conftest import REPO, sliced_like

STYLES = ["gpt2", "llama"]


@functools.cache  # one model per setting: the searches compiled for it are reused across tests
def _model(style, scan=False, vocab=50, max_len=24, seed=1):
  """A tiny random decoder; init_std 0.2 spreads the logits so that greedy choices are far from ties."""
  extra = {"num_kv_heads": 2, "tie_embeddings": False, "use_bias": False} if style == "llama" else {}
  cfg = DecoderConfig(vocab_size=vocab, max_len=max_len, num_layers=2, d_model=32, num_heads=4, style=style,
                      scan_layers=scan, init_std=0.2, **extra)
  model = Decoder(cfg)
  # an rbg key: threefry's random bits for every parameter take XLA on CPU several times longer to compile
  init = jax.jit(model.init)(jax.random.key(seed, impl="unsafe_rbg"), jnp.zeros((1, 4), jnp.int32))
  params = nn.meta.unbox(init["params"])
  return model, params


@functools.cache
def _forward(model):
  return jax.jit(lambda params, tokens: model.apply({"params": params}, tokens))


def _full_log_probs(model, params, seqs):
  """Log-probabilities [N, L, V] after each prefix of seqs [N, L], by running the whole sequences without a cache.

  The sequences are zero-padded to max_len so that one compiled forward serves every length; the model is causal,
  so the padding changes nothing before it."""
  seqs = np.asarray(seqs)
  padded = np.zeros((len(seqs), model.cfg.max_len), np.int32)
  padded[:, :seqs.shape[1]] = seqs
  logits = np.asarray(_forward(model)(params, jnp.asarray(padded)), np.float64)[:, :seqs.shape[1]]
  return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def _next_log_probs(model, params, seq):
  return _full_log_probs(model, params, [seq])[0, -1]


def _greedy_reference(model, params, prompt, n, eos=None, pad=0):
  """Greedy continuation of `prompt` by full recomputation each step, stopping at EOS; padded to n tokens."""
  seq, out = list(prompt), []
  while len(out) < n:
    tok = int(np.argmax(_next_log_probs(model, params, seq)))
    out.append(tok)
    seq.append(tok)
    if tok == eos:
      break
  return out + [pad] * (n - len(out))


def _sequence_log_prob(model, params, prompt, continuation):
  lp = _full_log_probs(model, params, [list(prompt) + list(continuation)])[0, len(prompt) - 1:-1]
  return float(np.sum(lp[np.arange(len(continuation)), continuation]))


def _pad_batch(prompts, rng, vocab):
  """Right-pads prompts with random tokens (they must not matter): [B, P] and lengths [B]."""
  width = max(len(p) for p in prompts)
  batch = rng.integers(0, vocab, (len(prompts), width))
  for b, p in enumerate(prompts):
    batch[b, :len(p)] = p
  return jnp.asarray(batch, jnp.int32), jnp.asarray([len(p) for p in prompts], jnp.int32)


# Most tests use batches of prompts padded to width 6 and 8 new tokens, so that they share compiled searches.
N = 8


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("scan", [False, True])
def test_greedy_with_cache_equals_full_recompute(style, scan):
  model, params = _model(style, scan)
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(0, 50, n)) for n in (6, 3, 5, 1)]
  batch, lengths = _pad_batch(prompts, rng, 50)
  out = generation.sample(generation.decoder_decoding(model), params, batch, lengths, max_new_tokens=N)
  for b, prompt in enumerate(prompts):
    np.testing.assert_array_equal(out.tokens[b], _greedy_reference(model, params, prompt, N))
  np.testing.assert_array_equal(out.lengths, [N] * 4)


@pytest.mark.parametrize("style", STYLES)
def test_shorter_cache_gives_the_same_tokens(style):
  """A model may decode with fewer cache slots than its max_len (attention over fewer slots); gpt2 keeps its whole
  position table."""
  model, params = _model(style)
  rng = np.random.default_rng(8)
  batch, lengths = _pad_batch([list(rng.integers(0, 50, n)) for n in (6, 2, 4, 3)], rng, 50)
  full = generation.sample(generation.decoder_decoding(model), params, batch, lengths, max_new_tokens=N)
  short = generation.sample(generation.decoder_decoding(model, 6 + N), params, batch, lengths, max_new_tokens=N)
  np.testing.assert_array_equal(short.tokens, full.tokens)
  with pytest.raises(ValueError, match="exceeds the cache length"):
    generation.sample(generation.decoder_decoding(model, 6 + N - 1), params, batch, lengths, max_new_tokens=N)
  with pytest.raises(ValueError, match="positions past the model's"):
    generation.decoder_decoding(model, model.cfg.max_len + 1)
  assert params["pos_embedding"].shape[0] == model.cfg.max_len if style == "gpt2" else "pos_embedding" not in params


@pytest.mark.parametrize("style", STYLES)
def test_padded_prompt_continues_as_alone(style):
  """A prompt right-padded beside a longer one gives the tokens (and beams) it gives in a batch of its own width."""
  model, params = _model(style)
  decoding = generation.decoder_decoding(model)
  rng = np.random.default_rng(1)
  short, long, others = list(rng.integers(0, 50, 3)), list(rng.integers(0, 50, 6)), rng.integers(0, 50, (3, 3))
  padded, padded_lengths = _pad_batch([short, long, long[:4], long[:5]], rng, 50)
  alone = jnp.asarray([short, *others], jnp.int32)  # width 3: no padding
  eos = _greedy_reference(model, params, short, 3)[2]  # ends the short prompt's row early
  beam_kw = {"beam_size": 3, "alpha": 0.6, "return_all": True, "max_new_tokens": N, "eos_id": eos}
  a = generation.sample(decoding, params, padded, padded_lengths, max_new_tokens=N, eos_id=eos)
  b = generation.sample(decoding, params, alone, max_new_tokens=N, eos_id=eos)
  np.testing.assert_array_equal(a.tokens[0], b.tokens[0])
  assert int(a.lengths[0]) == int(b.lengths[0]) <= 3
  a = generation.beam_search(decoding, params, padded, padded_lengths, **beam_kw)
  b = generation.beam_search(decoding, params, alone, **beam_kw)
  np.testing.assert_array_equal(a.tokens[0], b.tokens[0])
  np.testing.assert_array_equal(a.lengths[0], b.lengths[0])
  np.testing.assert_allclose(a.scores[0], b.scores[0], rtol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_top_k_one_and_tiny_top_p_are_greedy(style):
  model, params = _model(style)
  decoding = generation.decoder_decoding(model)
  rng = np.random.default_rng(2)
  batch, lengths = _pad_batch([list(rng.integers(0, 50, n)) for n in (4, 6, 2, 5)], rng, 50)
  greedy = generation.sample(decoding, params, batch, lengths, max_new_tokens=N).tokens
  for seed in range(3):
    key = jax.random.key(seed)
    top1 = generation.sample(decoding, params, batch, lengths, max_new_tokens=N, rng=key, temperature=1.0, top_k=1)
    np.testing.assert_array_equal(top1.tokens, greedy)
    tiny_p = generation.sample(decoding, params, batch, lengths, max_new_tokens=N, rng=key, temperature=1.5,
                               top_p=1e-6)
    np.testing.assert_array_equal(tiny_p.tokens, greedy)
  hot = generation.sample(decoding, params, batch, lengths, max_new_tokens=N, rng=jax.random.key(0), temperature=1.5)
  assert not np.array_equal(hot.tokens, greedy)  # plain sampling does differ, so the two checks above mean something


def _nucleus(probs, p):
  """Indices of the smallest set of most likely tokens whose probability reaches p."""
  order = np.argsort(-probs)
  size = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)
  return order[:size]


def test_top_p_samples_stay_in_the_nucleus():
  model, params = _model("gpt2")
  decoding = generation.decoder_decoding(model)
  prompt = [7, 3, 21, 9]
  temperature = 0.5
  logits = _next_log_probs(model, params, prompt) / temperature
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  n = 4000
  batch = jnp.asarray([prompt] * n, jnp.int32)
  for top_k, size in ((0, 5), (4, 3)):
    kept = probs.copy()  # the distribution top-p sees: after top-k, renormalized
    if top_k:
      kept[np.argsort(-probs)[top_k:]] = 0
      kept /= kept.sum()
    # p halfway between two cumulative masses: the nucleus is unambiguous and has `size` tokens
    cum = np.cumsum(np.sort(kept)[::-1])
    p = float(cum[size - 2] + cum[size - 1]) / 2
    nucleus = _nucleus(kept, p)
    assert len(nucleus) == size
    out = generation.sample(decoding, params, batch, max_new_tokens=1, rng=jax.random.key(top_k),
                            temperature=temperature, top_k=top_k, top_p=p)
    drawn = np.asarray(out.tokens[:, 0])
    assert set(drawn.tolist()) <= set(nucleus.tolist())
    # and the frequencies follow the renormalized nucleus distribution
    expected = np.zeros_like(kept)
    expected[nucleus] = kept[nucleus] / kept[nucleus].sum()
    freq = np.bincount(drawn, minlength=len(kept)) / n
    assert 0.5 * np.abs(freq - expected).sum() < 0.04


@pytest.mark.parametrize("style", STYLES)
def test_eos_ends_rows_independently_and_the_loop_early(style):
  model, params = _model(style)
  decoding = generation.decoder_decoding(model)
  rng = np.random.default_rng(3)
  for _ in range(20):  # a prompt whose greedy continuation has a token first seen at j >= 3, early enough
    prompt = [int(t) for t in rng.integers(0, 50, 4)]
    ref = _greedy_reference(model, params, prompt, N)
    firsts = [j for j in range(3, N - 1) if ref[j] not in ref[:j]]
    if firsts:
      break
  eos = ref[firsts[0]]
  # rows 1 and 2 are row 0 moved one and two tokens on: they meet the same EOS one and two steps earlier
  prompts = [prompt, prompt + ref[:1], prompt + ref[:2], prompt]
  batch, lengths = _pad_batch(prompts, rng, 50)
  out = generation.sample(decoding, params, batch, lengths, max_new_tokens=N, eos_id=eos, pad_id=0)
  expected = [_greedy_reference(model, params, p, N, eos=eos, pad=0) for p in prompts]
  np.testing.assert_array_equal(out.tokens, expected)
  np.testing.assert_array_equal(out.lengths, [firsts[0] + 1, firsts[0], firsts[0] - 1, firsts[0] + 1])
  assert int(out.steps) == firsts[0] + 1 < N  # the loop stopped when the last row ended


@pytest.mark.parametrize("style", STYLES)
def test_beam_of_one_is_greedy(style):
  model, params = _model(style)
  decoding = generation.decoder_decoding(model)
  rng = np.random.default_rng(4)
  prompts = [list(rng.integers(0, 50, n)) for n in (3, 6, 1, 4)]
  batch, lengths = _pad_batch(prompts, rng, 50)
  greedy = generation.sample(decoding, params, batch, lengths, max_new_tokens=N)
  beam = generation.beam_search(decoding, params, batch, lengths, beam_size=1, max_new_tokens=N)
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  for b, prompt in enumerate(prompts):  # the score is the sequence's log-probability by full recomputation
    np.testing.assert_allclose(float(beam.scores[b]), _sequence_log_prob(model, params, prompt, greedy.tokens[b]),
                               rtol=1e-5)
  # with an EOS that greedy meets, both stop there (alpha 0: no later hypothesis can beat it)
  eos = int(greedy.tokens[0, 2])
  greedy = generation.sample(decoding, params, batch, lengths, max_new_tokens=N, eos_id=eos)
  beam = generation.beam_search(decoding, params, batch, lengths, beam_size=1, max_new_tokens=N, eos_id=eos)
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  np.testing.assert_array_equal(beam.lengths, greedy.lengths)
  assert int(beam.steps) == int(greedy.steps)


def _exhaustive(model, params, prompt, vocab, n, eos, alpha, k):
  """The k best hypotheses over all sequences: ended by EOS at any length <= n, or reaching n without EOS."""
  conts = np.asarray(list(itertools.product(range(vocab), repeat=n)))  # [V**n, n]
  seqs = np.concatenate([np.broadcast_to(prompt, (len(conts), len(prompt))), conts], axis=1)
  logp = _full_log_probs(model, params, seqs)[:, len(prompt) - 1:-1]  # [V**n, n, V]
  cum = np.cumsum(np.take_along_axis(logp, conts[:, :, None], axis=-1)[:, :, 0], axis=1)  # [V**n, n]
  hyps = {}
  for seq, lp in zip(conts, cum):
    for m in range(1, n + 1):
      if seq[m - 1] == eos or m == n:
        hyps[tuple(seq[:m])] = lp[m - 1] / ((5 + m) / 6) ** alpha
        break
  best = sorted(hyps.items(), key=lambda kv: -kv[1])
  return best[:k], -np.diff([s for _, s in best[:k + 1]]).min()


@pytest.mark.parametrize("style", STYLES)
def test_beam_search_equals_exhaustive_search(style):
  """With K at least the candidates of every step but the last, beam search is exact: compare with brute force."""
  vocab, n, eos, k = 5, 3, 1, 20  # (vocab - 1) live prefixes * vocab tokens = 20 candidates at the middle step
  model, params = _model(style, vocab=vocab, max_len=12, seed=5)
  decoding = generation.decoder_decoding(model)
  prompts = [[3, 0, 4, 2], [2, 4]]
  batch, lengths = _pad_batch(prompts, np.random.default_rng(5), vocab)
  for alpha in (0.0, 0.6, -0.5):
    out = generation.beam_search(decoding, params, batch, lengths, beam_size=k, max_new_tokens=n, eos_id=eos,
                                 alpha=alpha, return_all=True)
    for b, prompt in enumerate(prompts):
      best, gap = _exhaustive(model, params, np.asarray(prompt), vocab, n, eos, alpha, k)
      assert gap > 1e-4  # no near-ties, so the order is well defined
      for j, (hyp, score) in enumerate(best):
        m = len(hyp)
        assert int(out.lengths[b, j]) == m
        np.testing.assert_array_equal(out.tokens[b, j, :m], hyp)
        np.testing.assert_allclose(float(out.scores[b, j]), score, rtol=1e-5, atol=1e-5)


def test_stable_slots_keep_one_child_in_each_parents_row():
  """Beam search copies only the cache rows of beams that left their parent's row: every parent with children keeps
  one of them in its row, the others fill childless rows, and no row is both read and written."""
  rng = np.random.default_rng(7)
  for k in (1, 2, 4, 5):
    parent = rng.integers(0, k, (200, k)).astype(np.int32)
    order, src = map(np.asarray, generation.stable_slots(jnp.asarray(parent)))
    for p, o, s in zip(parent, order, src):
      assert sorted(o) == list(range(k))  # every new beam in exactly one row
      np.testing.assert_array_equal(s, p[o])  # a row continues its beam's parent
      children = set(p)
      for row in range(k):
        assert (s[row] == row) == (row in children)  # a parent's row keeps a child; a childless row is refilled
      assert not set(s[s != np.arange(k)]) & set(np.flatnonzero(s != np.arange(k)))  # sources are never written
      for q in children:  # the child that stays is the best-ranked one
        assert o[q] == np.flatnonzero(p == q)[0]
    moved = (np.asarray(src) != np.arange(k)).sum()
    assert (moved > 0) == (k > 1)  # the draws hold forks, so copies are checked too


def test_beam_search_stops_early_once_no_live_beam_can_win():
  vocab, n = 5, 10
  model, params = _model("llama", vocab=vocab, max_len=16, seed=6)
  decoding = generation.decoder_decoding(model)
  prompts = [[3, 0, 4, 2], [2, 4]]
  batch, lengths = _pad_batch(prompts, np.random.default_rng(6), vocab)
  early = 0
  for eos in range(vocab):  # eos is traced: one compiled search serves every choice
    out = generation.beam_search(decoding, params, batch, lengths, beam_size=2, max_new_tokens=n, eos_id=eos,
                                 return_all=True)
    steps = int(out.steps)
    for b, prompt in enumerate(prompts):
      for j in range(2):
        m = int(out.lengths[b, j])
        hyp = np.asarray(out.tokens[b, j])
        assert eos not in hyp[:m - 1] and np.all(hyp[m:] == 0) and (hyp[m - 1] == eos or m == n)
        np.testing.assert_allclose(float(out.scores[b, j]), _sequence_log_prob(model, params, prompt, hyp[:m]),
                                   rtol=1e-5)
    if steps < n:  # stopped early: every returned hypothesis had ended by then
      early += 1
      assert np.all(np.asarray(out.lengths) <= steps)
  assert early > 0


def _repeats_ngram(seq, n):
  """Whether seq holds some n-gram twice."""
  grams = [tuple(seq[j:j + n]) for j in range(len(seq) - n + 1)]
  return len(grams) != len(set(grams))


def _banned_reference(seq, n):
  """The tokens that, appended to seq, would repeat one of its n-grams."""
  if len(seq) < n - 1:
    return set()
  tail = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
  return {seq[j + n - 1] for j in range(len(seq) - n + 1) if tuple(seq[j:j + n - 1]) == tail}


def test_repeated_ngrams_mask_matches_a_direct_count():
  rng = np.random.default_rng(8)
  tokens = rng.integers(0, 4, (6, 12))  # a 4-token vocabulary: many repeats
  for n in (1, 2, 3, 4):
    for length in range(13):
      mask = np.asarray(generation.repeated_ngrams(jnp.asarray(tokens, jnp.int32), jnp.int32(length), n, 5))
      for r in range(len(tokens)):
        expected = _banned_reference(list(tokens[r, :length]), n)
        assert set(np.flatnonzero(mask[r])) == expected, (n, length, r)


@pytest.mark.parametrize("style", STYLES)
def test_no_repeat_ngram_greedy_and_beam_match_a_constrained_reference(style):
  """Greedy with no_repeat_ngram_size equals a greedy reference (full recomputation) that skips the banned tokens; the
  unconstrained output of the same prompts repeats bigrams, so the ban changes something. Beam search never returns a
  hypothesis holding a repeated n-gram, scores it by its true log-probability, and with one beam is that greedy."""
  vocab, n, ngram = 5, 10, 2
  model, params = _model(style, vocab=vocab, max_len=16, seed=6)
  decoding = generation.decoder_decoding(model)
  prompts = [[3, 0, 4, 2], [2, 4], [1], [4, 4, 0]]
  batch, lengths = _pad_batch(prompts, np.random.default_rng(9), vocab)
  free = generation.sample(decoding, params, batch, lengths, max_new_tokens=n)
  assert any(_repeats_ngram(list(row), ngram) for row in np.asarray(free.tokens))
  out = generation.sample(decoding, params, batch, lengths, max_new_tokens=n, no_repeat_ngram_size=ngram)
  for b, prompt in enumerate(prompts):
    seq, gen = list(prompt), []
    for _ in range(n):
      lp = _next_log_probs(model, params, seq)
      lp[list(_banned_reference(gen, ngram))] = -np.inf
      gen.append(int(np.argmax(lp)))
      seq.append(gen[-1])
    np.testing.assert_array_equal(out.tokens[b], gen)
    assert not _repeats_ngram(gen, ngram)
  one = generation.beam_search(decoding, params, batch, lengths, beam_size=1, max_new_tokens=n,
                               no_repeat_ngram_size=ngram)
  np.testing.assert_array_equal(one.tokens, out.tokens)
  beams = generation.beam_search(decoding, params, batch, lengths, beam_size=3, max_new_tokens=n, alpha=0.6,
                                 eos_id=1, no_repeat_ngram_size=ngram, return_all=True)
  for b, prompt in enumerate(prompts):
    for j in range(3):
      m = int(beams.lengths[b, j])
      hyp = list(np.asarray(beams.tokens[b, j, :m]))
      assert not _repeats_ngram(hyp, ngram)
      np.testing.assert_allclose(float(beams.scores[b, j]),
                                 _sequence_log_prob(model, params, prompt, hyp) / ((5 + m) / 6) ** 0.6, rtol=1e-5)


def test_sharded_params_give_the_single_device_tokens():
  config = config_lib.load(str(REPO / "configs" / "gpt_tiny.py"), ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:8])
  rules = sharding.rules_from_config(config.mesh)
  model, params = _model("llama", scan=True)
  decoding = generation.decoder_decoding(model)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"])
  sharded = jax.device_put(params, sharding.shardings_for(abstract, mesh, rules))
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded))
  one = jax.device_put(params, jax.devices()[0])
  rng = np.random.default_rng(7)
  batch, lengths = _pad_batch([list(rng.integers(0, 50, n)) for n in (2, 5, 3, 6)], rng, 50)
  sharded_batch = jax.device_put(batch, sharding.batch_sharding(mesh, rules))
  sharded_lengths = jax.device_put(lengths, sharding.batch_sharding(mesh, rules, 1))
  for run in (  # the single-device sampler is the one the greedy test compiled (temperature and top_p are traced)
      lambda p, x, n: generation.sample(decoding, p, x, n, max_new_tokens=N, rng=jax.random.key(3), temperature=1.0,
                                        top_p=0.9),
      lambda p, x, n: generation.beam_search(decoding, p, x, n, beam_size=2, max_new_tokens=N, alpha=0.6),
  ):
    np.testing.assert_array_equal(run(sharded, sharded_batch, sharded_lengths).tokens, run(one, batch, lengths).tokens)


def test_time_decoding_reports_prefill_and_per_token_time():
  model, params = _model("llama")
  decoding = generation.decoder_decoding(model)
  timing = bench_generate.time_decoding(decoding, params, batch_size=4, prompt_len=8, new_tokens=8, repeats=2)
  assert timing.prefill_seconds > 0 and timing.per_token_seconds > 0
  np.testing.assert_allclose(timing.tokens_per_second, 4 / timing.per_token_seconds)
  with pytest.raises(ValueError, match="exceeds the cache length"):
    bench_generate.time_decoding(decoding, params, batch_size=1, prompt_len=20, new_tokens=8)


def test_a_decoding_step_of_scanned_layers_slices_no_weights_and_copies_no_whole_cache():
  """A model with scanned layers decodes unrolled, from parameters taken apart once per search (`prepare`): the
  compiled step (cache donated, as the searches' loops hold it) slices no layer's weights out of a stack, copies
  no cache array as it is laid out and no weight transposed (the output projection's was, contracted (E, H)).
  Scanned, each step sliced every layer's weights out of the stack into new buffers and stacked every layer's keys
  and values again."""
  model, params = _model("llama", scan=True)
  decoding = generation.decoder_decoding(model)
  prepared = jax.jit(decoding.prepare)(params)
  cache = decoding.init_cache(prepared, 3)
  tokens, positions = jnp.zeros((3, 1), jnp.int32), jnp.full((3, 1), 5, jnp.int32)
  hlo = jax.jit(decoding.step, donate_argnums=1).lower(prepared, cache, tokens, positions).compile().as_text()
  weights = {tuple(x.shape[1:]) for x in jax.tree.leaves(params["blocks"]) if x.ndim > 2}
  whole = {tuple(x.shape) for x in jax.tree.leaves(cache) if x.ndim > 2}  # (attention reads keys transposed)
  copied = [tuple(int(d) for d in m.group(1).split(","))
            for m in re.finditer(r"= f32\[([\d,]+)\]\{[\d,]*\} copy\(", hlo)]
  assert copied, "no copy at all: the pattern no longer matches XLA's text"
  assert not sliced_like(hlo, weights), (weights, sliced_like(hlo, weights))
  assert not [c for c in copied if c in whole], (whole, copied)
  assert not [c for c in copied if sorted(c) in [sorted(w) for w in weights]], (weights, copied)  # transposed
