"""Seq2seq pairs: the readers on the real files (Multi30k's gzip pairs and their odd lines, DailyDialog and SAMSum zips
read in place) against direct reads, JSON / JSONL / TSV / CSV fields, errors naming the file and line, and the rows
(one pair a row, first-fit packed, bucketed) traced back to their pairs."""

import gzip
import json
import zipfile

import grain
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.data import builders, encoder_inputs, records, sources
from jaxlm.data import seq2seq as pairs
from jaxlm.data.sources import DataError
from jaxlm.tasks import make_task
from tests.conftest import BASE, task_batches

OPTIONS = {"source_lang": "de", "target_lang": "en", "input_field": "source", "target_field": "target",
           "header": True, "delimiter": "\t", "context_turns": 3, "turn_separator": " | ", "drop_duplicates": False}


def _read(path, **options):
  return pairs.read_pairs(str(path), {**OPTIONS, **options})


def _config(tmp_path, *overrides):
  return config_lib.load(BASE, ["task.name=seq2seq", "model.family=encoder_decoder", "model.style=t5",
                                "data.source=pairs", f"data.tfds_data_dir={tmp_path / 'tfds'}", *overrides])


def test_multi30k_gzip_pairs_keep_alignment_and_clean_the_odd_lines(shared_data, capfd):
  d = shared_data / "multi30k"
  for split, expected in (("train", 29000), ("val", 1014), ("test_2016_flickr", 1000)):
    with gzip.open(d / f"{split}.de.gz", "rt", encoding="utf-8") as f:
      de = f.read().split("\n")[:-1]
    with gzip.open(d / f"{split}.en.gz", "rt", encoding="utf-8") as f:
      en = f.read().split("\n")[:-1]
    assert len(de) == len(en) == expected
    got = _read(d / f"{split}.de.gz")
    lines = {int(p["where"].rsplit(":", 1)[1]): p for p in got}
    bad = [i + 1 for i, s in enumerate(de) if not any(ch.isalnum() for ch in s)]
    assert sorted(lines) == [i for i in range(1, expected + 1) if i not in bad]  # aligned by line number
    for i, p in lines.items():
      assert p["source"] == " ".join(de[i - 1].split()) and p["target"] == " ".join(en[i - 1].split())
      assert p["where"] == f"{d / f'{split}.de.gz'}:{i}"
    if split == "train":
      assert bad == [16510, 16664]  # the '@@' lines: left out, and named
      assert "16510" in capfd.readouterr().err
      assert lines[7366]["source"] == '"Zwei männliche und eine weibliche Person spielen in einer Wasserfontäne."'
      assert sum(de[i - 1].endswith(" ") for i in lines) == 40 and sum(de[i - 1].count("\u00a0") for i in lines) == 47
      assert not any("\u00a0" in p["source"] or "\t" in p["source"] or p["source"] != p["source"].strip()
                     for p in got)


def test_line_pair_errors_name_files_and_lines(tmp_path):
  (tmp_path / "a.de").write_text("eins\nzwei\n")
  (tmp_path / "a.en").write_text("one\n")
  with pytest.raises(DataError, match=r"a\.de has 2 lines but .*a\.en has 1"):
    _read(tmp_path / "a.de")
  with pytest.raises(DataError, match=r"b\.de: its target-side file .*b\.en does not exist"):
    (tmp_path / "b.de").write_text("x\n")
    _read(tmp_path / "b.de")
  with pytest.raises(DataError, match=r"no '\.fr' part"):
    _read(tmp_path / "a.de", source_lang="fr")
  with pytest.raises(DataError, match="data.source_lang and data.target_lang"):
    _read(tmp_path / "a.de", source_lang="")
  (tmp_path / "c.de").write_bytes(b"gut\nschlecht \xff\n")
  (tmp_path / "c.en").write_text("good\nbad\n")
  with pytest.raises(DataError, match=r"c\.de:2: not UTF-8"):
    _read(tmp_path / "c.de")
  # a line separator inside a sentence (U+2028) does not split it: the pairs stay aligned
  (tmp_path / "d.de.gz").write_bytes(gzip.compress("erste\u2028hälfte\nzwei\n".encode()))
  (tmp_path / "d.en.gz").write_bytes(gzip.compress(b"first\ntwo\n"))
  got = _read(tmp_path / "d.de.gz")
  assert [p["target"] for p in got] == ["first", "two"] and got[1]["where"].endswith("d.de.gz:2")


