"""Every data source as a tensorflow-datasets builder written to array_record and read back through
`as_data_source` (random access, no TensorFlow): local text/CoNLL/TSV/SQuAD files, and public tfds datasets the user
has prepared. `open_split` gives a task the records of one split in one plain-Python form."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from jaxlm.data import sources
from jaxlm.data.sources import DataError

# Bumped whenever a reader's output changes, so files prepared by an older reader are prepared again.
_READER_VERSION = "1"

# What each task reads, and which data.source values can provide it.
KIND_OF_TASK = {"lm": "text", "mlm_nsp": "text", "span_corruption": "text", "classification": "classification",
                "ner": "ner", "qa": "qa"}
SOURCES_OF_KIND = {"text": ("text", "pydoc", "tfds"), "classification": ("tsv", "tfds"), "ner": ("conll", "tfds"),
                   "qa": ("squad", "tfds")}

_TEXT = tfds.features.Text()
_FEATURES = {
    "text": {"text": _TEXT},
    "ner": {"tokens": tfds.features.Sequence(_TEXT), "tags": tfds.features.Sequence(_TEXT), "where": _TEXT},
    "classification": {"text_a": _TEXT, "text_b": _TEXT, "label": _TEXT, "where": _TEXT},
    "qa": {"id": _TEXT, "title": _TEXT, "context": _TEXT, "question": _TEXT,
           "answers": tfds.features.Sequence(_TEXT), "answer_starts": tfds.features.Sequence(np.int32)},
}


def _read_local(kind: str, path: str, options: dict) -> list[dict]:
  """One local file -> records of `kind` (validated; errors name the file and line)."""
  if kind == "text":
    if path.endswith(".jsonl"):
      docs = sources.read_jsonl(path, options["jsonl_field"])
    else:
      docs = sources.read_text_files([path], options["doc_split"], options["jsonl_field"])
    return [{"text": d} for d in docs]
  if kind == "ner":
    rows = sources.read_conll(path, tag_column=options["tag_column"], scheme=options["tag_scheme"],
                              labels=options["labels"])
    return [{"tokens": r["tokens"], "tags": r["tags"], "where": f"{path}:{r['line']}"} for r in rows]
  if kind == "classification":
    rows = sources.read_tsv(path, text_fields=options["text_fields"], label_field=options["label_field"],
                            header=options["header"], delimiter=options["delimiter"])
    return [{"text_a": r["text_a"], "text_b": r["text_b"], "label": r["label"], "where": f"{path}:{r['line']}"}
            for r in rows]
  if kind == "qa":
    return sources.read_squad(path)
  raise ValueError(kind)


class LocalFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Local files of one kind prepared as array_record; the config name hashes the files and the reader options,
  so an edited file or a changed option is prepared afresh."""

  VERSION = tfds.core.Version("1.0.0")
  pkg_dir_path = pathlib.Path(__file__).parent  # tfds looks for optional metadata files next to the builder
  # tfds would locate this module through importlib_resources (not installed) to find download checksums;
  # nothing is downloaded here, so there are none to find.
  code_path = None

  def __init__(self, *, kind: str, files: dict[str, list[str]], options: dict, data_dir: str):
    self._kind, self._files, self._options = kind, files, options
    stamp = json.dumps([_READER_VERSION, kind, options, {
        split: [(os.path.abspath(p), os.path.getsize(p), os.path.getmtime(p)) for p in paths]
        for split, paths in files.items()}], sort_keys=True)
    name = f"{kind}_{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"
    self._config = tfds.core.BuilderConfig(name=name)
    super().__init__(data_dir=data_dir, config=self._config, file_format="array_record")

  def get_builder_config(self, name, version=None):
    # The config is made per instance, from the files; knowing it here keeps tfds from warning on every open
    # that a "custom data configuration" is in use.
    return self._config if name == self._config.name else None

  @property
  def name(self):
    return "jaxlm_local"

  def _info(self):
    # disable_shuffling keeps file order: eval passes follow the files, and records stay findable by line.
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(_FEATURES[self._kind]),
                                          disable_shuffling=True)

  def _split_generators(self, dl_manager):
    # Every file is read and validated before anything is written: bad input stops preparation early.
    records = {split: [r for path in paths for r in _read_local(self._kind, path, self._options)]
               for split, paths in self._files.items()}
    for split, rows in records.items():
      if not rows:
        raise DataError(f"the {split} split is empty: no records in {', '.join(self._files[split])}")
    return {split: self._generate_examples(rows) for split, rows in records.items()}

  def _generate_examples(self, rows):
    for i, row in enumerate(rows):
      yield i, row


