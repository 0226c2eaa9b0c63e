"""data.add_pydoc: text files plus CPython's pydoc topics in the train split of the text record kind (the LM
pretraining recipe's WikiText-2 + pydoc), compared with the files and the topics read directly."""

from jaxlm import config as config_lib
from jaxlm.data.sources import pydoc_documents, split_documents
from tests.conftest import BASE, open_split


def test_pydoc_topics_join_the_train_split_once(tmp_path):
  files = []
  for name, paragraphs in (("a.txt", ["one para", "two\nlines"]), ("b.txt", ["three"])):
    (tmp_path / name).write_text("\n\n".join(paragraphs) + "\n")
    files.append(tmp_path / name)
  (tmp_path / "eval.txt").write_text("held out\n\nand more\n")
  keys = ["data.source=text", f"data.train_files={tmp_path}/[ab].txt", f"data.eval_files={tmp_path}/eval.txt",
          f"data.tfds_data_dir={tmp_path}/tfds"]
  with_pydoc = config_lib.load(BASE, keys + ["data.add_pydoc=true"])
  a, b = (split_documents(f.read_text(), "blank_lines") for f in files)
  from_files = a + b
  train = [r["text"] for r in open_split(with_pydoc, "train").records]
  assert train == a + pydoc_documents() + b  # the topics come with the first file
  assert [r["text"] for r in open_split(with_pydoc, "eval").records] == ["held out", "and more"]
  without = config_lib.load(BASE, keys)
  assert [r["text"] for r in open_split(without, "train").records] == from_files
