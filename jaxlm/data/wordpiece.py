"""BERT's WordPiece tokenizer read from an HF-style vocab.txt (cased or uncased), so imported BERT checkpoints are
fine-tuned with their own vocabulary; gives character offsets for extractive QA."""

from __future__ import annotations

import hashlib
import unicodedata

import numpy as np

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_MAX_WORD_CHARS = 100  # BERT maps longer words to [UNK] whole
_CACHE_LIMIT = 200_000  # words whose pieces are remembered; natural text repeats its words


def _is_whitespace(ch: str) -> bool:
  if ch in (" ", "\t", "\n", "\r"):
    return True
  return unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
  if ch in ("\t", "\n", "\r"):
    return False
  return unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
  cp = ord(ch)
  # BERT counts every non-alphanumeric ASCII character as punctuation, e.g. "^", "$" and "`" too.
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
  return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
          or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
          or 0x2F800 <= cp <= 0x2FA1F)


def _normalize(word: str, origins: list[int], lowercase: bool) -> tuple[str, list[int]]:
  """Lower-cases and strips accents (uncased BERT) while remembering which input character each output came from.

  Character by character, as HF `tokenizers` does: a final capital sigma becomes 'σ', not Python's word-level 'ς'.
  """
  if not lowercase:
    return word, origins
  chars, out_origins = [], []
  for ch, origin in zip(word, origins):
    for c in unicodedata.normalize("NFD", ch.lower()):
      if unicodedata.category(c) != "Mn":
        chars.append(c)
        out_origins.append(origin)
  return "".join(chars), out_origins


class WordPieceTokenizer:
  """BERT's basic tokenisation (cleaning, CJK, accents, punctuation) followed by greedy longest-match WordPiece."""

  def __init__(self, vocab: list[str], lowercase: bool, path: str = ""):
    self.path = path
    self.lowercase = lowercase
    self._pieces = list(vocab)
    self._vocab = {p: i for i, p in enumerate(self._pieces)}
    missing = [s for s in ("[UNK]", "[PAD]") if s not in self._vocab]
    if missing:
      raise ValueError(f"{path or 'vocab'}: no {', '.join(missing)} entry: not a BERT WordPiece vocab.txt")
    self.vocab_size = len(self._pieces)
    self.pad_id = self._vocab["[PAD]"]
    self.unk_id = self._vocab["[UNK]"]
    self.cls_id = self._vocab.get("[CLS]", -1)
    self.sep_id = self._vocab.get("[SEP]", -1)
    self.mask_id = self._vocab.get("[MASK]", -1)
    self.bos_id, self.eos_id = self.cls_id, self.sep_id  # BERT's sequence start and end markers
    self._specials = {p for p in SPECIALS if p in self._vocab}
    self._cache: dict[str, list[int]] = {}

  @classmethod
  def from_file(cls, path: str, lowercase: bool) -> WordPieceTokenizer:
    with open(path, encoding="utf-8") as f:
      vocab = [line.rstrip("\n").rstrip("\r") for line in f]
    while vocab and not vocab[-1]:
      vocab.pop()
    return cls(vocab, lowercase, path)

  def _words(self, text: str) -> list[tuple[str, list[int]]]:
    """Basic tokenisation: (word, origin character index of each of its characters) pairs."""
    words, current, origins = [], [], []

    def flush():
      if current:
        words.append(("".join(current), list(origins)))
        current.clear()
        origins.clear()

    for i, ch in enumerate(text):
      cp = ord(ch)
      if cp == 0 or cp == 0xFFFD or _is_control(ch):
        continue
      if _is_whitespace(ch):
        flush()
      elif _is_cjk(cp):
        flush()
        words.append((ch, [i]))
      else:
        current.append(ch)
        origins.append(i)
    flush()
    out = []
    for word, origin in words:
      if word in self._specials:
        out.append((word, origin))
        continue
      word, origin = _normalize(word, origin, self.lowercase)
      start = 0
      for j, ch in enumerate(word):  # punctuation characters become words of their own
        if _is_punctuation(ch):
          if j > start:
            out.append((word[start:j], origin[start:j]))
          out.append((ch, origin[j:j + 1]))
          start = j + 1
      if start < len(word):
        out.append((word[start:], origin[start:]))
    return out

  def _word_pieces(self, word: str) -> list[tuple[int, int, int]]:
    """Greedy longest-match-first: (id, start, end) within the word; the whole word is [UNK] if any part fails."""
    if word in self._specials:
      return [(self._vocab[word], 0, len(word))]
    if len(word) > _MAX_WORD_CHARS:
      return [(self.unk_id, 0, len(word))]
    pieces, start = [], 0
    while start < len(word):
      end = len(word)
      found = None
      while start < end:
        piece = word[start:end] if start == 0 else "##" + word[start:end]
        if piece in self._vocab:
          found = self._vocab[piece]
          break
        end -= 1
      if found is None:
        return [(self.unk_id, 0, len(word))]
      pieces.append((found, start, end))
      start = end
    return pieces

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and, per token, the [start, end) character span it came from in `text`."""
    ids, offsets = [], []
    for word, origin in self._words(text):
      for piece_id, start, end in self._word_pieces(word):
        ids.append(piece_id)
        offsets.append((origin[start], origin[end - 1] + 1))
    return ids, offsets

  def encode(self, text: str) -> list[int]:
    ids = []
    for word, _ in self._words(text):
      cached = self._cache.get(word)
      if cached is None:
        cached = [p for p, _, _ in self._word_pieces(word)]
        if len(self._cache) < _CACHE_LIMIT:
          self._cache[word] = cached
      ids.extend(cached)
    return ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def encode_words(self, words: list[str]) -> list[list[int]]:
    """Each pre-split word on its own (token classification): a word may still become several pieces."""
    return [self.encode(w) for w in words]

  def decode(self, ids) -> str:
    out = []
    for i in ids:
      piece = self._pieces[int(i)]
      if piece == "[PAD]":
        continue
      if piece.startswith("##") and out:
        out[-1] += piece[2:]
      else:
        out.append(piece)
    return " ".join(out)

  def piece_to_id(self, piece: str) -> int:
    return self._vocab.get(piece, self.unk_id)

  def id_to_piece(self, i: int) -> str:
    return self._pieces[int(i)]

  def word_start_mask(self) -> np.ndarray:
    """[vocab] True where a piece begins a word (whole-word masking groups a start with its '##' pieces)."""
    return np.array([not p.startswith("##") for p in self._pieces], bool)

  def fingerprint(self) -> str:
    return "wordpiece:" + hashlib.sha256("\n".join(self._pieces).encode()).hexdigest()[:16]

  def __getstate__(self):
    return {"vocab": self._pieces, "lowercase": self.lowercase, "path": self.path}

  def __setstate__(self, state):
    self.__init__(state["vocab"], state["lowercase"], state["path"])
