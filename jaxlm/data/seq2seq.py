"""Sequence-to-sequence pairs {'source', 'target', 'where'}: readers of line-aligned file pairs (gzip read as it is),
JSON / JSONL / TSV / CSV with named fields, DailyDialog's `__eou__` dialogues and per-split JSON inside zip archives
(read in place), and the encoder-decoder rows a seq2seq task trains on (one pair a row, or first-fit packed)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import sys

import grain
import numpy as np
import tensorflow_datasets as tfds

from jaxlm.data.records import RecordKind, text
from jaxlm.data.sources import (
  DataError,
  _snippet,
  clean,
  clean_lines,
  decode_utf8,
  json_array_items,
  jsonl_items,
  open_zip,
  read_text,
  split_json_members,
)
from jaxlm.data.tokenizer import speaker_tag

_TEXT = tfds.features.Text()


def has_text(s: str) -> bool:
  """A side with a letter or digit: Multi30k's German lines that hold only '@@' have none."""
  return any(ch.isalnum() for ch in s)


# ---- reading --------------------------------------------------------------------------------------------------


def text_lines(s: str) -> list[str]:
  """Lines split on '\\n' only (a trailing '\\r' dropped): str.splitlines would also split on U+2028, U+0085 and
  other separators inside a sentence, and shift every later pair of line-aligned files."""
  lines = s.split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  return [line.removesuffix("\r") for line in lines]


def partner_path(path: str, source_lang: str, target_lang: str) -> str:
  """The target-side file of a source-side file: its last '.{source_lang}' name part becomes '.{target_lang}'
  (train.de.gz -> train.en.gz, test.de -> test.en)."""
  if not source_lang or not target_lang:
    raise DataError(f"{path}: line-aligned pair files need data.source_lang and data.target_lang (the name parts of "
                    "the two sides, e.g. 'de' and 'en' for train.de.gz / train.en.gz); name the source side's files")
  head, name = os.path.split(path)
  matches = list(re.finditer(rf"\.{re.escape(source_lang)}(?=\.|$)", name))
  if not matches:
    raise DataError(f"{path}: its name has no '.{source_lang}' part (data.source_lang) to find the "
                    f"'.{target_lang}' file (data.target_lang) beside it; name the source side's files")
  m = matches[-1]
  return os.path.join(head, name[:m.start()] + f".{target_lang}" + name[m.end():])


def read_line_pairs(path: str, source_lang: str, target_lang: str) -> tuple[list[dict], list[str]]:
  """Line i of `path` with line i of its partner (partner_path). Returns (pairs, skipped): a pair one of whose sides
  has no letter or digit (empty, or Multi30k's '@@') is skipped and named in `skipped`."""
  target_path = partner_path(path, source_lang, target_lang)
  if not os.path.isfile(target_path):
    raise DataError(f"{path}: its target-side file {target_path} does not exist")
  sources, targets = text_lines(read_text(path)), text_lines(read_text(target_path))
  if len(sources) != len(targets):
    raise DataError(f"{path} has {len(sources)} lines but {target_path} has {len(targets)}: line-aligned pair files "
                    f"must have as many lines (the shorter one ends at line {min(len(sources), len(targets))})")
  pairs, skipped = [], []
  for i, (s, t) in enumerate(zip(sources, targets), 1):
    s, t = clean(s), clean(t)
    if has_text(s) and has_text(t):
      pairs.append({"source": s, "target": t, "where": f"{path}:{i}"})
    else:
      skipped.append(f"{path if not has_text(s) else target_path}:{i}")
  return pairs, skipped


def _field_text(record, field: str, where: str, line: str, multiline: bool) -> str:
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}: {_snippet(line)}")
  if field not in record:
    raise DataError(f"{where}: no field {field!r} (data.input_field / data.target_field); its fields: "
                    f"{', '.join(record)}")
  value = record[field]
  if not isinstance(value, str):
    raise DataError(f"{where}: field {field!r} is {type(value).__name__}, not text: {_snippet(line)}")
  return clean_lines(value) if multiline else clean(value)


def _pair(record, fields: tuple[str, str], where: str, line: str) -> dict:
  # inputs keep their line structure (dialogue turns); targets become one line
  return {"source": _field_text(record, fields[0], where, line, True),
          "target": _field_text(record, fields[1], where, line, False), "where": where}


def read_jsonl_pairs(s: str, name: str, fields: tuple[str, str]) -> list[dict]:
  return [_pair(record, fields, f"{name}:{i}", line) for i, record, line in jsonl_items(s, name)]


