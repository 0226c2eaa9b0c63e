"""Readers of local input files (text/jsonl documents, one text field of JSON records, also per split inside a zip,
CoNLL token/tag files, TSV/CSV classification rows, SQuAD JSON), each stopping at bad input with the file, line and
offending text; plus CPython's bundled documentation text (the `pydoc` source, so a quick start needs no download)."""

from __future__ import annotations

import bisect
import csv
import glob
import gzip
import json
import os
import re
import zipfile


class DataError(ValueError):
  """Unusable input data; the message names the file, line and offending text where there is one."""


def _snippet(text: str, n: int = 80) -> str:
  text = text.rstrip("\r\n")
  return repr(text if len(text) <= n else text[:n] + "...")


# Names a per-split member of an archive may have (SAMSum's zip: train.json, val.json, test.json); 'eval' is 'dev'.
SPLIT_MEMBERS = {"train": ("train",), "dev": ("dev", "val", "valid", "validation"), "test": ("test",)}
SPLIT_MEMBERS["eval"] = SPLIT_MEMBERS["dev"]


def clean(s: str) -> str:
  """One line of text: any whitespace run (tabs, no-break spaces, line breaks) becomes one space; ends stripped."""
  return " ".join(s.split())


def clean_lines(s: str) -> str:
  """Multi-line text (a dialogue): each line cleaned, blank lines dropped, joined by '\\n'. Splits \\r\\n and \\n
  alike (str.splitlines), so no '\\r' stays on a turn."""
  return "\n".join(c for c in (clean(line) for line in s.splitlines()) if c)


