"""Relation classification data: SemEval-2010 Task 8 tagged sentences (and a JSONL variant) read into records with
the character spans of the two arguments, a fixed stratified dev split, and entity-marker encoding for BERT encoders."""

from __future__ import annotations

import dataclasses
import json
import re
import zlib
from collections.abc import Sequence

import grain
import numpy as np

from jaxlm.data import encoder_inputs
from jaxlm.data.example_packing import Layout
from jaxlm.data.sources import DataError, _snippet

SEMEVAL_RELATIONS = ("Cause-Effect", "Component-Whole", "Content-Container", "Entity-Destination", "Entity-Origin",
                     "Instrument-Agency", "Member-Collection", "Message-Topic", "Product-Producer")
# 'Other' first (id 0), then each relation in both directions: the 19 labels of the task.
SEMEVAL_LABELS = ("Other",) + tuple(f"{r}({d})" for r in SEMEVAL_RELATIONS for d in ("e1,e2", "e2,e1"))

# The dev split does not depend on train.seed, so runs with different seeds are compared on the same examples.
DEV_SEED = 20100308

_EXAMPLE_LINE = re.compile(r"(\d+)\t(.*)")  # 'ID<TAB>"sentence"'
# A label: a name without whitespace or parentheses, optionally directed: 'Cause-Effect(e2,e1)', 'Other'.
_LABEL = re.compile(r"[^\s()]+(\((e1,e2|e2,e1)\))?")
_TAG = re.compile(r"</?e[12]>")
_TAG_LIKE = re.compile(r"<\s*/?\s*[eE]\s*\d+\s*>")  # '<E1>', '< e1>', '<e3>': almost-tags that would pass as text


# ---- reading -----------------------------------------------------------------------------------------------------

def untag(sentence: str) -> tuple[str, tuple[int, int], tuple[int, int]]:
  """'... <e1>x</e1> ... <e2>y</e2> ...' -> (text without the tags, e1 span, e2 span) as [start, end) character
  offsets into that text. Spans exclude whitespace just inside the tags. ValueError says what is wrong."""
  for m in _TAG_LIKE.finditer(sentence):
    if not _TAG.fullmatch(m.group()):
      raise ValueError(f"malformed entity tag {m.group()!r} (the tags are <e1> </e1> <e2> </e2>)")
  tags = list(_TAG.finditer(sentence))
  names = [m.group() for m in tags]
  for tag in ("<e1>", "</e1>", "<e2>", "</e2>"):
    if names.count(tag) != 1:
      raise ValueError(f"{'no' if tag not in names else names.count(tag)} {tag} tag"
                       f"{'' if tag not in names else 's'}: each of <e1> </e1> <e2> </e2> must appear exactly once")
  if names not in (["<e1>", "</e1>", "<e2>", "</e2>"], ["<e2>", "</e2>", "<e1>", "</e1>"]):
    raise ValueError(f"entity tags nested, overlapping or closed before opened: {' '.join(names)}")
  pieces, spans, pos, n = [], {}, 0, 0
  for m in tags:
    pieces.append(sentence[pos:m.start()])
    n += m.start() - pos
    pos = m.end()
    spans.setdefault(m.group()[-3:-1], []).append(n)  # 'e1' -> [start, end]
  pieces.append(sentence[pos:])
  text = "".join(pieces)
  out = []
  for name in ("e1", "e2"):
    start, end = spans[name]
    inner = text[start:end]
    if not inner.strip():
      raise ValueError(f"entity <{name}> is empty")
    start += len(inner) - len(inner.lstrip())
    end -= len(inner) - len(inner.rstrip())
    out.append((start, end))
  return text, out[0], out[1]


def check_label(label: str, labels: Sequence[str] | None) -> str | None:
  """Why `label` is unusable (not Name, Name(e1,e2) or Name(e2,e1); or not in `labels` when given), or None."""
  if not _LABEL.fullmatch(label):
    return "a label is a name without spaces or parentheses, optionally followed by (e1,e2) or (e2,e1)"
  if labels is not None and label not in labels:
    return f"not a known label ({', '.join(labels)})"
  return None


def _read_text(path: str) -> str:
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    lineno = raw[:e.start].count(b"\n") + 1
    raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start}: {e.reason})") from None
  return text.removeprefix("\ufeff")


def _record(path: str, lineno: int, line: str, rid: str, sentence: str, label: str, seen: dict) -> dict:
  if rid in seen:
    raise DataError(f"{path}:{lineno}: example id {rid} already used on line {seen[rid]}: {_snippet(line)}")
  seen[rid] = lineno
  try:
    text, e1, e2 = untag(sentence)
  except ValueError as e:
    raise DataError(f"{path}:{lineno}: {e}: {_snippet(line)}") from None
  return {"id": rid, "text": text, "e1": e1, "e2": e2, "label": label, "line": lineno}