def _data_dir(config) -> str:
  return config.data.tfds_data_dir or os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


@contextlib.contextmanager
def _prepare_lock(data_dir: str):
  """Processes on one machine (or sharing a file system) prepare a dataset once, not concurrently."""
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, ".jaxlm_prepare.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _local_options(config, kind: str) -> dict:
  d = config.data
  if kind == "text":
    return {"doc_split": d.doc_split, "jsonl_field": d.jsonl_field}
  if kind == "ner":
    return {"tag_column": d.conll_tag_column, "tag_scheme": d.tag_scheme, "labels": list(d.labels)}
  if kind == "classification":
    return {"text_fields": d.text_fields, "label_field": d.label_field, "header": d.tsv_header,
            "delimiter": d.tsv_delimiter}
  return {}


def prepare_local(config, kind: str) -> LocalFiles:
  """Prepares (once) data.train_files and data.eval_files as array_record and returns the builder."""
  d = config.data
  files = {"train": sources.expand_globs(d.train_files, "data.train_files")}
  for split, key in (("eval", "eval_files"), ("dev", "dev_files"), ("test", "test_files")):
    if d[key]:
      files[split] = sources.expand_globs(d[key], f"data.{key}")
  builder = LocalFiles(kind=kind, files=files, options=_local_options(config, kind), data_dir=_data_dir(config))
  with _prepare_lock(_data_dir(config)):
    tfds.disable_progress_bar()  # per-split bars for files that take a second to read are noise in logs
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
  return builder


def named_builder(config):
  """A public tfds dataset (data.tfds_name) that the user prepared as array_record; nothing is downloaded."""
  name = config.data.tfds_name
  if not name:
    raise DataError("data.source='tfds' needs data.tfds_name, e.g. 'glue/sst2', 'conll2003' or 'c4/en'")
  data_dir = _data_dir(config)
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except Exception as e:  # noqa: BLE001 - tfds raises several kinds for an unknown or unreadable dataset
    raise DataError(f"data.tfds_name={name!r}: cannot open it in {data_dir}: {e}") from e
  if not builder.is_prepared():
    raise DataError(f"data.tfds_name={name!r} is not prepared in {data_dir}; prepare it once with "
                    f"`tfds build {name} --data_dir {data_dir} --file_format array_record` (jaxlm never downloads)")
  return builder


class Records(Sequence):
  """Random-access records of one split, decoded to plain Python by `decode` (bytes -> str, ids -> names).

  `source` is a list, or (prepared dataset directory, split) for array_record files: those are opened on first
  use in each process, so grain workers get the location rather than an open reader.
  """

  def __init__(self, source, decode, indices: np.ndarray | None = None):
    self._location = source if isinstance(source, tuple) else None
    self._opened = None if self._location else source
    self._decode, self._indices = decode, indices

  @property
  def _source(self):
    if self._opened is None:
      builder_dir, split = self._location
      self._opened = tfds.builder_from_directory(builder_dir).as_data_source(split=split)
    return self._opened

  def __getstate__(self):
    return {"location": self._location, "opened": None if self._location else self._opened,
            "decode": self._decode, "indices": self._indices}

  def __setstate__(self, state):
    self._location, self._opened = state["location"], state["opened"]
    self._decode, self._indices = state["decode"], state["indices"]

  def __len__(self):
    return len(self._source) if self._indices is None else len(self._indices)

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    return self._decode(self._source[int(i) if self._indices is None else int(self._indices[i])])


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _texts(xs) -> list[str]:
  return [_text(x) for x in xs]


@dataclasses.dataclass(frozen=True)
class _DecodeLocal:
  kind: str

  def __call__(self, r: dict) -> dict:
    if self.kind == "text":
      return {"text": _text(r["text"])}
    if self.kind == "ner":
      return {"tokens": _texts(r["tokens"]), "tags": _texts(r["tags"]), "where": _text(r["where"])}
    if self.kind == "classification":
      return {"text_a": _text(r["text_a"]), "text_b": _text(r["text_b"]), "label": _text(r["label"]),
              "where": _text(r["where"])}
    return {"id": _text(r["id"]), "title": _text(r["title"]), "context": _text(r["context"]),
            "question": _text(r["question"]), "answers": _texts(r["answers"]),
            "answer_starts": [int(s) for s in r["answer_starts"]]}


