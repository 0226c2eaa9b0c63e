"""Conversation data for task.name=sft: the chat template's token ids and loss weights against a reading of the rendered
text, markers as single sentencepiece tokens, left truncation against a brute-force search, packed rows, DailyDialog
read in place from the real zips (counted against zipfile), and bad input named by file and line."""

import json
import re
import zipfile

import grain
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.data import chat
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.sources import DataError, pydoc_documents
from tests.conftest import BASE, open_split

MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


class WordTokenizer:
  """One id per marker and per word 'w<n>': an independent tokenizer whose ids read back exactly."""
  vocab_size, pad_id, unk_id, bos_id, eos_id = 64, 0, 1, 2, 3

  def piece_to_id(self, piece):
    if piece in MARKERS:
      return 4 + MARKERS.index(piece)
    return 8 + int(piece[1:]) if re.fullmatch(r"w\d+", piece) else self.unk_id

  def encode(self, text):
    return [self.piece_to_id(w) for w in text.split()]

  def decode(self, ids):
    return " ".join(MARKERS[i - 4] if i < 8 else f"w{i - 8}" for i in ids if i >= 4)

  def fingerprint(self):
    return "words"


CONVERSATION = {"roles": ["system", "user", "assistant", "user", "assistant"],
                "contents": ["w1 w2", "w3", "w4 w5 w6", "w7 w8", "w9"], "where": "here"}


def reference_tokens(rendered: str, tok) -> tuple[list[int], list[float]]:
  """The rendered conversation read token by token: markers and words in order; weight 1 from the token after an
  assistant marker up to and including the end marker that closes it."""
  ids, weights, in_reply = [], [], False
  for piece in re.split(r"(<\|\w+\|>)|\s+", rendered):
    if not piece:
      continue
    ids.append(tok.piece_to_id(piece))
    weights.append(1.0 if in_reply else 0.0)
    if piece == "<|assistant|>":
      in_reply = True
    elif piece == "<|end|>":
      in_reply = False
  return ids, weights


def test_template_ids_and_weights_token_by_token():
  tok = WordTokenizer()
  template = chat.ChatTemplate()
  rendered = template.render(CONVERSATION["roles"], CONVERSATION["contents"])
  assert rendered.startswith("<|system|>\nw1 w2<|end|>\n<|user|>\nw3<|end|>\n<|assistant|>\nw4 w5 w6<|end|>\n")
  want_ids, want_weights = reference_tokens(rendered, tok)
  encoder = chat.ChatEncoder(tok, template)
  ids = [t for _, i, _ in encoder.messages(CONVERSATION) for t in i]
  weights = [w for _, _, ws in encoder.messages(CONVERSATION) for w in ws]
  assert ids == want_ids
  assert weights == want_weights
  # the train example: next-token pairs, weighted where the target is an assistant token or its end marker
  ex = chat.EncodeConversation(encoder, 64).map((0, CONVERSATION))
  assert ex["inputs"].tolist() == want_ids[:-1] and ex["targets"].tolist() == want_ids[1:]
  assert ex["weights"].tolist() == want_weights[1:]
  scored = [tok.decode([t]) for t, w in zip(ex["targets"], ex["weights"]) if w]
  assert scored == ["w4", "w5", "w6", "<|end|>", "w9", "<|end|>"]
  # a reply is asked for with the assistant marker after the conversation so far
  prompt = encoder.prompt(CONVERSATION["roles"][:4], CONVERSATION["contents"][:4], 64)
  assert prompt == reference_tokens(template.render(CONVERSATION["roles"][:4], CONVERSATION["contents"][:4],
                                                    ask_reply=True), tok)[0]