def test_json_jsonl_tsv_csv_fields_and_errors(tmp_path):
  rows = [{"id": "1", "src": "a b", "tgt": "x"}, {"id": "2", "src": "line one\r\nline  two", "tgt": " y \n z "}]
  (tmp_path / "p.json").write_text(json.dumps(rows, indent=2))
  (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  (tmp_path / "p.tsv").write_text("tgt\tsrc\nx\ta b\n")
  (tmp_path / "p.csv").write_text('src,tgt\n"a, b",x\n')
  fields = {"input_field": "src", "target_field": "tgt"}
  got = _read(tmp_path / "p.json", **fields)
  assert [(p["source"], p["target"]) for p in got] == [("a b", "x"), ("line one\nline two", "y z")]
  assert got[1]["where"] == f"{tmp_path / 'p.json'}:7 (id 2)"  # the line the object starts on
  assert [(p["source"], p["target"], p["where"][-2:]) for p in _read(tmp_path / "p.jsonl", **fields)] == [
      ("a b", "x", ":1"), ("line one\nline two", "y z", ":2")]
  assert [(p["source"], p["target"]) for p in _read(tmp_path / "p.tsv", **fields)] == [("a b", "x")]
  assert [(p["source"], p["target"]) for p in _read(tmp_path / "p.csv", **fields)] == [("a, b", "x")]
  (tmp_path / "n.tsv").write_text("a b\tx\n")
  assert _read(tmp_path / "n.tsv", header=False, input_field="0", target_field="1")[0]["target"] == "x"

  (tmp_path / "bad.jsonl").write_text('{"src": "a", "tgt": "b"}\n{"src": "a", "tgt": 3}\n')
  with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'tgt' is int"):
    _read(tmp_path / "bad.jsonl", **fields)
  (tmp_path / "bad.json").write_text('[\n{"src": "a", "tgt": "b"},\n{"src": "a"}\n]')
  with pytest.raises(DataError, match=r"bad\.json:3: no field 'tgt'"):
    _read(tmp_path / "bad.json", **fields)
  (tmp_path / "broken.json").write_text('[\n{"src": "a", "tgt": "b"}\n{"src": "c"}]')
  with pytest.raises(DataError, match=r"broken\.json:3: expected ',' or ']'"):
    _read(tmp_path / "broken.json", **fields)
  with pytest.raises(DataError, match=r"p\.tsv:1: no column 'source'"):
    _read(tmp_path / "p.tsv")


def _dialogues(zip_path, split):
  with zipfile.ZipFile(zip_path) as z:
    text = z.read(f"{split}/dialogues_{split}.txt").decode("utf-8")
  return [[u.strip() for u in line.split("__eou__")[:-1]] for line in text.split("\n") if line.strip()]


@pytest.mark.parametrize("split,dialogues,utterances", [("validation", 1000, 8069), ("test", 1000, 7740)])
def test_dailydialog_zip_read_in_place(shared_data, split, dialogues, utterances):
  path = shared_data / "dailydialog" / f"{split}.zip"
  turns = _dialogues(path, split)
  assert len(turns) == dialogues and sum(map(len, turns)) == utterances
  got = _read(path, context_turns=2, turn_separator=" || ")
  expected = [(" || ".join(" ".join(u.split()) for u in d[max(0, i - 2):i]), " ".join(d[i].split()))
              for d in turns for i in range(1, len(d))]
  kept = [e for e in expected if any(c.isalnum() for c in e[1]) and any(c.isalnum() for c in e[0])]
  assert [(p["source"], p["target"]) for p in got] == kept
  assert got[0]["where"] == f"{path}:{split}/dialogues_{split}.txt:1 turn 2"
  whole = _read(path, context_turns=0)  # the whole history
  assert whole[len(turns[0]) - 2]["source"].count(" | ") == len(turns[0]) - 2


def test_dailydialog_train_counts(shared_data):
  path = shared_data / "dailydialog" / "train.zip"
  turns = _dialogues(path, "train")
  assert len(turns) == 11118 and sum(map(len, turns)) == 87170
  assert len(_read(path)) == 87170 - 11118 - 1  # one response has no letter or digit


def test_samsum_zip_splits_through_the_source(tmp_path, shared_data):
  """SAMSum's one zip for all three splits, read in place by the prepared source: each split its own member, the
  empty dialogue left out, turns split at \\r\\n and \\n alike."""
  zip_path = shared_data / "samsum" / "samsum.zip"
  with zipfile.ZipFile(zip_path) as z:
    raw = {s: json.loads(z.read(f"samsum/{s}.json")) for s in ("train", "val", "test")}
  assert [len(v) for v in raw.values()] == [14732, 818, 819]
  c = _config(tmp_path, f"data.train_files={zip_path}", f"data.dev_files={zip_path}", f"data.test_files={zip_path}",
              "data.input_field=dialogue", "data.target_field=summary")
  source = builders.open_source(pairs.PAIRS, c.data)
  for split, name in (("train", "train"), ("dev", "val"), ("test", "test")):
    records = list(source.split(split).records)
    expected = [r for r in raw[name] if r["dialogue"].strip()]
    assert len(records) == len(expected) == {"train": 14731, "dev": 818, "test": 819}[split]
    for r, e in zip(records, expected):
      assert r["where"].endswith(f"(id {e['id']})") and f"samsum/{name}.json:" in r["where"]
      assert r["source"].split("\n") == [" ".join(t.split()) for t in e["dialogue"].splitlines() if t.strip()]
      assert r["target"] == " ".join(e["summary"].split())
      assert "\r" not in r["source"] and "\t" not in r["source"]
  assert "13828807" not in " ".join(r["where"] for r in source.split("train").records)
  texts = list(source.texts())  # a shared vocabulary: the tokenizer learns from both sides
  first = source.split("train").records[0]
  assert len(texts) == 2 * 14731 and texts[:2] == [first["source"], first["target"]]


def test_speaker_tags_replace_whole_names_and_come_back():
  record = {"source": "Mary Ann: Hi Tom, is Mary's car here?\nTom: Tomorrow, Mary Ann.\nMary:ok\nBob: :)",
            "target": "Tom will bring Mary Ann's car; Mary and Bob agree. Tomas stays.", "where": "x:1"}
  assert pairs.speakers(record["source"]) == ["Mary Ann", "Tom", "Mary", "Bob"]  # in the order of first turns
  tagged = pairs.tag_speakers(record, 3)  # Bob is the fourth: he keeps his name
  assert tagged["source"] == ("<speaker_1>: Hi <speaker_2>, is <speaker_3>'s car here?\n<speaker_2>: Tomorrow, "
                              "<speaker_1>.\n<speaker_3>:ok\nBob: :)")
  assert tagged["target"] == "<speaker_2> will bring <speaker_1>'s car; <speaker_3> and Bob agree. Tomas stays."
  assert tagged["where"] == "x:1"
  assert pairs.untag_speakers(tagged["target"], record["source"], 3) == record["target"]
  assert pairs.untag_speakers("<speaker_4> and <speaker_2>", record["source"], 3) == "<speaker_4> and Tom"
  plain = {"source": "no turns here, 5:30 pm", "target": "x"}
  assert pairs.speakers(plain["source"]) == [] and pairs.tag_speakers(plain, 3) is plain


def test_speaker_tags_on_samsum_round_trip(shared_data):
  """On SAMSum's dev dialogues: nearly every summary names a speaker, and untagging a tagged summary with its
  dialogue gives the summary back."""
  got = _read(shared_data / "samsum" / "samsum.zip", split="dev", input_field="dialogue", target_field="summary")
  assert len(got) == 818
  tagged = [pairs.tag_speakers(r, 16) for r in got]
  assert all(t["source"] != r["source"] for t, r in zip(tagged, got))  # every dialogue has turns
  assert sum(t["target"] != r["target"] for t, r in zip(tagged, got)) > 0.9 * len(got)
  assert [pairs.untag_speakers(t["target"], r["source"], 16) for t, r in zip(tagged, got)] == [r["target"] for r in got]


def test_samsum_duplicates_dropped_on_request(shared_data):
  path = shared_data / "samsum" / "samsum.zip"
  with zipfile.ZipFile(path) as z:
    raw = json.loads(z.read("samsum/train.json"))
  clean = {(pairs.clean_lines(r["dialogue"]), pairs.clean(r["summary"])) for r in raw if r["dialogue"].strip()}
  got = _read(path, split="train", input_field="dialogue", target_field="summary", drop_duplicates=True)
  assert len(got) == len(clean) == 14730  # one pair (13731178, 13809905) repeats dialogue and summary
  with pytest.raises(DataError, match=r"samsum\.zip: holds 0 DailyDialog dialogues_\*\.txt file\(s\) and 0 JSON"):
    _read(path, input_field="dialogue", target_field="summary")


def test_samsum_dialogues_as_pretraining_text(tmp_path, shared_data):
  """data.source='text' reads one field of each record (data.jsonl_field) of the split's JSON inside a zip: SAMSum's
  train dialogues for the train split (val's for eval) as span-corruption text, the empty one left out, a turn a
  line."""
  zip_path = shared_data / "samsum" / "samsum.zip"
  with zipfile.ZipFile(zip_path) as z:
    raw = {s: json.loads(z.read(f"samsum/{s}.json")) for s in ("train", "val")}
  c = config_lib.load(BASE, ["task.name=span_corruption", "model.family=encoder_decoder", "model.style=t5",
                             "data.source=text", f"data.train_files={zip_path}", f"data.eval_files={zip_path}",
                             "data.jsonl_field=dialogue", f"data.tfds_data_dir={tmp_path / 'tfds'}"])
  source = builders.open_source(records.TEXT, c.data)
  for split, name, count in (("train", "train", 14731), ("eval", "val", 818)):
    docs = [r["text"] for r in source.split(split).records]
    expected = [[" ".join(t.split()) for t in r["dialogue"].splitlines() if t.strip()] for r in raw[name]]
    expected = [turns for turns in expected if turns]
    assert len(docs) == len(expected) == count
    assert [d.split("\n") for d in docs] == expected


def test_record_documents_errors_name_file_and_line(tmp_path):
  good = [{"dialogue": "A: hi\r\nB: hello", "summary": "greeting"}, {"dialogue": " ", "summary": "none"}]
  path = tmp_path / "d.json"
  path.write_text(json.dumps(good, indent=1))
  assert sources.read_record_documents(str(path), "dialogue", "train") == ["A: hi\nB: hello"]
  path.write_text(json.dumps(good + [{"text": "x"}], indent=1))
  with pytest.raises(DataError, match=r"d\.json:10: no field 'dialogue' \(data\.jsonl_field\); its fields: text"):
    sources.read_record_documents(str(path), "dialogue", "train")
  lines = tmp_path / "d.jsonl"
  lines.write_text('{"dialogue": "A: hi"}\n\n{"dialogue": 3}\n')
  with zipfile.ZipFile(tmp_path / "d.zip", "w") as z:
    z.write(lines, "set/train.jsonl")
  with pytest.raises(DataError, match=r"d\.zip:set/train\.jsonl:3: field 'dialogue' is int, not text"):
    sources.read_record_documents(str(tmp_path / "d.zip"), "dialogue", "train")
  with pytest.raises(DataError, match=r"d\.zip: holds 0 JSON file\(s\) for the dev split \(named dev, val"):
    sources.read_record_documents(str(tmp_path / "d.zip"), "dialogue", "dev")


def test_tfds_fields_and_tokenizer_text():
  """A public dataset's example (e.g. wmt's {'de', 'en'} features) read through data.input_field / target_field."""
  record = pairs.PAIRS.decode_named({"de": "Zwei  Hunde\u00a0laufen.".encode(), "en": b" Two dogs run. "},
                                    ("de", "en"), None)
  assert record == {"source": "Zwei Hunde laufen.", "target": "Two dogs run.", "where": ""}
  assert list(pairs.PAIRS.texts_of([record])) == ["Zwei Hunde laufen.", "Two dogs run."]


# ---- rows ----------------------------------------------------------------------------------------------------


class WordTokenizer:
  """One id per word of a small vocabulary: rows can be traced back to their pairs."""
  vocab_size, pad_id, unk_id, bos_id, eos_id = 64, 0, 1, 2, 3

  def encode(self, text):
    return [4 + int(w) for w in text.split()]

  def decode(self, ids):
    return " ".join(str(i - 4) for i in ids if i >= 4)


def _encoded(n, seed=0):
  rng = np.random.default_rng(seed)
  records = [{"source": " ".join(map(str, rng.integers(0, 50, rng.integers(1, 12)))),
              "target": " ".join(map(str, rng.integers(0, 50, rng.integers(1, 9)))), "where": ""} for _ in range(n)]
  encode = pairs.EncodePair(WordTokenizer(), "", 16, 10)
  return records, [encode.map((i, r)) for i, r in enumerate(records)]


def test_one_pair_rows_and_packed_rows_hold_every_pair():
  records, encoded = _encoded(40)
  for i, ex in enumerate(encoded):  # cut to the row (EOS kept), ids from the tokenizer
    src, tgt = WordTokenizer().encode(records[i]["source"]), WordTokenizer().encode(records[i]["target"])
    np.testing.assert_array_equal(ex["inputs"], src[:15] + [3])
    np.testing.assert_array_equal(ex["targets"], tgt[:9] + [3])
  pad = pairs.PadPair(16, 10, pad_id=0, start_id=0)
  for ex in encoded:
    row = pad.map(ex)
    s, t = len(ex["inputs"]), len(ex["targets"])
    np.testing.assert_array_equal(row["encoder_input_ids"][:s], ex["inputs"])
    np.testing.assert_array_equal(row["decoder_target_ids"][:t], ex["targets"])
    np.testing.assert_array_equal(row["decoder_input_ids"][:t], np.r_[0, ex["targets"][:-1]])
    assert row["encoder_segment_ids"].sum() == s and row["decoder_weights"].sum() == t
    assert row["attention_mask"].sum() == s and row["example_ids"] == ex["example_id"]

  ds = grain.MapDataset.source(encoded).to_iter_dataset()
  rows = list(pairs.pack_pairs(ds, source_len=32, target_len=24, num_bins=4, seed=0, shuffle_bins=False, pad_id=0,
                               start_id=0))
  found = []
  for row in rows:
    assert row["example_ids"] == -1 and row["encoder_input_ids"].shape == (32,)
    for seg in range(1, int(row["encoder_segment_ids"].max()) + 1):
      e, d = row["encoder_segment_ids"] == seg, row["decoder_segment_ids"] == seg
      np.testing.assert_array_equal(row["encoder_positions"][e], np.arange(e.sum()))
      np.testing.assert_array_equal(row["decoder_positions"][d], np.arange(d.sum()))
      tgt = row["decoder_target_ids"][d]
      np.testing.assert_array_equal(row["decoder_input_ids"][d], np.r_[0, tgt[:-1]])  # shifted within the pair
      found.append((tuple(row["encoder_input_ids"][e]), tuple(tgt)))
    assert not row["encoder_input_ids"][row["encoder_segment_ids"] == 0].any()
  assert sorted(found) == sorted((tuple(ex["inputs"]), tuple(ex["targets"])) for ex in encoded)
  assert len(rows) < len(encoded) / 2  # several pairs a row


def test_train_batches_resume_from_their_state(tmp_path):
  """Packed train batches continue exactly from a saved iterator state, as every split's batches do."""
  records, _ = _encoded(120, seed=5)
  (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  c = _config(tmp_path, f"data.train_files={tmp_path / 'train.jsonl'}", "data.seq_len=32", "data.target_len=24",
              "train.batch_size=4", "data.prefetch=0")
  task = make_task(c)
  first = task_batches(c, WordTokenizer(), "train", task=task)
  for _ in range(3):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  want = [next(first) for _ in range(4)]
  resumed = task_batches(c, WordTokenizer(), "train", task=task)
  resumed.set_state(state)
  for w in want:
    got = next(resumed)
    assert (got["encoder_segment_ids"].max(axis=1) > 1).any()  # packed rows
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])


def test_bucketing_keeps_every_token_of_both_sides():
  _, encoded = _encoded(8, seed=3)
  pad = pairs.PadPair(16, 16, pad_id=0, start_id=0)  # equal lengths: the mask covers both sides
  batch = {k: np.stack([pad.map(ex)[k] for ex in encoded]) for k in pad.map(encoded[0])}
  longest = max(max(len(ex["inputs"]), len(ex["targets"])) for ex in encoded)
  cut = encoder_inputs.trim_to_bucket(batch, (4, 8, 12), 16)
  assert cut["decoder_target_ids"].shape[1] == cut["encoder_input_ids"].shape[1] >= longest
  assert cut["decoder_weights"].sum() == batch["decoder_weights"].sum()
  assert cut["encoder_segment_ids"].sum() == batch["encoder_segment_ids"].sum()
