"""configs/llama_sft_dailydialog.py with LoRA: rank-16 adapters on every attention and MLP projection train, the
pretrained weights stay frozen (and out of the checkpoints, which name the pretrained workdir instead).

    jaxlm train --config configs/llama_sft_dailydialog_lora.py --workdir runs/llama_sft_dailydialog_lora
    jaxlm generate --workdir runs/llama_sft_dailydialog_lora --chat

The same as the full fine-tune with --config.peft.method=lora, with a learning rate for adapters. The chat markers'
embeddings and output rows stay as pretraining left them (never seen there): the adapters learn to use them.

Not measured yet: to come from a run on an idle machine, beside the full fine-tune's (test
perplexity, bleu1, bleu2, distinct1, distinct2, trained parameters, train_seconds, tokens/s).
"""

import llama_sft_dailydialog


def get_config():
  c = llama_sft_dailydialog.get_config()
  c.name = "llama_sft_dailydialog_lora"
  c.peft.method = "lora"
  c.peft.rank = 16
  c.peft.alpha = 32.0
  c.peft.dropout = 0.05
  c.model.dropout = 0.0
  c.optim.learning_rate = 1e-3
  return c
