"""Sources: CoNLL / TSV / SQuAD readers on real and generated files, their bad-input errors, preparation as
array_record through tfds builders, and public tfds datasets read by name."""

import json
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxlm import config as config_lib
from jaxlm.data import sources
from jaxlm.data.sources import DataError
from tests.conftest import REPO, open_split, train_tokenizer


def make_config(tmp_path, **overrides):
  c = config_lib.load_config_file(str(REPO / "configs" / "base.py"))
  c.data.tfds_data_dir = str(tmp_path / "tfds")
  for key, value in overrides.items():
    group, name = key.split("__")
    c[group][name] = value
  return c


def conll_blocks(path):
  """Independent count: blocks of token lines between blank lines, -DOCSTART- blocks left out."""
  blocks, current = [], []
  for line in pathlib.Path(path).read_text().split("\n"):
    if line.strip():
      current.append(line.split())
    else:
      if current and current[0][0] != "-DOCSTART-":
        blocks.append(current)
      current = []
  if current and current[0][0] != "-DOCSTART-":
    blocks.append(current)
  return blocks


def test_conll_reader_on_real_data(shared_data):
  path = str(shared_data / "conll2003" / "valid.txt")
  sentences = sources.read_conll(path, tag_column=-1, scheme="iob2")
  blocks = conll_blocks(path)
  assert len(sentences) == len(blocks)
  assert [s["tokens"] for s in sentences] == [[row[0] for row in b] for b in blocks]
  assert [s["tags"] for s in sentences] == [[row[-1] for row in b] for b in blocks]
  assert {t for s in sentences for t in s["tags"]} == {"O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC",
                                                     "B-MISC", "I-MISC"}
  # the chunk column is IOB2 too, and the tag column read as IOB1 is rejected at its first entity start
  chunks = sources.read_conll(path, tag_column=2, scheme="iob2")
  assert chunks[0]["tags"] == [row[2] for row in blocks[0]]
  with pytest.raises(DataError, match=r"valid\.txt:\d+: tag 'B-\w+' after 'O'.*IOB1 .*IOB2"):
    sources.read_conll(path, tag_column=-1, scheme="iob1")


def test_conll_errors(tmp_path):
  path = tmp_path / "bad.conll"
  good = "-DOCSTART- -X- O\n\nEU NNP B-ORG\nrejects VBZ O\n\nPeter NNP B-PER\nBlackburn NNP I-PER\n"
  path.write_text(good)
  assert [s["tags"] for s in sources.read_conll(str(path), tag_column=-1, scheme="iob2")] == [
      ["B-ORG", "O"], ["B-PER", "I-PER"]]
  path.write_text(good + "German JJ\n")
  with pytest.raises(DataError, match=r"bad\.conll:8: 2 columns where the file has 3: 'German JJ'"):
    sources.read_conll(str(path), tag_column=-1, scheme="iob2")
  path.write_text(good + "\nGerman JJ B-NATION\n")
  with pytest.raises(DataError, match=r"bad\.conll:9: unknown tag 'B-NATION' \(not in data.labels\)"):
    sources.read_conll(str(path), tag_column=-1, scheme="iob2", labels=("O", "B-PER", "I-PER", "B-ORG", "I-ORG"))
  path.write_text(good + "\nGerman JJ X-MISC\n")
  with pytest.raises(DataError, match=r"bad\.conll:9: unknown tag 'X-MISC' \(not in the IOB2 scheme"):
    sources.read_conll(str(path), tag_column=-1, scheme="iob2")
  path.write_text(good + "\ncall VB O\nto TO I-MISC\n")
  with pytest.raises(DataError, match=r"bad\.conll:10: tag 'I-MISC' after 'O'"):
    sources.read_conll(str(path), tag_column=-1, scheme="iob2")
  path.write_text("New JJ B-LOC\nYork NNP E-LOC\nis VBZ O\nbig JJ S-MISC\n")
  assert sources.read_conll(str(path), tag_column=-1, scheme="bioes")[0]["tags"][-1] == "S-MISC"
  path.write_text("New JJ B-LOC\nis VBZ O\n")
  with pytest.raises(DataError, match=r"bad\.conll:2: tag 'O' after 'B-LOC'.*BIOES"):
    sources.read_conll(str(path), tag_column=-1, scheme="bioes")
  with pytest.raises(DataError, match="data.tag_scheme='bio'"):
    sources.read_conll(str(path), tag_column=-1, scheme="bio")


