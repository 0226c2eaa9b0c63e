"""Config validation: every key of configs/base.py declares what it accepts (CHECKS), and a value outside it stops a
command before any work, in one line naming the key, the value and what the key accepts."""

import ast

import pytest
from jaxlm.configs import base as base_configs

from jaxlm import config as config_lib
from jaxlm import config_checks as checks
from jaxlm.tasks import known_tasks, task_class
from tests.conftest import REPO, TINY

BASE_FILE = REPO / "configs" / "base.py"


def _declared_lines() -> dict[str, int]:
  """key -> line number of its CHECKS[...] line in configs/base.py, read from the source."""
  lines = {}
  for node in ast.walk(ast.parse(BASE_FILE.read_text())):
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Subscript):
      target = node.targets[0]
      if isinstance(target.value, ast.Name) and target.value.id == "CHECKS":
        lines[target.slice.value] = node.lineno
  return lines


def test_every_key_declares_what_it_accepts():
  base = config_lib.base_config()
  declared = config_lib.declared_checks()
  missing = [k for k in config_lib.all_keys(base)
             if k not in declared and not isinstance(config_lib.get_key(base, k), bool)]
  assert not missing, (
      "configs/base.py: these keys have no check; add a line right after each key, e.g.\n"
      '  CHECKS["train.steps"] = at_least(1)      # counts and sizes\n'
      '  CHECKS["train.nonfinite"] = one_of("skip", "stop")      # enumerations\n'
      '  CHECKS["model.dropout"] = rate()      # or probability(), between(lo, hi), positive(), each(...)\n'
      '  CHECKS["init.hf_path"] = FREE      # names, paths, globs\n'
      "(see jaxlm/config_checks.py; a boolean needs none). Missing: " + ", ".join(missing))
  stale = sorted(set(declared) - set(config_lib.all_keys(base)))
  assert not stale, f"configs/base.py declares checks for keys it does not define: {stale}"
  assert all(isinstance(c, checks.Check) for c in declared.values())


def test_each_check_sits_right_after_its_key():
  """The declaration is the line after the key's assignment (after its last line, for a key spanning lines)."""
  source = BASE_FILE.read_text().splitlines()
  for key, lineno in _declared_lines().items():
    above = source[lineno - 2].strip()
    statement_start = next(i for i in range(lineno - 2, -1, -1) if source[i].strip().startswith("c."))
    assert source[statement_start].strip().startswith(f"c.{key} = "), (key, above)
    between = source[statement_start + 1:lineno - 1]
    assert all(not line.strip().startswith(("c.", "CHECKS[")) for line in between), key


def test_every_default_and_config_file_passes_its_checks():
  config_lib.validate(config_lib.base_config(), "configs/base.py")
  for path in sorted(p for p in (REPO / "configs").glob("*.py") if p.name != "__init__.py"):
    config_lib.load(str(path))  # validates


@pytest.mark.parametrize("override, expected", [
    ("train.nonfinite=bogus", "--config.train.nonfinite=bogus: expected one of 'skip', 'stop'"),
    ("train.steps=0", "--config.train.steps=0: expected a number >= 1"),
    ("train.batch_size=-8", "--config.train.batch_size=-8: expected a number >= 1"),
    ("optim.learning_rate=-0.001", "--config.optim.learning_rate=-0.001: expected a number >= 0"),
    ("optim.learning_rate=nan", "--config.optim.learning_rate=nan: expected a number >= 0"),
    ("optim.eps=0", "--config.optim.eps=0: expected a number > 0"),
    ("optim.b2=1.0", "--config.optim.b2=1.0: expected a number in [0, 1)"),
    ("model.dropout=1.0", "--config.model.dropout=1.0: expected a number in [0, 1)"),
    ("data.mlm_probability=1.5", "--config.data.mlm_probability=1.5: expected a number in [0, 1]"),
    ("mesh.data=-2", "--config.mesh.data=-2: expected a number >= 1, or -1"),
    ("data.bucket_lengths=(16,0)", "--config.data.bucket_lengths=(16,0): item 1 (0): expected a number >= 1"),
    ("data.tsv_delimiter=;;", "--config.data.tsv_delimiter=;;: expected a single character"),
    ("data.jsonl_field=", "--config.data.jsonl_field=: expected a non-empty string"),
])
def test_a_refused_value_names_key_value_and_what_is_allowed(override, expected):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load(TINY, [override])
  assert str(e.value) == expected


