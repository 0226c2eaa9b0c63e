"""Sampling from a trained decoder: prefill the prompt into a KV cache, then one jitted loop of decode steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import config as config_lib
from jaxlm import run, train
from jaxlm.checkpoint import Checkpointer
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.models.decoder import Decoder, DecoderConfig


def load_config_for_sampling(workdir: str, overrides=()):
  return config_lib.apply_overrides(run.read_config(workdir), overrides)


def _pick(logits, rng, temperature: float, top_k: int):
  """logits [B, V] -> next token ids [B]: greedy at temperature 0, else top-k filtered sampling."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k"))
def sample(model: Decoder, params, prompt, rng, *, max_new_tokens: int, temperature: float, top_k: int):
  """prompt [B, P] int32 -> generated ids [B, max_new_tokens]."""
  b, p = prompt.shape
  cache = model.init(jax.random.key(0), jnp.zeros((b, 1), jnp.int32), decode=True)["cache"]
  positions = jnp.broadcast_to(jnp.arange(p), (b, p))
  ones = jnp.ones((b, p), jnp.int32)
  logits, variables = model.apply({"params": params, "cache": cache}, prompt, positions, ones, decode=True,
                                  mutable=["cache"])
  first = _pick(logits[:, -1], jax.random.fold_in(rng, 0), temperature, top_k)

  def body(i, carry):
    out, cache = carry
    token = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)  # [B, 1]: the token chosen last
    pos = jnp.full((b, 1), p + i - 1, jnp.int32)
    logits, variables = model.apply({"params": params, "cache": cache}, token, pos, jnp.ones((b, 1), jnp.int32),
                                    decode=True, mutable=["cache"])
    nxt = _pick(logits[:, -1], jax.random.fold_in(rng, i), temperature, top_k)
    return jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1), variables["cache"]

  out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
  out, _ = jax.lax.fori_loop(1, max_new_tokens, body, (out, variables["cache"]))
  return out


def load_params(config, workdir: str, tokenizer=None):
  """The model and the best-or-latest checkpoint's parameters, on the run's mesh; `tokenizer`, if given, must be the
  one the checkpoint was trained with."""
  setup = train.build(config)
  ckpt = Checkpointer(workdir, config.checkpoint, read_only=True)
  step, params = run.restore_params(setup, ckpt, tokenizer=tokenizer)
  ckpt.close()
  return setup.task.model, params, step


def generate_text(config, workdir: str, prompt: str) -> str:
  tokenizer = load_tokenizer(config, workdir)
  model, params, _ = load_params(config, workdir, tokenizer)
  ids = tokenizer.encode(prompt)
  if not ids:
    ids = [tokenizer.bos_id if tokenizer.bos_id >= 0 else tokenizer.eos_id]
  s = config.sample
  max_len = DecoderConfig.from_config(config.model).max_len
  if len(ids) + s.max_new_tokens > max_len:
    raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({s.max_new_tokens}) exceeds model.max_len={max_len}")
  out = sample(model, params, jnp.asarray([ids], jnp.int32), jax.random.key(s.seed),
               max_new_tokens=s.max_new_tokens, temperature=float(s.temperature), top_k=int(s.top_k))
  new = [int(t) for t in np.asarray(out[0])]
  if tokenizer.eos_id in new:
    new = new[:new.index(tokenizer.eos_id)]
  return tokenizer.decode(ids + new)  # decoding the whole sequence keeps the spacing between prompt and sample