def test_tsv_reader(tmp_path, shared_data):
  dev = sources.read_tsv(str(shared_data / "sst2" / "dev.tsv"), text_fields="sentence", label_field="label",
                         header=True, delimiter="\t")
  lines = (shared_data / "sst2" / "dev.tsv").read_text().splitlines()[1:]
  assert len(dev) == len(lines)
  assert [(r["text_a"], r["label"]) for r in dev] == [tuple(x.strip() for x in line.split("\t")) for line in lines]
  pairs = tmp_path / "pairs.csv"
  pairs.write_text('q,"a, with comma",1\nwhy?,"because ""quoted""",0\n')
  rows = sources.read_tsv(str(pairs), text_fields="0,1", label_field="2", header=False, delimiter=",")
  assert [(r["text_a"], r["text_b"], r["label"]) for r in rows] == [
      ("q", "a, with comma", "1"), ("why?", 'because "quoted"', "0")]
  bad = tmp_path / "bad.tsv"
  bad.write_text("sentence\tlabel\ngood one\t1\nno label here\t\n")
  with pytest.raises(DataError, match=r"bad\.tsv:3: row without a label \(column 'label'\): 'no label here"):
    sources.read_tsv(str(bad), text_fields="sentence", label_field="label", header=True, delimiter="\t")
  with pytest.raises(DataError, match=r"data.text_fields='text': no such column .* header is \['sentence', 'label'\]"):
    sources.read_tsv(str(bad), text_fields="text", label_field="label", header=True, delimiter="\t")


def squad_file(path, contexts):
  data = {"version": "1.1", "data": [{"title": "T", "paragraphs": [
      {"context": ctx, "qas": [{"id": f"q{i}-{j}", "question": q, "answers": [{"text": a, "answer_start": ctx.find(a)}]}
                               for j, (q, a) in enumerate(qas)]} for i, (ctx, qas) in enumerate(contexts)]}]}
  path.write_text(json.dumps(data, indent=1))
  return data


def test_squad_reader_and_errors(tmp_path):
  path = tmp_path / "squad.json"
  squad_file(path, [("Paris is the capital of France.", [("Capital of France?", "Paris")])])
  (record,) = sources.read_squad(str(path))
  assert record["answers"] == ["Paris"] and record["answer_starts"] == [0] and record["id"] == "q0-0"
  text = path.read_text().splitlines()
  text[5] = text[5] + ","  # a stray comma: invalid JSON on line 7 or after
  path.write_text("\n".join(text))
  with pytest.raises(DataError, match=r"squad\.json:\d+: invalid JSON"):
    sources.read_squad(str(path))
  data = squad_file(path, [("Paris is the capital of France.", [("Capital?", "Paris")])])
  data["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 3
  path.write_text(json.dumps(data))
  with pytest.raises(DataError, match=r"question 'q0-0': answer 'Paris' is not at character 3"):
    sources.read_squad(str(path))


def test_prepared_as_array_record_and_refreshed(tmp_path):
  train = tmp_path / "train.tsv"
  train.write_text("sentence\tlabel\nfine film\tpos\nawful\tneg\nok\tmeh\n")
  (tmp_path / "dev.tsv").write_text("sentence\tlabel\ngreat\tpos\n")
  c = make_config(tmp_path, task__name="classification", data__source="tsv", data__train_files=str(train),
                  data__eval_files=str(tmp_path / "dev.tsv"))
  split = open_split(c, "train")
  assert list(pathlib.Path(c.data.tfds_data_dir).rglob("*.array_record*"))
  assert [(r["text_a"], r["label"]) for r in split.records] == [("fine film", "pos"), ("awful", "neg"), ("ok", "meh")]
  assert split.records[1]["where"] == f"{train}:3"
  assert split.labels == ("meh", "neg", "pos")  # sorted from the train split
  assert open_split(c, "eval").labels == split.labels
  train.write_text("sentence\tlabel\nchanged\tpos\n")  # an edited file is prepared again
  assert [r["text_a"] for r in open_split(c, "train").records] == ["changed"]
  (tmp_path / "dev.tsv").write_text("sentence\tlabel\ngreat\tamazing\n")
  with pytest.raises(DataError, match=r"dev\.tsv:2: unknown label 'amazing'; known labels: pos"):
    open_split(c, "eval")
  (tmp_path / "dev.tsv").write_text("sentence\tlabel\n")
  with pytest.raises(DataError, match=r"the eval split is empty: no records in .*dev\.tsv"):
    open_split(c, "eval")
  c.data.source = "conll"
  with pytest.raises(DataError, match=r"task.name='classification' reads data.source tsv \| tfds, not 'conll'"):
    open_split(c, "train")


def test_conll_prepared_with_holdout(tmp_path, shared_data):
  c = make_config(tmp_path, task__name="ner", data__source="conll", data__eval_fraction=0.1,
                  data__train_files=str(shared_data / "conll2003" / "test.txt"))
  train, held = open_split(c, "train"), open_split(c, "eval")
  assert train.labels[0] == "O" and len(train.labels) == 9
  n = len(conll_blocks(shared_data / "conll2003" / "test.txt"))
  assert len(train.records) + len(held.records) == n and len(held.records) == round(0.1 * n)
  assert not {r["where"] for r in held.records} & {r["where"] for r in train.records[:500]}


class JaxlmTestReviews(tfds.core.GeneratorBasedBuilder):
  """Stands in for a public dataset such as glue/sst2: named, with a ClassLabel feature."""
  VERSION = tfds.core.Version("1.0.0")
  pkg_dir_path = pathlib.Path(__file__).parent
  code_path = None

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "sentence": tfds.features.Text(), "label": tfds.features.ClassLabel(names=["negative", "positive"])}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(20), "validation": self._generate_examples(4)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"sentence": f"review number {i}", "label": i % 2}