def test_registries_are_the_allowed_values():
  """task.name and data.source accept exactly what the task registry and the tasks' record kinds provide."""
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load(TINY, ["task.name=translation"])
  for name in known_tasks():
    assert repr(name) in str(e.value)
  sources = {s for name in known_tasks() for s in task_class(name).kind.sources()}
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load(TINY, ["data.source=csv"])
  assert sorted(s for s in sources if repr(s) in str(e.value)) == sorted(sources)
  for source in sources:
    config_lib.load(TINY, [f"data.source={source}"])


def test_values_from_a_file_are_checked_with_its_name(tmp_path):
  (tmp_path / "exp.py").write_text(
      "from jaxlm.configs import base\n\n\ndef get_config():\n  c = base.get_config()\n"
      "  c.model.dropout = 2.0\n  c.train.nonfinite = 'halt'\n  return c\n")
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load(str(tmp_path / "exp.py"))
  path = tmp_path / "exp.py"
  assert str(e.value) == (f"{path}: model.dropout=2.0: expected a number in [0, 1); {path}: "
                          "train.nonfinite='halt': expected one of 'skip', 'stop'")
  # an override that fixes them is what counts
  config_lib.load(str(path), ["model.dropout=0.1", "train.nonfinite=stop"])


@pytest.mark.parametrize("body, expected", [
    ("def get_config(:\n  pass\n", "{path}:1: invalid Python"),
    (("from jaxlm.configs import base\n\n\ndef get_config():\n  c = base.get_config()\n  c.model.d_model = 1 / 0\n"
     "  return c\n"), "{path}:6: ZeroDivisionError: division by zero"),
    ("import base_that_is_not_there\n", "{path}:1: ModuleNotFoundError: No module named 'base_that_is_not_there'"),
    (("from jaxlm.configs import base\n\n\ndef get_config():\n  c = base.get_config()\n  c.train.steps = '10'\n"
     "  return c\n"), "{path}:6: TypeError: Could not override field 'steps'"),
    ("x = 1\n", "{path} defines no get_config()"),
    ("def get_config():\n  return {'train': {}}\n", "{path}: get_config() returned dict, not an ml_collections"),
])
def test_a_config_file_that_fails_is_named_with_its_line(tmp_path, body, expected):
  path = tmp_path / "exp.py"
  path.write_text(body)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load(str(path))
  assert str(e.value).startswith(expected.format(path=path)), str(e.value)
  assert "\n" not in str(e.value)


def test_a_saved_config_takes_new_keys_from_base_and_is_checked(tmp_path):
  saved = config_lib.base_config().to_dict()
  del saved["train"]["nonfinite"]  # a key added after this config was written
  saved["optim"]["gone"] = 1  # a key removed since
  config = config_lib.from_saved(saved, "config.json")
  assert config.train.nonfinite == base_configs.get_config().train.nonfinite and "gone" not in config.optim
  saved["model"]["dropout"] = 3.0
  with pytest.raises(config_lib.ConfigError, match=r"config.json: model.dropout=3.0: expected a number in \[0, 1\)"):
    config_lib.from_saved(saved, "config.json")


def test_check_objects_word_their_own_errors():
  assert checks.between(0, 1, lo_open=True).error(0) == "expected a number in (0, 1]"
  assert checks.at_least(1).or_(-1).accepts(-1) and not checks.at_least(1).or_(-1).accepts(-1.5)
  assert not checks.at_least(0).accepts(True)  # a boolean is not a count
  assert checks.FREE.error(object()) is None
  assert checks.each(checks.non_empty()).error(("a", "")) == "item 1 (''): expected a non-empty string"
  assert checks.satisfies(lambda v: v.isupper(), "upper case").error(3) == "expected upper case"  # TypeError: refused
