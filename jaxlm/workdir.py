"""What a run keeps in its workdir and checks before writing to it: the config (config.json), the checkpoint's saved
config and tokenizer fingerprint that a resumed, evaluated or generating run must agree with, the metadata a
checkpoint records, and the workdir's own tokenizer (trained once, by process 0)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
from jax.experimental import multihost_utils

from jaxlm import __version__, train
from jaxlm import config as config_lib
from jaxlm.checkpoint import checkpoint_dir, finalized_steps, read_json_item
from jaxlm.data import builders
from jaxlm.data.tokenizer import load_tokenizer, tokenizer_path, train_tokenizer, trained_here
from jaxlm.tasks import task_class


class SetupError(ValueError):
  """Input that cannot be trained on (labels, vocabulary, head, data, workdir), found before the first step."""


def open_data(config) -> builders.Source:
  """The data of the config's task (its record kind), prepared or opened once for the whole run."""
  return builders.open_source(task_class(config.task.name).kind, config.data, f"task.name='{config.task.name}'")


def resolve_labels(config, source: builders.Source | None = None) -> None:
  """Fills data.labels from the train split when the task sizes its head by them and they are not set. The config
  written to the workdir then carries them, so eval and predict build the same head with the same ids."""
  if task_class(config.task.name).labels_from_data and not config.data.labels:
    config.data.labels = tuple((source or open_data(config)).labels)


def check_vocab(config, tokenizer) -> None:
  if tokenizer.vocab_size != config.model.vocab_size:
    raise ValueError(
        f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={config.model.vocab_size}; "
        f"set --config.model.vocab_size={tokenizer.vocab_size} (or retrain the tokenizer)")


def write_config(config, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config_lib.to_json(config))
  os.replace(tmp, path)


def read_config(workdir: str):
  """WORKDIR/config.json, the config of the last run accepted there, over base.py's defaults (keys added since take
  their default) and validated like a loaded config."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise SetupError(f"--workdir {workdir} is a file, not a jaxlm workdir")
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a jaxlm workdir (made by `jaxlm train`)?")
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except UnicodeDecodeError as e:
    raise config_lib.ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise config_lib.ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
  if not isinstance(saved, dict):
    raise config_lib.ConfigError(f"{path}: expected a JSON object of config groups, got {type(saved).__name__}")
  return config_lib.from_saved(saved, path)


def check_workdir(workdir: str) -> None:
  """A workdir to train in is a directory, or a path one can be made at, and writable: checked before any work."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise SetupError(f"--workdir {workdir} is a file, not a directory")
  probe = os.path.abspath(workdir)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise SetupError(f"--workdir {workdir}: {probe} is a file, not a directory")
  for path in (probe, checkpoint_dir(workdir)):
    if os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
      raise SetupError(f"--workdir {workdir}: {path} is not writable")


# Keys whose change makes a checkpoint mean something else: the shapes of its arrays (model.*), what token ids stand
# for (tokenizer.*; the tokenizer file itself is compared by fingerprint), what the head's outputs stand for (task,
# labels). A checkpoint restored under a config that differs in one of them is refused, naming each difference.
SAME_AS_CHECKPOINT = ("model.", "tokenizer.", "task.name", "task.head", "data.labels", "data.tag_scheme", "peft.",
                      "optim.trainable", "optim.frozen")


# ... except these, which change how the same arrays are computed or trained, or how a new tokenizer would be made.
FREE_ON_RESUME = ("model.dropout", "model.attention_dropout", "model.mlp_dropout", "model.dtype", "model.remat",
                  "model.attention", "model.init_std", "model.init_factor", "tokenizer.path", "tokenizer.max_sentences",
                  "peft.dropout")


@dataclasses.dataclass
class SavedStep:
  """The JSON items saved with one checkpoint step (None where missing or unreadable)."""
  path: str
  config: dict | None
  metadata: dict | None


def saved_step(step_dir: str) -> SavedStep:
  return SavedStep(step_dir, read_json_item(step_dir, "config"), read_json_item(step_dir, "metadata"))


def newest_saved_step(workdir: str) -> SavedStep | None:
  """The newest step of the workdir whose config item reads (a damaged step is the restore's to report)."""
  for step in finalized_steps(checkpoint_dir(workdir)):
    saved = saved_step(os.path.join(checkpoint_dir(workdir), str(step)))
    if saved.config is not None:
      return saved
  return None