def test_messages_after_the_last_assistant_turn_are_left_out():
  encoder = chat.ChatEncoder(WordTokenizer(), chat.ChatTemplate())
  record = {"roles": ["user", "assistant", "user"], "contents": ["w1", "w2", "w3"], "where": ""}
  ex = chat.EncodeConversation(encoder, 64).map((0, record))
  assert WordTokenizer().decode(ex["targets"]).split() == ["w1", "<|end|>", "<|assistant|>", "w2", "<|end|>"]


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
  """A sentencepiece model trained here on the pydoc text with the chat markers as user-defined symbols."""
  config = config_lib.load(BASE, ["tokenizer.vocab_size=300", "tokenizer.max_sentences=2000",
                                  f"tokenizer.user_defined_symbols={list(MARKERS)}"])
  workdir = tmp_path_factory.mktemp("spm")
  path = tokenizer_lib.train_tokenizer(config, str(workdir), pydoc_documents()[:100])
  return tokenizer_lib.SentencePieceTokenizer.from_file(path)


def test_markers_are_single_sentencepiece_tokens(spm_tokenizer):
  tok = spm_tokenizer
  template = chat.ChatTemplate()
  encoder = chat.ChatEncoder(tok, template)
  for role, marker in (("system", MARKERS[0]), ("user", MARKERS[1]), ("assistant", MARKERS[2])):
    assert encoder.markers[role] == [tok.piece_to_id(marker)]
  assert encoder.end_id == tok.piece_to_id("<|end|>")
  assert tok.encode(MARKERS[1]) != encoder.markers["user"]  # encoded as text it would start with a word-start piece
  record = {"roles": ["system", "user", "assistant"], "contents": ["Be brief.", "What is a list?", "A sequence."]}
  messages = encoder.messages(record)
  ids = [t for _, i, _ in messages for t in i]
  rendered = template.render(record["roles"], record["contents"])
  assert "".join(tok.decode(ids).split()) == "".join(rendered.split())  # the same text, whitespace aside
  weighted = [t for _, i, ws in messages for t, w in zip(i, ws) if w]
  assert tok.decode(weighted) == "A sequence.<|end|>"


def test_an_end_marker_of_several_tokens_is_refused(spm_tokenizer):
  with pytest.raises(ValueError, match="data.chat_end='<\\|stop\\|>' is [2-9] tokens.*user_defined_symbols"):
    chat.ChatEncoder(spm_tokenizer, chat.ChatTemplate(end="<|stop|>"))


def _brute_force_truncate(messages, budget):
  """The rule of chat.truncate as a search: the oldest start of the non-system messages whose suffix fits with the
  system message (else without it), moved past an assistant turn it would leave first; else the last message's
  tail."""
  size = lambda ms: sum(len(m[1]) for m in ms)
  head = messages[:1] if messages[0][0] == "system" and len(messages) > 1 else []
  body = messages[len(head):]
  last = len(body) - 1
  for with_head in (head, []):
    fits = [s for s in range(len(body)) if size(with_head) + size(body[s:]) <= budget]
    if not fits:
      continue
    s = fits[0]
    while 0 < s < last and body[s][0] == "assistant":
      s += 1
    kept = with_head + body[s:]
    break
  else:
    kept = body[-1:]
  ids = [t for m in kept for t in m[1]]
  return ids[-budget:]


def test_truncation_matches_brute_force_and_keeps_the_last_assistant_turn():
  rng = np.random.default_rng(0)
  encoder = chat.ChatEncoder(WordTokenizer(), chat.ChatTemplate())
  for trial in range(300):
    n = int(rng.integers(2, 8))
    roles = (["system"] if rng.random() < 0.5 else []) + [("user", "assistant")[i % 2] for i in range(n)]
    if roles[-1] != "assistant":
      roles.append("assistant")
    contents = [" ".join(f"w{int(x)}" for x in rng.integers(0, 40, rng.integers(0, 6))) for _ in roles]
    record = {"roles": roles, "contents": contents}
    messages = encoder.messages(record)
    budget = int(rng.integers(3, 40))
    ids, weights = chat.truncate(messages, budget)
    assert ids == _brute_force_truncate(messages, budget), trial
    assert len(ids) == len(weights) <= budget
    last = messages[-1][1]
    assert ids[-min(len(last), budget):] == last[-budget:]  # the last assistant turn: whole if it fits, else its tail
    ex = chat.EncodeConversation(encoder, budget - 1).map((0, record))
    assert len(ex["inputs"]) <= budget - 1 and ex["targets"].tolist() == ids[1:]


