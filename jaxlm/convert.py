"""`jaxlm convert`: a Hugging Face model directory -> a jaxlm workdir (config.json, tokenizer, step-0 checkpoint)."""

from __future__ import annotations

import os

from jaxlm.hf.bert import (  # noqa: F401 - re-exported while callers move to jaxlm.hf.bert
    CHECKPOINT_KEYS, check_compatible, configure_from_hf, load_hf_bert, model_overrides, read_hf_config, source_tree,
    vocab_is_lowercase)
from jaxlm.hf.io import ConvertError  # noqa: F401

def convert_to_workdir(hf_dir: str, workdir: str, overrides: tuple[str, ...] = ()) -> str:
  """A Hugging Face BERT directory -> a jaxlm workdir: config.json (an MLM+NSP encoder of the checkpoint's shape, the
  WordPiece vocabulary copied beside it), and a step-0 checkpoint of its parameters (with the pretraining heads where
  the checkpoint has them). Fine-tuning starts from it with --config.init.checkpoint_dir=WORKDIR. Returns the step
  directory."""
  import shutil

  from jaxlm import checkpoint, train
  from jaxlm import config as config_lib

  cfg, _, vocab_path = load_hf_bert(hf_dir)
  os.makedirs(workdir, exist_ok=True)
  vocab_copy = os.path.join(os.path.abspath(workdir), "vocab.txt")
  shutil.copyfile(vocab_path, vocab_copy)
  base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "base.py")
  config = config_lib.load(base, [
      *model_overrides(cfg), "task.name=mlm_nsp", "tokenizer.kind=wordpiece", f"tokenizer.path={vocab_copy}",
      f"tokenizer.lowercase={vocab_is_lowercase(hf_dir)}", f"name=converted:{os.path.basename(hf_dir.rstrip('/'))}",
      "checkpoint.async_save=False", *overrides])
  setup = train.build(config)
  state = train.init_state(setup, 0)
  params, report = checkpoint.init_from_tree(state.params, source_tree(hf_dir, with_heads=True),
                                             source_name=hf_dir, key="--hf")
  state = state.replace(params=params)
  train.write_config(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
  ckpt.save(0, state, None, config, train.metadata(config, setup))
  ckpt.close()
  print(report.describe())
  return ckpt.step_path(0)