def _class_names(feature) -> list[str] | None:
  """Names of a ClassLabel feature (or of a Sequence of ClassLabel), else None."""
  if isinstance(feature, tfds.features.Sequence):
    feature = feature.feature
  return list(feature.names) if isinstance(feature, tfds.features.ClassLabel) else None


@dataclasses.dataclass(frozen=True)
class _DecodeNamed:
  """Maps a public dataset's fields onto the records of `kind` (field names from the data.* keys)."""
  kind: str
  fields: tuple[str, ...]
  names: tuple[str, ...] | None  # ClassLabel names of the label/tag field

  def _label(self, x):
    return self.names[int(x)] if self.names is not None else _text(x)

  def __call__(self, r: dict) -> dict:
    if self.kind == "text":
      return {"text": _text(r[self.fields[0]])}
    if self.kind == "ner":
      tokens_field, tags_field = self.fields
      return {"tokens": _texts(r[tokens_field]), "tags": [self._label(t) for t in r[tags_field]], "where": ""}
    if self.kind == "classification":
      *text_fields, label_field = self.fields
      return {"text_a": _text(r[text_fields[0]]), "text_b": _text(r[text_fields[1]]) if len(text_fields) > 1 else "",
              "label": self._label(r[label_field]), "where": ""}
    answers = r["answers"]
    return {"id": _text(r["id"]), "title": _text(r.get("title", b"")), "context": _text(r["context"]),
            "question": _text(r["question"]).strip(), "answers": _texts(answers["text"]),
            "answer_starts": [int(s) for s in answers["answer_start"]]}


def _named_fields(config, kind: str) -> tuple[str, ...]:
  d = config.data
  if kind == "text":
    return (d.jsonl_field,)
  if kind == "ner":
    return d.tokens_field, d.tags_field
  if kind == "classification":
    return tuple(n.strip() for n in d.text_fields.split(",") if n.strip()) + (d.label_field,)
  return ()


@dataclasses.dataclass
class Split:
  """One split of a task's data: records (random access) and, for labelled tasks, the label names in id order."""
  records: Sequence
  labels: tuple[str, ...] = ()


SPLITS = ("train", "eval", "dev", "test")


def _holdout(n: int, fraction: float, split: str) -> np.ndarray:
  """Indices of a deterministic held-out `fraction` (for eval) or of the rest (for train)."""
  if not 0.0 < fraction < 1.0:
    raise DataError(f"data.eval_fraction={fraction}: must be in (0, 1) when there is no eval split")
  if n < 2:
    raise DataError(f"only {n} record(s): cannot hold out an eval split; set data.eval_files")
  n_eval = min(n - 1, max(1, round(fraction * n)))
  held = np.zeros(n, bool)
  held[np.random.default_rng(sources._HOLDOUT_SEED).permutation(n)[:n_eval]] = True
  return np.flatnonzero(held if split == "eval" else ~held)


def _derived_labels(builder, records: Records, kind: str) -> tuple[str, ...]:
  """Label names seen in the train split, 'O' first for tags; cached beside the prepared files."""
  cache = os.path.join(builder.data_dir, "jaxlm_labels.json")
  if os.path.isfile(cache):
    with open(cache) as f:
      return tuple(json.load(f))
  seen = set()
  for r in records:
    seen.update(r["tags"] if kind == "ner" else [r["label"]])
  names = sorted(seen - {"O"})
  labels = tuple((["O"] if kind == "ner" else []) + names)
  tmp = cache + f".{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(labels, f)
  os.replace(tmp, cache)
  return labels


def check_labels(records: Sequence, labels: tuple[str, ...], kind: str, split: str) -> None:
  """Every label/tag of a split must be a known one; the error names where the record came from."""
  known = set(labels)
  for r in records:
    found = r["tags"] if kind == "ner" else [r["label"]]
    for label in found:
      if label not in known:
        where = r["where"] or f"the {split} split"
        raise DataError(f"{where}: unknown label {label!r}; known labels: {', '.join(labels)} (data.labels)")