def test_packed_rows_keep_conversations_apart():
  encoder = chat.ChatEncoder(WordTokenizer(), chat.ChatTemplate())
  rng = np.random.default_rng(1)
  records = [{"roles": ["user", "assistant"], "contents": [f"w{i}", " ".join(["w9"] * int(rng.integers(1, 5)))]}
             for i in range(12)]
  examples = [chat.EncodeConversation(encoder, 16).map((i, r)) for i, r in enumerate(records)]
  ds = grain.MapDataset.source(examples).to_iter_dataset()
  packed = list(chat.pack_conversations(ds, seq_len=16, num_bins=2, seed=0, shuffle_bins=False))
  assert len(packed) < len(records)  # several conversations a row
  found = []
  for row in packed:
    for s in range(1, int(row["segment_ids"].max()) + 1):
      at = row["segment_ids"] == s
      assert row["positions"][at].tolist() == list(range(int(at.sum())))
      found.append((row["inputs"][at].tolist(), row["targets"][at].tolist(), row["weights"][at].tolist()))
    assert not row["weights"][row["segment_ids"] == 0].any()
    assert row["example_ids"] == -1 and row["turns"] == -1
  want = sorted((e["inputs"].tolist(), e["targets"].tolist(), e["weights"].tolist()) for e in examples)
  assert sorted(found) == want


def test_turn_rows_score_each_assistant_turn_once_after_its_context():
  tok = WordTokenizer()
  encoder = chat.ChatEncoder(tok, chat.ChatTemplate())
  rows = chat.TurnRows(encoder, 24, tok.pad_id).flat_map((7, CONVERSATION))
  assert [int(r["turns"]) for r in rows] == [2, 4] and all(int(r["example_ids"]) == 7 for r in rows)
  full = chat.EncodeConversation(encoder, 64).map((0, CONVERSATION))
  # the weights of the turn rows add up to the whole conversation's, on the same targets after the same inputs
  total = np.zeros(len(full["targets"]))
  for r in rows:
    n = int((r["segment_ids"] > 0).sum())
    assert r["inputs"][:n].tolist() == full["inputs"][:n].tolist()
    total[:n] += r["weights"][:n]
    prompt = r["inputs"][:int(r["prompt_lengths"])].tolist()
    turn = int(r["turns"])
    assert prompt == encoder.prompt(CONVERSATION["roles"][:turn], CONVERSATION["contents"][:turn], 64)
  assert total.tolist() == full["weights"].tolist()


# ---- reading -----------------------------------------------------------------------------------------------------

def _chat_config(tmp_path, train, dev=None, *overrides):
  keys = ["task.name=sft", "data.source=chat", f"data.train_files={train}", f"data.tfds_data_dir={tmp_path}/tfds"]
  if dev:
    keys.append(f"data.dev_files={dev}")
  return config_lib.load(BASE, keys + list(overrides))


def test_jsonl_messages_and_prompt_response_records(tmp_path):
  path = tmp_path / "train.jsonl"
  lines = [{"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"}]},
           {"q": "2+2?", "a": "4", "sys": "Answer."},
           {"q": "Name?", "a": "Bot"}]
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
  config = _chat_config(tmp_path, path, None, "data.prompt_field=q", "data.response_field=a", "data.system_field=sys",
                        "data.eval_fraction=0.34")
  records = list(open_split(config, "train").records) + list(open_split(config, "dev").records)
  by_where = {r["where"]: r for r in records}
  assert len(by_where) == 3
  assert by_where[f"{path}:1"]["roles"] == ["system", "user", "assistant"]
  assert by_where[f"{path}:1"]["contents"] == ["Be kind.", "Hi", "Hello!"]
  assert by_where[f"{path}:2"]["roles"] == ["system", "user", "assistant"]
  assert by_where[f"{path}:2"]["contents"] == ["Answer.", "2+2?", "4"]
  assert by_where[f"{path}:3"]["roles"] == ["user", "assistant"]


