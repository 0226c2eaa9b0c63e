"""Input-pipeline throughput for `jaxlm bench --data`: the time to prepare the rows (with grain worker processes)
and the tokens per second the packed causal-LM path and the MLM path then deliver."""

from __future__ import annotations

import os
import tempfile
import time

import ml_collections

from jaxlm.data import builders, pipeline
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.tasks import make_task


def _time_batches(make_iterator, batches: int, count) -> dict:
  """Times preparing the rows (tokenising in the workers, packing), then `batches` batches after the first (which
  pays for any worker start-up); counts tokens with `count`."""
  t0 = time.perf_counter()
  iterator = make_iterator()
  prepare_s = time.perf_counter() - t0
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
          "fill": round(tokens / max(padded, 1), 4), "prepare_s": round(prepare_s, 2),
          "first_batch_s": round(first_s, 2), "batches": batches}


def _mlm_tokenizer(config, workdir: str, tokenizer):
  """The config's tokenizer when it has [CLS]/[SEP]/[MASK]; else one trained the same way with them added."""
  if min(tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id) >= 0:
    return tokenizer, "config"
  c = ml_collections.ConfigDict(config.to_dict())
  c.tokenizer.user_defined_symbols = tuple(c.tokenizer.user_defined_symbols) + ("[CLS]", "[SEP]", "[MASK]")
  c.tokenizer.path = os.path.join(workdir, "bench_mlm_spm.model")
  c.task.name = "lm"
  texts = builders.open_source(make_task(c).kind, c.data).texts()
  tokenizer_lib.train_tokenizer(c, workdir, texts)
  return tokenizer_lib.load_tokenizer(c, workdir), "trained with [CLS] [SEP] [MASK] added"


def _train_batches(c, tokenizer):
  task = make_task(c)
  records = builders.open_source(task.kind, c.data).split("train").records
  return pipeline.batches(task, records, tokenizer, "train", data_cfg=c.data, batch_size=c.train.batch_size,
                          seed=c.train.seed)


def _as_lm(config):
  """A copy of the config for the causal LM."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.task.name = "lm"
  return c


def _as_mlm(config):
  """A copy of the config for MLM+NSP rows, on a BERT-shaped model config of the same size."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.task.name = "mlm_nsp"
  c.model.family, c.model.scan_layers, c.model.num_kv_heads, c.model.head_dim = "encoder", False, 0, 0
  if c.model.attention == "blocked":  # causal blocks are for decoders; an encoder attends through XLA's path
    c.model.attention = "xla"
  return c


def bench_data(config, *, workdir: str, batches: int = 50, workers: int = 2) -> dict:
  """Seconds to prepare the train split's rows with `workers` grain worker processes, then tokens/s of its batches,
  through the packed causal-LM path and the MLM+NSP path, for the config's data, tokenizer, batch size and seq_len.
  Real (non-padding) tokens count."""
  tokenizer = tokenizer_lib.load_tokenizer(config, workdir)
  c = _as_lm(config)
  c.data.worker_count = workers
  lm = _time_batches(lambda: _train_batches(c, tokenizer), batches, lambda b: int(b["weights"].sum()))
  with tempfile.TemporaryDirectory() as tmp:
    mlm_tok, origin = _mlm_tokenizer(c, tmp, tokenizer)
    mlm = _time_batches(lambda: _train_batches(_as_mlm(c), mlm_tok), batches,
                        lambda b: int(b["attention_mask"].sum()))
  return {"name": config.name, "workers": workers, "batch_size": config.train.batch_size,
          "seq_len": config.data.seq_len, "source": config.data.source, "cpus": os.cpu_count(),
          "lm": lm, "mlm": dict(mlm, tokenizer=origin)}
