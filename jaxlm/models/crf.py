"""Linear-chain CRF: log-likelihood by the forward algorithm and Viterbi decoding, masked, in lax.scan.

Sub-word models tag the first sub-word of each word only, so the chain runs over words: `compact` moves those
positions to the front of the row in their original order (a stable gather), the CRF runs on the compacted
prefix, and `scatter_back` puts decoded tags at their original positions. Letters: B batch, T positions,
N tags. Every function treats `mask` [B, T] as a prefix of real positions (what `compact` produces).

A row packed with several examples holds one chain per example: `restarts` [B, T] marks the positions where a new
chain begins, and there the transition score transitions[i, j] is replaced by end[i] + start[j] (the first chain's
end, the next one's start). Path scores, the partition function and Viterbi then factorise over the examples: a
packed row's log-likelihood is the sum of its examples' and its best path is theirs side by side.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.models import layers
from jaxlm.models.layers import compact, gather

# A forbidden transition's score: finite, so a gold path that breaks a constraint gives a large loss, not NaN.
FORBIDDEN = -1e4


def _at_least_f32(x):
  """bfloat16 emissions are summed in float32; float64 (gradient checks) stays float64."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def iob2_constraints(labels) -> tuple[np.ndarray, np.ndarray]:
  """IOB2: I-X may follow only B-X or I-X and may not start a sentence. Returns allowed (transitions [N, N]
  with [from, to], start [N]) as boolean arrays."""
  labels = list(labels)
  for label in labels:
    if label != "O" and not (len(label) > 2 and label[:2] in ("B-", "I-")):
      raise ValueError(f"task.labels: '{label}' is not an IOB2 tag (O, B-TYPE or I-TYPE)")
  n = len(labels)
  transitions = np.ones((n, n), bool)
  start = np.ones((n,), bool)
  for j, to in enumerate(labels):
    if to.startswith("I-"):
      start[j] = False
      for i, frm in enumerate(labels):
        transitions[i, j] = frm[2:] == to[2:] and frm != "O"
  return transitions, start


class CrfScores(nn.Module):
  """Learned transition [N, N] ([from, to]), start [N] and end [N] scores, with forbidden moves masked."""
  num_tags: int
  allowed_transitions: tuple | None = None  # nested tuples of bool [N][N]; None = no constraint
  allowed_start: tuple | None = None  # tuple of bool [N]

  @nn.compact
  def __call__(self):
    n = self.num_tags
    # the chain is tiny: replicate it on every device
    transitions = layers.param(self, "transitions", nn.initializers.zeros, (n, n), (None, None))
    start = layers.param(self, "start", nn.initializers.zeros, (n,), (None,))
    end = layers.param(self, "end", nn.initializers.zeros, (n,), (None,))
    if self.allowed_transitions is not None:
      transitions = jnp.where(np.asarray(self.allowed_transitions), transitions, FORBIDDEN)
    if self.allowed_start is not None:
      start = jnp.where(np.asarray(self.allowed_start), start, FORBIDDEN)
    return {"transitions": transitions, "start": start, "end": end}


def scatter_back(values, order, count, fill):
  """Inverse of `gather` for the first count[b] entries: values [B, L] -> [B, L] at their original positions, `fill`
  elsewhere."""
  b, length = values.shape
  keep = jnp.arange(length)[None, :] < count[:, None]
  out = jnp.full((b, length), fill, values.dtype)
  return out.at[jnp.arange(b)[:, None], order].set(jnp.where(keep, values, fill))


def prefix_mask(count, length: int):
  return jnp.arange(length)[None, :] < count[:, None]  # [B, T]


