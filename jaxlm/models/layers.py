"""Building blocks shared by the model families: parameters with logical axis names, projections (LoRA included),
dropout, attention, MLPs (the norms: jaxlm.models.norms).

Shapes are written as einsum subscripts with a comment; letters: B batch, T query length, S key length,
D d_model, H query heads, K key/value heads, G query heads per kv head, E head_dim, F MLP hidden, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import string
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import sharding
from jaxlm.models import activations

Initializer = Callable[..., jax.Array]


def residual(x):
  """The residual stream [B, T, D] pinned to the batch axes (sharding.constrain; a no-op outside a traced step)."""
  return sharding.constrain(x, ("batch", "length", None))


def lookup(table, ids, rows: str | None = "vocab"):
  """Rows of an embedding table [V, D] (V's logical axis `rows`) for ids [B, T]: a residual stream split over the batch.

  In a traced step the table is first gathered whole along D (its fsdp shards): looked up from those shards, the rows
  came out split over D and XLA went to the batch layout by replicating them on every device.
  """
  return residual(jnp.take(sharding.constrain(table, (rows, None)), ids, axis=0))


def param(module: nn.Module, name: str, init: Initializer, shape: Sequence[int], axes: Sequence[str | None]):
  """A float32 parameter created with its logical axis names (resolved to mesh axes in jaxlm/sharding.py)."""
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), jnp.float32)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Low-rank adapters (LoRA) on the dense projections whose parameter path ('block_0/attn/qkv') the regex `targets`
  finds (re.search): y = x W + (alpha / rank) * dropout(x) A B, with B zero at the start."""
  rank: int
  alpha: float
  dropout: float = 0.0
  targets: str = ""
  token_ids: tuple[int, ...] = ()  # decoders: rows of the embedding (and output layer) trained as deltas

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def applies_to(self, path: str) -> bool:
    return re.search(self.targets, path) is not None


LORA_SUFFIXES = ("_lora_a", "_lora_b")  # an adapter's leaves sit beside the weight `name` as name_lora_a / name_lora_b
TOKEN_DELTA = "_token_delta"  # trained token rows sit beside the table `name` as name_token_delta (LoraSpec.token_ids)


def _is_projection(xs: str, ws: str, out: str) -> bool:  # each weight axis contracted with x or kept in the output
  return all((ch in xs) != (ch in out) for ch in ws)


def split_equation(equation: str) -> tuple[str, str, str, str, str]:
  """'inputs,weight->outputs' -> (inputs, weight, outputs, weight letters contracted with the inputs, weight letters
  kept in the outputs). Every weight letter is one or the other."""
  x, w, out = re.split(r",|->", equation.replace(" ", ""))
  ins = "".join(ch for ch in w if ch in x and ch not in out)
  outs = "".join(ch for ch in w if ch in out and ch not in x)
  if not _is_projection(x, w, out):
    raise ValueError(f"einsum '{equation}': a LoRA adapter needs every weight axis either contracted with the inputs "
                     "or kept in the outputs")
  return x, w, out, ins, outs


def lora_shapes(equation: str, shape: Sequence[int], axes: Sequence[str | None], rank: int):
  """((A shape, A axes), (B shape, B axes)) of an adapter on a weight of `shape`: A [inputs..., r] sharded like the
  weight's input axes, B [r, outputs...] like its output axes, so each shards with the weight it adapts."""
  _, w, _, ins, outs = split_equation(equation)
  pick = lambda letters, seq: [seq[w.index(ch)] for ch in letters]
  return ((*pick(ins, shape), rank), (*pick(ins, axes), None)), ((rank, *pick(outs, shape)), (None, *pick(outs, axes)))


def lora_params(module: nn.Module, name: str, equation: str, shape: Sequence[int], axes: Sequence[str | None],
                lora: LoraSpec | None):
  """(A, B) of the adapter on the weight `name` when `lora` targets its path, else None. A starts uniform in
  +-1/sqrt(fan_in) (PEFT's default), B at zero: the adapted model starts as the base model."""
  if lora is None or not lora.applies_to("/".join((*module.path, name))):
    return None
  (a_shape, a_axes), (b_shape, b_axes) = lora_shapes(equation, shape, axes, lora.rank)
  bound = 1.0 / math.sqrt(math.prod(a_shape[:-1]))
  init_a = lambda key, s, dtype: jax.random.uniform(key, s, dtype, -bound, bound)
  return (param(module, name + LORA_SUFFIXES[0], init_a, a_shape, a_axes),
          param(module, name + LORA_SUFFIXES[1], nn.initializers.zeros, b_shape, b_axes))


@functools.lru_cache(maxsize=None)
def _weight_major(equation: str) -> str:
  """`equation` ('x,w->out') with its letters renamed so the weight's come first in the alphabet, in the weight's
  order. jnp.einsum lists contracted axes alphabetically, and XLA:CPU transposes both operands of a product whose
  contracted axes come in neither operand's order: the attention output projection 'bthe,hed->btd' contracted
  (e, h), and its weight was copied transposed in every training step and every decoding step (there, with the
  attention output too)."""
  inputs, out = equation.split("->")
  xs, ws = inputs.split(",")
  letters = [ch for ch in dict.fromkeys(ws + xs + out) if ch.isalpha()]
  names = dict(zip(letters, string.ascii_letters))
  return "".join(names.get(ch, ch) for ch in equation)


def einsum(equation: str, x, w):
  """jnp.einsum(equation, x, w), contracted in the weight's axis order (_weight_major); projections by _product."""
  equation = _weight_major(equation)
  if "." not in equation and _is_projection(*re.split(r",|->", equation)):
    return _product(equation, x, w)
  return jnp.einsum(equation, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _product(equation: str, x, w):
  """A projection whose weight gradient contracts one token axis, the leading axes x and the output share ([B, T])
  merged: over B and T apart XLA:CPU copied the gradient transposed and ran the product outside YNNPACK."""
  return jnp.einsum(equation, x, w)


def _product_bwd(equation, res, g):
  x, w = res
  xs, ws, out = re.split(r",|->", equation)
  zx, zout, xn, gn = _merge_tokens(xs, out, x, g, _free_letter(equation))
  dw = jnp.einsum(f"{zout},{zx}->{ws}", gn, xn.astype(g.dtype))
  dx = jnp.einsum(f"{out},{ws}->{xs}", g, w.astype(g.dtype))
  return dx.astype(x.dtype), dw.astype(w.dtype)


def _merge_tokens(xs: str, out: str, x, g, z: str):
  """(x letters, output letters, x, g) with the leading axes x and the output share ([B, T]) merged into one token
  axis `z`: a weight's gradient is then one contraction over it."""
  lead = next((i for i, (a, b) in enumerate(zip(xs, out)) if a != b), min(len(xs), len(out)))
  n = math.prod(x.shape[:lead])
  return z + xs[lead:], z + out[lead:], x.reshape(n, *x.shape[lead:]), g.reshape(n, *g.shape[lead:])


_product.defvjp(lambda equation, x, w: (jnp.einsum(equation, x, w), (x, w)), _product_bwd)


def _free_letter(equation: str) -> str:
  return next(ch for ch in "rzyxwvutsqponmlkjihgfedcba" if ch not in equation)


def dense(module: nn.Module, equation: str, x, w, dtype, adapter=None, lora: LoraSpec | None = None):
  """einsum(equation, x, w) in `dtype`, plus the adapter's (alpha / r) * dropout(x) A B when there is one. Adapter
  dropout is active when the call has a 'dropout' RNG (training) and off otherwise; without it the adapter is folded
  into the weight for the product (_merged_lora), which on XLA:CPU made the MiniLM SST-2 LoRA step 1.4x faster."""
  if adapter is None:
    return einsum(equation, x, w.astype(dtype))
  a, b = adapter
  xs, ws, out, ins, outs = split_equation(equation)
  r = _free_letter(equation)
  rest = "".join(ch for ch in xs if ch not in ins)
  letters = (equation, xs, ws, out, ins, outs, rest, r)
  if lora.dropout > 0 and module.has_rng("dropout"):
    keep, scale = dropout_keep(module.make_rng("dropout"), lora.dropout, x.shape)
    xd = jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))
    xa = einsum(f"{xs},{ins}{r}->{rest}{r}", xd, a.astype(dtype)) * jnp.asarray(lora.scale, dtype)  # [..., r]
    return einsum(equation, x, w.astype(dtype)) + jnp.einsum(f"{rest}{r},{r}{outs}->{out}", xa, b.astype(dtype))
  return _merged_lora(letters, x, w, a, b, lora.scale, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5, 6))