def split_name(config, split: str) -> str:
  """The split that `split` reads: 'dev' and 'eval' are one split (data.dev_files if set, else data.eval_files or
  the held-out part of train), so a fine-tuning dev split and an LM eval split need one set of keys each."""
  d = config.data
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
  if split == "test" and not (d.test_files if d.source != "tfds" else d.tfds_test_split):
    raise DataError("there is no test split: set data.test_files (data.tfds_test_split for data.source='tfds')")
  if split == "eval" and d.dev_files:
    return "dev"
  if split == "dev" and not d.dev_files:
    return "eval"
  return split


def open_split(config, split: str) -> Split:
  """The records of `split` (train | eval | dev | test) for the config's task, from its data.source."""
  split = split_name(config, split)
  d = config.data
  kind = KIND_OF_TASK.get(config.task.name)
  if kind is None:
    raise DataError(f"task.name={config.task.name!r}: expected one of {', '.join(KIND_OF_TASK)}")
  if d.source not in SOURCES_OF_KIND[kind]:
    raise DataError(f"task.name={config.task.name!r} reads data.source {' | '.join(SOURCES_OF_KIND[kind])}, "
                    f"not {d.source!r}")
  if d.source == "pydoc":
    docs = [{"text": t} for t in sources.pydoc_documents()]
    return Split(Records(docs, dict, _holdout(len(docs), d.eval_fraction, split)))

  labels = tuple(d.labels)
  if d.source == "tfds":
    builder = named_builder(config)
    # Without an eval split name, eval is a fixed held-out part of the train split (and train is the rest).
    holdout = not d.tfds_eval_split and split != "test"
    tfds_split = {"eval": d.tfds_eval_split, "test": d.tfds_test_split}.get(split) or d.tfds_train_split
    try:
      n = len(builder.as_data_source(split=tfds_split))
    except Exception as e:  # noqa: BLE001 - tfds raises several kinds for a missing split
      raise DataError(f"data.tfds_name={d.tfds_name!r} has no split {tfds_split!r}: {e}") from e
    source = (str(builder.data_dir), tfds_split)
    fields = _named_fields(config, kind)
    features = builder.info.features
    for name in fields:
      if name not in features:
        raise DataError(f"data.tfds_name={d.tfds_name!r} has no field {name!r}; its fields: {', '.join(features)}")
    names = _class_names(features[fields[-1]]) if kind in ("ner", "classification") else None
    labels = labels or tuple(names or ())
    decode = _DecodeNamed(kind, fields, tuple(names) if names else None)
    records = Records(source, decode, _holdout(n, d.eval_fraction, split) if holdout else None)
  else:
    builder = prepare_local(config, kind)
    decode = _DecodeLocal(kind)
    if split in builder.info.splits and (split != "train" or {"eval", "dev"} & set(builder.info.splits)):
      records = Records((str(builder.data_dir), split), decode)
    else:  # no eval (dev) files: a fixed held-out part of the train files
      n = builder.info.splits["train"].num_examples
      records = Records((str(builder.data_dir), "train"), decode, _holdout(n, d.eval_fraction, split))
  if len(records) == 0:
    raise DataError(f"the {split} split of data.source={d.source!r} is empty")
  if kind in ("ner", "classification"):
    if not labels:
      labels = open_split(config, "train").labels if split != "train" else _derived_labels(builder, records, kind)
    if split != "train" or d.labels:
      check_labels(records, labels, kind, split)
  return Split(records, labels)


def documents(config, split: str) -> Sequence[str]:
  """The documents of a text split (causal LM, MLM, span corruption)."""
  return [r["text"] for r in open_split(config, split).records]


def training_texts(config):
  """Text a tokenizer learns from: the train split of whatever the config's task reads."""
  kind = KIND_OF_TASK.get(config.task.name)
  seen_contexts = set()
  for r in open_split(config, "train").records:
    if kind == "text":
      yield r["text"]
    elif kind == "ner":
      yield " ".join(r["tokens"])
    elif kind == "classification":
      yield r["text_a"] + ("\n" + r["text_b"] if r["text_b"] else "")
    else:
      if r["context"] not in seen_contexts:  # SQuAD repeats a paragraph for each of its questions
        seen_contexts.add(r["context"])
        yield r["context"]
      yield r["question"]