def segment_restarts(segments):
  """segments [B, T] (e.g. the segment ids at the compacted positions) -> restarts [B, T]: True where the segment
  differs from the previous position's (never at t = 0)."""
  return jnp.concatenate([jnp.zeros_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1)


def _scan_inputs(emissions, mask, restarts):
  """Steps 1..T-1 time-major: (emissions [T-1, B, N], mask [T-1, B], restarts [T-1, B])."""
  if restarts is None:
    restarts = jnp.zeros(mask.shape, bool)
  return tuple(jnp.swapaxes(x[:, 1:], 0, 1) for x in (emissions, mask, restarts))


def _step_transitions(transitions, start, end, restart):
  """[B, N(from), N(to)]: transitions, or end[i] + start[j] in rows where a new chain begins (restart [B])."""
  return jnp.where(restart[:, None, None], (end[:, None] + start[None, :])[None], transitions[None])


def log_partition(emissions, mask, transitions, start, end, restarts=None):
  """log Z [B] by the forward algorithm. emissions [B, T, N] float, mask [B, T] bool (a prefix), restarts [B, T]
  bool or None (one chain a row)."""
  emissions = _at_least_f32(emissions)
  alpha0 = start[None, :] + emissions[:, 0]  # [B, N]

  def step(alpha, xs):
    emit, m, restart = xs  # [B, N], [B], [B]
    trans = _step_transitions(transitions, start, end, restart)  # [B, N, N]
    nxt = jax.nn.logsumexp(alpha[:, :, None] + trans, axis=1) + emit  # [B, N(to)]
    return jnp.where(m[:, None], nxt, alpha), None

  alpha, _ = jax.lax.scan(step, alpha0, _scan_inputs(emissions, mask, restarts))
  return jax.nn.logsumexp(alpha + end[None, :], axis=-1)


def path_score(emissions, tags, mask, transitions, start, end, restarts=None):
  """Score [B] of the tag path `tags` [B, T] over the masked prefix (a sum over its chains with `restarts`)."""
  emissions = _at_least_f32(emissions)
  tags = jnp.where(mask, tags, 0)  # whatever fills the padding (e.g. -100) never indexes
  m = mask.astype(jnp.float32)
  emit = jnp.take_along_axis(emissions, tags[..., None], axis=-1)[..., 0]  # [B, T]
  trans = transitions[tags[:, :-1], tags[:, 1:]]  # [B, T-1]
  if restarts is not None:
    trans = jnp.where(restarts[:, 1:], end[tags[:, :-1]] + start[tags[:, 1:]], trans)
  count = jnp.sum(mask.astype(jnp.int32), axis=-1)
  last = jnp.take_along_axis(tags, jnp.maximum(count - 1, 0)[:, None], axis=-1)[:, 0]
  return start[tags[:, 0]] + jnp.sum(emit * m, -1) + jnp.sum(trans * m[:, 1:], -1) + end[last]


def log_likelihood(emissions, tags, mask, transitions, start, end, restarts=None):
  """log p(tags | emissions) [B] (with `restarts`, the sum over a row's chains); 0 for rows without any real
  position."""
  ll = path_score(emissions, tags, mask, transitions, start, end, restarts) - log_partition(
      emissions, mask, transitions, start, end, restarts)
  return jnp.where(jnp.any(mask, axis=-1), ll, 0.0)


def viterbi(emissions, mask, transitions, start, end, restarts=None):
  """Best tag path [B, T] (int32, 0 past the prefix) and its score [B] (with `restarts`: each chain's best path, and
  the sum of their scores)."""
  emissions = _at_least_f32(emissions)
  n = emissions.shape[-1]
  delta0 = start[None, :] + emissions[:, 0]  # [B, N]

  def forward(delta, xs):
    emit, m, restart = xs
    cand = delta[:, :, None] + _step_transitions(transitions, start, end, restart)  # [B, N(from), N(to)]
    best_prev = jnp.argmax(cand, axis=1).astype(jnp.int32)  # [B, N]
    nxt = jnp.max(cand, axis=1) + emit
    # a padded step keeps delta and points each tag at itself, so backtracking walks through it unchanged
    keep = m[:, None]
    return jnp.where(keep, nxt, delta), jnp.where(keep, best_prev, jnp.arange(n, dtype=jnp.int32)[None])

  delta, backpointers = jax.lax.scan(forward, delta0, _scan_inputs(emissions, mask, restarts))
  final = delta + end[None, :]
  last = jnp.argmax(final, axis=-1).astype(jnp.int32)  # [B]

  def backward(tag, bp):  # tag at position t, bp [B, N] the best predecessor of each tag at t
    return jnp.take_along_axis(bp, tag[:, None], axis=-1)[:, 0], tag

  first, rest = jax.lax.scan(backward, last, backpointers, reverse=True)  # rest [T-1, B]: tags at 1..T-1
  tags = jnp.concatenate([first[None], rest], axis=0).T  # [B, T]
  return jnp.where(mask, tags, 0), jnp.max(final, axis=-1)


def compact_emissions(emissions, selected):
  """Compacts emissions [B, L, N] to the selected (first sub-word) positions: (emissions, mask, order, count)."""
  order, count = compact(selected)
  return gather(emissions, order), prefix_mask(count, selected.shape[1]), order, count