def _shown(value) -> str:
  return repr(value) if isinstance(value, str) else str(tuple(value) if isinstance(value, list) else value)


def check_same_model(config, saved: SavedStep) -> None:
  """Refuses `config` where it differs from the config saved with the checkpoint in a key of SAME_AS_CHECKPOINT;
  the message names each key: 'model.d_model: checkpoint 64, config 128'."""
  if saved.config is None:
    return
  before = config_lib.from_json_dict(saved.config)
  differences = []
  for key in config_lib.all_keys(config):
    if not key.startswith(SAME_AS_CHECKPOINT) or key in FREE_ON_RESUME:
      continue
    try:
      old = config_lib.get_key(before, key)
    except (KeyError, AttributeError):
      continue  # a key added since the checkpoint was saved
    new = config_lib.get_key(config, key)
    if (tuple(old) if isinstance(old, list) else old) != (tuple(new) if isinstance(new, list) else new):
      differences.append(f"{key}: checkpoint {_shown(old)}, config {_shown(new)}")
  if differences:
    raise SetupError(f"{saved.path} was saved with another model: {'; '.join(differences)} (set these back, or use "
                     "another --workdir)")


def check_tokenizer(saved: SavedStep, tokenizer) -> None:
  """The tokenizer must be the one the checkpoint was trained with (its recorded fingerprint), or every token id
  would stand for another piece of text."""
  recorded = (saved.metadata or {}).get("tokenizer_fingerprint", "")
  if recorded and recorded != tokenizer.fingerprint():
    raise SetupError(f"{saved.path} was trained with tokenizer {recorded} but the tokenizer loaded now is "
                     f"{tokenizer.fingerprint()}: its token ids would mean other text (set tokenizer.path to the "
                     "tokenizer it was trained with)")


def metadata(config, setup: train.Setup, tokenizer_fingerprint: str = "") -> dict:
  """What a checkpoint records besides the state: version, mesh, processes and the tokenizer it was trained with."""
  return {"jaxlm_version": __version__, "mesh": dict(setup.mesh.shape), "name": config.name,
          "process_count": jax.process_count(), "tokenizer_fingerprint": tokenizer_fingerprint}


def prepare_tokenizer(c, workdir: str, source: builders.Source):
  """The run's tokenizer; a workdir-owned sentencepiece model that does not exist yet is trained first, as
  `jaxlm tokenizer` would: by process 0, while the other processes wait for it at a barrier, then all load it."""
  path = tokenizer_path(c, workdir)
  # Decided from the config alone, so that every process takes the barrier below or none does (whether the file
  # exists yet depends on when a process looks).
  if trained_here(c):
    if jax.process_index() == 0 and not os.path.isfile(path):
      print(f"training the tokenizer first: {train_tokenizer(c, workdir, source.texts())}", flush=True)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("jaxlm: the workdir's tokenizer is ready")
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: process 0 trained the tokenizer there, but process {jax.process_index()} "
                                "does not see it: the workdir must be one directory shared by every process (or run "
                                "`jaxlm tokenizer` first and set tokenizer.path to its file)")
  return load_tokenizer(c, workdir)


def check_tokenizer_to_train(c, workdir: str, steps: list[int]) -> None:
  """When the run will train its tokenizer into the workdir: never where checkpoints exist (they were trained with the
  one that is missing), and only one that will fit model.vocab_size (checked before, not after, it is written)."""
  path = tokenizer_path(c, workdir)
  if c.tokenizer.path or c.tokenizer.kind != "sentencepiece" or os.path.isfile(path):
    return  # nothing is trained: load_tokenizer reads the file, or names the one that is missing
  if steps:
    raise SetupError(f"{path} is missing but {checkpoint_dir(workdir)} holds checkpoints trained with it: a newly "
                     "trained tokenizer would give other token ids (put the file back, or set tokenizer.path to it)")
  if c.tokenizer.vocab_size != c.model.vocab_size:
    raise SetupError(f"tokenizer.vocab_size={c.tokenizer.vocab_size} but model.vocab_size={c.model.vocab_size}: the "
                     f"tokenizer this run would train does not fit the model; set --config.model.vocab_size="
                     f"{c.tokenizer.vocab_size}")