def read_json_pairs(s: str, name: str, fields: tuple[str, str]) -> list[dict]:
  out = []
  for line, record in json_array_items(s, name):
    where = f"{name}:{line}"
    if isinstance(record, dict) and isinstance(record.get("id"), str):
      where += f" (id {record['id']})"
    out.append(_pair(record, fields, where, json.dumps(record, ensure_ascii=False)))
  return out


def read_tsv_pairs(s: str, name: str, fields: tuple[str, str], header: bool, delimiter: str) -> list[dict]:
  """Rows of a TSV (unquoted, as GLUE's) or CSV (standard quoting) text; fields by header name, else 0-based index."""
  quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
  reader = csv.reader(io.StringIO(s, newline=""), delimiter=delimiter, quoting=quoting)
  columns, out = None, []
  for row in reader:
    lineno = reader.line_num
    if not any(cell.strip() for cell in row):
      continue
    if columns is None:
      if header:
        names = [c.strip() for c in row]
        missing = [f for f in fields if f not in names]
        if missing:
          raise DataError(f"{name}:{lineno}: no column {missing[0]!r} (data.input_field / data.target_field); its "
                          f"header is {names}")
        columns = [names.index(f) for f in fields]
        continue
      try:
        columns = [int(f) for f in fields]
      except ValueError:
        raise DataError(f"{name}: no header (data.tsv_header=False), so name the input and target columns by 0-based "
                        f"index in data.input_field / data.target_field, not {fields}") from None
    if max(columns) >= len(row):
      raise DataError(f"{name}:{lineno}: row has {len(row)} columns, column {max(columns)} is missing: "
                      f"{_snippet(delimiter.join(row))}")
    out.append({"source": clean_lines(row[columns[0]]), "target": clean(row[columns[1]]),
                "where": f"{name}:{lineno}"})
  return out


def dialogue_pairs(s: str, name: str, context_turns: int, separator: str) -> list[dict]:
  """DailyDialog text (one dialogue a line, 'utt1 __eou__ utt2 __eou__ ...') -> (the last `context_turns` turns
  before a turn (0: all of them), joined by `separator`) -> that turn, for every turn after the first."""
  out = []
  for lineno, line in enumerate(text_lines(s), 1):
    if not line.strip():
      continue
    pieces = line.split("__eou__")
    if pieces[-1].strip():
      raise DataError(f"{name}:{lineno}: a dialogue line must end with '__eou__': {_snippet(line)}")
    turns = [clean(p) for p in pieces[:-1]]
    if not all(turns):
      raise DataError(f"{name}:{lineno}: empty utterance between '__eou__' markers: {_snippet(line)}")
    for i in range(1, len(turns)):
      context = turns[max(0, i - context_turns) if context_turns else 0:i]
      out.append({"source": separator.join(context), "target": turns[i], "where": f"{name}:{lineno} turn {i + 1}"})
  return out


def read_zip_pairs(path: str, split: str, options: dict) -> list[dict]:
  """A zip archive read in place: DailyDialog's (one dialogues_<split>.txt inside), or one holding a JSON / JSONL
  file per split (SAMSum's train.json, val.json, test.json), of which the file for `split` is read."""
  with open_zip(path) as archive:
    names = [n for n in archive.namelist() if not n.endswith("/")]
    dialogues = [n for n in names if re.fullmatch(r"dialogues_(?!act_|emotion_)\w+\.txt", os.path.basename(n))]
    if len(dialogues) == 1:
      member = dialogues[0]
      return dialogue_pairs(decode_utf8(archive.read(member), f"{path}:{member}"), f"{path}:{member}",
                            options["context_turns"], options["turn_separator"])
    members, wanted = split_json_members(names, split)
    if len(members) != 1:
      raise DataError(f"{path}: holds {len(dialogues)} DailyDialog dialogues_*.txt file(s) and "
                      f"{len(members)} JSON file(s) for the {split} split (named {', '.join(wanted) or '?'}); "
                      f"expected one of either. Its files: {', '.join(names)}")
    member = members[0]
    s = decode_utf8(archive.read(member), f"{path}:{member}")
  fields = (options["input_field"], options["target_field"])
  read = read_jsonl_pairs if member.endswith(".jsonl") else read_json_pairs
  return read(s, f"{path}:{member}", fields)