def _merged_lora(letters, x, w, a, b, scale, dtype):
  """x (W + scale A B) in one product of the weight's size: the adapter's [tokens, outputs] term is never formed,
  neither in the forward pass nor in the backward one, where x's gradient comes through the merged weight too."""
  return _merged_lora_fwd(letters, x, w, a, b, scale, dtype)[0]


def _merged_lora_fwd(letters, x, w, a, b, scale, dtype):
  return einsum(letters[0], x, _merge(letters, w, a, b, scale, dtype)), (x, w, a, b)


def _merge(letters, w, a, b, scale, dtype):
  _, _, ws, _, ins, outs, _, r = letters
  return (w.astype(jnp.float32) + scale * jnp.einsum(f"{ins}{r},{r}{outs}->{ws}", a, b)).astype(dtype)


def _merged_lora_bwd(letters, scale, dtype, res, g):
  """The adapter's and the weight's gradients contract one merged token axis (as _product's); when x is [tokens,
  inputs...], the output [tokens, outputs...] and the weight [inputs..., outputs...], as products of matrices."""
  equation, xs, ws, out, ins, outs, rest, r = letters
  x, w, a, b = res
  merged = _merge(letters, w, a, b, scale, dtype)  # formed again rather than kept: a weight's size per projection
  dx = jnp.einsum(f"{out},{ws}->{xs}", g, merged).astype(x.dtype)
  z = _free_letter(equation + r)
  xs, out, x, g = _merge_tokens(xs, out, x, g, z)
  if xs == z + ins and out == z + outs and ws == ins + outs:  # x [N, K], g [N, M], A [K, r], B [r, M], W [K, M]
    # as matrices: with several input axes (the attention output's h, e) XLA:CPU copied x transposed
    x, g, a2, b2 = x.reshape(len(x), -1), g.reshape(len(g), -1), a.reshape(-1, a.shape[-1]), b.reshape(len(b), -1)
    g_xa, xa = g @ b2.T.astype(dtype), x @ a2.astype(dtype)
    da, db, dw = (x.T @ g_xa).reshape(a.shape), (xa.T @ g).reshape(b.shape), (x.T @ g).reshape(w.shape)
  else:
    rest = "".join(ch for ch in xs if ch not in ins)
    g_xa = jnp.einsum(f"{out},{r}{outs}->{rest}{r}", g, b.astype(dtype))  # [tokens..., r]
    xa = einsum(f"{xs},{ins}{r}->{rest}{r}", x, a.astype(dtype))
    da, db = jnp.einsum(f"{xs},{rest}{r}->{ins}{r}", x, g_xa), jnp.einsum(f"{rest}{r},{out}->{r}{outs}", xa, g)
    dw = jnp.einsum(f"{xs},{out}->{ws}", x, g)
  # dw is computed only where the weight itself trains (XLA drops it otherwise)
  return dx, dw.astype(w.dtype), (scale * da).astype(a.dtype), (scale * db).astype(b.dtype)


