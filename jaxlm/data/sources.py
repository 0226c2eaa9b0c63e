"""Where documents come from: local .txt/.jsonl files split into documents, and CPython's bundled documentation
text (the `pydoc` source, so a quick start needs no download)."""

from __future__ import annotations

import glob
import json
import os

import numpy as np


class DataError(ValueError):
  """Unusable input data; the message names the file, line and offending text where there is one."""


def _snippet(text: str, n: int = 80) -> str:
  text = text.rstrip("\r\n")
  return repr(text if len(text) <= n else text[:n] + "...")


def expand_globs(patterns: str, key: str) -> list[str]:
  """Comma-separated globs (or folders) -> sorted file list; a pattern matching nothing is an error naming `key`."""
  files = []
  for pattern in [p.strip() for p in patterns.split(",") if p.strip()]:
    if os.path.isdir(pattern):
      matched = sorted(p for ext in ("txt", "jsonl") for p in glob.glob(os.path.join(pattern, "**", f"*.{ext}"),
                                                                          recursive=True))
    else:
      matched = sorted(glob.glob(pattern, recursive=True))
    matched = [m for m in matched if os.path.isfile(m)]
    if not matched:
      raise DataError(f"{key}: {pattern!r} matches no files")
    files.extend(matched)
  if not files:
    raise DataError(f"{key} is empty: name the files to read (comma-separated globs)")
  return files


def split_documents(text: str, doc_split: str) -> list[str]:
  """One file's text -> documents. blank_lines: paragraphs separated by blank lines; lines: every non-blank line;
  file: the whole file."""
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  if doc_split == "file":
    return [text.strip()] if text.strip() else []
  if doc_split == "lines":
    return [line.strip() for line in text.split("\n") if line.strip()]
  if doc_split == "blank_lines":
    docs, current = [], []
    for line in text.split("\n"):
      if line.strip():
        current.append(line.rstrip())
      elif current:
        docs.append("\n".join(current))
        current = []
    if current:
      docs.append("\n".join(current))
    return docs
  raise DataError(f"data.doc_split={doc_split!r}: expected blank_lines, lines or file")


def read_jsonl(path: str, field: str) -> list[str]:
  """One document per JSON line, taken from `field`; blank lines are skipped."""
  docs = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}): {_snippet(line)}") from None
      if not isinstance(record, dict) or field not in record:
        raise DataError(f"{path}:{lineno}: no field {field!r} (data.jsonl_field): {_snippet(line)}")
      if not isinstance(record[field], str):
        raise DataError(f"{path}:{lineno}: field {field!r} is {type(record[field]).__name__}, not text: "
                        f"{_snippet(line)}")
      if record[field].strip():
        docs.append(record[field].strip())
  return docs


def read_text_files(files: list[str], doc_split: str, jsonl_field: str) -> list[str]:
  docs = []
  for path in files:
    if path.endswith(".jsonl"):
      docs.extend(read_jsonl(path, jsonl_field))
    else:
      try:
        with open(path, encoding="utf-8") as f:
          text = f.read()
      except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
      docs.extend(split_documents(text, doc_split))
  return docs


def pydoc_documents() -> list[str]:
  """CPython's documentation topics (pydoc_data), one document per topic, in a fixed order."""
  from pydoc_data.topics import topics
  return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


# The held-out eval documents do not depend on train.seed, so runs with different seeds are scored on the same text.
_HOLDOUT_SEED = 20240601


def holdout_split(docs: list[str], fraction: float, split: str) -> list[str]:
  """A deterministic held-out `fraction` of the documents (at least one) for eval; the rest for train."""
  if not 0.0 < fraction < 1.0:
    raise DataError(f"data.eval_fraction={fraction}: must be in (0, 1) when data.eval_files is empty")
  if len(docs) < 2:
    raise DataError(f"only {len(docs)} document(s): cannot hold out an eval split; set data.eval_files")
  n_eval = min(len(docs) - 1, max(1, round(fraction * len(docs))))
  held = np.zeros(len(docs), bool)
  held[np.random.default_rng(_HOLDOUT_SEED).permutation(len(docs))[:n_eval]] = True
  return [d for d, h in zip(docs, held) if h == (split == "eval")]


def text_documents(config, split: str) -> list[str]:
  """The documents of a split for data.source = text | pydoc. An empty split is an error."""
  d = config.data
  if split not in ("train", "eval"):
    raise DataError(f"unknown split {split!r}: expected train or eval")
  if d.source == "pydoc":
    docs = holdout_split(pydoc_documents(), d.eval_fraction, split)
    where = "pydoc topics"
  elif d.source == "text":
    if split == "eval" and d.eval_files:
      files = expand_globs(d.eval_files, "data.eval_files")
      docs = read_text_files(files, d.doc_split, d.jsonl_field)
    else:
      files = expand_globs(d.train_files, "data.train_files")
      docs = read_text_files(files, d.doc_split, d.jsonl_field)
      if not d.eval_files:
        docs = holdout_split(docs, d.eval_fraction, split)
    where = ", ".join(files[:3]) + (" ..." if len(files) > 3 else "")
  else:
    raise DataError(f"data.source={d.source!r} has no document reader for the causal-LM path")
  if not docs:
    raise DataError(f"the {split} split is empty (no documents in {where}, data.doc_split={d.doc_split!r})")
  return docs


def tokenizer_training_texts(config) -> list[str]:
  """The text a tokenizer is trained on: the train split of the config's source."""
  return text_documents(config, "train")