def read_pairs(path: str, options: dict) -> list[dict]:
  """One local file -> pairs, by its name: .zip (dialogues or per-split JSON), .jsonl, .json, .tsv, .csv; any other
  file is the source side of line-aligned files (gzip or not). A pair with an empty side is left out (and named on
  stderr); with options['drop_duplicates'], so is a pair whose input and target repeat an earlier pair."""
  fields = (options["input_field"], options["target_field"])
  lower = path.lower().removesuffix(".gz")
  skipped = []
  if path.lower().endswith(".zip"):
    pairs = read_zip_pairs(path, options.get("split", ""), options)
  elif lower.endswith(".jsonl"):
    pairs = read_jsonl_pairs(read_text(path), path, fields)
  elif lower.endswith(".json"):
    pairs = read_json_pairs(read_text(path), path, fields)
  elif lower.endswith((".tsv", ".csv")):
    delimiter = "," if lower.endswith(".csv") else options["delimiter"]
    pairs = read_tsv_pairs(read_text(path), path, fields, options["header"], delimiter)
  else:
    pairs, skipped = read_line_pairs(path, options["source_lang"], options["target_lang"])
  kept = []
  for p in pairs:
    if has_text(p["source"]) and has_text(p["target"]):
      kept.append(p)
    else:
      skipped.append(p["where"])
  if skipped:
    shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
    print(f"{path}: left out {len(skipped)} pair(s) with no text on one side: {shown}", file=sys.stderr, flush=True)
  if options["drop_duplicates"]:
    seen, unique = set(), []
    for p in kept:
      if (p["source"], p["target"]) not in seen:
        seen.add((p["source"], p["target"]))
        unique.append(p)
    kept = unique
  return kept


class PairRecords(RecordKind):
  """Input -> target text pairs (translation, summarisation, dialogue responses): {'source', 'target', 'where'}."""
  name = "seq2seq"
  local_source = "pairs"

  def features(self):
    return {"source": _TEXT, "target": _TEXT, "where": _TEXT}

  def options(self, data_cfg):
    d = data_cfg
    return {"source_lang": d.source_lang, "target_lang": d.target_lang, "input_field": d.input_field,
            "target_field": d.target_field, "header": d.tsv_header, "delimiter": d.tsv_delimiter,
            "context_turns": d.context_turns, "turn_separator": d.turn_separator,
            "drop_duplicates": d.drop_duplicates}

  def read(self, path, options):
    return read_pairs(path, options)

  def decode(self, raw):
    return {"source": text(raw["source"]), "target": text(raw["target"]), "where": text(raw["where"])}

  def named_fields(self, data_cfg):
    return data_cfg.input_field, data_cfg.target_field

  def decode_named(self, raw, fields, names):
    return {"source": clean_lines(text(raw[fields[0]])), "target": clean(text(raw[fields[1]])), "where": ""}

  def texts_of(self, records):
    # one vocabulary for both sides (T5's shared embedding and tied output)
    for r in records:
      yield r["source"]
      yield r["target"]


PAIRS = PairRecords()


# ---- speaker tags (task.speaker_tags) --------------------------------------------------------------------------

_TURN = re.compile(r"([^:]{1,40}):")  # a dialogue line 'Name: text' (SAMSum has 'Aida:?!' too)
_NAME = re.compile(r"\w[\w '’.\-]*")  # letters, digits, spaces, apostrophes, dots, hyphens
_TAG = re.compile(r"<speaker_(\d+)>")


def speakers(source: str) -> list[str]:
  """The distinct speakers of a dialogue whose lines read 'Name: text', in the order of their first turns (a name:
  up to three words of letters, digits, apostrophes, dots and hyphens)."""
  names = []
  for line in source.split("\n"):
    m = _TURN.match(line)
    name = m.group(1).strip() if m else ""
    if _NAME.fullmatch(name) and len(name.split()) <= 3 and name not in names:
      names.append(name)
  return names


def tag_speakers(record: dict, max_tags: int) -> dict:
  """The pair with its first `max_tags` speakers' names, wherever they stand as words in the input or the target,
  replaced by <speaker_1> .. (a name that is part of a longer name or word stays)."""
  names = speakers(record["source"])[:max_tags]
  if not names:
    return record
  tags = {name: speaker_tag(i) for i, name in enumerate(names, 1)}
  alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))  # 'Mary Ann' before 'Mary'
  pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")
  sub = lambda s: pattern.sub(lambda m: tags[m.group(0)], s)
  return {**record, "source": sub(record["source"]), "target": sub(record["target"])}


def untag_speakers(text_: str, source: str, max_tags: int) -> str:
  """An output's <speaker_i> pieces back to the names they stand for in its (untagged) input; a tag with no
  speaker behind it stays."""
  names = speakers(source)[:max_tags]
  return _TAG.sub(lambda m: names[int(m.group(1)) - 1] if 0 < int(m.group(1)) <= len(names) else m.group(0), text_)


@dataclasses.dataclass
class TagSpeakers(grain.transforms.Map):
  """(index, pair) -> (index, tag_speakers(pair))."""
  max_tags: int

  def map(self, item):
    index, record = item
    return index, tag_speakers(record, self.max_tags)


