"""Generation for any model family with a KV cache: sampling (greedy, temperature, top-k, top-p) and beam search,
each one jitted loop that stops early once every row has ended, written against the small `Decoding` interface.

The contract a model family fulfils (`Decoding`):

- `init_cache(params, batch_size, context) -> cache`: an empty cache for `batch_size` rows. `context` is whatever
  the family needs once per row before decoding, batched on a leading axis (None for a decoder-only model; for an
  encoder-decoder the encoder inputs, which init_cache encodes and turns into the cross-attention keys/values).
- `step(params, cache, tokens [B, T], positions [B, T]) -> (logits [B, T, V] float32, cache)`: runs T tokens per row
  at the given positions (consecutive within a row, rows may differ). The keys/values of `tokens[b, t]` are written
  to cache slot `positions[b, t]`, and a query at position p attends to the slots 0..p of its row and nothing else.
  Slots above p may hold stale values from an earlier write (a prompt's padding); they must stay invisible.
- `reorder(cache, rows [N]) -> cache`: the cache of N rows where row n is old row `rows[n]` (repeats allowed); beam
  search uses it to copy a prompt's cache to its K beams.
- `copy_rows(cache, dst [M], src [M], n) -> cache`: rows dst[:n] replaced by rows src[:n], no row both a source and a
  destination; beam search uses it to follow each beam's parent.
- `max_len`: the number of cache slots; every position must stay below it.
- `prepare(params) -> params`: the parameters in the form `init_cache` and `step` take, made once per search before
  its loop (the identity for most families).

A model whose cache keeps one write index for the whole batch (the decoder here, T5 in models/encdec.py) meets the
per-row part of this contract the way `decoder_decoding` and `encdec_decoding` do: by running the model once per row
under jax.vmap, setting that row's index to its first position. For T5 the context is (encoder tokens [B, S], encoder
segment ids [B, S]) and the prompt is the decoder start token.

Prompts are right-padded to a common width P with their true lengths given per row (`prompt_lengths`): row b's
first generated token comes from the logits at position `prompt_lengths[b] - 1`, and its generated tokens take the
positions from `prompt_lengths[b]` on, overwriting the padding's cache slots, so a padded prompt continues exactly
as it would alone. Generated tokens include the EOS that ends a row; after it a row emits `pad_id`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxlm.models.decoder import Decoder, unstack_layers
from jaxlm.models.encdec import EncDec
from jaxlm.models.encdec import init_cache as encdec_init_cache
from jaxlm.models.encdec import unstack_layers as encdec_unstack_layers

NEG_INF = -jnp.inf


def _as_given(params):
  return params


@dataclasses.dataclass(frozen=True)
class Decoding:
  """How to decode one model family: see the module docstring for the contract of each function.

  Searches take it as a static argument, so build it once per model (decoder_decoding caches it) and reuse it:
  a new Decoding object compiles the searches again.
  """
  init_cache: Callable[[Any, int, Any], Any]
  step: Callable[[Any, Any, jax.Array, jax.Array], tuple[jax.Array, Any]]
  reorder: Callable[[Any, jax.Array], Any]
  copy_rows: Callable[[Any, jax.Array, jax.Array, jax.Array], Any]
  max_len: int
  prepare: Callable[[Any], Any] = _as_given


def take_rows(cache, rows, axis: int = 0):
  """Every cache leaf indexed by `rows` along its batch `axis`: a `Decoding.reorder` for caches of one layout."""
  return jax.tree.map(lambda x: jnp.take(x, rows, axis=axis), cache)


def copy_rows(cache, dst, src, n):
  """Every cache leaf with rows dst[:n] (batch axis 0) replaced by rows src[:n], one row at a time, in place: a
  `Decoding.copy_rows` for caches of one layout.

  Beam search moves only the rows of beams that left their parent's row with it; a gather of every row (take_rows)
  moved the whole cache at every generated token, as many bytes as the model's weights at batch 8 x 4 beams.
  """
  def one(i, cache):
    return jax.tree.map(lambda x: jax.lax.dynamic_update_index_in_dim(
        x, jax.lax.dynamic_index_in_dim(x, src[i], 0), dst[i], 0), cache)
  return jax.lax.fori_loop(0, n, one, cache)


def _at_index(cache, positions):
  """Every cache index leaf of one row set to the row's first position: where its keys/values are written."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.full_like(x, positions[0]) if path[-1].key == "index" else x, cache)


