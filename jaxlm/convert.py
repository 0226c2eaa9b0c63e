"""`jaxlm convert`: a Hugging Face model directory (BERT, GPT-2, Llama or T5, told apart by config.json) -> a jaxlm
workdir (config.json with the model's keys and a task, the tokenizer where jaxlm can read it, a step-0 checkpoint)
that fine-tuning starts from with --config.init.checkpoint_dir=WORKDIR."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxlm import __version__, checkpoint, sharding, train, warm_start
from jaxlm import config as config_lib
from jaxlm import hf as hf_lib
from jaxlm import workdir as workdir_lib
from jaxlm.hf import bert as hf_bert
from jaxlm.hf import decoders as hf_decoders
from jaxlm.models.encdec import EncDec
from jaxlm.tasks import known_tasks

# The task a converted decoder or T5 starts as, and what to say when it is not there.
TASKS = {"gpt2": ("lm",), "llama": ("lm",), "t5": ("span_corruption", "seq2seq")}
# Sentencepiece models jaxlm's tokenizer reads, by the name each family's Hugging Face directory gives them.
SENTENCEPIECE_FILES = {"llama": "tokenizer.model", "t5": "spiece.model"}


def convert_to_workdir(hf_dir: str, workdir: str, overrides: tuple[str, ...] = (), log=print) -> str:
  """A Hugging Face model directory -> a jaxlm workdir; returns the step directory of its checkpoint."""
  family = hf_lib.detect_family(hf_dir)
  if family == "bert":
    return _convert_bert(hf_dir, workdir, overrides, log)
  module = hf_lib.family_module(family)
  cfg, params = module.load(hf_dir)
  task, notes = _task(family)
  tokenizer, tokenizer_notes = _tokenizer(hf_dir, workdir, family, cfg.vocab_size)
  config = config_lib.apply_overrides(config_lib.base_config(), [
      *module.model_overrides(cfg), *task, *tokenizer, f"name=converted:{os.path.basename(hf_dir.rstrip('/'))}",
      "checkpoint.async_save=False", *overrides])
  placed = place(family, cfg, params, config)
  step_dir = _save(workdir, config, placed)
  for note in [*notes, *tokenizer_notes]:
    log(note)
  log(f"{family} checkpoint {hf_dir}: {sum(int(np.prod(x.shape)) for x in jax.tree.leaves(placed)):,} parameters")
  return step_dir


def _task(family: str) -> tuple[list[str], list[str]]:
  """The task.name override of a converted model and notes for the user."""
  known = known_tasks()
  for name in TASKS[family]:
    if name in known:
      return [f"task.name={name}"], []
  return [], [f"task.name is left for you to set: none of {', '.join(TASKS[family])} is a task here"]


def _tokenizer(hf_dir: str, workdir: str, family: str, vocab_size: int) -> tuple[list[str], list[str]]:
  """Tokenizer overrides: the directory's sentencepiece model copied into the workdir where it has one."""
  name = SENTENCEPIECE_FILES.get(family)
  src = os.path.join(hf_dir, name) if name else ""
  if not src or not os.path.isfile(src):
    if name:
      what = f"no {name} in {hf_dir}"
    else:
      what = f"{family}'s byte-level BPE (vocab.json, merges.txt) is not a tokenizer jaxlm reads"
    return [f"tokenizer.vocab_size={vocab_size}"], [
        f"{what}: set --config.tokenizer.path to a sentencepiece model of the checkpoint's {vocab_size} tokens"]
  copy = os.path.join(os.path.abspath(workdir), "tokenizer", "spm.model")
  os.makedirs(os.path.dirname(copy), exist_ok=True)
  shutil.copyfile(src, copy)
  return ["tokenizer.kind=sentencepiece", f"tokenizer.path={copy}", f"tokenizer.vocab_size={vocab_size}"], []


def abstract_params(family: str, cfg):
  """The family's model parameters as shapes, boxed with their logical axis names; nothing is allocated."""
  if family in ("gpt2", "llama"):
    return hf_decoders.abstract_params(cfg)
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: EncDec(cfg).init(jax.random.key(0), tokens, tokens)["params"])


def conversion_mesh(config, devices=None):
  """Every device on the fsdp axis: each parameter is split as far as the rules allow, never whole on one device."""
  mesh_cfg = ml_collections.ConfigDict(config.mesh.to_dict())
  mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = 1, -1, 1
  for key in sharding.DCN_KEYS:
    mesh_cfg[key] = 1
  return sharding.make_mesh(mesh_cfg, devices)


def place(family: str, cfg, params, config, devices=None):
  """Host arrays -> jax.Arrays sharded over the conversion mesh as the config's rules place the model's parameters;
  each array is built shard by shard from its host copy."""
  mesh = conversion_mesh(config, devices)
  rules = sharding.rules_from_config(config.mesh)
  if family in ("gpt2", "llama"):
    return hf_decoders.place(params, cfg, mesh, rules)
  shardings = sharding.shardings_for(abstract_params(family, cfg), mesh, rules)
  return jax.tree.map(
      lambda a, s: jax.make_array_from_callback(np.shape(a), s, lambda index: np.asarray(a[index], np.float32)),
      params, shardings)


def _save(workdir: str, config, params) -> str:
  """config.json and a step-0 checkpoint of the parameters alone (no optimiser state: fine-tuning reads params)."""
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.write_config(config, workdir)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state={},
                           nonfinite_skips=jnp.zeros((), jnp.int32))
  meta = {"jaxlm_version": __version__, "name": config.name, "process_count": jax.process_count(),
          "tokenizer_fingerprint": ""}
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
  ckpt.save(0, state, None, config, meta)
  ckpt.close()
  return ckpt.step_path(0)


def _convert_bert(hf_dir: str, workdir: str, overrides: tuple[str, ...], log) -> str:
  """A BERT directory -> config.json (an MLM+NSP encoder of the checkpoint's shape, the WordPiece vocabulary copied
  beside it), and a step-0 checkpoint of its parameters (with the pretraining heads where the checkpoint has them)."""
  cfg, _, vocab_path = hf_bert.load_hf_bert(hf_dir)
  vocab_copy = os.path.join(os.path.abspath(workdir), "vocab.txt")
  config = config_lib.apply_overrides(config_lib.base_config(), [
      *hf_bert.model_overrides(cfg), "task.name=mlm_nsp", "tokenizer.kind=wordpiece", f"tokenizer.path={vocab_copy}",
      f"tokenizer.lowercase={hf_bert.vocab_is_lowercase(hf_dir)}",
      f"name=converted:{os.path.basename(hf_dir.rstrip('/'))}", "checkpoint.async_save=False", *overrides])
  setup = train.build(config)
  state = train.init_state(setup, 0)
  params, report = warm_start.init_from_tree(state.params, hf_bert.source_tree(hf_dir, with_heads=True),
                                             source_name=hf_dir, key="--hf")
  state = state.replace(params=params)
  os.makedirs(workdir, exist_ok=True)
  shutil.copyfile(vocab_path, vocab_copy)
  workdir_lib.write_config(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
  ckpt.save(0, state, None, config, workdir_lib.metadata(config, setup))
  ckpt.close()
  log(report.describe())
  return ckpt.step_path(0)
