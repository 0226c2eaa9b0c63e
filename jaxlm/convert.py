"""`jaxlm convert`: a Hugging Face model directory -> a jaxlm workdir (config.json, tokenizer, step-0 checkpoint) that
fine-tuning starts from with --config.init.checkpoint_dir=WORKDIR."""

from __future__ import annotations

import os
import shutil

from jaxlm import checkpoint, run, train
from jaxlm import config as config_lib
from jaxlm.hf import bert as hf_bert


def convert_to_workdir(hf_dir: str, workdir: str, overrides: tuple[str, ...] = (), log=print) -> str:
  """A Hugging Face BERT directory -> a jaxlm workdir: config.json (an MLM+NSP encoder of the checkpoint's shape, the
  WordPiece vocabulary copied beside it), and a step-0 checkpoint of its parameters (with the pretraining heads where
  the checkpoint has them). Returns the step directory."""
  cfg, _, vocab_path = hf_bert.load_hf_bert(hf_dir)
  vocab_copy = os.path.join(os.path.abspath(workdir), "vocab.txt")
  config = config_lib.apply_overrides(config_lib.base_config(), [
      *hf_bert.model_overrides(cfg), "task.name=mlm_nsp", "tokenizer.kind=wordpiece", f"tokenizer.path={vocab_copy}",
      f"tokenizer.lowercase={hf_bert.vocab_is_lowercase(hf_dir)}",
      f"name=converted:{os.path.basename(hf_dir.rstrip('/'))}", "checkpoint.async_save=False", *overrides])
  setup = train.build(config)
  state = train.init_state(setup, 0)
  params, report = checkpoint.init_from_tree(state.params, hf_bert.source_tree(hf_dir, with_heads=True),
                                             source_name=hf_dir, key="--hf")
  state = state.replace(params=params)
  os.makedirs(workdir, exist_ok=True)
  shutil.copyfile(vocab_path, vocab_copy)
  run.write_config(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
  ckpt.save(0, state, None, config, run.metadata(config, setup))
  ckpt.close()
  log(report.describe())
  return ckpt.step_path(0)