@functools.cache
def decoder_decoding(model: Decoder, max_len: int | None = None) -> Decoding:
  """The Decoding of a decoder-only model; `max_len` (default: the model's) sets the cache length.

  Each row keeps its own cache, with its own write index, and the model runs once per row under jax.vmap: the
  decoder's cache index is one scalar for the whole batch, and rows of different prompt lengths write at different
  slots. Every cache leaf therefore has a leading row axis (then the decoder's own layout with a batch of 1).
  A cache shorter than the model's max_len serves prompts and outputs that fit it: attention and beam reordering
  then touch only those slots (a gpt2 model keeps its whole position table).

  A model with scanned layers decodes with its layers unrolled: `prepare` takes the stacked parameters apart once
  per search. Scanned, every step sliced each layer's weights out of the stack into a fresh buffer (XLA:CPU's
  matmuls do not read through a dynamic slice), copying all the weights once per generated token, and stacked the
  cache of every layer again.
  """
  cfg = model.cfg
  max_len = max_len or cfg.max_len
  if max_len > cfg.max_len:
    raise ValueError(f"cache length {max_len} > model.max_len={cfg.max_len}: positions past the model's are not "
                     "defined")
  model = Decoder(dataclasses.replace(cfg, cache_len=max_len, scan_layers=False))

  def init_cache(params, batch_size: int, context=None):
    del params, context  # the empty cache is zeros of the shapes the model declares
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32), decode=True)["cache"])
    return jax.tree.map(lambda s: jnp.zeros((batch_size, *s.shape), s.dtype), shapes)

  def step_row(params, cache, tokens, positions):  # one row: cache with batch 1, tokens/positions [T]
    # the write slot is the row's first position: point every layer's cache index there
    logits, variables = model.apply({"params": params, "cache": _at_index(cache, positions)}, tokens[None],
                                    positions[None], decode=True, mutable=["cache"])
    return logits[0], variables["cache"]

  def step(params, cache, tokens, positions):
    return jax.vmap(step_row, in_axes=(None, 0, 0, 0))(params, cache, tokens, positions)

  return Decoding(init_cache=init_cache, step=step, reorder=take_rows, copy_rows=copy_rows, max_len=max_len,
                  prepare=unstack_layers if cfg.scan_layers else _as_given)


@functools.cache
def encdec_decoding(model: EncDec, max_len: int) -> Decoding:
  """The Decoding of a T5 encoder-decoder with room for `max_len` decoder tokens (the start token included).

  `context` is (encoder tokens [B, S], encoder segment ids [B, S], 0 on padding): init_cache encodes them once and
  stores each row's cross-attention keys/values (models/encdec.init_cache), so a decoding step costs one decoder
  position. As in decoder_decoding, each row keeps its own cache under jax.vmap (leading row axis, then a batch of 1),
  and a model with scanned layers decodes unrolled from its parameters taken apart once per search.
  """
  cfg = model.cfg
  model = EncDec(dataclasses.replace(cfg, scan_layers=False))

  def init_cache(params, batch_size: int, context):
    tokens, segment_ids = context
    encoded = model.apply({"params": params}, tokens, segment_ids, method=EncDec.encode)  # [B, S, D]
    return jax.vmap(lambda e, s: encdec_init_cache(model, params, e[None], s[None], max_len))(encoded, segment_ids)

  def step_row(params, cache, tokens, positions):  # one row: tokens/positions [T]
    logits, variables = model.apply({"params": params, "cache": _at_index(cache, positions)}, None, None,
                                    tokens[None], None, positions[None], decode=True, method=EncDec.decode,
                                    mutable=["cache"])
    return logits[0], variables["cache"]

  def step(params, cache, tokens, positions):
    return jax.vmap(step_row, in_axes=(None, 0, 0, 0))(params, cache, tokens, positions)

  return Decoding(init_cache=init_cache, step=step, reorder=take_rows, copy_rows=copy_rows, max_len=max_len,
                  prepare=functools.partial(encdec_unstack_layers, cfg=cfg) if cfg.scan_layers else _as_given)