_merged_lora.defvjp(_merged_lora_fwd, _merged_lora_bwd)


def project(module: nn.Module, name: str, equation: str, x, init: Initializer, shape: Sequence[int],
            axes: Sequence[str | None], dtype, lora: LoraSpec | None = None):
  """x times a new parameter `name` by an einsum `equation` ('inputs,weight->outputs'), computed in `dtype`.

  Every dense projection of every model family goes through here, so what wraps a projection is written once: with
  `lora` targeting this weight's path, a low-rank adapter (name_lora_a, name_lora_b) is added beside it.
  """
  w = param(module, name, init, shape, axes)
  return dense(module, equation, x, w, dtype, lora_params(module, name, equation, shape, axes, lora), lora)


def normal(std: float) -> Initializer:
  return nn.initializers.normal(stddev=std)


DROPOUT_LEVELS = 1 << 32  # a dropout draw is a 32-bit word: the rate is exact to 2**-33


def _mix32(h):
  """A bijective avalanche of uint32 words (xor-shift-multiply, "lowbias32"): each output bit depends on every input
  bit, so consecutive counters give unrelated words."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def dropout_keep(rng, rate: float, shape: Sequence[int]) -> tuple[jax.Array, float]:
  """(keep mask, scale of the kept values) for dropout at `rate`: each element is dropped when its 32-bit draw falls
  below round(rate * 2**32), and the scale 1 / (1 - that rate) keeps the expectation.

  The draws are counter-based: two words taken from `rng` key a hash of each element's index (row along the first
  axis, position within the row), so the mask is a pure elementwise function that XLA fuses into its consumer and
  partitions like any iota. On XLA:CPU dropout of a [8, 128, 1024] activation this way takes ~0.7 ms against ~9 ms with
  jax.random.bits, and the bits were a fifth of a T5 training step with dropout 0.1."""
  shape = tuple(shape)
  threshold = min(round(rate * DROPOUT_LEVELS), DROPOUT_LEVELS - 1)
  scale = DROPOUT_LEVELS / (DROPOUT_LEVELS - threshold)
  first = 1 if len(shape) >= 2 else 0  # rows along the first axis of a 2-D or larger shape
  if math.prod(shape[first:]) >= DROPOUT_LEVELS:
    raise ValueError(f"dropout over rows of {math.prod(shape[first:])} elements: a row must hold fewer than 2**32")
  a, b = jax.random.bits(rng, (2,), jnp.uint32)
  # the index within the row from one iota per axis, in the mask's own shape: no reshape for sharding to resolve
  index, stride = jnp.zeros(shape, jnp.uint32), 1
  for axis in reversed(range(first, len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride *= shape[axis]
  row = _mix32(jax.lax.broadcasted_iota(jnp.uint32, shape, 0) + b) if first else b
  words = _mix32(_mix32(index + a) ^ row)
  return words >= jnp.uint32(threshold), scale


class Dropout(nn.Module):
  """Dropout with the cheaper mask of dropout_keep; otherwise as flax's nn.Dropout (the 'dropout' rng stream, nothing
  dropped when deterministic or at rate 0)."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    keep, scale = dropout_keep(self.make_rng("dropout"), self.rate, x.shape)
    return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))


