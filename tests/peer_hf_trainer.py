"""The Hugging Face Trainer peer of the MiniLM fine-tuning recipes, for throughput: CoNLL-2003 NER
(configs/bert_conll2003.py) and SST-2 (configs/bert_sst2.py).

    python tests/peer_hf_trainer.py --task ner --steps 100
    python tests/peer_hf_trainer.py --task sst2 --steps 100

What a PyTorch user writes: BertForTokenClassification / BertForSequenceClassification from all-MiniLM-L6-v2, the
fast WordPiece tokenizer (NER tags on first subwords, -100 elsewhere), the Trainer's padding collator (each batch
padded to its longest row), shuffled batches of the recipe's size (32 / 64), AdamW at 1e-4 with 10% linear warm-up and
weight decay 0.01 (the recipes' optimiser). Prints one JSON line: non-padding tokens/s and token slots/s over the
timed steps (after `--warmup` steps), to set beside the `nonpad_tokens_per_s` and `tokens_per_s` of `jaxlm train`'s
train rows. `--epochs N` trains whole epochs and adds the test split's seqeval entity F1 (NER) or the dev accuracy
(SST-2). Needs the test extra (torch, transformers); not part of the suite.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from seqeval.metrics import classification_report, f1_score
from transformers import (
  BertForSequenceClassification,
  BertForTokenClassification,
  BertTokenizerFast,
  DataCollatorForTokenClassification,
  DataCollatorWithPadding,
  Trainer,
  TrainerCallback,
  TrainingArguments,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
from bert_conll2003 import minilm_dir  # noqa: E402 - the recipe's own lookup of the weights

LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def read_conll(path: str) -> list[tuple[list[str], list[str]]]:
  """(words, tags) per sentence of a CoNLL-2003 file (word POS chunk tag; blank lines between sentences)."""
  sentences, words, tags = [], [], []
  with open(path, encoding="utf-8") as f:
    for line in f:
      cols = line.split()
      if not cols or cols[0] == "-DOCSTART-":
        if words:
          sentences.append((words, tags))
        words, tags = [], []
        continue
      words.append(cols[0])
      tags.append(cols[-1])
  if words:
    sentences.append((words, tags))
  return sentences


def encode(tokenizer, sentences, max_len: int = 192):
  rows = []
  for words, tags in sentences:
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_len)
    labels, previous = [], None
    for word in enc.word_ids():
      labels.append(-100 if word is None or word == previous else LABELS.index(tags[word]))
      previous = word
    rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
  return rows


class StepTimes(TrainerCallback):
  def __init__(self):
    self.ends = []

  def on_step_end(self, args, state, control, **kwargs):
    self.ends.append(time.perf_counter())


def count_tokens(model) -> list[tuple[int, int]]:
  """(real tokens, token slots) of each batch the model is called on in training, in order (a forward pre-hook)."""
  batches = []

  def hook(module, args, kwargs):
    if module.training:
      mask = kwargs["attention_mask"]
      batches.append((int(mask.sum()), int(mask.numel())))

  model.register_forward_pre_hook(hook, with_kwargs=True)
  return batches


def entity_f1(trainer, tokenizer, sentences) -> tuple[float, str]:
  """seqeval entity F1 of the first-subword predictions on `sentences` (words cut off by max_len predicted O)."""
  rows = encode(tokenizer, sentences)
  predictions = trainer.predict(rows).predictions
  gold, pred = [], []
  for row, logits, (_, tags) in zip(rows, predictions, sentences):
    picked = [LABELS[int(np.argmax(logits[i]))] for i, label in enumerate(row["labels"]) if label != -100]
    gold.append(tags)
    pred.append(picked + ["O"] * (len(tags) - len(picked)))
  return f1_score(gold, pred), classification_report(gold, pred, digits=4)


def read_sst2(path: str) -> list[tuple[str, int]]:
  """(sentence, label) rows of an SST-2 TSV with a 'sentence\tlabel' header."""
  with open(path, encoding="utf-8") as f:
    next(f)
    return [(sentence.strip(), int(label)) for sentence, label in (line.rstrip("\n").split("\t") for line in f)]


def sst2_rows(tokenizer, rows, max_len: int = 64):
  return [{**tokenizer(text, truncation=True, max_length=max_len), "labels": label} for text, label in rows]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--task", choices=("ner", "sst2"), default="ner")
  ap.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data"))
  ap.add_argument("--steps", type=int, default=100, help="train steps to time (ignored with --epochs)")
  ap.add_argument("--epochs", type=int, default=0, help="train whole epochs and score (the recipes: 3 / 1)")
  ap.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing")
  ap.add_argument("--out", default="/tmp/hf_trainer_peer")
  args = ap.parse_args()
  torch.manual_seed(0)
  tokenizer = BertTokenizerFast(os.path.join(minilm_dir(), "vocab.txt"), do_lower_case=True)
  if args.task == "ner":
    batch_size = 32
    train = encode(tokenizer, read_conll(os.path.join(args.data, "conll2003", "train.txt")))
    model = BertForTokenClassification.from_pretrained(minilm_dir(), num_labels=len(LABELS))
    collator = DataCollatorForTokenClassification(tokenizer)
  else:
    batch_size = 64
    train = sst2_rows(tokenizer, read_sst2(os.path.join(args.data, "sst2", "train.tsv")))
    model = BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    collator = DataCollatorWithPadding(tokenizer)
  batches = count_tokens(model)
  max_steps = args.epochs * (len(train) // batch_size) if args.epochs else args.steps
  training_args = TrainingArguments(
      output_dir=args.out, per_device_train_batch_size=batch_size, per_device_eval_batch_size=128,
      learning_rate=1e-4, weight_decay=0.01, warmup_steps=0.1, lr_scheduler_type="linear", max_steps=max_steps,
      dataloader_drop_last=True, save_strategy="no", report_to=[], logging_steps=50, seed=0, use_cpu=True,
      disable_tqdm=True)
  times = StepTimes()
  trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=collator, callbacks=[times])
  start = time.perf_counter()
  trainer.train()
  wall = time.perf_counter() - start
  timed = slice(args.warmup, len(times.ends))
  seconds = times.ends[-1] - times.ends[args.warmup - 1]
  real = sum(r for r, _ in batches[timed])
  slots = sum(s for _, s in batches[timed])
  result = {"peer": "transformers.Trainer", "task": args.task, "batch_size": batch_size,
            "torch_threads": torch.get_num_threads(), "steps": len(times.ends),
            "timed_steps": len(times.ends) - args.warmup, "seconds": round(seconds, 2), "train_wall_s": round(wall, 1),
            "tokens_per_s": round(real / seconds, 1), "slots_per_s": round(slots / seconds, 1),
            "slots_per_real_token": round(slots / real, 2)}
  if args.epochs and args.task == "ner":
    f1, report = entity_f1(trainer, tokenizer, read_conll(os.path.join(args.data, "conll2003", "test.txt")))
    result["test_f1"] = round(f1, 4)
    print(report)
  elif args.epochs:
    dev = read_sst2(os.path.join(args.data, "sst2", "dev.tsv"))
    predictions = trainer.predict(sst2_rows(tokenizer, dev)).predictions
    result["dev_accuracy"] = round(float(np.mean(np.argmax(predictions, -1) == [label for _, label in dev])), 4)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
