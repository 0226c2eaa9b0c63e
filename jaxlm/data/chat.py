"""Conversations for instruction and dialogue fine-tuning of decoders (task.name=sft): records of role-tagged messages
read from JSON lines / JSON arrays (a messages list, or prompt and response fields) and DailyDialog dialogues, the chat
template that turns them into token ids with loss weights on the assistant's tokens, left truncation at turn
boundaries, and the rows: packed conversations for training, one assistant turn a row for evaluation."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

from jaxlm.data import seq2seq as pairs_lib
from jaxlm.data.records import RecordKind, text, texts
from jaxlm.data.sources import DataError, _snippet, json_array_items

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLES = (SYSTEM, USER, ASSISTANT)
SPEAKERS = ("first", "second", "both")  # data.assistant_speaker: which DailyDialog speaker the assistant is

_TEXT = tfds.features.Text()


# ---- reading -----------------------------------------------------------------------------------------------------


def _text_field(record: dict, field: str, where: str, key: str) -> str:
  value = record[field]
  if not isinstance(value, str):
    raise DataError(f"{where}: field {field!r} ({key}) is {type(value).__name__}, not text")
  return value


def conversation(record, fields: dict, where: str, line: str, need_assistant: bool = True) -> dict:
  """One JSON object -> {'roles', 'contents', 'where'}: its list of {role, content} messages (fields['messages']), or
  one exchange from its prompt and response fields (and an optional system field). Roles are system, user and
  assistant; a system message comes first; with `need_assistant`, some message must be the assistant's."""
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}: {_snippet(line)}")
  roles, contents = [], []
  if fields["messages"] in record:
    messages = record[fields["messages"]]
    if not isinstance(messages, list) or not messages:
      raise DataError(f"{where}: field {fields['messages']!r} (data.messages_field) must be a non-empty list of "
                      f"{{role, content}} objects: {_snippet(line)}")
    for i, m in enumerate(messages, 1):
      if not isinstance(m, dict):
        raise DataError(f"{where}: message {i} is {type(m).__name__}, not a {{role, content}} object")
      if "role" not in m:
        raise DataError(f"{where}: message {i} has no 'role' (system, user or assistant): {_snippet(json.dumps(m))}")
      if m["role"] not in ROLES:
        raise DataError(f"{where}: message {i} has unknown role {m['role']!r}; expected system, user or assistant")
      if not isinstance(m.get("content"), str):
        raise DataError(f"{where}: message {i} ({m['role']}) has no 'content' text: {_snippet(json.dumps(m))}")
      roles.append(m["role"])
      contents.append(m["content"])
  elif fields["prompt"] in record:
    system = _text_field(record, fields["system"], where, "data.system_field") if fields["system"] in record else ""
    if system:
      roles.append(SYSTEM)
      contents.append(system)
    roles.append(USER)
    contents.append(_text_field(record, fields["prompt"], where, "data.prompt_field"))
    if fields["response"] in record:
      roles.append(ASSISTANT)
      contents.append(_text_field(record, fields["response"], where, "data.response_field"))
  else:
    raise DataError(f"{where}: no field {fields['messages']!r} (data.messages_field) or {fields['prompt']!r} "
                    f"(data.prompt_field); its fields: {', '.join(record) or 'none'}")
  if SYSTEM in roles[1:]:
    raise DataError(f"{where}: message {roles.index(SYSTEM, 1) + 1} is a system message: only the first may be")
  if need_assistant and ASSISTANT not in roles:
    raise DataError(f"{where}: a conversation with no assistant turn (nothing to learn from): {_snippet(line)}")
  return {"roles": roles, "contents": contents, "where": where}


