"""Config loading: overrides, validation of unknown keys and bad types, nearest-name suggestions."""

import pytest

from jaxlm import config as config_lib
from tests.conftest import REPO

TINY = str(REPO / "configs" / "gpt_tiny.py")


def test_overrides_apply_with_types():
  c = config_lib.load(TINY, ["train.steps=7", "optim.learning_rate=1e-3", "model.scan_layers=true",
                             "model.style=llama", "tokenizer.user_defined_symbols=('[CLS]','[SEP]')"])
  assert c.train.steps == 7 and isinstance(c.train.steps, int)
  assert c.optim.learning_rate == 1e-3
  assert c.model.scan_layers is True
  assert c.model.style == "llama"
  assert c.tokenizer.user_defined_symbols == ("[CLS]", "[SEP]")


def test_unknown_key_names_nearest():
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load(TINY, ["train.stpes=3"])
  assert "train.stpes" in str(e.value) and "train.steps" in str(e.value)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load(TINY, ["trian.batch_size=3"])
  assert "train.batch_size" in str(e.value)


def test_wrong_type_names_key():
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load(TINY, ["train.steps=ten"])
  assert "train.steps" in str(e.value) and "integer" in str(e.value)


def test_experiment_key_missing_from_base(tmp_path):
  (tmp_path / "base.py").write_text((REPO / "configs" / "base.py").read_text())
  (tmp_path / "exp.py").write_text(
      "import base\n\ndef get_config():\n  c = base.get_config()\n  c.train.learning_rate = 1.0\n  return c\n")
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load(str(tmp_path / "exp.py"))
  assert "train.learning_rate" in str(e.value) and "optim.learning_rate" in str(e.value)


def test_every_config_file_loads():
  for path in sorted(p for p in (REPO / "configs").glob("*.py") if p.name != "__init__.py"):
    c = config_lib.load(str(path))
    assert c.name, path


def test_base_keys_all_commented():
  lines = (REPO / "configs" / "base.py").read_text().splitlines()
  for i, line in enumerate(lines):
    stripped = line.strip()
    if stripped.startswith("c.") and " = " in stripped and "ConfigDict()" not in stripped:
      # the comment sits on the key's line, or (for a long one) on the lines right above it
      above = lines[i - 1].strip() if i else ""
      assert "#" in stripped or above.startswith("#"), f"configs/base.py key without a comment: {stripped}"
