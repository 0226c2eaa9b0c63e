"""jaxlm as users install it: a wheel in a fresh virtual environment (no editable install, no repository on the path)
converts a Hugging Face checkpoint and loads a config file kept outside the repository that starts from the packaged
base config."""

import os
import site
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO
from tests.test_convert import _save, _small_hf_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
  """(python of a new venv with the jaxlm wheel installed, environment). The venv reaches the test environment's
  dependencies through a .pth file naming its site-packages; .pth files found there (the editable install's) are not
  run, so `import jaxlm` can only find the wheel."""
  root = tmp_path_factory.mktemp("wheel")
  r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                      str(root / "dist"), str(REPO)], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  [wheel] = (root / "dist").glob("jaxlm-*.whl")
  venv = root / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
  python = venv / "bin" / "python"
  venv_site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                             capture_output=True, text=True, check=True).stdout.strip()
  with open(os.path.join(venv_site, "test_dependencies.pth"), "w") as f:
    f.write("\n".join(site.getsitepackages()) + "\n")
  r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", venv_site, str(wheel)],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", XLA_FLAGS="")
  where = subprocess.run([str(python), "-c", "import jaxlm, jaxlm.configs.base as b; print(jaxlm.__file__, b.__file__)"],
                         capture_output=True, text=True, env=env, cwd=root, timeout=120)
  assert where.returncode == 0, where.stderr[-3000:]
  assert str(REPO) not in where.stdout and venv_site in where.stdout, where.stdout  # the wheel's copy, not the repo
  return python, env, root


@pytest.mark.slow
def test_convert_from_a_wheel_install(wheel_env, tmp_path):
  python, env, _ = wheel_env
  torch.manual_seed(0)
  hf_dir = _save(transformers.BertForPreTraining(_small_hf_config()), tmp_path / "hf", 256)
  r = subprocess.run([str(python), "-m", "jaxlm", "convert", "--hf", hf_dir, "--workdir", str(tmp_path / "w")],
                     capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert "checkpoint written to" in r.stdout and (tmp_path / "w" / "config.json").is_file()


@pytest.mark.slow
def test_a_config_outside_the_repository_starts_from_the_packaged_base(wheel_env, tmp_path):
  python, env, _ = wheel_env
  (tmp_path / "mine.py").write_text(textwrap.dedent("""
      from jaxlm.configs import base

      def get_config():
        c = base.get_config()
        c.name = "mine"
        c.train.steps = 7
        return c
  """))
  script = ("from jaxlm import config; c = config.load('mine.py', ['train.batch_size=16']); "
            "print(c.name, c.train.steps, c.train.batch_size)")
  r = subprocess.run([str(python), "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.split() == ["mine", "7", "16"]
  (tmp_path / "typo.py").write_text("from jaxlm.configs import base\n\ndef get_config():\n  c = base.get_config()\n"
                                    "  c.train.stpes = 7\n  return c\n")
  r = subprocess.run([str(python), "-m", "jaxlm", "train", "--config", "typo.py", "--workdir", "w"],
                     capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
  assert r.returncode != 0 and "train.stpes" in r.stderr and "train.steps" in r.stderr, r.stderr[-2000:]
