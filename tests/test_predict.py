"""Prediction input formats, read by each task: sentences per line, sentence pairs, CoNLL (tags ignored), SQuAD JSON;
blank lines never change how a file is read."""

import json

import pytest

from jaxlm import config as config_lib
from jaxlm.data.sources import DataError
from jaxlm.tasks import make_task
from tests.conftest import BASE, TINY_ENCODER

NER_LABELS = ("O", "B-ORG", "I-ORG", "B-PER", "I-PER")


def _task(name, *extra):
  return make_task(config_lib.load(BASE, [f"task.name={name}", *TINY_ENCODER, *extra]))


def test_classification_lines_and_pairs(tmp_path):
  task = _task("classification", "data.labels=('neg','pos')")
  path = tmp_path / "in.txt"
  path.write_text("a fine film\n\nfirst half\tsecond half\n")
  records = task.read_predict_input(str(path), "auto")
  assert [(r["text_a"], r["text_b"]) for r in records] == [("a fine film", ""), ("first half", "second half")]


def test_ner_plain_lines_and_conll(tmp_path):
  task = _task("ner", f"data.labels={NER_LABELS!r}")
  plain = tmp_path / "plain.txt"
  plain.write_text("EU rejects German call\nPeter Blackburn\n")
  assert [r["tokens"] for r in task.read_predict_input(str(plain), "auto")] == [["EU", "rejects", "German", "call"],
                                                                                ["Peter", "Blackburn"]]
  conll = tmp_path / "in.conll"
  conll.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n")
  records = task.read_predict_input(str(conll), "auto")
  assert [r["tokens"] for r in records] == [["EU", "rejects"], ["Peter"]]
  # a one-sentence CoNLL file without -DOCSTART-: every line is a word and one of the model's tags
  one = tmp_path / "one.conll"
  one.write_text("EU B-ORG\nrejects O\n")
  assert [r["tokens"] for r in task.read_predict_input(str(one), "auto")] == [["EU", "rejects"]]
  assert [r["tokens"] for r in task.read_predict_input(str(one), "lines")] == [["EU", "B-ORG"], ["rejects", "O"]]


def test_blank_lines_never_switch_a_lines_file_to_conll(tmp_path):
  task = _task("ner", f"data.labels={NER_LABELS!r}")
  sentences = ["EU rejects German call", "Peter Blackburn", "BRUSSELS 1996-08-22", "The European Commission said"]
  for text in ("\n".join(sentences) + "\n\n", "\n".join(sentences) + "\n", "\n\n".join(sentences),
               "\r\n".join(sentences) + "\r\n\r\n"):
    path = tmp_path / "in.txt"
    path.write_text(text, newline="")
    assert [r["tokens"] for r in task.read_predict_input(str(path), "auto")] == [s.split() for s in sentences]


def test_squad_input_and_errors(tmp_path):
  task = _task("qa")
  path = tmp_path / "q.json"
  path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [
      {"context": "anna lives in oslo .", "qas": [{"id": "q1", "question": "where ?", "answers": []}]}]}]}))
  assert [r["id"] for r in task.read_predict_input(str(path), "auto")] == ["q1"]
  with pytest.raises(DataError, match="--input-format='lines' does not fit task.name='qa'"):
    task.read_predict_input(str(path), "lines")
  with pytest.raises(DataError, match="--input-format='squad' does not fit task.name='ner'"):
    _task("ner", f"data.labels={NER_LABELS!r}").read_predict_input(str(path), "squad")
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"caf\xe9 au lait\n")
  with pytest.raises(DataError, match=r"bad\.txt: not UTF-8 text \(byte 3"):
    _task("classification", "data.labels=('neg','pos')").read_predict_input(str(bad), "auto")
