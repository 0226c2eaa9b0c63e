"""Tokenizers behind one small interface: sentencepiece models (trained by `jaxlm tokenizer`) and HF-style
WordPiece vocab.txt files (imported BERT checkpoints), plus training and loading from the run config."""

from __future__ import annotations

import hashlib
import io
import os
from typing import Protocol

import numpy as np
import sentencepiece as spm

from jaxlm.data.wordpiece import WordPieceTokenizer

# Ids a sentencepiece model trained here reserves; imported models keep their own.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  unk_id: int
  cls_id: int  # [CLS], [SEP], [MASK]: -1 when the vocabulary has no such piece
  sep_id: int
  mask_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids) -> str: ...

  def piece_to_id(self, piece: str) -> int: ...  # unk_id when the piece is not in the vocabulary

  def encode_batch(self, texts: list[str]) -> list[list[int]]: ...  # each text on its own, in one call

  def encode_words(self, words: list[str]) -> list[list[int]]: ...  # token classification: one id list per word

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...  # QA: character spans

  def word_start_mask(self): ...  # [vocab] bool, True where a piece begins a word (whole-word masking)

  def fingerprint(self) -> str: ...  # hash of the vocabulary/model file, stored with checkpoints


class SentencePieceTokenizer:
  """A sentencepiece model. Pickles as its serialized proto, so grain worker processes get their own copy."""

  def __init__(self, model_proto: bytes, path: str = ""):
    self.path = path
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.vocab_size()
    # Models without a pad piece still need a filler id for padded positions; they carry weight 0.
    self.pad_id = max(self._sp.pad_id(), 0)
    self.unk_id = self._sp.unk_id()
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()
    # Encoder tasks need BERT's markers; a model trained with them as user-defined symbols has them, else -1.
    self.cls_id, self.sep_id, self.mask_id = (self._known("[CLS]"), self._known("[SEP]"), self._known("[MASK]"))

  def _known(self, piece: str) -> int:
    i = self._sp.piece_to_id(piece)
    return -1 if i == self.unk_id else i

  @classmethod
  def from_file(cls, path: str) -> SentencePieceTokenizer:
    with open(path, "rb") as f:
      return cls(f.read(), path)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self._sp.encode(list(texts))

  def encode_pieces(self, text: str) -> list[str]:
    return self._sp.encode(text, out_type=str)

  def encode_words(self, words: list[str]) -> list[list[int]]:
    """Each pre-split word on its own, as if preceded by a space (token classification)."""
    return self._sp.encode(list(words))

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and, per token, the [start, end) character span of its surface text in `text`."""
    proto = self._sp.encode(text, return_type="proto")
    if text.isascii():
      return [p.id for p in proto.pieces], [(p.begin, p.end) for p in proto.pieces]
    char_at = np.zeros(len(text.encode("utf-8")) + 1, np.int64)  # byte offset -> character offset
    pos = 0
    for i, ch in enumerate(text):
      n = len(ch.encode("utf-8"))
      char_at[pos:pos + n] = i
      pos += n
    char_at[pos] = len(text)
    return [p.id for p in proto.pieces], [(int(char_at[p.begin]), int(char_at[p.end])) for p in proto.pieces]

  def word_start_mask(self) -> np.ndarray:
    """[vocab] True where a piece begins a word ('\u2581' prefix), for whole-word masking."""
    return np.array([self._sp.id_to_piece(i).startswith("\u2581") or self._sp.is_control(i)
                     for i in range(self.vocab_size)], bool)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])

  def piece_to_id(self, piece: str) -> int:
    return self._sp.piece_to_id(piece)

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def fingerprint(self) -> str:
    return "spm:" + hashlib.sha256(self._proto).hexdigest()[:16]

  def __getstate__(self):
    return {"proto": self._proto, "path": self.path}

  def __setstate__(self, state):
    self.__init__(state["proto"], state["path"])


def sentinel(i: int) -> str:
  """T5's name for the i-th span-corruption sentinel piece."""
  return f"<extra_id_{i}>"


def speaker_tag(i: int) -> str:
  """The piece that stands for a dialogue's i-th speaker (from 1) under task.speaker_tags."""
  return f"<speaker_{i}>"