# ---- rows ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EncodePair(grain.transforms.Map):
  """(index, pair) -> token ids: 'inputs' (prefix + source, cut to source_len - 1, then EOS), 'targets' (target,
  cut to target_len - 1, then EOS) and 'example_id'."""
  tokenizer: object
  prefix: str
  source_len: int
  target_len: int

  def map(self, item) -> dict:
    index, record = item
    tok = self.tokenizer
    src = tok.encode(self.prefix + record["source"])[:self.source_len - 1] + [tok.eos_id]
    tgt = tok.encode(record["target"])[:self.target_len - 1] + [tok.eos_id]
    return {"inputs": np.asarray(src, np.int32), "targets": np.asarray(tgt, np.int32),
            "example_id": np.int32(index)}


def _row(enc, enc_seg, enc_pos, dec_in, dec_tgt, dec_seg, dec_pos, example_id) -> dict[str, np.ndarray]:
  used = enc_seg > 0
  if dec_seg.shape == enc_seg.shape:  # equal lengths: bucketing cuts both sides, so the mask covers both
    used = used | (dec_seg > 0)
  return {
      "encoder_input_ids": enc, "encoder_segment_ids": enc_seg, "encoder_positions": enc_pos,  # [S]
      "decoder_input_ids": dec_in, "decoder_target_ids": dec_tgt, "decoder_segment_ids": dec_seg,  # [T]
      "decoder_positions": dec_pos, "decoder_weights": (dec_seg > 0).astype(np.float32),
      # positions holding a token on either side, for length grouping and bucketing; 0 on padding
      "attention_mask": used.astype(np.int32),
      "example_ids": np.int32(example_id),  # the record's index in its split; -1 for packed and padding rows
  }


@dataclasses.dataclass
class PadPair(grain.transforms.Map):
  """Token ids of one pair -> a row of its own: padded to source_len / target_len, segment 1, positions from 0. The
  decoder input is the target shifted right behind `start_id` (T5 starts from the pad id)."""
  source_len: int
  target_len: int
  pad_id: int
  start_id: int

  def map(self, ex: dict) -> dict[str, np.ndarray]:
    s, t = len(ex["inputs"]), len(ex["targets"])

    def padded(values, n, length, fill):
      out = np.full(length, fill, np.int32)
      out[:n] = values
      return out

    dec_in = np.r_[self.start_id, ex["targets"][:-1]]
    return _row(padded(ex["inputs"], s, self.source_len, self.pad_id), padded(1, s, self.source_len, 0),
                padded(np.arange(s), s, self.source_len, 0), padded(dec_in, t, self.target_len, self.pad_id),
                padded(ex["targets"], t, self.target_len, self.pad_id), padded(1, t, self.target_len, 0),
                padded(np.arange(t), t, self.target_len, 0), ex["example_id"])


@dataclasses.dataclass
class _PackFeatures(grain.transforms.Map):
  start_id: int

  def map(self, ex: dict) -> dict[str, np.ndarray]:
    return {"inputs": ex["inputs"], "targets": ex["targets"],
            "decoder_inputs": np.r_[self.start_id, ex["targets"][:-1]].astype(np.int32)}


@dataclasses.dataclass
class _PackedRow(grain.transforms.Map):
  pad_id: int

  def map(self, p: dict) -> dict[str, np.ndarray]:
    enc_seg = p["inputs_segment_ids"].astype(np.int32)
    dec_seg = p["targets_segment_ids"].astype(np.int32)
    pad = lambda ids, seg: np.where(seg > 0, ids, self.pad_id).astype(np.int32)
    return _row(pad(p["inputs"], enc_seg), enc_seg, p["inputs_positions"].astype(np.int32),
                pad(p["decoder_inputs"], dec_seg), pad(p["targets"], dec_seg), dec_seg,
                p["targets_positions"].astype(np.int32), -1)


def pack_pairs(ds: grain.IterDataset, *, source_len: int, target_len: int, num_bins: int, seed: int,
               shuffle_bins: bool, pad_id: int, start_id: int) -> grain.IterDataset:
  """IterDataset of encoded pairs -> rows holding several pairs each (first fit over `num_bins` open rows; a pair
  goes where both its sides fit). Segment ids number the pairs of a row on both sides (1, 2, ...; 0 = padding),
  positions restart at 0 in each, so attention and cross-attention stay inside a pair."""
  lengths = {"inputs": source_len, "targets": target_len, "decoder_inputs": target_len}
  packed = grain.experimental.FirstFitPackIterDataset(ds.map(_PackFeatures(start_id)), length_struct=lengths,
                                                      num_packing_bins=num_bins, seed=seed, shuffle_bins=shuffle_bins)
  return packed.map(_PackedRow(pad_id))


PAD_VALUES = {"example_ids": -1}  # padding rows of an eval pass: no example (token fills come from the tokenizer)