def check_lengths(decoding: Decoding, prompt_width: int, max_new_tokens: int):
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
  if prompt_width + max_new_tokens > decoding.max_len:
    raise ValueError(f"prompt width {prompt_width} + max_new_tokens {max_new_tokens} exceeds the cache length "
                     f"{decoding.max_len}")


def prefill(decoding: Decoding, params, prompt, prompt_lengths, context):
  """Runs the padded prompt [B, P] through the model: the cache and the logits [B, V] after each row's last token."""
  b, p = prompt.shape
  cache = decoding.init_cache(params, b, context)
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  logits, cache = decoding.step(params, cache, prompt, positions)  # [B, P, V]
  last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, V]
  return cache, last


def _lengths_or_full(prompt, prompt_lengths):
  b, p = prompt.shape
  if prompt_lengths is None:
    return jnp.full((b,), p, jnp.int32)
  return jnp.asarray(prompt_lengths, jnp.int32)


# ---- sampling -------------------------------------------------------------------------------------------------


class Generated(NamedTuple):
  tokens: jax.Array  # [B, max_new_tokens] int32: generated ids, EOS included, pad_id after it
  lengths: jax.Array  # [B] int32: generated tokens per row, EOS included
  steps: jax.Array  # () int32: positions decoded before the loop stopped (max(lengths) when every row hit EOS)


def nucleus_filter(logits, top_p):
  """logits [B, V] -> the same with -inf outside the nucleus: the smallest set of most likely tokens whose
  probability reaches top_p (the most likely token always stays; tokens tied with the last one kept stay too)."""
  sorted_logits = -jnp.sort(-logits, axis=-1)  # [B, V], most likely first
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above each one
  kept = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1), 1)  # [B]
  threshold = jnp.take_along_axis(sorted_logits, (kept - 1)[:, None], axis=-1)  # [B, 1]
  return jnp.where(logits < threshold, NEG_INF, logits)


