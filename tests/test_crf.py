"""Linear-chain CRF against brute-force enumeration of every tag path, finite differences, masking and constraints."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxlm.models import crf


def _instance(seed, b=3, t=4, n=3, scale=1.0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(b, t, n)) * scale, jnp.float32),
          jnp.asarray(rng.normal(size=(n, n)), jnp.float32),
          jnp.asarray(rng.normal(size=(n,)), jnp.float32),
          jnp.asarray(rng.normal(size=(n,)), jnp.float32))


def _enumerate(emissions, length, transitions, start, end):
  """Every path of the first `length` positions with its score, computed from the definition in float64."""
  e, tr, s, en = (np.asarray(a, np.float64) for a in (emissions, transitions, start, end))
  paths = list(itertools.product(range(e.shape[-1]), repeat=length))
  scores = []
  for path in paths:
    score = s[path[0]] + en[path[-1]] + sum(e[i, tag] for i, tag in enumerate(path))
    score += sum(tr[a, b] for a, b in itertools.pairwise(path))
    scores.append(score)
  return paths, np.array(scores)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_log_partition_and_viterbi_match_enumeration(seed):
  emissions, transitions, start, end = _instance(seed, b=4, t=5, n=3, scale=2.0)
  lengths = np.array([5, 3, 1, 4])
  mask = crf.prefix_mask(jnp.asarray(lengths), 5)
  log_z = crf.log_partition(emissions, mask, transitions, start, end)
  tags, best = crf.viterbi(emissions, mask, transitions, start, end)
  for row, length in enumerate(lengths):
    paths, scores = _enumerate(emissions[row], length, transitions, start, end)
    np.testing.assert_allclose(log_z[row], np.logaddexp.reduce(scores), rtol=1e-5)
    np.testing.assert_allclose(best[row], scores.max(), rtol=1e-5)
    assert tuple(np.asarray(tags[row, :length])) == paths[int(np.argmax(scores))]
    assert np.all(np.asarray(tags[row, length:]) == 0)


def test_log_likelihood_is_a_distribution_over_paths():
  emissions, transitions, start, end = _instance(3, b=2, t=4, n=3)
  mask = crf.prefix_mask(jnp.array([4, 2]), 4)
  log_likelihood = jax.jit(crf.log_likelihood)
  for row, length in enumerate([4, 2]):
    paths, scores = _enumerate(emissions[row], length, transitions, start, end)
    total = 0.0
    for path, score in zip(paths, scores):
      tags = jnp.zeros((2, 4), jnp.int32).at[row, :length].set(jnp.array(path))
      ll = log_likelihood(emissions, tags, mask, transitions, start, end)[row]
      np.testing.assert_allclose(ll, score - np.logaddexp.reduce(scores), rtol=1e-4, atol=1e-5)
      total += np.exp(float(ll))
    np.testing.assert_allclose(total, 1.0, rtol=1e-4)


def test_gradients_match_finite_differences():
  emissions, transitions, start, end = _instance(4, b=2, t=4, n=3)
  tags = jnp.array([[0, 2, 1, 1], [2, 0, 0, 0]])
  mask = crf.prefix_mask(jnp.array([4, 3]), 4)

  def f(e, tr, s, en):
    return jnp.sum(crf.log_likelihood(e, tags, mask, tr, s, en))

  with jax.enable_x64(True):
    args = tuple(jnp.asarray(a, jnp.float64) for a in (emissions, transitions, start, end))
    check_grads(f, args, order=1, modes=["rev"], eps=1e-4, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_results():
  emissions, transitions, start, end = _instance(5, b=1, t=3, n=4)
  tags = jnp.array([[1, 3, 0]])
  mask = jnp.ones((1, 3), bool)
  ll = crf.log_likelihood(emissions, tags, mask, transitions, start, end)
  best_tags, best = crf.viterbi(emissions, mask, transitions, start, end)
  # the same row padded with 4 garbage positions and a garbage label
  noise = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 4)) * 50, jnp.float32)
  padded_em = jnp.concatenate([emissions, noise], axis=1)
  padded_tags = jnp.concatenate([tags, jnp.full((1, 4), -100)], axis=1)
  padded_mask = crf.prefix_mask(jnp.array([3]), 7)
  np.testing.assert_allclose(crf.log_likelihood(padded_em, padded_tags, padded_mask, transitions, start, end), ll,
                             rtol=1e-6)
  padded_best_tags, padded_best = crf.viterbi(padded_em, padded_mask, transitions, start, end)
  np.testing.assert_array_equal(padded_best_tags[:, :3], best_tags)
  np.testing.assert_allclose(padded_best, best, rtol=1e-6)
  # a row with no words at all is finite and contributes nothing
  empty = crf.log_likelihood(padded_em, padded_tags, jnp.zeros((1, 7), bool), transitions, start, end)
  assert float(empty[0]) == 0.0


def test_compact_runs_the_chain_over_first_subwords_only():
  # words of 2, 1 and 3 sub-words in a row of 8 with 2 padding positions
  first = jnp.array([[1, 0, 1, 1, 0, 0, 0, 0], [0, 1, 0, 1, 0, 1, 1, 0]], bool)
  emissions, transitions, start, end = _instance(6, b=2, t=8, n=3)
  em_c, mask_c, order, count = crf.compact_emissions(emissions, first)
  np.testing.assert_array_equal(count, [3, 4])
  np.testing.assert_array_equal(order[0, :3], [0, 2, 3])
  np.testing.assert_array_equal(order[1, :4], [1, 3, 5, 6])
  np.testing.assert_array_equal(mask_c, crf.prefix_mask(count, 8))
  # the compacted chain is the CRF of the word-level emissions alone
  words = emissions[0, jnp.array([0, 2, 3])][None]
  np.testing.assert_allclose(crf.log_partition(em_c, mask_c, transitions, start, end)[0],
                             crf.log_partition(words, jnp.ones((1, 3), bool), transitions, start, end)[0], rtol=1e-6)
  tags_c, _ = crf.viterbi(em_c, mask_c, transitions, start, end)
  tags = crf.scatter_back(tags_c, order, count, -1)
  word_tags, _ = crf.viterbi(words, jnp.ones((1, 3), bool), transitions, start, end)
  np.testing.assert_array_equal(tags[0], [word_tags[0, 0], -1, word_tags[0, 1], word_tags[0, 2], -1, -1, -1, -1])
  assert np.all(np.asarray(tags[1])[~np.asarray(first[1])] == -1)


def test_iob2_constraints():
  labels = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
  allowed, allowed_start = crf.iob2_constraints(labels)
  idx = {name: i for i, name in enumerate(labels)}
  assert not allowed[idx["O"], idx["I-PER"]]
  assert not allowed[idx["B-LOC"], idx["I-PER"]]
  assert not allowed[idx["I-LOC"], idx["I-PER"]]
  assert allowed[idx["B-PER"], idx["I-PER"]] and allowed[idx["I-PER"], idx["I-PER"]]
  assert allowed[idx["I-PER"], idx["B-LOC"]] and allowed[idx["O"], idx["B-PER"]]
  np.testing.assert_array_equal(allowed_start, [True, True, False, True, False])
  with pytest.raises(ValueError, match="not an IOB2 tag"):
    crf.iob2_constraints(("O", "PER"))

  # emissions that strongly prefer an invalid sequence: the constrained decode never produces it
  module = crf.CrfScores(len(labels), tuple(map(tuple, allowed.tolist())), tuple(allowed_start.tolist()))
  scores = module.apply(module.init(jax.random.key(0)))
  em = jnp.full((1, 4, 5), -5.0).at[0, jnp.arange(4), jnp.array([2, 0, 4, 2])].set(5.0)  # I-PER O I-LOC I-PER
  tags, _ = crf.viterbi(em, jnp.ones((1, 4), bool), scores["transitions"], scores["start"], scores["end"])
  names = [labels[i] for i in np.asarray(tags[0])]
  for prev, cur in zip(["O"] + names[:-1], names):
    assert not cur.startswith("I-") or prev[2:] == cur[2:] and prev != "O", names
  # the constraint-free decode does pick the invalid path, so the check above is not vacuous
  free, _ = crf.viterbi(em, jnp.ones((1, 4), bool), jnp.zeros((5, 5)), jnp.zeros(5), jnp.zeros(5))
  assert [labels[i] for i in np.asarray(free[0])] == ["I-PER", "O", "I-LOC", "I-PER"]


def test_jit_and_sharded_batch():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))  # the Auto-axes mesh jaxlm.sharding builds
  emissions, transitions, start, end = _instance(7, b=8, t=6, n=4)
  tags = jnp.asarray(np.random.default_rng(1).integers(0, 4, size=(8, 6)), jnp.int32)
  mask = crf.prefix_mask(jnp.arange(8) % 6 + 1, 6)
  want = crf.log_likelihood(emissions, tags, mask, transitions, start, end)
  want_tags, _ = crf.viterbi(emissions, mask, transitions, start, end)
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  put = lambda x: jax.device_put(x, rows)
  fn = jax.jit(lambda e, t, m: (crf.log_likelihood(e, t, m, transitions, start, end),
                                crf.viterbi(e, m, transitions, start, end)[0]))
  ll, got_tags = fn(put(emissions), put(tags), put(mask))
  np.testing.assert_allclose(ll, want, rtol=1e-6)
  np.testing.assert_array_equal(got_tags, want_tags)


def _packed_instance(seed, rows, t=8, n=3):
  """Rows of examples laid side by side (`rows`: the word counts of each row's examples), as a packed NER row's
  compacted chain: emissions [B, T, N], tags, mask, restarts (from the examples' segment ids) and the examples."""
  rng = np.random.default_rng(seed)
  emissions = rng.normal(size=(len(rows), t, n)) * 2.0
  tags = rng.integers(0, n, size=(len(rows), t))
  segments = np.zeros((len(rows), t), np.int32)
  examples = []  # (row, first position, length)
  for r, lengths in enumerate(rows):
    pos = 0
    for k, length in enumerate(lengths):
      segments[r, pos:pos + length] = k + 1
      examples.append((r, pos, length))
      pos += length
  mask = segments > 0
  restarts = crf.segment_restarts(jnp.asarray(segments))
  return (jnp.asarray(emissions, jnp.float32), jnp.asarray(tags, jnp.int32), jnp.asarray(mask), restarts, examples)


def test_restarts_factorise_a_packed_row_into_its_examples():
  """A packed row's chain with restarts: log Z, the log-likelihood of a path and the best path are those of its
  examples taken alone, by brute force over each example's paths and by the one-chain functions."""
  _, transitions, start, end = _instance(8, n=3)
  rows = [[3, 1, 2], [2, 4], [5]]
  emissions, tags, mask, restarts, examples = _packed_instance(9, rows)
  np.testing.assert_array_equal(restarts[0], [False, False, False, True, True, False, True, False])
  log_z = crf.log_partition(emissions, mask, transitions, start, end, restarts)
  ll = crf.log_likelihood(emissions, tags, mask, transitions, start, end, restarts)
  best_tags, best = crf.viterbi(emissions, mask, transitions, start, end, restarts)
  want_z, want_ll, want_best = np.zeros(3), np.zeros(3), np.zeros(3)
  want_tags = np.zeros((3, 8), np.int64)
  for r, first, length in examples:
    paths, scores = _enumerate(emissions[r, first:first + length], length, transitions, start, end)
    gold = tuple(int(x) for x in tags[r, first:first + length])
    want_z[r] += np.logaddexp.reduce(scores)
    want_ll[r] += scores[paths.index(gold)] - np.logaddexp.reduce(scores)
    want_best[r] += scores.max()
    want_tags[r, first:first + length] = paths[int(np.argmax(scores))]
    # the one-chain functions on the example alone agree
    alone = emissions[r, first:first + length][None]
    alone_tags, _ = crf.viterbi(alone, jnp.ones((1, length), bool), transitions, start, end)
    np.testing.assert_array_equal(best_tags[r, first:first + length], alone_tags[0])
  np.testing.assert_allclose(log_z, want_z, rtol=1e-5)
  np.testing.assert_allclose(ll, want_ll, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(best, want_best, rtol=1e-5)
  np.testing.assert_array_equal(best_tags, want_tags)
  # without restarts the same rows are one chain each: a different distribution, so the restarts above matter
  assert not np.allclose(crf.log_partition(emissions, mask, transitions, start, end), want_z, rtol=1e-3)


def test_restarts_gradients_match_finite_differences():
  _, transitions, start, end = _instance(10, n=3)
  emissions, tags, mask, restarts, _ = _packed_instance(11, [[2, 3], [1, 1, 2]], t=6)

  def f(e, tr, s, en):
    return jnp.sum(crf.log_likelihood(e, tags, mask, tr, s, en, restarts))

  with jax.enable_x64(True):
    args = tuple(jnp.asarray(a, jnp.float64) for a in (emissions, transitions, start, end))
    check_grads(f, args, order=1, modes=["rev"], eps=1e-4, atol=1e-5, rtol=1e-5)
