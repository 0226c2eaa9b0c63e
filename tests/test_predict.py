"""Prediction input formats: sentences per line, sentence pairs, CoNLL (tags ignored) and SQuAD JSON."""

import json

import pytest

from jaxlm import predict
from jaxlm.data.sources import DataError


def test_classification_lines_and_pairs(tmp_path):
  path = tmp_path / "in.txt"
  path.write_text("a fine film\n\nfirst half\tsecond half\n")
  records = predict.read_input("classification", str(path))
  assert [(r["text_a"], r["text_b"]) for r in records] == [("a fine film", ""), ("first half", "second half")]


def test_ner_plain_lines_and_conll(tmp_path):
  plain = tmp_path / "plain.txt"
  plain.write_text("EU rejects German call\nPeter Blackburn\n")
  assert [r["tokens"] for r in predict.read_input("ner", str(plain))] == [["EU", "rejects", "German", "call"],
                                                                         ["Peter", "Blackburn"]]
  conll = tmp_path / "in.conll"
  conll.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n")
  records = predict.read_input("ner", str(conll))
  assert [r["tokens"] for r in records] == [["EU", "rejects"], ["Peter"]]
  # a one-sentence CoNLL file has no blank line: the format is then said explicitly
  one = tmp_path / "one.conll"
  one.write_text("EU B-ORG\nrejects O\n")
  assert [r["tokens"] for r in predict.read_input("ner", str(one), "conll")] == [["EU", "rejects"]]
  assert len(predict.read_input("ner", str(one))) == 2  # read as two one-word sentences


def test_squad_input_and_errors(tmp_path):
  path = tmp_path / "q.json"
  path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [
      {"context": "anna lives in oslo .", "qas": [{"id": "q1", "question": "where ?", "answers": []}]}]}]}))
  assert [r["id"] for r in predict.read_input("qa", str(path))] == ["q1"]
  with pytest.raises(DataError, match="--input-format='xml'"):
    predict.read_input("ner", str(path), "xml")
  with pytest.raises(DataError, match="predict knows classification, ner and qa"):
    predict.read_input("lm", str(path), "lines")
