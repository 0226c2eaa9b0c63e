"""`jaxlm predict`: a fine-tuned workdir's best (else latest) checkpoint applied to new inputs; the task reads the
input file and writes its predictions (TSV / CoNLL / JSON lines), one per input record."""

from __future__ import annotations

import io
import os
import sys

import jax

from jaxlm import evaluation, train
from jaxlm import workdir as workdir_lib
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
  (classification: 'label<TAB>text'; NER: CoNLL 'word<TAB>tag' with a blank line after each sentence). Nothing is
  written unless there is one prediction per input record; `log` gets the count of records in and predictions out.
  """
  if input_format not in INPUT_FORMATS:
    raise DataError(f"--input-format={input_format!r}: expected one of {', '.join(INPUT_FORMATS)}")
  if output_path:
    _check_writable(output_path)
  config = workdir_lib.read_config(workdir)
  setup = train.build(config)
  task = setup.task
  tokenizer = load_tokenizer(config, workdir)
  workdir_lib.check_vocab(config, tokenizer)
  records = task.read_predict_input(input_path, input_format)
  if not records:
    raise PredictError(f"{input_path}: no input to predict for")
  ckpt = Checkpointer(workdir, config.checkpoint, read_only=True)
  _, params = evaluation.restore_params(setup, ckpt, tokenizer=tokenizer)
  ckpt.close()

  predict_fn = jax.jit(task.predict)
  batches = pipeline.batches(task, records, tokenizer, "test", data_cfg=config.data, batch_size=config.train.batch_size,
                             seed=config.train.seed, local_rows=setup.local_rows)
  pairs = []
  for local in batches:
    out = predict_fn(params, evaluation.local_batch(setup, local))
    pairs.append((local, jax.device_get(out)))

  jsonl = (output_path or "").endswith(".jsonl")
  out = io.StringIO()  # written out only once every record has its prediction
  written = task.write_predictions(records, pairs, out, jsonl)
  blank = _blank_lines(input_path)
  skipped = f" ({blank} blank line{'s' if blank != 1 else ''} skipped)" if blank else ""
  if written != len(records):
    raise PredictError(f"{input_path}: {len(records)} records read{skipped} but {written} predictions made; nothing "
                       "written")
  if output_path:
    tmp = output_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(out.getvalue())
    os.replace(tmp, output_path)
  else:
    sys.stdout.write(out.getvalue())
    sys.stdout.flush()
  if log is not None:
    log(f"predict: {len(records)} records read from {input_path}{skipped}, {written} predictions written to "
        f"{output_path or 'stdout'}")
  return written


def _blank_lines(path: str) -> int:
  """Blank lines of the input: no record comes from them, and the count statement says so."""
  with open(path, encoding="utf-8", errors="replace") as f:
    return sum(1 for line in f if not line.strip())


def _check_writable(output_path: str) -> None:
  """The output's folder exists and can be written, and the output is not a folder: checked before any work."""
  folder = os.path.dirname(os.path.abspath(output_path))
  if os.path.isdir(output_path):
    raise PredictError(f"--output {output_path} is a directory")
  if not os.path.isdir(folder):
    raise PredictError(f"--output {output_path}: {folder} is not a directory")
  if not os.access(folder, os.W_OK) or (os.path.exists(output_path) and not os.access(output_path, os.W_OK)):
    raise PredictError(f"--output {output_path} is not writable")