def _pick(logits, rng, temperature, top_k: int, top_p):
  """logits [B, V] -> token ids [B]: argmax at temperature 0, else a sample after top-k, then top-p filtering."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
  if top_k:
    kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]  # [B, 1]
    scaled = jnp.where(scaled < kth, NEG_INF, scaled)
  # the sort behind top-p is skipped when top_p >= 1 (also where rounding would let the cumulative mass reach 1 early)
  scaled = jax.lax.cond(top_p < 1.0, nucleus_filter, lambda x, _: x, scaled, top_p)
  sampled = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


def repeated_ngrams(tokens, length, n: int, vocab_size: int):
  """tokens [R, N] whose first `length` (a traced scalar) are generated -> [R, V] bool: the tokens that would repeat
  an n-gram already in tokens[:, :length] as the next one (Hugging Face's no_repeat_ngram_size, over the generated
  tokens alone; n=1 bans every token generated so far)."""
  rows, total = tokens.shape
  starts = total - n + 1  # the n-grams tokens[:, j:j+n] that can lie inside the buffer
  if starts <= 0:
    return jnp.zeros((rows, vocab_size), bool)
  match = jnp.broadcast_to(jnp.arange(starts) <= length - n, (rows, starts))  # the n-gram j.. is all generated
  for t in range(n - 1):  # its first n-1 tokens equal the last n-1 generated ones
    tail = jax.lax.dynamic_index_in_dim(tokens, jnp.maximum(length - n + 1 + t, 0), axis=1, keepdims=False)  # [R]
    match = match & (tokens[:, t:t + starts] == tail[:, None])
  hits = jnp.zeros((rows, vocab_size), jnp.int32).at[jnp.arange(rows)[:, None], tokens[:, n - 1:]].add(
      match.astype(jnp.int32))
  return hits > 0


def _ban_repeats(scores, tokens, length, n: int):
  """scores [R, V] with -inf for the tokens that would repeat an n-gram of tokens [R, N]; n 0: unchanged."""
  if not n:
    return scores
  return jnp.where(repeated_ngrams(tokens, length, n, scores.shape[-1]), NEG_INF, scores)


@functools.partial(jax.jit, static_argnames=("decoding", "max_new_tokens", "top_k", "no_repeat_ngram_size"))
def _sample(decoding, params, prompt, prompt_lengths, rng, temperature, top_p, eos_id, pad_id, context, *,
            max_new_tokens: int, top_k: int, no_repeat_ngram_size: int):
  b = prompt.shape[0]
  n = max_new_tokens
  params = decoding.prepare(params)
  cache, logits = prefill(decoding, params, prompt, prompt_lengths, context)
  first = _pick(logits, jax.random.fold_in(rng, 0), temperature, top_k, top_p)
  tokens = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first)
  state = (jnp.int32(1), tokens, jnp.ones((b,), jnp.int32), first == eos_id, first, cache)

  def cond(state):
    i, _, _, done, _, _ = state
    return (i < n) & ~jnp.all(done)

  def body(state):
    i, tokens, lengths, done, last, cache = state
    logits, cache = decoding.step(params, cache, last[:, None], (prompt_lengths + i - 1)[:, None])
    logits = _ban_repeats(logits[:, 0], tokens, i, no_repeat_ngram_size)
    tok = _pick(logits, jax.random.fold_in(rng, i), temperature, top_k, top_p)
    tok = jnp.where(done, pad_id, tok)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], i, axis=1)
    return i + 1, tokens, lengths + (~done), done | (tok == eos_id), tok, cache

  steps, tokens, lengths, _, _, _ = jax.lax.while_loop(cond, body, state)
  return Generated(tokens, lengths, steps)


def sample(decoding: Decoding, params, prompt, prompt_lengths=None, *, max_new_tokens: int, rng=None,
           temperature=0.0, top_k: int = 0, top_p=1.0, eos_id: int | None = None, pad_id: int = 0,
           context=None, no_repeat_ngram_size: int = 0) -> Generated:
  """Generates up to max_new_tokens per row of `prompt` [B, P] (right-padded; `prompt_lengths` [B], default P).

  temperature 0 is greedy; otherwise a sample from softmax(logits / temperature) restricted to the top_k tokens
  (0: all) and then to the nucleus of mass top_p (1: all). no_repeat_ngram_size n > 0 never generates an n-gram a
  second time within a row's output. A row ends at `eos_id` (None: never), and the loop stops when every row has
  ended. Compiled once per shape, decoding, max_new_tokens, top_k and no_repeat_ngram_size; temperature, top_p, eos_id
  and pad_id are traced. Sharded params and inputs keep their shardings.
  """
  check_lengths(decoding, prompt.shape[1], max_new_tokens)
  return _sample(decoding, params, jnp.asarray(prompt, jnp.int32), _lengths_or_full(prompt, prompt_lengths),
                 jax.random.key(0) if rng is None else rng, jnp.float32(temperature), jnp.float32(top_p),
                 jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id), context,
                 max_new_tokens=max_new_tokens, top_k=top_k, no_repeat_ngram_size=no_repeat_ngram_size)


# ---- beam search ----------------------------------------------------------------------------------------------


class Beams(NamedTuple):
  tokens: jax.Array  # [B, max_new_tokens] int32, or [B, K, max_new_tokens] best first with return_all
  lengths: jax.Array  # [B] (or [B, K]) int32: tokens per hypothesis, EOS included
  scores: jax.Array  # [B] (or [B, K]) float32: log-probability / length_penalty(length)
  steps: jax.Array  # () int32: positions decoded before the loop stopped


def describe(beam_size: int, alpha: float, no_repeat_ngram_size: int = 0) -> str:
  """The search, as the dev/test reports name it."""
  search = f"beam search, {beam_size} beams, length penalty {alpha}" if beam_size > 1 else "greedy"
  return search + (f", no {no_repeat_ngram_size}-gram repeated" if no_repeat_ngram_size else "")


def length_penalty(length, alpha):
  """GNMT / T5: ((5 + length) / 6) ** alpha; a hypothesis scores log p / length_penalty(length)."""
  return ((5.0 + length) / 6.0) ** alpha


def stable_slots(parent):
  """Rows for K new beams given their parents' rows ([B, K], 0..K-1): each parent's first child stays in the parent's
  row, its other children take the rows of childless parents in order, so only those rows' caches are copied.

  Returns `order` [B, K], the new beam each row holds, and `src` [B, K], the row whose cache it continues (src == row
  where the beam stays); no row is both copied from and copied to.
  """
  k = parent.shape[-1]
  j = jnp.arange(k)
  sibling = parent[:, :, None] == parent[:, None, :]  # [B, j, j']
  first = ~jnp.any(sibling & (j[None, :] < j[:, None]), axis=2)  # no earlier beam has the same parent
  childless = ~jnp.any(parent[:, :, None] == j, axis=1)  # [B, row]
  free_rank = jnp.cumsum(childless, axis=1) - 1  # [B, row]: the m-th childless row
  later_rank = jnp.cumsum(~first, axis=1) - 1  # [B, j]: the m-th later child
  takes = childless[:, None, :] & (free_rank[:, None, :] == later_rank[:, :, None])  # [B, j, row]
  row = jnp.where(first, parent, jnp.argmax(takes, axis=2))  # a permutation of 0..K-1 per prompt
  order = jnp.argmax(row[:, :, None] == j, axis=1)  # [B, row]
  return order, jnp.take_along_axis(parent, order, axis=1)


def _top_pool(tokens, scores, lengths, k: int):
  """The k best of a pool of hypotheses ([B, M, N], [B, M], [B, M]), best first."""
  scores, idx = jax.lax.top_k(scores, k)
  return jnp.take_along_axis(tokens, idx[:, :, None], axis=1), scores, jnp.take_along_axis(lengths, idx, axis=1)


@functools.partial(jax.jit, static_argnames=("decoding", "beam_size", "max_new_tokens", "return_all",
                                             "no_repeat_ngram_size"))
def _beam_search(decoding, params, prompt, prompt_lengths, alpha, eos_id, pad_id, context, *, beam_size: int,
                 max_new_tokens: int, return_all: bool, no_repeat_ngram_size: int):
  b, k, n = prompt.shape[0], beam_size, max_new_tokens
  params = decoding.prepare(params)
  cache, logits = prefill(decoding, params, prompt, prompt_lengths, context)
  cache = decoding.reorder(cache, jnp.repeat(jnp.arange(b), k))  # row b*K + j: beam j of prompt b
  rows = jnp.arange(b)[:, None] * k

  def penalty(length):
    return length_penalty(jnp.asarray(length, jnp.float32), alpha)

  def extend(state, logp, i):
    """Chooses token i (0-based) from log-probs [B, K, V] of the live beams: updates both pools; the parents."""
    live_tok, live_lp, fin_tok, fin_score, fin_len, done = state
    v = logp.shape[-1]
    cand_lp, cand = jax.lax.top_k((live_lp[:, :, None] + logp).reshape(b, k * v), 2 * k)  # [B, 2K]
    parent, token = cand // v, (cand % v).astype(jnp.int32)
    seqs = jnp.take_along_axis(live_tok, parent[:, :, None], axis=1).at[:, :, i].set(token)  # [B, 2K, N]
    ends = token == eos_id
    # as in Hugging Face's beam search, an EOS ends a hypothesis only when ranked among this step's best K
    # candidates (so K=1 is greedy search); 2K candidates still leave K live beams when K of them end
    new_score = jnp.where(ends & (jnp.arange(2 * k) < k) & ~done[:, None], cand_lp / penalty(i + 1), NEG_INF)
    fin_tok, fin_score, fin_len = _top_pool(
        jnp.concatenate([fin_tok, seqs], axis=1), jnp.concatenate([fin_score, new_score], axis=1),
        jnp.concatenate([fin_len, jnp.full((b, 2 * k), i + 1, jnp.int32)], axis=1), k)
    live_lp, keep = jax.lax.top_k(jnp.where(ends, NEG_INF, cand_lp), k)  # [B, K]
    # live beams in stable rows (not ranked): most continue in their parent's cache row
    order, parent = stable_slots(jnp.take_along_axis(parent, keep, axis=1))
    keep = jnp.take_along_axis(keep, order, axis=1)
    live_lp = jnp.take_along_axis(live_lp, order, axis=1)
    live_tok = jnp.take_along_axis(seqs, keep[:, :, None], axis=1)
    # A live beam's log-prob only falls, so its best final score is live_lp / the largest penalty of the
    # lengths still ahead (i+2 .. n). A row is done when that cannot beat the worst of a full finished pool.
    ahead = jnp.maximum(penalty(jnp.minimum(i + 2, n)), penalty(n))
    worst = fin_score[:, -1]
    best = live_lp.max(axis=1)
    done = done | ((worst > NEG_INF) & (best / ahead <= worst)) | (best == NEG_INF)
    return (live_tok, live_lp, fin_tok, fin_score, fin_len, done), parent

  # only beam 0 is live at first: the K copies of the prompt would otherwise give K identical candidates
  live_lp = jnp.broadcast_to(jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF), (b, k)).astype(jnp.float32)
  state = (jnp.full((b, k, n), pad_id, jnp.int32), live_lp, jnp.full((b, k, n), pad_id, jnp.int32),
           jnp.full((b, k), NEG_INF, jnp.float32), jnp.zeros((b, k), jnp.int32), jnp.zeros((b,), bool))
  first = jax.nn.log_softmax(logits, axis=-1)[:, None, :]  # [B, 1, V]: the same for all K copies
  state, _ = extend(state, jnp.broadcast_to(first, (b, k, first.shape[-1])), 0)

  def cond(carry):
    i, state, _ = carry
    return (i < n) & ~jnp.all(state[-1])

  def body(carry):
    i, state, cache = carry
    last = jax.lax.dynamic_index_in_dim(state[0], i - 1, axis=2, keepdims=False)  # [B, K]
    positions = jnp.broadcast_to(prompt_lengths[:, None] + i - 1, (b, k))
    logits, cache = decoding.step(params, cache, last.reshape(b * k, 1), positions.reshape(b * k, 1))
    logp = jax.nn.log_softmax(logits[:, 0], axis=-1)  # [B*K, V]
    logp = _ban_repeats(logp, state[0].reshape(b * k, n), i, no_repeat_ngram_size).reshape(b, k, -1)
    state, parent = extend(state, logp, i)
    moved = (parent != jnp.arange(k)).reshape(-1)  # beams that left their parent's row
    dst = jnp.nonzero(moved, size=b * k, fill_value=0)[0]
    return i + 1, state, decoding.copy_rows(cache, dst, (rows + parent).reshape(-1)[dst], moved.sum())

  steps, state, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), state, cache))
  live_tok, live_lp, fin_tok, fin_score, fin_len, done = state
  # rows still running reached max_new_tokens: their live beams are hypotheses of that length
  live_score = jnp.where(done[:, None], NEG_INF, live_lp / penalty(n))
  tokens, scores, lengths = _top_pool(
      jnp.concatenate([fin_tok, live_tok], axis=1), jnp.concatenate([fin_score, live_score], axis=1),
      jnp.concatenate([fin_len, jnp.full((b, k), n, jnp.int32)], axis=1), k)
  if not return_all:
    tokens, scores, lengths = tokens[:, 0], scores[:, 0], lengths[:, 0]
  return Beams(tokens, lengths, scores, steps)


def beam_search(decoding: Decoding, params, prompt, prompt_lengths=None, *, beam_size: int, max_new_tokens: int,
                alpha=0.0, eos_id: int | None = None, pad_id: int = 0, context=None, return_all: bool = False,
                no_repeat_ngram_size: int = 0) -> Beams:
  """Beam search over B prompts [B, P] (right-padded; `prompt_lengths` [B]) with B*K cache rows.

  Hypotheses end at `eos_id` (kept in a finished pool of the K best) or at max_new_tokens; they are ranked by
  log p / length_penalty(length, alpha) (alpha 0: plain log-probability). The loop stops once no row's live beams
  can beat its K-th finished hypothesis. no_repeat_ngram_size n > 0: no hypothesis holds an n-gram twice (its
  scores stay log-probabilities). Returns the best hypothesis per row, or all K best first (return_all).
  """
  check_lengths(decoding, prompt.shape[1], max_new_tokens)
  return _beam_search(decoding, params, jnp.asarray(prompt, jnp.int32), _lengths_or_full(prompt, prompt_lengths),
                      jnp.float32(alpha), jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id), context,
                      beam_size=beam_size, max_new_tokens=max_new_tokens, return_all=return_all,
                      no_repeat_ngram_size=no_repeat_ngram_size)