def read_conversations(path: str, fields: dict, need_assistant: bool = True) -> list[dict]:
  """Conversations of a .jsonl file (one a line) or a .json file (an array of them); gzip is read as it is."""
  s = pairs_lib.read_text(path)
  if path.lower().removesuffix(".gz").endswith(".json"):
    return [conversation(record, fields, f"{path}:{line}", json.dumps(record), need_assistant)
            for line, record in json_array_items(s, path)]
  out = []
  for i, line in enumerate(pairs_lib.text_lines(s), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{i}: invalid JSON ({e.msg}): {_snippet(line)}") from None
    out.append(conversation(record, fields, f"{path}:{i}", line, need_assistant))
  return out


def speaker_conversations(turns: Sequence[str], where: str, speaker: str) -> list[dict]:
  """A dialogue's turns (two speakers taking turns) -> conversations whose assistant is the first speaker, the second,
  or both (the dialogue twice); one without an assistant turn (a single turn, answered by no one) is left out."""
  if speaker not in SPEAKERS:
    raise DataError(f"data.assistant_speaker={speaker!r}: expected one of {', '.join(SPEAKERS)}")
  out = []
  for who, parity in (("first", 0), ("second", 1)):
    if speaker not in (who, "both"):
      continue
    roles = [ASSISTANT if i % 2 == parity else USER for i in range(len(turns))]
    if ASSISTANT in roles:
      out.append({"roles": roles, "contents": list(turns),
                  "where": where if speaker != "both" else f"{where} (assistant: {who} speaker)"})
  return out


_DIALOGUE_TURN = re.compile(r"(.*) turn \d+")  # where seq2seq's dialogue reader puts a turn: 'file:line turn N'


def dialogues(pairs: list[dict], speaker: str) -> list[dict]:
  """Conversations from seq2seq's dialogue pairs read with every earlier turn as context, joined by '\\n' (each turn
  after the first is a pair; the last pair of a dialogue holds all its turns). Pairs that are not dialogue turns (a
  zip of per-split JSON pairs) become one exchange each: the input the user's turn, the target the assistant's."""
  last, out = {}, []
  for p in pairs:
    m = _DIALOGUE_TURN.fullmatch(p["where"])
    if m is None:
      out.append({"roles": [USER, ASSISTANT], "contents": [p["source"], p["target"]], "where": p["where"]})
    else:
      last[m.group(1)] = p  # a dict keeps the order of its first insertion: the dialogues' order
  for where, p in last.items():
    out.extend(speaker_conversations(p["source"].split("\n") + [p["target"]], where, speaker))
  return out


def read_chat(path: str, options: dict) -> list[dict]:
  """One local file -> conversations, by its name: .jsonl / .json conversations, a DailyDialog zip (or per-split JSON
  pairs zip, read in place by jaxlm/data/seq2seq.py) or DailyDialog dialogues_*.txt."""
  lower = path.lower().removesuffix(".gz")
  fields = {k: options[f"{k}_field"] for k in ("messages", "prompt", "response", "system")}
  # seq2seq's readers with the whole history as each turn's context; turns are single lines, so '\n' splits them back
  pair_options = {"context_turns": 0, "turn_separator": "\n", "input_field": options["input_field"],
                  "target_field": options["target_field"]}
  if path.lower().endswith(".zip"):
    conversations = dialogues(pairs_lib.read_zip_pairs(path, options.get("split", ""), pair_options),
                              options["assistant_speaker"])
  elif lower.endswith((".jsonl", ".json")):
    return read_conversations(path, fields)
  elif re.fullmatch(r"dialogues_\w+\.txt", os.path.basename(lower)):
    conversations = dialogues(pairs_lib.dialogue_pairs(pairs_lib.read_text(path), path, 0, "\n"),
                              options["assistant_speaker"])
  else:
    raise DataError(f"{path}: conversations are read from .jsonl or .json files (messages, or prompt/response "
                    "fields), DailyDialog .zip archives and dialogues_*.txt files")
  if not conversations:
    print(f"{path}: no conversation with an assistant turn", file=sys.stderr, flush=True)
  return conversations


class ChatRecords(RecordKind):
  """Conversations: {'roles', 'contents', 'where'}, a role (system | user | assistant) and a text per message."""
  name = "chat"
  local_source = "chat"

  def features(self):
    return {"roles": tfds.features.Sequence(_TEXT), "contents": tfds.features.Sequence(_TEXT), "where": _TEXT}

  def options(self, data_cfg):
    d = data_cfg
    return {"messages_field": d.messages_field, "prompt_field": d.prompt_field, "response_field": d.response_field,
            "system_field": d.system_field, "assistant_speaker": d.assistant_speaker, "input_field": d.input_field,
            "target_field": d.target_field}

  def read(self, path, options):
    return read_chat(path, options)

  def decode(self, raw):
    return {"roles": texts(raw["roles"]), "contents": texts(raw["contents"]), "where": text(raw["where"])}

  def sources(self):
    return (self.local_source,)

  def texts_of(self, records):
    for r in records:
      yield from r["contents"]


CHAT = ChatRecords()


# ---- the chat template -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """How a conversation is written: each message is its role's marker, its content, then the end marker; a reply is
  asked for with the assistant's marker. The defaults (data.chat_*) follow the Zephyr / Phi-3 layout:

      <|system|>\\nYou are terse.<|end|>\\n<|user|>\\nHi!<|end|>\\n<|assistant|>\\nHello.<|end|>\\n
  """
  system: str = "<|system|>\n"
  user: str = "<|user|>\n"
  assistant: str = "<|assistant|>\n"
  end: str = "<|end|>\n"

  @classmethod
  def from_config(cls, data_cfg) -> ChatTemplate:
    return cls(data_cfg.chat_system, data_cfg.chat_user, data_cfg.chat_assistant, data_cfg.chat_end)

  def marker(self, role: str) -> str:
    return {SYSTEM: self.system, USER: self.user, ASSISTANT: self.assistant}[role]

  def render(self, roles: Sequence[str], contents: Sequence[str], ask_reply: bool = False) -> str:
    """The conversation as text (for reading; the token ids are made message by message, see ChatEncoder)."""
    written = "".join(self.marker(r) + c + self.end for r, c in zip(roles, contents))
    return written + (self.assistant if ask_reply else "")

  def symbols(self) -> tuple[str, ...]:
    """The markers without the whitespace around them: the tokenizer.user_defined_symbols that make each one token."""
    return tuple(m.strip() for m in (self.system, self.user, self.assistant, self.end))


def marker_ids(tokenizer, marker: str) -> list[int]:
  """A marker's token ids: the single vocabulary piece it is, whitespace around it aside (encoding it would put a
  word-start piece before it, and sentencepiece drops the whitespace anyway), else its encoding."""
  core = marker.strip()
  if core:
    i = tokenizer.piece_to_id(core)
    if i >= 0 and i != tokenizer.unk_id:
      return [int(i)]
  return list(tokenizer.encode(marker))


Encoded = tuple[str, list[int], list[float]]  # (role, token ids, loss weights) of one message


@dataclasses.dataclass
class ChatEncoder:
  """A tokenizer with a chat template: messages -> token ids and loss weights. Each message's ids are its marker's,
  its content's (encoded alone) and the end marker's, so every message boundary is a token boundary. Picklable (grain
  workers receive it)."""
  tokenizer: object
  template: ChatTemplate

  def __post_init__(self):
    self.markers = {r: marker_ids(self.tokenizer, self.template.marker(r)) for r in ROLES}
    for role, ids in self.markers.items():
      if not ids:
        raise ValueError(f"data.chat_{role}={self.template.marker(role)!r} encodes to no token: a role marker must "
                         "be text the tokenizer keeps")
    end = marker_ids(self.tokenizer, self.template.end)
    if len(end) != 1:
      raise ValueError(f"data.chat_end={self.template.end!r} is {len(end)} tokens of the tokenizer, and generation "
                       f"stops at one token: train the tokenizer with tokenizer.user_defined_symbols="
                       f"{self.template.symbols()} so that each marker is one token")
    self.end_id = end[0]

  def message(self, role: str, content: str, train: bool = True) -> Encoded:
    """A message's ids; with `train`, weight 1 on an assistant's content and end marker (the model learns to stop),
    0 on its marker and on every token of other roles."""
    marker = self.markers[role]
    ids = marker + list(self.tokenizer.encode(content)) + [self.end_id]
    w = 1.0 if train and role == ASSISTANT else 0.0
    return role, ids, [0.0] * len(marker) + [w] * (len(ids) - len(marker))

  def messages(self, record: dict) -> list[Encoded]:
    return [self.message(r, c) for r, c in zip(record["roles"], record["contents"])]

  def prompt(self, roles: Sequence[str], contents: Sequence[str], budget: int) -> list[int]:
    """The ids a reply is generated from: the conversation, then the assistant's marker, at most `budget` tokens
    (truncate; the last message and the marker are kept as one)."""
    units = [self.message(r, c, train=False) for r, c in zip(roles, contents)]
    reply = self.markers[ASSISTANT]
    if units:
      role, ids, weights = units.pop()
      units.append((role, ids + reply, weights + [0.0] * len(reply)))
    else:
      units = [(ASSISTANT, reply, [0.0] * len(reply))]
    return truncate(units, budget)[0]


def truncate(messages: list[Encoded], budget: int) -> tuple[list[int], list[float]]:
  """The messages' ids and weights joined, at most `budget` tokens. Cut from the left at turn boundaries, and the
  last message always stays:

  1. a system message (the first) stays, unless the last message does not fit beside it;
  2. the oldest other messages are left out one at a time until the rest fits; an assistant turn that this leaves
     at the front (answering a turn that is gone) goes too, unless it is the last message;
  3. if the last message alone is longer than `budget`, its last `budget` tokens are kept.
  """
  messages = list(messages)
  head = [messages.pop(0)] if len(messages) > 1 and messages[0][0] == SYSTEM else []
  size = lambda ms: sum(len(m[1]) for m in ms)
  if size(head) + size(messages[-1:]) > budget:
    head = []
  dropped = False
  while len(messages) > 1 and (size(head) + size(messages) > budget or (dropped and messages[0][0] == ASSISTANT)):
    messages.pop(0)
    dropped = True
  kept = head + messages
  ids = [t for m in kept for t in m[1]]
  weights = [w for m in kept for w in m[2]]
  return ids[-budget:], weights[-budget:]


# ---- rows --------------------------------------------------------------------------------------------------------


def _last_assistant(roles: Sequence[str]) -> int:
  return max(i for i, r in enumerate(roles) if r == ASSISTANT)


@dataclasses.dataclass
class EncodeConversation(grain.transforms.Map):
  """(index, conversation) -> next-token pairs {'inputs', 'targets', 'weights'} of its messages up to its last
  assistant turn (those after it carry no loss), truncated to seq_len pairs (seq_len + 1 tokens)."""
  encoder: ChatEncoder
  seq_len: int

  def map(self, item) -> dict[str, np.ndarray]:
    _, record = item
    messages = self.encoder.messages(record)[:_last_assistant(record["roles"]) + 1]
    ids, weights = truncate(messages, self.seq_len + 1)
    return {"inputs": np.asarray(ids[:-1], np.int32), "targets": np.asarray(ids[1:], np.int32),
            "weights": np.asarray(weights[1:], np.float32)}


def _row(inputs, targets, weights, segment_ids, positions, example_id: int, turn: int, prompt_length: int) -> dict:
  return {
      "inputs": inputs, "targets": targets, "weights": weights,  # [T]
      "segment_ids": segment_ids,  # 1..n per conversation in the row, 0 = padding
      "positions": positions,  # restart at 0 for each conversation
      "example_ids": np.int32(example_id),  # eval rows: the conversation's index in its split; -1 otherwise
      "turns": np.int32(turn),  # eval rows: the index of the assistant message the row scores; -1 otherwise
      "prompt_lengths": np.int32(prompt_length),  # eval rows: tokens before that message's content (the context)
  }


@dataclasses.dataclass
class _PackedRow(grain.transforms.Map):
  def map(self, p: dict) -> dict[str, np.ndarray]:
    segment_ids = p["inputs_segment_ids"].astype(np.int32)
    return _row(p["inputs"].astype(np.int32), p["targets"].astype(np.int32),
                np.where(segment_ids > 0, p["weights"], 0.0).astype(np.float32), segment_ids,
                p["inputs_positions"].astype(np.int32), -1, -1, 0)


def pack_conversations(ds: grain.IterDataset, *, seq_len: int, num_bins: int, seed: int,
                       shuffle_bins: bool) -> grain.IterDataset:
  """IterDataset of EncodeConversation outputs -> rows of `seq_len` holding several conversations each (first fit over
  `num_bins` open rows). Segment ids number the conversations of a row and positions restart at 0 in each, so no
  token attends across conversations."""
  lengths = {"inputs": seq_len, "targets": seq_len, "weights": seq_len}
  packed = grain.experimental.FirstFitPackIterDataset(ds, length_struct=lengths, num_packing_bins=num_bins, seed=seed,
                                                      shuffle_bins=shuffle_bins)
  return packed.map(_PackedRow())


@dataclasses.dataclass
class TurnRows(grain.experimental.FlatMapTransform):
  """(index, conversation) -> a row per assistant turn: its context and it (truncated to seq_len + 1 tokens), weights
  on that turn alone, padded to seq_len. Every assistant token of the split is scored once, after the same context
  as in the whole conversation, and the row's context is what a reply to the turn is generated from."""
  encoder: ChatEncoder
  seq_len: int
  pad_id: int
  max_fan_out: int = 1 << 16

  def flat_map(self, item) -> list[dict[str, np.ndarray]]:
    index, record = item
    messages = self.encoder.messages(record)
    out = []
    for k, (role, ids, weights) in enumerate(messages):
      if role != ASSISTANT:
        continue
      context = [(r, i, [0.0] * len(i)) for r, i, _ in messages[:k]]
      joined, joined_weights = truncate(context + [(role, ids, weights)], self.seq_len + 1)
      response = len(ids) - len(self.encoder.markers[ASSISTANT])  # content and end marker
      n = len(joined) - 1  # next-token pairs
      out.append(_row(self._padded(joined[:-1], self.pad_id, np.int32), self._padded(joined[1:], self.pad_id, np.int32),
                      self._padded(joined_weights[1:], 0.0, np.float32), self._padded([1] * n, 0, np.int32),
                      self._padded(np.arange(n), 0, np.int32), index, k, max(len(joined) - response, 1)))
    return out

  def _padded(self, values, fill, dtype) -> np.ndarray:
    row = np.full(self.seq_len, fill, dtype)
    row[:len(values)] = values
    return row


PAD_VALUES = {"example_ids": -1, "turns": -1, "prompt_lengths": 1}  # eval padding rows: no turn, a 1-token prompt
