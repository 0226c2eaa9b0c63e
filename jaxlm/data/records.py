"""Record kinds: what a task reads, as one object per kind. A kind knows its local file format (reader and options
from data.* keys), its array_record features and how to decode them, how a public tfds dataset's fields map onto it,
the labels a record carries and the text a tokenizer learns from. The builders and the pipeline ask a task for its
kind and never switch on kind names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from jaxlm.data import sources
from jaxlm.data.sources import DataError

_TEXT = tfds.features.Text()


def text(x) -> str:
  """A decoded array_record string (bytes) or a plain one, as str."""
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def texts(xs) -> list[str]:
  return [text(x) for x in xs]


def class_names(feature) -> tuple[str, ...] | None:
  """Names of a tfds ClassLabel feature (or of a Sequence of ClassLabel), else None."""
  if isinstance(feature, tfds.features.Sequence):
    feature = feature.feature
  return tuple(feature.names) if isinstance(feature, tfds.features.ClassLabel) else None


class RecordKind:
  """One kind of record. Subclasses are stateless and picklable (grain workers receive their decode methods)."""

  name: str = ""
  local_source: str = ""  # the data.source value that reads local files of this kind
  has_labels: bool = False  # records carry label names (the head is sized from them)
  # one free-form label a record (classes, not tags): a label that only one train record carries, among many records,
  # is taken for a typo when the labels come from the data (builders.check_rare_labels)
  one_label_per_record: bool = False
  outside_label: str = ""  # a label listed first whether or not the data has it ('O' for tags)

  def features(self) -> dict:
    """tfds features of a prepared record."""
    raise NotImplementedError

  def options(self, data_cfg) -> dict:
    """Reader options from data.* keys; part of the prepared dataset's name, so a changed option prepares afresh."""
    return {}

  def read(self, path: str, options: dict) -> list[dict]:
    """One local file -> records (validated; errors name the file and line)."""
    raise NotImplementedError

  def decode(self, raw: dict) -> dict:
    """A prepared array_record example -> the plain-Python record."""
    raise NotImplementedError

  def named_fields(self, data_cfg) -> tuple[str, ...]:
    """The fields of a public tfds dataset this kind reads (data.source='tfds'); the last one holds labels, if any."""
    raise DataError(f"records of kind {self.name!r} cannot be read from a public tfds dataset")

  def decode_named(self, raw: dict, fields: tuple[str, ...], names: tuple[str, ...] | None) -> dict:
    raise NotImplementedError

  def builtin(self, source: str) -> list[dict] | None:
    """Records of a data.source that needs no files (e.g. 'pydoc' for text), else None."""
    return None

  def sources(self) -> tuple[str, ...]:
    """The data.source values that can provide this kind."""
    return (self.local_source, "tfds")

  def labels_of(self, record: dict) -> Sequence[str]:
    """The label names one record carries (empty for unlabelled kinds)."""
    return ()

  def holdout(self, records: Sequence[dict], fraction: float, split: str) -> np.ndarray | None:
    """Indices into the train records of `split` when local data has no eval (dev) files: the held-out part for
    'eval', the rest for 'train'. None: the generic fixed random share of data.eval_fraction."""
    return None

  def texts_of(self, records: Iterable[dict]) -> Iterator[str]:
    """Text a tokenizer learns from."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class _Labeller:
  """Maps a tfds label value to its name: ClassLabel ids through `names`, strings as they are."""
  names: tuple[str, ...] | None

  def __call__(self, x) -> str:
    return self.names[int(x)] if self.names is not None else text(x)


class TextRecords(RecordKind):
  """Documents: {'text'} (causal LM, MLM, span corruption). Local .txt files split by data.doc_split, .jsonl, or the
  data.jsonl_field of each record of a JSON file or of the split's JSON inside a zip (SAMSum's dialogues);
  data.add_pydoc adds CPython's pydoc topics to the train split of the files."""
  name = "text"
  local_source = "text"

  def features(self):
    return {"text": _TEXT}

  def options(self, data_cfg):
    d = data_cfg
    add_pydoc = bool(d.add_pydoc) and d.source == self.local_source
    return {"doc_split": d.doc_split, "jsonl_field": d.jsonl_field, "add_pydoc": add_pydoc,
            "pydoc_with": sources.expand_globs(d.train_files, "data.train_files")[0] if add_pydoc else ""}

  def read(self, path, options):
    if path.endswith(".jsonl"):
      docs = sources.read_jsonl(path, options["jsonl_field"])
    elif path.lower().endswith((".json", ".json.gz", ".zip")):
      docs = sources.read_record_documents(path, options["jsonl_field"], options.get("split", ""))
    else:
      docs = sources.read_text_files([path], options["doc_split"], options["jsonl_field"])
    # the topics join the train split once, with its first file (the reader sees one file at a time)
    if options.get("add_pydoc") and options.get("split") == "train" and path == options["pydoc_with"]:
      docs = docs + sources.pydoc_documents()
    return [{"text": d} for d in docs]

  def decode(self, raw):
    return {"text": text(raw["text"])}

  def builtin(self, source):
    return [{"text": t} for t in sources.pydoc_documents()] if source == "pydoc" else None

  def sources(self):
    return ("text", "pydoc", "tfds")

  def named_fields(self, data_cfg):
    return (data_cfg.jsonl_field,)

  def decode_named(self, raw, fields, names):
    return {"text": text(raw[fields[0]])}

  def texts_of(self, records):
    for r in records:
      yield r["text"]


