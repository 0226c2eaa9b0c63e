"""`jaxlm predict`: a fine-tuned workdir's best (else latest) checkpoint applied to new inputs; the task reads the
input file and writes its predictions (TSV / CoNLL / JSON lines), one per input record."""

from __future__ import annotations

import contextlib
import sys

import jax

from jaxlm import run, train
from jaxlm.checkpoint import Checkpointer
from jaxlm.data import pipeline
from jaxlm.data.sources import DataError
from jaxlm.data.tokenizer import load_tokenizer

INPUT_FORMATS = ("auto", "lines", "conll", "squad")


class PredictError(DataError):
  """Input that predict cannot answer one for one."""


def predict(workdir: str, input_path: str, output_path: str | None = None, input_format: str = "auto",
            log=None) -> int:
  """Writes predictions for `input_path` to `output_path` (stdout if None); returns the number of records.

  The output format follows the output file's name: '.jsonl' gives JSON lines; otherwise the task's own text form
  (classification: 'label<TAB>text'; NER: CoNLL 'word<TAB>tag' with a blank line after each sentence).
  """
  if input_format not in INPUT_FORMATS:
    raise DataError(f"--input-format={input_format!r}: expected one of {', '.join(INPUT_FORMATS)}")
  config = run.read_config(workdir)
  setup = train.build(config)
  task = setup.task
  tokenizer = load_tokenizer(config, workdir)
  run.check_vocab(config, tokenizer)
  records = task.read_predict_input(input_path, input_format)
  if not records:
    raise PredictError(f"{input_path}: no input to predict for")
  ckpt = Checkpointer(workdir, config.checkpoint, read_only=True)
  _, params = run.restore_params(setup, ckpt)
  ckpt.close()

  predict_fn = jax.jit(task.predict)
  batches = pipeline.batches(task, records, tokenizer, "test", data_cfg=config.data, batch_size=config.train.batch_size,
                             seed=config.train.seed, process_index=jax.process_index(),
                             process_count=jax.process_count())
  pairs = []
  for local in batches:
    out = predict_fn(params, train.global_batch(local, setup.batch_shardings))
    pairs.append((local, jax.device_get(out)))

  jsonl = (output_path or "").endswith(".jsonl")
  with open(output_path, "w", encoding="utf-8") if output_path else contextlib.nullcontext(sys.stdout) as out:
    written = task.write_predictions(records, pairs, out, jsonl)
  if written != len(records):
    raise PredictError(f"{input_path}: {len(records)} records read but {written} predictions written")
  if log is not None:
    log(f"{len(records)} records read from {input_path}, {written} predictions written")
  return written
