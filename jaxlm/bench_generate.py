"""`jaxlm bench --generate`: KV-cache decoding speed of a decoder, greedy and beam search at several batch sizes, with
prefill and per-token latency apart, as one JSON line. The weights are random or a Hugging Face GPT-2/Llama directory
(--hf), so the same model can be timed beside transformers' `generate` (tests/peer_hf_generate.py)."""

from __future__ import annotations

import statistics
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import generation, hf
from jaxlm.models.decoder import Decoder, DecoderConfig


class DecodeTiming(NamedTuple):
  prefill_seconds: float  # one prefill of batch_size prompts of prompt_len tokens
  per_token_seconds: float  # one decode step for the whole batch
  tokens_per_second: float  # batch_size / per_token_seconds


def time_decoding(decoding: generation.Decoding, params, *, batch_size: int, prompt_len: int, new_tokens: int,
                  repeats: int = 3, context=None) -> DecodeTiming:
  """Times prefill and greedy decode steps apart (compiled first, then the median of `repeats` runs)."""
  generation.check_lengths(decoding, prompt_len, new_tokens)
  prompt = jnp.zeros((batch_size, prompt_len), jnp.int32)  # the values do not change the work done

  @jax.jit
  def prefill(params, context):
    params = decoding.prepare(params)
    lengths = jnp.full((batch_size,), prompt_len, jnp.int32)
    cache, logits = generation.prefill(decoding, params, prompt, lengths, context)
    return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)

  @jax.jit
  def decode(params, cache, token):
    params = decoding.prepare(params)

    def body(i, carry):
      cache, token = carry
      positions = jnp.full((batch_size, 1), prompt_len + i, jnp.int32)
      logits, cache = decoding.step(params, cache, token[:, None], positions)
      return cache, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
    return jax.lax.fori_loop(0, new_tokens, body, (cache, token))

  def clock(fn, *args):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start

  cache, token = jax.block_until_ready(prefill(params, context))  # compiles
  jax.block_until_ready(decode(params, cache, token))
  prefill_s = float(np.median([clock(prefill, params, context) for _ in range(repeats)]))
  decode_s = float(np.median([clock(decode, params, cache, token) for _ in range(repeats)]))
  per_token = decode_s / new_tokens
  return DecodeTiming(prefill_s, per_token, batch_size / per_token)


def _model(config, hf_dir: str | None):
  """(Decoder, params): the config's decoder with random weights, or an HF directory's model and weights."""
  if hf_dir:
    cfg, params = hf.family_module(hf.detect_family(hf_dir)).load(hf_dir)
    return Decoder(cfg), jax.tree.map(jnp.asarray, params)
  model = Decoder(DecoderConfig.from_config(config.model))
  params = jax.jit(lambda r: model.init(r, jnp.zeros((1, 1), jnp.int32))["params"])(jax.random.key(0))
  return model, jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params)


def _clock(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compiles
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_generate(config, *, hf_dir: str | None = None, batch_sizes=(1, 8), prompt_len: int = 32,
                   new_tokens: int = 64, beam_size: int = 4, repeats: int = 3) -> dict:
  """Greedy and beam-search decoding of `new_tokens` tokens after `prompt_len` prompt tokens (no EOS: every run does
  the same work), timed after compilation; median of `repeats`. tokens_per_s counts generated tokens of all rows."""
  model, params = _model(config, hf_dir)
  decoding = generation.decoder_decoding(model, prompt_len + new_tokens)  # a cache just long enough, as HF's grows
  rng = np.random.default_rng(0)
  vocab = model.cfg.vocab_size
  out = {"name": config.name, "params": int(sum(x.size for x in jax.tree.leaves(params))), "prompt_len": prompt_len,
         "new_tokens": new_tokens, "devices": jax.device_count(), "runs": []}
  for b in batch_sizes:
    prompt = jnp.asarray(rng.integers(0, vocab, (b, prompt_len)), jnp.int32)
    timing = time_decoding(decoding, params, batch_size=b, prompt_len=prompt_len, new_tokens=new_tokens,
                           repeats=repeats)
    greedy = _clock(lambda p=prompt: generation.sample(decoding, params, p, max_new_tokens=new_tokens), repeats)
    out["runs"].append({"search": "greedy", "batch": b, "seconds": float(f"{greedy:.6g}"),
                        "tokens_per_s": round(b * new_tokens / greedy, 1),
                        "prefill_ms": round(timing.prefill_seconds * 1e3, 2),
                        "per_token_ms": round(timing.per_token_seconds * 1e3, 3)})
    if beam_size > 1:
      beam = _clock(lambda p=prompt: generation.beam_search(decoding, params, p, beam_size=beam_size,
                                                            max_new_tokens=new_tokens), repeats)
      out["runs"].append({"search": f"beam{beam_size}", "batch": b, "seconds": float(f"{beam:.6g}"),
                          "tokens_per_s": round(b * new_tokens / beam, 1)})
  return out