@pytest.mark.parametrize("line, why", [
    ({"messages": [{"content": "Hi"}, {"role": "assistant", "content": "x"}]}, "message 1 has no 'role'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}]},
     "message 2 has unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"}]},
     "a conversation with no assistant turn"),
    ({"prompt": "Hi"}, "a conversation with no assistant turn"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "x"},
                   {"role": "assistant", "content": "y"}]}, "message 2 is a system message"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
     "message 1 \\(user\\) has no 'content' text"),
    ({"text": "Hi"}, "no field 'messages' \\(data.messages_field\\) or 'prompt'"),
    ("{not json", "invalid JSON"),
])
def test_bad_conversations_name_file_and_line(tmp_path, line, why):
  good = json.dumps({"prompt": "a", "response": "b"})
  path = tmp_path / "bad.jsonl"
  path.write_text(good + "\n" + good + "\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n")
  with pytest.raises(DataError, match=f"^{re.escape(str(path))}:3: {why}"):
    chat.read_chat(str(path), chat.CHAT.options(_chat_config(tmp_path, path).data))


def test_json_array_errors_name_the_line(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text('[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "c"}\n]\n')
  with pytest.raises(DataError, match=f"^{re.escape(str(path))}:3: a conversation with no assistant turn"):
    chat.read_chat(str(path), chat.CHAT.options(_chat_config(tmp_path, path).data))


def _dialogues_in_zip(path) -> list[list[str]]:
  """The reference: the zip's dialogues_<split>.txt read directly, split on __eou__ as the data README says."""
  with zipfile.ZipFile(path) as z:
    name = next(n for n in z.namelist() if re.search(r"/dialogues_(?!act|emotion)\w+\.txt$", n))
    lines = z.read(name).decode("utf-8").splitlines()
  return [[" ".join(u.split()) for u in line.split("__eou__")[:-1]] for line in lines if line.strip()]


@pytest.mark.parametrize("speaker", ["second", "first", "both"])
def test_dailydialog_validation_as_conversations(shared_data, tmp_path, speaker):
  path = shared_data / "dailydialog" / "validation.zip"
  config = _chat_config(tmp_path, path, None, f"data.assistant_speaker={speaker}")
  conversations = chat.read_chat(str(path), {**chat.CHAT.options(config.data), "split": "dev"})
  reference = _dialogues_in_zip(path)
  assert len(reference) == 1000 and sum(map(len, reference)) == 8069  # the data README's counts
  parities = {"first": [0], "second": [1], "both": [0, 1]}[speaker]
  want = [(turns, ["assistant" if i % 2 == p else "user" for i in range(len(turns))])
          for turns in reference for p in parities if len(turns) > p]
  assert [(c["contents"], c["roles"]) for c in conversations] == want
  assert conversations[0]["where"].startswith(f"{path}:validation/dialogues_validation.txt:1")


def test_dailydialog_train_counts(shared_data, tmp_path):
  path = shared_data / "dailydialog" / "train.zip"
  conversations = chat.read_chat(str(path), {**chat.CHAT.options(_chat_config(tmp_path, path).data), "split": "train"})
  assert len(conversations) == 11118  # every train dialogue has a second speaker's turn
  assert sum(len(c["roles"]) for c in conversations) == 87170  # the data README's utterance count
  reference = _dialogues_in_zip(path)
  assert sum(c["roles"].count("assistant") for c in conversations) == sum(len(d) // 2 for d in reference)
  assert [c["contents"] for c in conversations[::97]] == reference[::97]


def test_dailydialog_splits_through_the_builder(shared_data, tmp_path):
  folder = shared_data / "dailydialog"
  config = _chat_config(tmp_path, folder / "validation.zip", folder / "test.zip", "data.assistant_speaker=both")
  assert len(open_split(config, "train").records) == 2000  # each validation dialogue twice
  dev = open_split(config, "dev").records
  assert len(dev) == 2000 and dev[1]["where"].endswith("test/dialogues_test.txt:1 (assistant: second speaker)")
