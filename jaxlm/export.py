"""`jaxlm export`: a workdir's best (else latest) checkpoint -> a Hugging Face model directory (BERT, GPT-2, Llama or
T5, by the run's config.model) that transformers loads with from_pretrained and that computes the same logits.

A LoRA run's adapters are folded into their weights with --merge; without it the directory holds the model without
adapters (frozen weights, and the trained head) and adapter/ holds the adapters in PEFT's format, with every trained
module that is not an adapter (a task head) saved whole as PEFT's modules_to_save, so that the adapter also applies
to the original base model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from jaxlm import evaluation, peft, peft_format, train
from jaxlm import workdir as workdir_lib
from jaxlm.checkpoint import Checkpointer
from jaxlm.data.tokenizer import tokenizer_path
from jaxlm.hf import bert as hf_bert
from jaxlm.hf import decoders as hf_decoders
from jaxlm.hf import gpt2 as hf_gpt2
from jaxlm.hf import llama as hf_llama
from jaxlm.hf import t5 as hf_t5
from jaxlm.hf.io import ConvertError, write_model_dir
from jaxlm.models import heads

ADAPTER_DIR = "adapter"  # PEFT's files, apart from the model: transformers would read them as the model's own there
# The task PEFT's model class is chosen by, for each exported architecture.
TASK_TYPES = {"BertForSequenceClassification": "SEQ_CLS", "BertForTokenClassification": "TOKEN_CLS",
              "BertForQuestionAnswering": "QUESTION_ANS", "GPT2LMHeadModel": "CAUSAL_LM",
              "LlamaForCausalLM": "CAUSAL_LM", "T5ForConditionalGeneration": "SEQ_2_SEQ_LM"}
SENTENCEPIECE_NAMES = {"llama": "tokenizer.model", "t5": "spiece.model"}  # the file name each family's tokenizer reads


def export(workdir: str, out_dir: str, *, merge: bool = False, log=print) -> str:
  """Writes the workdir's best-or-latest checkpoint to `out_dir` as a Hugging Face model (see the module docstring);
  returns out_dir."""
  config = workdir_lib.read_config(workdir)
  spec = peft.lora_spec(config.peft)
  if spec is not None and spec.token_ids and not merge:
    raise ConvertError(f"{workdir} trains token rows (peft.trainable_token_ids={spec.token_ids}), which the "
                       "PEFT-format export has no place for: export with --merge (they are added to the embedding and "
                       "output rows)")
  setup = train.build(config)
  ckpt = Checkpointer(workdir, config.checkpoint, read_only=True)
  step, params = evaluation.restore_params(setup, ckpt)
  ckpt.close()
  family = peft_format.family_of(config.model)
  model = setup.task.model
  cfg = dataclasses.replace(model.cfg, lora=None)
  host = to_host(params)
  adapters = spec is not None and peft.has_adapters(host)
  if adapters and merge:
    host = peft.merge_adapters(host, spec)
  base = peft.strip_adapters(host)
  hf_config, tensors, extra = hf_model(family, model, cfg, base, setup.task.labels)
  write_model_dir(out_dir, hf_config, tensors)
  for name, values in extra.items():
    save_file(values, os.path.join(out_dir, name), metadata={"format": "pt"})
    log(f"{name}: parameters Hugging Face's {hf_config['architectures'][0]} has no place for (decode with them)")
  _copy_tokenizer(config, workdir, out_dir, family, log)
  what = "adapters folded in" if adapters else "no adapters"
  if adapters and not merge:
    trained = _trained_modules(family, model, cfg, base, setup.task.labels, tensors, params, setup.trainable)
    peft_format.write_adapter_dir(os.path.join(out_dir, ADAPTER_DIR), family, per_layer(family, cfg, host), spec,
                                  base_dir=out_dir, task_type=TASK_TYPES.get(hf_config["architectures"][0]),
                                  saved_modules=trained)
    what = f"adapters in PEFT's format in {os.path.join(out_dir, ADAPTER_DIR)}"
  elif spec is not None and not adapters:
    what = "no adapters in the checkpoint"
  log(f"step {step} of {workdir} written to {out_dir} as {hf_config['architectures'][0]} ({what})")
  return out_dir


def to_host(tree) -> dict:
  """Device arrays (any dtype, any mesh) -> float32 numpy, one array at a time (gathered across processes)."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x), np.float32)
  return jax.tree.map(one, tree)


