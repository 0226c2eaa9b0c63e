"""configs/llama_sft_dailydialog.py with LoRA: rank-16 adapters on every attention and MLP projection train, the
pretrained weights stay frozen (and out of the checkpoints, which name the pretrained workdir instead).

    jaxlm train --config configs/llama_sft_dailydialog_lora.py --workdir runs/llama_sft_dailydialog_lora
    jaxlm generate --workdir runs/llama_sft_dailydialog_lora --chat

The same as the full fine-tune with --config.peft.method=lora, with a learning rate for adapters. The chat markers'
embeddings and output rows stay as pretraining left them (never seen there): the adapters learn to use them.

Measured (2026-11-30, beside the full fine-tune, with --config.data.test_files= to fit the session): 399,360 of
9,020,672 parameters trained (4.43%), optimiser state 3.05 MiB, checkpoints 4.9 MB (the full fine-tune's 103.5 MB);
120 steps in 416.0 s of training; dev response perplexity 266.85 / 242.97 at steps 60 / 120 (the full fine-tune:
99.12 / 81.55), BLEU-1 5.00, BLEU-2 0.41. Far behind; a likely cause, not yet checked: the chat markers' embeddings
and output rows, never trained in pretraining, stay frozen here (optim.trainable can train them too).
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
  # the chat markers' rows train too: the pretraining recipe never showed them to the model, and frozen at their
  # initial values they cost LoRA most of its way (docstring); ids 4-7 are llama_pretrain_wiki.CHAT_MARKERS in its
  # tokenizer (user-defined pieces follow <pad> <unk> <s> </s>)
  c.peft.trainable_token_ids = (4, 5, 6, 7)
  return c
