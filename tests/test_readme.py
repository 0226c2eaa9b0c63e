"""The README's Python examples run as written."""

import os
import re

from tests.conftest import REPO


def _python_blocks(section: str) -> list[str]:
  text = (REPO / "README.md").read_text()
  start = text.index(f"## {section}")
  end = text.find("\n## ", start + 1)
  return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], re.S)


def test_from_python_runs_as_written(tmp_path, capsys, monkeypatch):
  [code] = _python_blocks("From Python")
  monkeypatch.chdir(REPO)
  code = code.replace("/tmp/jaxlm_notebook", str(tmp_path / "nb"))
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own example
  out = capsys.readouterr().out
  assert re.search(r"step 20: loss \d+\.\d{3}", out), out
  assert "perplexity" in out
  assert os.path.isfile(tmp_path / "nb" / "tokenizer" / "spm.model")
