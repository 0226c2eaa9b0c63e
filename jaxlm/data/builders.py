"""Every data source as a tensorflow-datasets builder written to array_record and read back through
`as_data_source` (random access, no TensorFlow): local files of a task's record kind, and public tfds datasets the
user has prepared. A run opens its data once (`open_source`) and reads each split from it in one plain-Python form."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from jaxlm.data import sources
from jaxlm.data.records import RecordKind, class_names
from jaxlm.data.sources import DataError

# Bumped whenever a reader's output changes, so files prepared by an older reader are prepared again.
_READER_VERSION = "1"


class LocalFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Local files of one kind prepared as array_record; the config name hashes the files and the reader options,
  so an edited file or a changed option is prepared afresh."""

  VERSION = tfds.core.Version("1.0.0")
  pkg_dir_path = pathlib.Path(__file__).parent  # tfds looks for optional metadata files next to the builder
  # tfds would locate this module through importlib_resources (not installed) to find download checksums;
  # nothing is downloaded here, so there are none to find.
  code_path = None

  def __init__(self, *, kind: RecordKind, files: dict[str, list[str]], options: dict, data_dir: str):
    self._kind, self._files, self._options = kind, files, options
    stamp = json.dumps([_READER_VERSION, kind.name, options, {
        split: [(os.path.abspath(p), os.path.getsize(p), os.path.getmtime(p)) for p in paths]
        for split, paths in files.items()}], sort_keys=True)
    name = f"{kind.name}_{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"
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
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(self._kind.features()),
                                          disable_shuffling=True)

  def _split_generators(self, dl_manager):
    # Every file is read and validated before anything is written: bad input stops preparation early.
    # A reader also gets the split: an archive that holds every split (SAMSum's zip) is read for its split's part.
    records = {split: [r for path in paths for r in self._kind.read(path, {**self._options, "split": split})]
               for split, paths in self._files.items()}
    for split, rows in records.items():
      if not rows:
        raise DataError(f"the {split} split is empty: no records in {', '.join(self._files[split])}")
    return {split: self._generate_examples(rows) for split, rows in records.items()}

  def _generate_examples(self, rows):
    for i, row in enumerate(rows):
      yield i, row


def _data_dir(data_cfg) -> str:
  return data_cfg.tfds_data_dir or os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


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




def prepare_local(kind: RecordKind, data_cfg) -> LocalFiles:
  """Prepares (once) the local files of every split the data.* keys name as array_record; returns the builder."""
  d = data_cfg
  files = {"train": sources.expand_globs(d.train_files, "data.train_files")}
  for split, key in (("eval", "eval_files"), ("dev", "dev_files"), ("test", "test_files")):
    if d[key]:
      files[split] = sources.expand_globs(d[key], f"data.{key}")
  builder = LocalFiles(kind=kind, files=files, options=kind.options(d), data_dir=_data_dir(d))
  with _prepare_lock(_data_dir(d)):
    tfds.disable_progress_bar()  # per-split bars for files that take a second to read are noise in logs
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
  return builder


def named_builder(data_cfg):
  """A public tfds dataset (data.tfds_name) that the user prepared as array_record; nothing is downloaded."""
  name = data_cfg.tfds_name
  if not name:
    raise DataError("data.source='tfds' needs data.tfds_name, e.g. 'glue/sst2', 'conll2003' or 'c4/en'")
  data_dir = _data_dir(data_cfg)
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except Exception as e:
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



@dataclasses.dataclass(frozen=True)
class _DecodeNamed:
  """A public dataset's example -> the kind's record (field names from the data.* keys)."""
  kind: RecordKind
  fields: tuple[str, ...]
  names: tuple[str, ...] | None  # ClassLabel names of the label/tag field

  def __call__(self, raw: dict) -> dict:
    return self.kind.decode_named(raw, self.fields, self.names)


@dataclasses.dataclass
class Split:
  """One split of a task's data: records (random access) and, for labelled kinds, the label names in id order."""
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


def _derived_labels(cache_dir: str, records: Records, kind: RecordKind) -> tuple[str, ...]:
  """Label names seen in the train split, sorted, the kind's outside label ('O' for tags) first; cached beside the
  prepared files."""
  cache = os.path.join(cache_dir, "jaxlm_labels.json")
  if os.path.isfile(cache):
    with open(cache) as f:
      return tuple(json.load(f))
  counts, where = collections.Counter(), {}
  for r in records:
    for label in kind.labels_of(r):
      counts[label] += 1
      where.setdefault(label, r.get("where") or "the train split")
  check_rare_labels(counts, where, kind)
  seen = set(counts)
  first = [kind.outside_label] if kind.outside_label else []
  labels = tuple(first + sorted(seen - set(first)))
  tmp = cache + f".{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(labels, f)
  os.replace(tmp, cache)
  return labels


RARE_LABEL_MIN_RECORDS = 20  # below this many train records a label seen once is no evidence of a typo


def check_rare_labels(counts: collections.Counter, where: dict, kind: RecordKind) -> None:
  """Labels read from the data: in a kind with one label a record, a label that a single record of many carries is
  refused (one stray row would add a class to the head), naming that record; data.labels accepts it."""
  total = sum(counts.values())
  if not kind.one_label_per_record or total < RARE_LABEL_MIN_RECORDS:
    return
  for label, n in sorted(counts.items()):
    if n == 1 and label != kind.outside_label:
      common = ", ".join(f"{k!r} ({v})" for k, v in counts.most_common(5) if k != label)
      raise DataError(f"{where[label]}: label {label!r} appears in this one train record only, against {common} in "
                      f"the other {total - 1}: a typo? (set data.labels to the full label set to accept it)")