def rope(x, positions, theta: float):
  """Rotary position embedding on x [B, T, H, E] at integer positions [B, T] (rotate-half convention)."""
  e = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))  # [E/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, E/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : e // 2], x32[..., e // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention_mask(segment_ids_q, segment_ids_k, positions_q=None, positions_k=None, causal: bool = True):
  """Boolean mask [B, 1, T, S]: same segment and, if causal, key position <= query position."""
  mask = segment_ids_q[:, :, None] == segment_ids_k[:, None, :]
  if causal:
    mask = mask & (positions_k[:, None, :] <= positions_q[:, :, None])
  return mask[:, None, :, :]


def dot_product_attention(q, k, v, mask, implementation: str | None):
  """q [B, T, H, E], k/v [B, S, K, E] (K divides H) -> [B, T, H, E] through jax.nn.dot_product_attention."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


ATTENTION_IMPLS = ("xla", "cudnn", "auto")  # model.attention for every family: jax.nn.dot_product_attention's
DECODER_ATTENTION_IMPLS = (*ATTENTION_IMPLS, "blocked")  # decoders also: blocked_causal_attention
ATTENTION_BLOCK = 128  # query rows per block of blocked_causal_attention


def _masked_softmax(logits, keep):
  """float32 softmax over the last axis, the entries not kept set to jax.nn.dot_product_attention's large negative
  (-0.7 of the logits dtype's largest number) first, as its XLA path does."""
  big_negative = -0.7 * jnp.finfo(logits.dtype).max
  return jax.nn.softmax(jnp.where(keep, logits, big_negative).astype(jnp.float32), axis=-1)


def blocked_causal_attention(q, k, v, mask, block: int = ATTENTION_BLOCK):
  """Causal attention as jax.nn.dot_product_attention's XLA path computes it (logits and softmax in float32, the
  same large negative number at masked keys), in blocks of `block` query rows that skip the keys after the block.

  q [B, T, H, E], k/v [B, T, K, E] (K divides H), mask [B, 1, T, T] causal in slot order (a query never sees a later
  slot; packed segments and padding only remove more keys) -> [B, T, H, E]. The keys a block skips are masked for
  every query in it, so the result equals the full computation, with about (1 + 1/n) / 2 of its attention work for
  n blocks. The products are batched over [B, K] only, with a kv head's G query heads and the block's rows merged into
  one row axis: on XLA:CPU the forward and backward pass took about a quarter less time with these four-axis batched
  dots than with a separate size-G axis (also when G is 1).
  """
  b, t, h, e = q.shape
  kh, g = k.shape[2], h // k.shape[2]
  logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
  qh = q.reshape(b, t, kh, g, e).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, E]
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, E]
  outs = []
  for start in range(0, t, block):
    stop = min(start + block, t)
    rows = qh[:, :, :, start:stop].reshape(b, kh, g * (stop - start), e)  # [B, K, G·t, E]
    logits = jnp.einsum("bkre,bkse->bkrs", rows, kt[:, :, :stop],
                        preferred_element_type=logits_dtype) * jnp.asarray(e ** -0.5, logits_dtype)
    keep = jnp.tile(mask[:, :, start:stop, :stop], (1, 1, g, 1))  # [B, 1, G·t, s]: rows ordered (g, t)
    probs = _masked_softmax(logits, keep).astype(v.dtype)
    outs.append(jnp.einsum("bkrs,bkse->bkre", probs, vt[:, :, :stop]).reshape(b, kh, g, stop - start, e))
  return jnp.concatenate(outs, axis=3).transpose(0, 3, 1, 2, 4).reshape(b, t, h, e)