def require_ids(tokenizer, names: tuple[str, ...], task: str) -> None:
  """A clear error before any batch is built when the task's special pieces are missing from the vocabulary."""
  missing = [n for n in names if getattr(tokenizer, f"{n}_id") < 0]
  if missing:
    pieces = ", ".join(f"[{n.upper()}]" for n in missing)
    raise ValueError(f"{task} needs the tokenizer pieces {pieces}; add them to tokenizer.user_defined_symbols and "
                     "retrain with `jaxlm tokenizer` (or use a WordPiece vocab.txt that has them)")


def tokenizer_path(config, workdir: str) -> str:
  """config.tokenizer.path, or WORKDIR/tokenizer/spm.model when that is empty."""
  if config.tokenizer.path:
    return config.tokenizer.path
  return os.path.join(workdir, "tokenizer", "spm.model")


# tokenizer.kind -> (how to load its file, what to do when the file is missing)
_KINDS = {
    "sentencepiece": (lambda path, cfg: SentencePieceTokenizer.from_file(path),
                      "train one with `jaxlm tokenizer --config CONFIG --workdir {workdir}`, or set "
                      "--config.tokenizer.path"),
    "wordpiece": (lambda path, cfg: WordPieceTokenizer.from_file(path, lowercase=cfg.lowercase),
                  "set --config.tokenizer.path to the checkpoint's vocab.txt"),
}


def trained_here(config) -> bool:
  """Whether the run owns its tokenizer (a sentencepiece model at WORKDIR/tokenizer/spm.model, trained if missing)."""
  return not config.tokenizer.path and config.tokenizer.kind in TRAINABLE


TRAINABLE = ("sentencepiece",)  # tokenizer kinds `jaxlm tokenizer` trains


def load_tokenizer(config, workdir: str) -> Tokenizer:
  path = tokenizer_path(config, workdir)
  kind = config.tokenizer.kind
  if kind not in _KINDS:
    raise ValueError(f"tokenizer.kind={kind!r}: expected {' or '.join(_KINDS)}")
  load, hint = _KINDS[kind]
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file not found: {path} ({hint.format(workdir=workdir)})")
  return load(path, config.tokenizer)


def _training_sentences(texts, max_sentences: int):
  """Lines of the training text: sentencepiece learns from sentences, not whole documents."""
  count = 0
  for doc in texts:
    for line in doc.split("\n"):
      line = line.strip()
      if line:
        yield line
        count += 1
        if count >= max_sentences:
          return


def train_tokenizer(config, workdir: str, texts) -> str:
  """Trains a sentencepiece model on `texts` (an iterable of documents, e.g. the train split's) and writes it to
  tokenizer_path(); returns the path."""
  t = config.tokenizer
  if t.kind not in TRAINABLE:
    raise ValueError(f"tokenizer.kind={t.kind!r}: only sentencepiece models are trained (WordPiece comes with its "
                     "checkpoint's vocab.txt)")
  if t.model_type not in ("unigram", "bpe"):
    raise ValueError(f"tokenizer.model_type={t.model_type!r}: expected unigram or bpe")
  path = tokenizer_path(config, workdir)
  symbols = [s for s in t.user_defined_symbols if s]
  symbols += [sentinel(i) for i in range(t.num_sentinels) if sentinel(i) not in symbols]
  symbols += [speaker_tag(i) for i in range(1, config.task.speaker_tags + 1) if speaker_tag(i) not in symbols]
  proto = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_sentences(texts, t.max_sentences), model_writer=proto,
        vocab_size=t.vocab_size, model_type=t.model_type, character_coverage=t.character_coverage,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, user_defined_symbols=symbols,
        # a training corpus usually holds more sentences than max_sentences; sample them, don't take the head
        input_sentence_size=t.max_sentences, shuffle_input_sentence=True,
        num_threads=max(1, min(4, os.cpu_count() or 1)), minloglevel=2)
  except RuntimeError as e:
    if "Vocabulary size" in str(e):
      raise ValueError(f"tokenizer.vocab_size={t.vocab_size} is too large for this training text: {e}") from e
    raise
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(proto.getvalue())
  os.replace(tmp, path)
  return path
