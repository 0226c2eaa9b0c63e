"""Input-pipeline throughput: tokens per second that the packed causal-LM path and the MLM path deliver, with grain
worker processes, for `jaxlm bench --data`."""

from __future__ import annotations

import os
import tempfile
import time

import ml_collections

from jaxlm.data import pipeline
from jaxlm.data import tokenizer as tokenizer_lib


def _time_batches(iterator, batches: int, count) -> dict:
  """Times `batches` batches after the first (which pays for worker start-up); counts tokens with `count`."""
  t0 = time.perf_counter()
  next(iterator)
  first_s = time.perf_counter() - t0
  tokens = padded = 0
  t0 = time.perf_counter()
  for _ in range(batches):
    batch = next(iterator)
    tokens += count(batch)
    padded += next(iter(batch.values())).size
  seconds = time.perf_counter() - t0
  iterator.close()  # stops worker processes now rather than at interpreter exit
  return {"tokens_per_s": round(tokens / seconds, 1), "slots_per_s": round(padded / seconds, 1),
          "fill": round(tokens / max(padded, 1), 4), "first_batch_s": round(first_s, 2), "batches": batches}


def _mlm_tokenizer(config, workdir: str, tokenizer):
  """The config's tokenizer when it has [CLS]/[SEP]/[MASK]; else one trained the same way with them added."""
  if min(tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id) >= 0:
    return tokenizer, "config"
  c = ml_collections.ConfigDict(config.to_dict())
  c.tokenizer.user_defined_symbols = tuple(c.tokenizer.user_defined_symbols) + ("[CLS]", "[SEP]", "[MASK]")
  c.tokenizer.path = os.path.join(workdir, "bench_mlm_spm.model")
  c.task.name = "lm"
  tokenizer_lib.train_tokenizer(c, workdir)
  return tokenizer_lib.load_tokenizer(c, workdir), "trained with [CLS] [SEP] [MASK] added"


def bench_data(config, *, workdir: str, batches: int = 50, workers: int = 2) -> dict:
  """Tokens/s of the train split through the packed causal-LM path and the MLM+NSP path with `workers` grain
  worker processes, for the config's data, tokenizer, batch size and seq_len. Real (non-padding) tokens count."""
  tokenizer = tokenizer_lib.load_tokenizer(config, workdir)
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.worker_count = workers
  c.task.name = "lm"
  lm = _time_batches(pipeline.lm_batches(c, tokenizer, "train"), batches, lambda b: int(b["weights"].sum()))
  with tempfile.TemporaryDirectory() as tmp:
    mlm_tok, origin = _mlm_tokenizer(c, tmp, tokenizer)
    c.task.name = "mlm_nsp"
    mlm = _time_batches(pipeline.task_batches(c, mlm_tok, "train"), batches,
                        lambda b: int(b["attention_mask"].sum()))
  return {"name": config.name, "workers": workers, "batch_size": config.train.batch_size,
          "seq_len": config.data.seq_len, "source": config.data.source, "cpus": os.cpu_count(),
          "lm": lm, "mlm": dict(mlm, tokenizer=origin)}