def per_layer(family: str, cfg, params: dict) -> dict:
  """A host tree in the per-layer layout whatever model.scan_layers was."""
  if family in ("gpt2", "llama") and "blocks" in params:
    return hf_decoders.unstack_layers(params)
  if family == "t5":
    return hf_t5.unstack_layers(params, cfg)
  return params


def hf_model(family: str, model, cfg, params: dict, labels=()) -> tuple[dict, dict, dict]:
  """(config.json, tensors, extra files) of the Hugging Face model that computes what `model` does with `params`
  (host arrays, no adapters). BERT task models export with their head: sequence classification, token
  classification (a CRF's scores go to crf.safetensors) or question answering; the pretraining model as
  BertForPreTraining / BertForMaskedLM."""
  if family == "gpt2":
    return hf_gpt2.hf_config(cfg), hf_gpt2.hf_tensors(cfg, params), {}
  if family == "llama":
    return hf_llama.hf_config(cfg), hf_llama.hf_tensors(cfg, params), {}
  if family == "t5":
    return hf_t5.hf_config(cfg), hf_t5.hf_tensors(cfg, params), {}
  if isinstance(model, heads.PreTrainingModel):
    architecture, tensors = hf_bert.hf_tensors(cfg, params)
    return hf_bert.hf_config(cfg, architecture), tensors, {}
  by_class = {heads.SequenceClassifier: ("BertForSequenceClassification", "classifier"),
              heads.TokenClassifier: ("BertForTokenClassification", "classifier"),
              heads.SpanExtractor: ("BertForQuestionAnswering", "qa_outputs")}
  if type(model) not in by_class:
    raise ConvertError(f"export: {type(model).__name__} has no Hugging Face BERT architecture to go to")
  architecture, head = by_class[type(model)]
  tensors = hf_bert.encoder_tensors(params["encoder"], cfg, "bert.")
  tensors[f"{head}.weight"] = params[head]["kernel"].T  # [D, C] -> torch Linear [C, D]
  tensors[f"{head}.bias"] = params[head]["bias"]
  extra_config = {}
  if head == "classifier":
    extra_config = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                    "label2id": {label: i for i, label in enumerate(labels)}}
  extra = {}
  if "crf" in params:
    extra["crf.safetensors"] = {k: np.ascontiguousarray(v) for k, v in params["crf"].items()}
  return hf_bert.hf_config(cfg, architecture, extra_config), tensors, extra


def _trained_modules(family, model, cfg, base: dict, labels, tensors: dict, params, mask) -> dict[str, np.ndarray]:
  """The exported tensors of every HF module that holds a trained parameter other than an adapter (a task head,
  optim.trainable's matches). Found by exporting an indicator tree (1 on those parameters, 0 elsewhere) through the
  same mapping, so no family needs a second table."""
  if mask is None:
    return {}
  trained = {p for p, m in zip(peft.paths(params), jax.tree.leaves(mask)) if m and not peft.is_adapter(p)}
  indicator = peft.map_paths(lambda p, x: np.full(np.shape(x), float(p in trained), np.float32), base)
  _, marked, _ = hf_model(family, model, cfg, indicator, labels)
  modules = {name.rsplit(".", 1)[0] for name, value in marked.items() if np.any(value)}
  return {name: value for name, value in tensors.items() if name.rsplit(".", 1)[0] in modules}


def _copy_tokenizer(config, workdir: str, out_dir: str, family: str, log) -> None:
  """The run's tokenizer file beside the model where Hugging Face's tokenizers look for it."""
  path = tokenizer_path(config, workdir)
  if not os.path.isfile(path):
    log(f"no tokenizer file at {path}: the exported model has none")
    return
  _TOKENIZER_FILES[config.tokenizer.kind](config, path, out_dir, family)


def _wordpiece_files(config, path: str, out_dir: str, family: str) -> None:
  shutil.copyfile(path, os.path.join(out_dir, "vocab.txt"))
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"do_lower_case": bool(config.tokenizer.lowercase), "tokenizer_class": "BertTokenizer"}, f, indent=2)


def _sentencepiece_files(config, path: str, out_dir: str, family: str) -> None:
  shutil.copyfile(path, os.path.join(out_dir, SENTENCEPIECE_NAMES.get(family, "spm.model")))


# tokenizer.kind -> what writes the run's tokenizer file where Hugging Face's tokenizer classes look for it
_TOKENIZER_FILES = {"wordpiece": _wordpiece_files, "sentencepiece": _sentencepiece_files}