def decode_utf8(data: bytes, where: str) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise DataError(f"{where}:{line}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_bytes(path: str) -> bytes:
  """A file's bytes, gunzipped when it is gzip (by its magic number, whatever its name)."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except IsADirectoryError:
    raise DataError(f"{path} is a directory, not a file") from None
  if data[:2] == b"\x1f\x8b":
    try:
      return gzip.decompress(data)
    except (OSError, EOFError) as e:
      raise DataError(f"{path}: damaged gzip data ({e})") from None
  return data


def read_text(path: str) -> str:
  return decode_utf8(read_bytes(path), path)


def json_array_items(s: str, name: str) -> list[tuple[int, object]]:
  """(line, value) of each element of a JSON array, parsed one at a time so that each keeps the line it starts on."""
  decoder = json.JSONDecoder()
  newlines = [m.start() for m in re.finditer("\n", s)]

  def line_of(pos: int) -> int:
    return bisect.bisect_left(newlines, pos) + 1

  def skip(pos: int) -> int:
    while pos < len(s) and s[pos] in " \t\r\n":
      pos += 1
    return pos

  def fail(pos: int, why: str):
    raise DataError(f"{name}:{line_of(pos)}: {why}")

  pos = skip(1 if s.startswith("\ufeff") else 0)
  if pos >= len(s) or s[pos] != "[":
    fail(pos, "expected a JSON array of objects")
  pos = skip(pos + 1)
  items = []
  if pos < len(s) and s[pos] == "]":
    return items
  while True:
    try:
      value, end = decoder.raw_decode(s, pos)
    except json.JSONDecodeError as e:
      raise DataError(f"{name}:{e.lineno}: invalid JSON ({e.msg})") from None
    items.append((line_of(pos), value))
    pos = skip(end)
    if pos < len(s) and s[pos] == ",":
      pos = skip(pos + 1)
    elif pos < len(s) and s[pos] == "]":
      if skip(pos + 1) != len(s):
        fail(skip(pos + 1), "text after the JSON array")
      return items
    else:
      fail(pos, "expected ',' or ']' in the JSON array")


def member_stem(member: str) -> str:
  return os.path.basename(member).split(".")[0].lower()


def open_zip(path: str) -> zipfile.ZipFile:
  try:
    return zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise DataError(f"{path}: not a readable zip archive ({e})") from None


def split_json_members(names: list[str], split: str) -> tuple[list[str], tuple[str, ...]]:
  """The JSON / JSONL members of an archive named for `split` (SPLIT_MEMBERS), and the names it looked for."""
  wanted = SPLIT_MEMBERS.get(split or "", ())
  return [n for n in names if n.endswith((".json", ".jsonl")) and member_stem(n) in wanted], wanted


def jsonl_items(s: str, name: str) -> list[tuple[int, object, str]]:
  """(line number, value, line) of each non-blank line of JSONL text; lines split on '\n' only, a trailing '\r'
  dropped."""
  out = []
  for lineno, line in enumerate(s.split("\n"), 1):
    line = line.removesuffix("\r")
    if line.strip():
      try:
        out.append((lineno, json.loads(line), line))
      except json.JSONDecodeError as e:
        raise DataError(f"{name}:{lineno}: invalid JSON ({e.msg}): {_snippet(line)}") from None
  return out


def read_record_documents(path: str, field: str, split: str) -> list[str]:
  """One document per record, the text of its `field`, from a JSON array or JSONL file (gzip or not), or from the
  JSON / JSONL file for `split` inside a zip (SAMSum's train.json for the train split): the unlabelled side of a
  labelled set as pretraining text. Multi-line text keeps a line per turn (clean_lines); empty records are left out."""
  if path.lower().endswith(".zip"):
    with open_zip(path) as archive:
      names = [n for n in archive.namelist() if not n.endswith("/")]
      members, wanted = split_json_members(names, split)
      if len(members) != 1:
        raise DataError(f"{path}: holds {len(members)} JSON file(s) for the {split} split (named "
                        f"{', '.join(wanted) or '?'}), expected one. Its files: {', '.join(names)}")
      member = members[0]
      name = f"{path}:{member}"
      s = decode_utf8(archive.read(member), name)
  else:
    member, name, s = path.removesuffix(".gz"), path, read_text(path)
  docs = []
  if member.endswith(".jsonl"):
    items = [(line, record) for line, record, _ in jsonl_items(s, name)]
  else:
    items = json_array_items(s, name)
  for line, record in items:
    if not isinstance(record, dict) or field not in record:
      fields = ", ".join(record) if isinstance(record, dict) else f"a {type(record).__name__}, not an object"
      raise DataError(f"{name}:{line}: no field {field!r} (data.jsonl_field); its fields: {fields}")
    if not isinstance(record[field], str):
      raise DataError(f"{name}:{line}: field {field!r} is {type(record[field]).__name__}, not text")
    text = clean_lines(record[field])
    if text:
      docs.append(text)
  return docs


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


def read_lines(path: str) -> list[tuple[int, str]]:
  """(line number, text) of every non-blank line of a UTF-8 text file (any line ending), in order."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
  except IsADirectoryError:
    raise DataError(f"{path} is a directory, not a file") from None
  return [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def pydoc_documents() -> list[str]:
  """CPython's documentation topics (pydoc_data), one document per topic, in a fixed order."""
  from pydoc_data.topics import topics  # a 700 kB module: loaded only by runs that read it
  return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


# The held-out eval part does not depend on train.seed, so runs with different seeds are scored on the same data.
_HOLDOUT_SEED = 20240601


# ---- CoNLL token / tag files -----------------------------------------------------------------------------------

TAG_PREFIXES = {"iob1": ("B", "I"), "iob2": ("B", "I"), "bioes": ("B", "I", "E", "S")}


def _tag_parts(tag: str, scheme: str) -> tuple[str, str] | None:
  """'B-PER' -> ('B', 'PER'); 'O' -> ('O', ''); None when the tag does not belong to the scheme."""
  if tag == "O":
    return "O", ""
  prefix, sep, kind = tag.partition("-")
  if not sep or not kind or prefix not in TAG_PREFIXES[scheme]:
    return None
  return prefix, kind


def _scheme_violation(prev: tuple[str, str], cur: tuple[str, str], scheme: str) -> str | None:
  """Why `cur` cannot follow `prev` in `scheme` (prev is ('O', '') at a sentence start), or None."""
  (pp, pk), (cp, ck) = prev, cur
  if scheme == "iob2" and cp == "I" and not (pp in ("B", "I") and pk == ck):
    return "an I- tag must continue a B- or I- tag of the same type in IOB2 (is the file IOB1?)"
  if scheme == "iob1" and cp == "B" and not (pp in ("B", "I") and pk == ck):
    return "in IOB1 a B- tag only separates two adjacent entities of the same type (is the file IOB2?)"
  if scheme == "bioes":
    if cp in ("I", "E") and not (pp in ("B", "I") and pk == ck):
      return "an I-/E- tag must continue a B- or I- tag of the same type in BIOES"
    if pp in ("B", "I") and not (cp in ("I", "E") and pk == ck):
      return "a B-/I- tag must be followed by an I- or E- tag of the same type in BIOES"
  return None


def read_conll(path: str, *, tag_column: int, scheme: str, labels: tuple[str, ...] = ()) -> list[dict]:
  """Sentences of a CoNLL file: {'tokens', 'tags', 'line'}. Skips -DOCSTART- lines; every token line must have the
  column count of the first one; tags must belong to `scheme` (and to `labels` when given) and follow its rules."""
  if scheme not in TAG_PREFIXES:
    raise DataError(f"data.tag_scheme={scheme!r}: expected one of {', '.join(TAG_PREFIXES)}")
  known = set(labels)
  sentences, tokens, tags, tag_lines, start = [], [], [], [], 0
  n_columns = None

  def finish():
    if not tokens:
      return
    prev = ("O", "")
    for tag, lineno in zip(tags, tag_lines):
      cur = _tag_parts(tag, scheme)
      why = _scheme_violation(prev, cur, scheme)
      if why:
        raise DataError(f"{path}:{lineno}: tag {tag!r} after {'-'.join(p for p in prev if p)!r}: {why}")
      prev = cur
    why = _scheme_violation(prev, ("O", ""), scheme)
    if why:
      raise DataError(f"{path}:{tag_lines[-1]}: sentence ends on {tags[-1]!r}: {why}")
    sentences.append({"tokens": list(tokens), "tags": list(tags), "line": start})
    tokens.clear()
    tags.clear()
    tag_lines.clear()

  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      columns = line.split()
      if not columns:
        finish()
        continue
      if columns[0] == "-DOCSTART-":
        finish()
        continue
      if n_columns is None:
        n_columns = len(columns)
        if n_columns < 2:
          raise DataError(f"{path}:{lineno}: a CoNLL line needs a token and a tag column: {_snippet(line)}")
      if len(columns) != n_columns:
        raise DataError(f"{path}:{lineno}: {len(columns)} columns where the file has {n_columns}: {_snippet(line)}")
      tag = columns[tag_column]
      if _tag_parts(tag, scheme) is None or (known and tag not in known):
        where = "data.labels" if known else f"the {scheme.upper()} scheme (data.tag_scheme)"
        raise DataError(f"{path}:{lineno}: unknown tag {tag!r} (not in {where}): {_snippet(line)}")
      if not tokens:
        start = lineno
      tokens.append(columns[0])
      tags.append(tag)
      tag_lines.append(lineno)
  finish()
  return sentences


# ---- TSV / CSV classification rows -----------------------------------------------------------------------------

def _column(name: str, header: list[str] | None, key: str, path: str) -> int:
  if header is None:
    try:
      return int(name)
    except ValueError:
      raise DataError(f"{key}={name!r}: {path} has no header (data.tsv_header=False), so name columns by "
                      "0-based index") from None
  if name not in header:
    raise DataError(f"{key}={name!r}: no such column in {path}; its header is {header}")
  return header.index(name)


def read_tsv(path: str, *, text_fields: str, label_field: str, header: bool, delimiter: str) -> list[dict]:
  """Rows of a TSV/CSV file: {'text_a', 'text_b', 'label', 'line'}; text_b is '' for single sentences."""
  names = [n.strip() for n in text_fields.split(",") if n.strip()]
  if len(names) not in (1, 2):
    raise DataError(f"data.text_fields={text_fields!r}: name one column (a sentence) or two (a sentence pair)")
  rows = []
  with open(path, encoding="utf-8", newline="") as f:
    # GLUE's TSVs are unquoted (a '"' is part of the text); CSV files use standard quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
    columns = None
    for row in reader:
      lineno = reader.line_num
      if not any(cell.strip() for cell in row):
        continue
      if header and columns is None:
        columns = [c.strip() for c in row]
        text_cols = [_column(n, columns, "data.text_fields", path) for n in names]
        label_col = _column(label_field, columns, "data.label_field", path)
        continue
      if columns is None and not header:
        columns = []
        text_cols = [_column(n, None, "data.text_fields", path) for n in names]
        label_col = _column(label_field, None, "data.label_field", path)
      line = delimiter.join(row)
      if label_col >= len(row) or not row[label_col].strip():
        raise DataError(f"{path}:{lineno}: row without a label (column {label_field!r}): {_snippet(line)}")
      if max(text_cols) >= len(row):
        raise DataError(f"{path}:{lineno}: row has {len(row)} columns, text column {max(text_cols)} is missing: "
                        f"{_snippet(line)}")
      texts = [row[c].strip() for c in text_cols]
      rows.append({"text_a": texts[0], "text_b": texts[1] if len(texts) > 1 else "", "label": row[label_col].strip(),
                   "line": lineno})
  return rows


# ---- SQuAD-style JSON ------------------------------------------------------------------------------------------

def read_squad(path: str) -> list[dict]:
  """Questions of a SQuAD v1/v2 JSON file: {'id', 'title', 'context', 'question', 'answers', 'answer_starts'}.
  An unanswerable (v2) question has no answers."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    lines = text.splitlines()
    line = lines[e.lineno - 1] if e.lineno <= len(lines) else ""  # an error at the very end is past the last line
    raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno}): {_snippet(line)}") from None
  if not isinstance(data, dict) or not isinstance(data.get("data"), list):
    raise DataError(f"{path}: not SQuAD JSON: expected {{'data': [articles]}} at the top level")
  examples = []
  for article in data["data"]:
    for paragraph in article.get("paragraphs", []):
      context = paragraph.get("context")
      if not isinstance(context, str):
        raise DataError(f"{path}: a paragraph of {article.get('title', '?')!r} has no 'context' string")
      for qa in paragraph.get("qas", []):
        qid = str(qa.get("id", ""))
        if not isinstance(qa.get("question"), str):
          raise DataError(f"{path}: question {qid!r} has no 'question' string")
        answers, starts = [], []
        if not qa.get("is_impossible", False):
          for answer in qa.get("answers", []):
            start, answer_text = answer.get("answer_start"), answer.get("text")
            if not isinstance(start, int) or not isinstance(answer_text, str):
              raise DataError(f"{path}: question {qid!r}: an answer needs 'text' and an integer 'answer_start': "
                              f"{_snippet(json.dumps(answer))}")
            if context[start:start + len(answer_text)] != answer_text:
              raise DataError(f"{path}: question {qid!r}: answer {answer_text!r} is not at character {start} of "
                              f"its context (found {context[start:start + len(answer_text)]!r})")
            answers.append(answer_text)
            starts.append(start)
        examples.append({"id": qid, "title": str(article.get("title", "")), "context": context,
                         "question": qa["question"].strip(), "answers": answers, "answer_starts": starts})
  return examples