def cached_attention(q, key_t, value, mask, bias=None, scale: float | None = None):
  """Attention over a KV cache kept in the layouts its two products read as they are: q [B, T, H, E], key_t
  [B, K, E, S], value [B, K, S, E] (K divides H), mask [B, 1, T, S], bias None or [B|1, H, T, S] -> [B, T, H, E];
  numbers as jax.nn.dot_product_attention's XLA path (float32 logits times `scale`, default E**-0.5, plus the bias,
  the same large negative at masked keys, float32 softmax). A cache in the [B, S, K, E] layout of the other paths made
  XLA:CPU copy all of it, transposed, for every layer at every token."""
  b, t, h, e = q.shape
  kh = key_t.shape[1]
  logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
  qh = q.reshape(b, t, kh, h // kh, e).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, E]
  logits = jnp.einsum("bkgte,bkes->bkgts", qh, key_t, preferred_element_type=logits_dtype)
  logits = logits * jnp.asarray(e ** -0.5 if scale is None else scale, logits_dtype)
  if bias is not None:
    logits = logits + bias.reshape(bias.shape[0], kh, h // kh, *bias.shape[2:]).astype(logits_dtype)
  probs = _masked_softmax(logits, mask[:, :, None])
  out = jnp.einsum("bkgts,bkse->bkgte", probs.astype(value.dtype), value)  # [B, K, G, T, E]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, e)


class Mlp(nn.Module):
  """GELU MLP (gpt2, BERT) or SwiGLU (llama)."""
  d_ff: int
  activation: str  # gelu | gelu_tanh | swiglu
  use_bias: bool
  init_std: float
  out_std: float
  dtype: jnp.dtype
  lora: LoraSpec | None = None

  @nn.compact
  def __call__(self, x):  # x [B, T, D]
    d, dt = x.shape[-1], self.dtype
    if self.activation == "swiglu":
      gate_up = project(self, "wi", "btd,dcf->btcf", x, normal(self.init_std), (d, 2, self.d_ff),
                        ("embed", None, "mlp"), dt, self.lora)  # [B, T, 2, F]
      h = nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
    else:
      h = project(self, "wi", "btd,df->btf", x, normal(self.init_std), (d, self.d_ff), ("embed", "mlp"), dt,
                  self.lora)  # [B, T, F]
      if self.use_bias:
        h = h + param(self, "bi", nn.initializers.zeros, (self.d_ff,), ("mlp",)).astype(dt)
      h = activations.gelu_by_name(h, self.activation)
    y = project(self, "wo", "btf,fd->btd", h, normal(self.out_std), (self.d_ff, d), ("mlp", "embed"), dt,
                self.lora)  # [B, T, D]
    if self.use_bias:
      y = y + param(self, "bo", nn.initializers.zeros, (d,), ("norm",)).astype(dt)
    return y


def llama_ffn_dim(d_model: int, multiple: int = 64) -> int:
  return multiple * math.ceil(int(8 * d_model / 3) / multiple)


def compact(selected):
  """selected [B, L] bool -> (order [B, L], count [B]): order lists the selected positions first, each group in its
  original order, so x[b, order[b]] is the row's selected entries followed by the rest."""
  order = jnp.argsort(~selected.astype(bool), axis=-1, stable=True).astype(jnp.int32)
  return order, jnp.sum(selected.astype(jnp.int32), axis=-1)


def gather(x, order):
  """x [B, L, ...] reordered along L by order [B, L]."""
  idx = order.reshape(order.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)