def check_labels(records: Sequence, labels: tuple[str, ...], kind: RecordKind, split: str) -> None:
  """Every label/tag of a split must be a known one; the error names where the record came from."""
  known = set(labels)
  for r in records:
    for label in kind.labels_of(r):
      if label not in known:
        where = r.get("where") or f"the {split} split"
        raise DataError(f"{where}: unknown label {label!r}; known labels: {', '.join(labels)} (data.labels)")


def split_name(data_cfg, split: str) -> str:
  """The split that `split` reads: 'dev' and 'eval' are one split (data.dev_files if set, else data.eval_files or
  the held-out part of train), so a fine-tuning dev split and an LM eval split need one set of keys each."""
  d = data_cfg
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
  if split == "test" and not (d.test_files if d.source != "tfds" else d.tfds_test_split):
    raise DataError("there is no test split: set data.test_files (data.tfds_test_split for data.source='tfds')")
  if split == "eval" and d.dev_files:
    return "dev"
  if split == "dev" and not d.dev_files:
    return "eval"
  return split


class Source:
  """The data of one run for one record kind: prepared (local files) or opened (tfds) once, then read by split."""

  def __init__(self, kind: RecordKind, data_cfg, reader: str = ""):
    d = data_cfg
    if d.source not in kind.sources():
      who = reader or f"records of kind {kind.name!r}"
      raise DataError(f"{who} reads data.source {' | '.join(kind.sources())}, not {d.source!r}")
    self.kind, self.data_cfg = kind, d
    self._builtin = kind.builtin(d.source)
    self._builder = None
    self._splits: dict[str, Split] = {}
    if self._builtin is None:
      self._builder = named_builder(d) if d.source == "tfds" else prepare_local(kind, d)

  def split(self, split: str) -> Split:
    """The records of `split` (train | eval | dev | test)."""
    split = split_name(self.data_cfg, split)
    if split not in self._splits:
      self._splits[split] = self._open(split)
    return self._splits[split]

  @property
  def rows_dir(self) -> str:
    """Where tasks' prepared rows of this data are stored (beside the prepared records)."""
    return os.path.join(_data_dir(self.data_cfg), "jaxlm_rows")

  def fingerprint(self, split: str) -> str:
    """Names the records of a split: the prepared dataset (its name hashes the files and reader options) and the
    split it reads, so prepared rows are rebuilt when the records change."""
    split = split_name(self.data_cfg, split)
    if self._builder is None:
      records = self.split(split).records
      return f"{self.data_cfg.source}:{split}:{len(records)}:" + hashlib.sha256(
          json.dumps([records[0], records[len(records) - 1]], sort_keys=True).encode()).hexdigest()[:16]
    d = self.data_cfg
    return json.dumps([str(self._builder.data_dir), split, d.eval_fraction, d.tfds_train_split, d.tfds_eval_split,
                       d.tfds_test_split])

  @property
  def labels(self) -> tuple[str, ...]:
    """data.labels, else the labels of the train split (sorted, 'O' first)."""
    return self.split("train").labels

  def texts(self) -> Iterator[str]:
    """The train split's text, for training a tokenizer."""
    return self.kind.texts_of(self.split("train").records)

  def _open(self, split: str) -> Split:
    d, kind = self.data_cfg, self.kind
    labels = tuple(d.labels)
    if self._builtin is not None:
      return Split(Records(self._builtin, dict, _holdout(len(self._builtin), d.eval_fraction, split)))
    builder = self._builder
    if d.source == "tfds":
      # Without an eval split name, eval is a fixed held-out part of the train split (and train is the rest).
      holdout = not d.tfds_eval_split and split != "test"
      tfds_split = {"eval": d.tfds_eval_split, "test": d.tfds_test_split}.get(split) or d.tfds_train_split
      try:
        n = len(builder.as_data_source(split=tfds_split))
      except Exception as e:
        raise DataError(f"data.tfds_name={d.tfds_name!r} has no split {tfds_split!r}: {e}") from e
      fields = kind.named_fields(d)
      features = builder.info.features
      for name in fields:
        if name not in features:
          raise DataError(f"data.tfds_name={d.tfds_name!r} has no field {name!r}; its fields: {', '.join(features)}")
      names = class_names(features[fields[-1]]) if kind.has_labels else None
      labels = labels or tuple(names or ())
      records = Records((str(builder.data_dir), tfds_split), _DecodeNamed(kind, fields, names),
                        _holdout(n, d.eval_fraction, split) if holdout else None)
    else:
      if split in builder.info.splits and (split != "train" or {"eval", "dev"} & set(builder.info.splits)):
        records = Records((str(builder.data_dir), split), kind.decode)
      else:  # no eval (dev) files: a fixed held-out part of the train files (the kind's own, else a random share)
        n = builder.info.splits["train"].num_examples
        location = (str(builder.data_dir), "train")
        indices = kind.holdout(Records(location, kind.decode), d.eval_fraction, split)
        records = Records(location, kind.decode, _holdout(n, d.eval_fraction, split) if indices is None else indices)
    if len(records) == 0:
      raise DataError(f"the {split} split of data.source={d.source!r} is empty")
    if kind.has_labels:
      if not labels:
        labels = self.split("train").labels if split != "train" else _derived_labels(
            str(builder.data_dir), records, kind)
      if split != "train" or d.labels:
        check_labels(records, labels, kind, split)
    return Split(records, labels)


def open_source(kind: RecordKind, data_cfg, reader: str = "") -> Source:
  """Prepares or opens the data a run reads; every error names the key, file and line at fault (and `reader`, e.g.
  "task.name='ner'", when the data.source does not fit)."""
  return Source(kind, data_cfg, reader)