def _read_tagged(path: str, labels) -> list[dict]:
  """SemEval-2010 Task 8 layout: 'ID<TAB>"sentence"', the label, optional 'Comment:' lines, a blank line."""
  lines = [line.rstrip("\r") for line in _read_text(path).split("\n")]
  records, seen, i = [], {}, 0
  while i < len(lines):
    line = lines[i]
    if not line.strip():
      i += 1
      continue
    m = _EXAMPLE_LINE.fullmatch(line)
    if not m:
      raise DataError(f"{path}:{i + 1}: expected an example line 'ID<TAB>\"sentence with <e1>..</e1> and "
                      f"<e2>..</e2>\"': {_snippet(line)}")
    rid, sentence = m.group(1), m.group(2).strip()
    # The quotes around the sentence are not escaped inside it ('"... "Deep Impact", ..."'): strip only the outer pair.
    if len(sentence) >= 2 and sentence[0] == sentence[-1] == '"':
      sentence = sentence[1:-1]
    nxt = lines[i + 1] if i + 1 < len(lines) else ""
    if not nxt.strip() or _EXAMPLE_LINE.fullmatch(nxt) or nxt.startswith("Comment"):
      raise DataError(f"{path}:{i + 1}: example {rid} has no label line after it (truncated example?): "
                      f"{_snippet(line)}")
    label = nxt.strip()
    why = check_label(label, labels)
    if why:
      raise DataError(f"{path}:{i + 2}: label {label!r} of example {rid}: {why}")
    records.append(_record(path, i + 1, line, rid, sentence, label, seen))
    i += 2
    while i < len(lines) and lines[i].strip() and not _EXAMPLE_LINE.fullmatch(lines[i]):
      if not lines[i].startswith("Comment"):
        raise DataError(f"{path}:{i + 1}: unexpected line after the label of example {rid} (expected 'Comment: ...' "
                        f"or a blank line): {_snippet(lines[i])}")
      i += 1
  return records


def _read_jsonl(path: str, labels) -> list[dict]:
  """One {"text": "... <e1>..</e1> ... <e2>..</e2> ...", "label": "...", "id": optional} object a line."""
  records, seen = [], {}
  for lineno, line in enumerate(_read_text(path).split("\n"), 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}): {_snippet(line)}") from None
    if not isinstance(obj, dict):
      raise DataError(f"{path}:{lineno}: expected a JSON object {{\"text\": ..., \"label\": ...}}: {_snippet(line)}")
    for key in ("text", "label"):
      if not isinstance(obj.get(key), str):
        what = "no field" if key not in obj else f"{type(obj[key]).__name__} field, not text:"
        raise DataError(f"{path}:{lineno}: {what} {key!r}: {_snippet(line)}")
    rid = obj.get("id", lineno)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
      raise DataError(f"{path}:{lineno}: 'id' must be a string or an integer: {_snippet(line)}")
    label = obj["label"].strip()
    why = check_label(label, labels)
    if why:
      raise DataError(f"{path}:{lineno}: label {label!r}: {why}")
    records.append(_record(path, lineno, line, str(rid), obj["text"], label, seen))
  return records


def read_semeval(path: str, labels: Sequence[str] | None = None) -> list[dict]:
  """Examples of a SemEval-2010 Task 8 file (or of a .jsonl file of tagged sentences): {'id', 'text', 'e1', 'e2',
  'label', 'line'}, with 'e1'/'e2' the (start, end) character spans of the arguments in the untagged text.

  Labels must have the shape Name, Name(e1,e2) or Name(e2,e1), and belong to `labels` when given (SEMEVAL_LABELS for
  the task's own files). A .jsonl file without 'id' fields numbers its examples by line.
  """
  labels = tuple(labels) if labels is not None else None
  return _read_jsonl(path, labels) if path.endswith(".jsonl") else _read_tagged(path, labels)


# ---- dev split ---------------------------------------------------------------------------------------------------

