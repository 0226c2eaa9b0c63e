"""configs/llama_sft_dailydialog.py with LoRA: rank-16 adapters on every attention and MLP projection and on the output
layer, and the four chat markers' embedding and output rows, train; the pretrained weights stay frozen (and out of the
checkpoints, which name the pretrained workdir instead).

    jaxlm train --config configs/llama_sft_dailydialog_lora.py --workdir runs/llama_sft_dailydialog_lora
    jaxlm generate --workdir runs/llama_sft_dailydialog_lora --chat

Measured beside the full fine-tune (99.12 / 81.55 dev response perplexity at steps 60 / 120), each run with
--config.data.test_files= (dev only), from the same pretrained workdir, 120 steps:

    adapters on attention + MLP only (2026-11-30): 399,360 of 9,020,672 trained (4.43%), optimiser state 3.05 MiB,
      checkpoints 4.9 MB (full: 103.5 MB); 416.0 s of training; perplexity 266.85 / 242.97, BLEU-1 5.00, BLEU-2 0.41
    + the chat markers' rows (peft.trainable_token_ids, 2026-12-01): 401,408 (4.45%), 3.06 MiB; 297.7 s;
      perplexity 227.62 / 207.40, BLEU-1 4.73, BLEU-2 0.44
    + an adapter on lm_head too (this config, 2026-12-01): 536,576 of 9,157,888 (5.86%), 4.09 MiB; 343.9 s;
      perplexity 107.80 / 94.54, BLEU-1 7.52, BLEU-2 1.96
    adapters on attention + MLP with the whole embedding and lm_head trained (--config.optim.trainable=
      '^(embedding|lm_head)', 2026-12-01): 4,593,664 (50.92%), 35.05 MiB; 391.1 s; perplexity 79.28 / 68.59

The output layer is what LoRA must reach here: the pretrained model's next-token distribution is WikiText's, and
adapters inside the blocks alone move it slowly. The markers' rows (never seen in pretraining) help less.
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
  # the chat markers' rows train too (the pretraining recipe never showed them to the model; measured in the
  # docstring); ids 4-7 are llama_pretrain_wiki.CHAT_MARKERS in its tokenizer (user-defined pieces follow <pad> <unk>
  # <s> </s>)
  c.peft.trainable_token_ids = (4, 5, 6, 7)
  c.peft.targets += "|lm_head$"  # the output layer too: the largest single gain measured (docstring)
  return c
