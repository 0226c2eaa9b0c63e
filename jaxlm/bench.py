"""`jaxlm bench`: the training step of a config on random tokens, timed after warm-up, as one JSON line."""

from __future__ import annotations

import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import train
from jaxlm import workdir as workdir_lib


def measure_peak_gflops(n: int = 2048, reps: int = 5) -> float:
  """Dense float32 matmul throughput of the first device, jitted (the MFU denominator)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    matmul(a, a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / statistics.median(times) / 1e9


def flops_params(config, params) -> int:
  """N for 6·N·tokens: all parameters except the learned position table (it does no matmul)."""
  n = train.count_params(params)
  if config.model.family == "decoder" and config.model.style == "gpt2":
    n -= config.model.max_len * config.model.d_model
  return n


def bench_train_step(config, *, steps: int = 10, warmup: int = 3, peak_gflops: float | None = None) -> dict:
  workdir_lib.resolve_labels(config)  # a fine-tuning config sizes its head from the train split's labels
  setup = train.build(config)
  state = train.init_state(setup, config.train.seed)
  n_params = train.count_params(state.params)
  n_flops = flops_params(config, state.params)
  step_fn = train.compile_train_step(setup)
  rng = np.random.default_rng(config.train.seed)
  b, seq = config.train.batch_size, config.data.seq_len
  pool = []
  for _ in range(4):
    local = setup.task.dummy_batch(b, seq)
    tokens = rng.integers(0, config.model.vocab_size, size=(b, seq + 1), dtype=np.int32)
    if "inputs" in local:
      local["inputs"], local["targets"] = tokens[:, :-1], tokens[:, 1:]
    pool.append(train.global_batch(local, setup.batch_shardings))

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, pool[0]).compile()
  compile_s = time.perf_counter() - t0
  times, losses = [], []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, pool[i % len(pool)])
    loss = float(metrics["loss"])  # a full sync each step, as the peer does with loss.item()
    dt = time.perf_counter() - t0
    losses.append(loss)
    if i >= warmup:
      times.append(dt)
  med = statistics.median(times)
  tokens_per_s = b * seq / med
  peak = peak_gflops if peak_gflops else measure_peak_gflops()
  stats = jax.devices()[0].memory_stats() or {}  # accelerators report their allocator's peak; the CPU reports none
  return {
      "name": config.name,
      "tokens_per_s": round(tokens_per_s, 1),
      "step_ms": round(med * 1e3, 2),
      "mfu": round(6 * n_flops * tokens_per_s / (peak * 1e9), 4),
      "peak_gflops": round(peak, 1),
      "compile_s": round(compile_s, 2),
      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
      "params": n_params,
      "params_6n": n_flops,
      "peak_device_memory_gb": round(stats["peak_bytes_in_use"] / 2**30, 2) if "peak_bytes_in_use" in stats else None,
      "loss_first": round(losses[0], 4),
      "loss_last": round(losses[-1], 4),
      "losses": [round(x, 5) for x in losses],
      "timed_steps": len(times),
      "dtype": config.model.dtype,
      "attention": config.model.attention,
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # jaxlm/malloc_env.py
      "devices": jax.device_count(),
      "platform": jax.devices()[0].platform,
  }