def test_named_tfds_dataset(tmp_path):
  data_dir = str(tmp_path / "tfds")
  JaxlmTestReviews(data_dir=data_dir, file_format="array_record").download_and_prepare()
  c = make_config(tmp_path, task__name="classification", data__source="tfds", data__tfds_name="jaxlm_test_reviews")
  train = open_split(c, "train")
  assert train.labels == ("negative", "positive")
  assert train.records[3] == {"text_a": "review number 3", "text_b": "", "label": "positive", "where": ""}
  assert [r["text_a"] for r in open_split(c, "eval").records] == [f"review number {i}" for i in range(4)]
  c.data.tfds_eval_split = ""  # hold out part of train instead
  held = open_split(c, "eval").records
  rest = open_split(c, "train").records
  assert len(held) == 1 and len(rest) == 19 and held[0] not in list(rest)
  c.data.text_fields = "text"
  with pytest.raises(DataError, match="has no field 'text'; its fields: "):
    open_split(c, "train")
  c.data.tfds_name = "jaxlm_test_reviews_missing"
  with pytest.raises(DataError, match="jaxlm_test_reviews_missing"):
    open_split(c, "train")


def test_tokenizer_trains_from_a_conll_source(tmp_path, shared_data):
  from jaxlm.data import tokenizer as tokenizer_lib
  c = make_config(tmp_path, task__name="ner", data__source="conll", tokenizer__vocab_size=300,
                  data__train_files=str(shared_data / "conll2003" / "test.txt"), tokenizer__max_sentences=2000)
  train_tokenizer(c, str(tmp_path))
  tok = tokenizer_lib.load_tokenizer(c, str(tmp_path))
  first = open_split(c, "train").records[0]["tokens"]
  assert tok.vocab_size == 300 and tok.decode(tok.encode(" ".join(first))) == " ".join(first)


class JaxlmTestNerQa(tfds.core.GeneratorBasedBuilder):
  """Stands in for conll2003 (tags as a Sequence of ClassLabel) and squad (answers as a Sequence of dicts)."""
  VERSION = tfds.core.Version("1.0.0")
  pkg_dir_path = pathlib.Path(__file__).parent
  code_path = None
  TAGS = ["O", "B-PER", "I-PER"]

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "tokens": tfds.features.Sequence(tfds.features.Text()),
        "ner": tfds.features.Sequence(tfds.features.ClassLabel(names=self.TAGS)),
        "id": tfds.features.Text(), "title": tfds.features.Text(), "context": tfds.features.Text(),
        "question": tfds.features.Text(),
        "answers": tfds.features.Sequence({"text": tfds.features.Text(), "answer_start": np.int32})}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(10):
      yield i, {"tokens": ["Peter", "Blackburn", f"w{i}"], "ner": ["B-PER", "I-PER", "O"], "id": f"q{i}",
                "title": "t", "context": f"Ann met Bob {i}.", "question": "Who?",
                "answers": {"text": ["Bob", "Bob " + str(i)], "answer_start": [8, 8]}}


def test_named_tfds_ner_and_qa(tmp_path):
  JaxlmTestNerQa(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
  c = make_config(tmp_path, task__name="ner", data__source="tfds", data__tfds_name="jaxlm_test_ner_qa",
                  data__tfds_eval_split="")
  train = open_split(c, "train")
  assert train.labels == ("O", "B-PER", "I-PER")
  assert train.records[0]["tags"] == ["B-PER", "I-PER", "O"] and train.records[0]["tokens"][:2] == ["Peter",
                                                                                                  "Blackburn"]
  c.task.name = "qa"
  record = open_split(c, "eval").records[0]
  assert record["answers"] == ["Bob", f"Bob {record['id'][1:]}"] and record["answer_starts"] == [8, 8]
  assert record["context"][8:11] == "Bob"