class ClassificationRecords(RecordKind):
  """Sentences or sentence pairs with a label: {'text_a', 'text_b', 'label', 'where'} from TSV/CSV rows."""
  name = "classification"
  local_source = "tsv"
  has_labels = True
  one_label_per_record = True

  def features(self):
    return {"text_a": _TEXT, "text_b": _TEXT, "label": _TEXT, "where": _TEXT}

  def options(self, data_cfg):
    return {"text_fields": data_cfg.text_fields, "label_field": data_cfg.label_field, "header": data_cfg.tsv_header,
            "delimiter": data_cfg.tsv_delimiter}

  def read(self, path, options):
    rows = sources.read_tsv(path, text_fields=options["text_fields"], label_field=options["label_field"],
                            header=options["header"], delimiter=options["delimiter"])
    return [{"text_a": r["text_a"], "text_b": r["text_b"], "label": r["label"], "where": f"{path}:{r['line']}"}
            for r in rows]

  def decode(self, raw):
    return {"text_a": text(raw["text_a"]), "text_b": text(raw["text_b"]), "label": text(raw["label"]),
            "where": text(raw["where"])}

  def named_fields(self, data_cfg):
    return tuple(n.strip() for n in data_cfg.text_fields.split(",") if n.strip()) + (data_cfg.label_field,)

  def decode_named(self, raw, fields, names):
    *text_fields, label_field = fields
    return {"text_a": text(raw[text_fields[0]]), "text_b": text(raw[text_fields[1]]) if len(text_fields) > 1 else "",
            "label": _Labeller(names)(raw[label_field]), "where": ""}

  def labels_of(self, record):
    return (record["label"],)

  def texts_of(self, records):
    for r in records:
      yield r["text_a"] + ("\n" + r["text_b"] if r["text_b"] else "")


class NerRecords(RecordKind):
  """Tagged sentences: {'tokens', 'tags', 'where'} from CoNLL files (tags validated against data.tag_scheme)."""
  name = "ner"
  local_source = "conll"
  has_labels = True
  outside_label = "O"

  def features(self):
    return {"tokens": tfds.features.Sequence(_TEXT), "tags": tfds.features.Sequence(_TEXT), "where": _TEXT}

  def options(self, data_cfg):
    return {"tag_column": data_cfg.conll_tag_column, "tag_scheme": data_cfg.tag_scheme, "labels": list(data_cfg.labels)}

  def read(self, path, options):
    rows = sources.read_conll(path, tag_column=options["tag_column"], scheme=options["tag_scheme"],
                              labels=options["labels"])
    return [{"tokens": r["tokens"], "tags": r["tags"], "where": f"{path}:{r['line']}"} for r in rows]

  def decode(self, raw):
    return {"tokens": texts(raw["tokens"]), "tags": texts(raw["tags"]), "where": text(raw["where"])}

  def named_fields(self, data_cfg):
    return data_cfg.tokens_field, data_cfg.tags_field

  def decode_named(self, raw, fields, names):
    tokens_field, tags_field = fields
    label = _Labeller(names)
    return {"tokens": texts(raw[tokens_field]), "tags": [label(t) for t in raw[tags_field]], "where": ""}

  def labels_of(self, record):
    return record["tags"]

  def texts_of(self, records):
    for r in records:
      yield " ".join(r["tokens"])


class QaRecords(RecordKind):
  """SQuAD questions: {'id', 'title', 'context', 'question', 'answers', 'answer_starts'} (no answers = unanswerable)."""
  name = "qa"
  local_source = "squad"

  def features(self):
    return {"id": _TEXT, "title": _TEXT, "context": _TEXT, "question": _TEXT,
            "answers": tfds.features.Sequence(_TEXT), "answer_starts": tfds.features.Sequence(np.int32)}

  def read(self, path, options):
    return sources.read_squad(path)

  def decode(self, raw):
    return {"id": text(raw["id"]), "title": text(raw["title"]), "context": text(raw["context"]),
            "question": text(raw["question"]), "answers": texts(raw["answers"]),
            "answer_starts": [int(s) for s in raw["answer_starts"]]}

  def named_fields(self, data_cfg):
    return ()

  def decode_named(self, raw, fields, names):
    answers = raw["answers"]
    return {"id": text(raw["id"]), "title": text(raw.get("title", b"")), "context": text(raw["context"]),
            "question": text(raw["question"]).strip(), "answers": texts(answers["text"]),
            "answer_starts": [int(s) for s in answers["answer_start"]]}

  def texts_of(self, records):
    seen_contexts = set()
    for r in records:
      if r["context"] not in seen_contexts:  # SQuAD repeats a paragraph for each of its questions
        seen_contexts.add(r["context"])
        yield r["context"]
      yield r["question"]


TEXT = TextRecords()
CLASSIFICATION = ClassificationRecords()
NER = NerRecords()
QA = QaRecords()
