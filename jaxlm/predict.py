"""`jaxlm predict`: a fine-tuned workdir's best (else latest) checkpoint applied to new text — a label per sentence,
typed entity spans per sentence, or an answer per question — written as TSV / CoNLL / JSON lines."""

from __future__ import annotations

import contextlib
import json
import sys

import jax
import numpy as np

from jaxlm.data import classification, ner, qa, sources

INPUT_FORMATS = ("auto", "lines", "conll", "squad")


def read_input(task_name: str, path: str, input_format: str = "auto") -> list[dict]:
  """The input file -> records the task's encoders take (with a placeholder gold label, never read)."""
  if input_format not in INPUT_FORMATS:
    raise sources.DataError(f"--input-format={input_format!r}: expected one of {', '.join(INPUT_FORMATS)}")
  if task_name == "qa" or input_format == "squad":
    return sources.read_squad(path)
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  if task_name == "classification":
    records = []
    for line in lines:
      if line.strip():
        # a tab separates the two sentences of a pair
        a, _, b = line.partition("\t")
        records.append({"text_a": a.strip(), "text_b": b.strip(), "label": ""})
    return records
  if task_name != "ner":
    raise sources.DataError(f"task.name={task_name!r} has no predictions; predict knows classification, ner and qa")
  # CoNLL marks sentences with blank lines (and documents with -DOCSTART-); plain text has one sentence per line
  conll = input_format == "conll" or (input_format == "auto" and any(
      not line.strip() or line.startswith("-DOCSTART-") for line in lines))
  sentences = []
  if conll:
    words = []
    for line in lines + [""]:
      if line.startswith("-DOCSTART-"):
        continue
      if line.strip():
        words.append(line.split()[0])  # the word; tag columns, if any, are ignored
      elif words:
        sentences.append(words)
        words = []
  else:
    sentences = [line.split() for line in lines if line.strip()]
  return [{"tokens": s, "tags": ["O"] * len(s)} for s in sentences]


def _rows(task, config, tokenizer, records) -> tuple[list[dict], dict]:
  """Encoded rows (one per sentence, or per window for QA) and the values that fill a partial batch."""
  seq_len = config.data.seq_len
  pad_values = {"input_ids": tokenizer.pad_id}
  if task.name == "classification":
    encode = classification.EncodeClassification(tokenizer, seq_len, {"": 0})
    return [encode.map(r) for r in records], {**pad_values, "example_weights": 0}
  if task.name == "ner":
    align = ner.AlignTags(tokenizer, seq_len, {"O": 0})
    return [align.map((i, r)) for i, r in enumerate(records)], {**pad_values, **ner.PAD_VALUES}
  windows = qa.QAWindows(tokenizer, seq_len, config.data.doc_stride, config.data.max_query_length)
  return [w for i, r in enumerate(records) for w in windows.flat_map((i, r))], {**pad_values, **qa.PAD_VALUES}


def _batches(rows: list[dict], batch_size: int, pad_values: dict):
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    while len(chunk) < batch_size:
      chunk = chunk + [{k: np.full_like(v, pad_values.get(k, 0)) for k, v in rows[0].items()}]
    yield {k: np.stack([r[k] for r in chunk]) for k in rows[0]}


def predict(workdir: str, input_path: str, output_path: str | None = None, input_format: str = "auto") -> int:
  """Writes predictions for `input_path` to `output_path` (stdout if None); returns the number of records.

  The output format follows the output file's name: '.jsonl' gives JSON lines; otherwise classification writes
  'label<TAB>text' lines and NER CoNLL ('word<TAB>tag', a blank line after each sentence). QA always writes JSON lines.
  """
  from jaxlm import train
  from jaxlm.checkpoint import Checkpointer
  from jaxlm.data.tokenizer import load_tokenizer

  config = train.read_config(workdir)
  setup = train.build(config)
  task = setup.task
  if task.name not in ("classification", "ner", "qa"):
    raise sources.DataError(f"{workdir} trained task.name={task.name!r}; predict knows classification, ner and qa")
  tokenizer = load_tokenizer(config, workdir)
  train.check_vocab(config, tokenizer)
  ckpt = Checkpointer(workdir, config.checkpoint, read_only=True)
  step = train.best_or_latest_step(ckpt, config)
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: run `jaxlm train` first")
  step, params = ckpt.restore_params_falling_back(step, train.abstract_state(setup).params)
  ckpt.close()

  records = read_input(task.name, input_path, input_format)
  if not records:
    raise sources.DataError(f"{input_path}: no input to predict for")
  rows, pad_values = _rows(task, config, tokenizer, records)
  pairs = []
  for local in _batches(rows, config.train.batch_size // jax.process_count(), pad_values):
    batch = train.global_batch(local, setup.batch_shardings)
    pairs.append((local, jax.device_get(task.predict_fn(params, batch))))

  jsonl = (output_path or "").endswith(".jsonl")
  with open(output_path, "w", encoding="utf-8") if output_path else contextlib.nullcontext(sys.stdout) as out:
    if task.name == "classification":
      predicted = np.concatenate([o["labels"][np.asarray(b["example_weights"]) > 0] for b, o in pairs])
      probs = np.concatenate([o["probs"][np.asarray(b["example_weights"]) > 0] for b, o in pairs])
      for record, label, p in zip(records, predicted, probs):
        name = task.labels[int(label)]
        text = record["text_a"] + ("\t" + record["text_b"] if record["text_b"] else "")
        if jsonl:
          out.write(json.dumps({"text": text, "label": name, "probability": round(float(p[int(label)]), 6)}) + "\n")
        else:
          out.write(f"{name}\t{text}\n")
    elif task.name == "ner":
      tags = {}
      for b, o in pairs:
        tags.update(ner.predictions_to_tags(b, np.asarray(o["tags"]), task.labels))
      for i, record in enumerate(records):
        words, sentence_tags = record["tokens"], tags[i]
        if jsonl:
          spans = [{"type": t, "start": s, "end": e + 1, "text": " ".join(words[s:e + 1])}
                   for t, s, e in task.entities(sentence_tags)]
          out.write(json.dumps({"tokens": words, "tags": sentence_tags, "entities": spans}) + "\n")
        else:
          out.writelines(f"{w}\t{t}\n" for w, t in zip(words, sentence_tags))
          out.write("\n")
    else:
      task.set_examples(records)
      answers = task.answers(pairs)
      for i, record in enumerate(records):
        out.write(json.dumps({"id": record["id"], "question": record["question"], "answer": answers.get(i, "")})
                  + "\n")
  return len(records)