def dev_split_indices(labels: Sequence[str], dev: float, seed: int = DEV_SEED) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, dev indices), each ascending, for examples with these labels.

  `dev` is a fraction in (0, 1) (a float) or a number of examples (an int). Stratified: each label gives its share of the dev set
  (largest remainders round the shares to whole examples), drawn by a generator seeded from `seed` and the label
  name, so a label's choice does not move when other labels are added or removed.
  """
  n = len(labels)
  if isinstance(dev, bool) or not isinstance(dev, (int, float)):
    raise TypeError(f"dev={dev!r}: a fraction in (0, 1) or a number of examples")
  size = round(dev * n) if isinstance(dev, float) else dev
  if isinstance(dev, float) and not 0.0 < dev < 1.0:
    raise ValueError(f"dev={dev}: a fraction must be in (0, 1)")
  if not 0 < size < n:
    raise ValueError(f"dev={dev!r} gives {size} of {n} examples: the dev and train parts must both be non-empty")
  by_label: dict[str, list[int]] = {}
  for i, label in enumerate(labels):
    by_label.setdefault(label, []).append(i)
  names = sorted(by_label)
  exact = np.array([size * len(by_label[k]) / n for k in names])
  quota = np.floor(exact).astype(int)
  # the examples still missing go to the largest fractional parts; ties by label name (stable sort)
  for j in np.argsort(-(exact - quota), kind="stable")[:size - int(quota.sum())]:
    quota[j] += 1
  held = np.zeros(n, bool)
  for name, q in zip(names, quota):
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    held[rng.permutation(np.array(by_label[name]))[:q]] = True
  return np.flatnonzero(~held), np.flatnonzero(held)


def dev_split(records: Sequence[dict], dev: float, seed: int = DEV_SEED) -> tuple[list[dict], list[dict]]:
  """(train records, dev records), each in file order: a fixed stratified dev part carved out of the train records."""
  train_idx, dev_idx = dev_split_indices([r["label"] for r in records], dev, seed)
  return [records[i] for i in train_idx], [records[i] for i in dev_idx]


# ---- entity markers ----------------------------------------------------------------------------------------------

MARKER_NAMES = ("[E1]", "[/E1]", "[E2]", "[/E2]")
# BERT vocabularies reserve [unused0].. slots for new tokens (all-MiniLM-L6-v2 has [unused0]..[unused993]). Using
# them keeps the embedding table, the checkpoint shapes and an exported model's vocab.txt unchanged, so the markers
# are the reserved slots whenever the vocabulary has them. A vocabulary without them (a sentencepiece model trained
# here) gets the markers appended after its last id, and the model's embedding table grows by `new_pieces`.
_RESERVED = tuple(f"[unused{i}]" for i in range(4))
_TAG_TEXT = ("<e1>", "</e1>", "<e2>", "</e2>")  # what each marker stands for in the tagged sentence


@dataclasses.dataclass(frozen=True)
class EntityMarkers:
  """Vocabulary ids of the four markers and what a task needs to give them embeddings."""
  ids: tuple[int, int, int, int]  # [E1] [/E1] [E2] [/E2]
  pieces: tuple[str, ...]  # the vocabulary piece each marker uses
  new_pieces: tuple[str, ...]  # pieces appended after the tokenizer's vocabulary (ids vocab_size - len(new_pieces)..)
  vocab_size: int  # rows the embedding table needs: the tokenizer's vocabulary plus new_pieces
  # Per marker, ids whose mean embedding is a sensible start for its row (the pieces of '<e1>', '</e1>', ...); a
  # pre-trained BERT never saw its reserved slots as input, so their rows deserve the same start as new ones.
  init_ids: tuple[tuple[int, ...], ...]


def entity_markers(tokenizer) -> EntityMarkers:
  """The markers of `tokenizer`'s vocabulary: pieces named [E1] [/E1] [E2] [/E2] if it has them (an exported model),
  else [unused0]..[unused3], else four new pieces appended to it."""
  def has(piece):
    return tokenizer.piece_to_id(piece) != tokenizer.unk_id

  init_ids = tuple(tuple(tokenizer.encode(t)) for t in _TAG_TEXT)
  for pieces in (MARKER_NAMES, _RESERVED):
    if all(has(p) for p in pieces):
      ids = tuple(tokenizer.piece_to_id(p) for p in pieces)
      return EntityMarkers(ids, pieces, (), tokenizer.vocab_size, init_ids)
  n = tokenizer.vocab_size
  return EntityMarkers(tuple(range(n, n + 4)), MARKER_NAMES, MARKER_NAMES, n + 4, init_ids)


@dataclasses.dataclass(frozen=True)
class MarkedTokens:
  """A sentence's token ids with the markers in place (no [CLS]/[SEP]), the positions of the [E1] and [E2] markers,
  and which truncation rule had to cut it: '' (none), 'context', 'middle' or 'entities'."""
  ids: list[int]
  e1_start: int
  e2_start: int
  cut: str


def _fit(left, a, mid, b, right, budget: int):
  """Cuts the five segments (outer context, first argument, middle, second argument, outer context) so that they and
  the four markers fit in `budget` tokens. The markers always stay:
  1. outer context goes first, farthest from the arguments first, alternating sides (the left keeps the odd token);
  2. when both arguments and the middle still do not fit, the middle loses its centre (the tokens farthest from
     both arguments), keeping its ends beside each argument (the first argument's side keeps the odd token);
  3. when the two arguments alone do not fit, the longer one loses its last piece, one at a time.
  """
  core = 4 + len(a) + len(mid) + len(b)
  if core + len(left) + len(right) <= budget:
    return left, a, mid, b, right, ""
  if core <= budget:
    room = budget - core
    keep_right = min(len(right), room // 2)
    keep_left = min(len(left), room - keep_right)
    keep_right = min(len(right), room - keep_left)
    return left[len(left) - keep_left:], a, mid, b, right[:keep_right], "context"
  keep_mid = len(mid) - (core - budget)
  if keep_mid >= 0:
    head = (keep_mid + 1) // 2
    return [], a, mid[:head] + mid[len(mid) - (keep_mid - head):], b, [], "middle"
  a, b = list(a), list(b)
  while 4 + len(a) + len(b) > budget:
    (a if len(a) >= len(b) else b).pop()
  return [], a, [], b, [], "entities"


def mark_entities(text: str, e1: tuple[int, int], e2: tuple[int, int], tokenizer, markers: EntityMarkers,
                  max_tokens: int) -> MarkedTokens:
  """Token ids of `text` with [E1] x [/E1] and [E2] y [/E2] around the two arguments, cut to `max_tokens` (see _fit).

  The five stretches of text are tokenized apart, so an argument boundary inside a word splits the word, as a
  Hugging Face tokenizer does around added special tokens. max_tokens must leave room for the markers and one piece
  of each argument (6).
  """
  if max_tokens < 6:
    raise ValueError(f"max_tokens={max_tokens}: the four entity markers and one piece of each argument need 6")
  if e1[0] < e2[0]:
    (s1, t1), (s2, t2), first = e1, e2, 1
  else:
    (s1, t1), (s2, t2), first = e2, e1, 2
  if not 0 <= s1 < t1 <= s2 < t2 <= len(text):
    raise ValueError(f"argument spans {e1} and {e2} overlap or lie outside a text of {len(text)} characters")
  enc = tokenizer.encode
  left, a, mid, b, right, cut = _fit(enc(text[:s1]), enc(text[s1:t1]), enc(text[t1:s2]), enc(text[s2:t2]),
                                     enc(text[t2:]), max_tokens)
  o1, c1, o2, c2 = markers.ids
  (oa, ca), (ob, cb) = ((o1, c1), (o2, c2)) if first == 1 else ((o2, c2), (o1, c1))
  ids = left + [oa] + a + [ca] + mid + [ob] + b + [cb] + right
  pos_a, pos_b = len(left), len(left) + len(a) + len(mid) + 2
  e1_start, e2_start = (pos_a, pos_b) if first == 1 else (pos_b, pos_a)
  return MarkedTokens(ids, e1_start, e2_start, cut)


def encode_relation(record: dict, tokenizer, markers: EntityMarkers, seq_len: int) -> dict[str, np.ndarray]:
  """A record -> encoder inputs [seq_len] ([CLS] marked sentence [SEP]) and e1_start / e2_start [] (positions of
  the [E1] and [E2] markers in the row)."""
  marked = mark_entities(record["text"], record["e1"], record["e2"], tokenizer, markers, seq_len - 2)
  out = encoder_inputs.encode_pair(marked.ids, None, seq_len, tokenizer)
  out["e1_start"] = np.int32(marked.e1_start + 1)  # +1: [CLS]
  out["e2_start"] = np.int32(marked.e2_start + 1)
  return out


@dataclasses.dataclass
class EncodeRelation(grain.transforms.Map):
  """An (example index, record) pair -> encoder inputs [L], e1_start, e2_start, labels, example_weights and
  example_ids [] (the index, to map predictions back to record ids)."""
  tokenizer: object
  seq_len: int
  label_ids: dict
  markers: EntityMarkers

  def map(self, item) -> dict[str, np.ndarray]:
    index, record = item
    if record["label"] not in self.label_ids:
      raise DataError(f"example {record['id']} (line {record['line']}): unknown label {record['label']!r}; known "
                      f"labels: {', '.join(self.label_ids)}")
    out = encode_relation(record, self.tokenizer, self.markers, self.seq_len)
    out.update(labels=np.int32(self.label_ids[record["label"]]), example_weights=np.float32(1.0),
               example_ids=np.int32(index))
    return out


# EncodeRelation's rows for data.pack_examples: the marker positions move with their example
LAYOUT = Layout(token_keys=("input_ids", "token_type_ids", "attention_mask"),
                example_keys=("e1_start", "e2_start", "labels", "example_weights", "example_ids"),
                offset_keys=("e1_start", "e2_start"))
