"""Dialogue fine-tuning (task.name=sft) of the WikiText-2 + pydoc Llama (configs/llama_pretrain_wiki.py) on DailyDialog:
the second speaker of each dialogue is the assistant, the loss is on its turns only (their end markers included),
several dialogues are packed into each 256-token row. Every parameter trains; configs/llama_sft_dailydialog_lora.py
is the same run with LoRA adapters.

    jaxlm train --config configs/llama_pretrain_wiki.py --workdir runs/llama_pretrain_wiki   # first
    jaxlm train --config configs/llama_sft_dailydialog.py --workdir runs/llama_sft_dailydialog
    jaxlm generate --workdir runs/llama_sft_dailydialog --chat

Dev (DailyDialog validation: 3,851 assistant turns, the first 512 of them at each evaluation): response perplexity, and each
assistant turn generated greedily from its context, scored by BLEU-1/2 and distinct-1/2 (jaxlm/text_metrics.py, as
the T5 dialogue task scores). The best checkpoint by dev loss is evaluated on the whole test split at the end.

Measured (2026-11-30, an idle 2-core machine of this kind, from the 200-step pretraining above): 120 steps in 357.9 s
of training (~1,350-1,460 tokens/s); dev response perplexity 99.12 / 81.55 at steps 60 / 120; the best (step 120) on
the whole test split: perplexity 75.42, BLEU-1 5.12, BLEU-2 1.63, distinct-1 0.02, distinct-2 0.05 (x100), its
greedy replies degenerate at this budget (README, "Recipes" of the chat section). The test evaluation took ~9 minutes.
"""

import base
import llama_pretrain_wiki

PRETRAINED = "runs/llama_pretrain_wiki"  # the pretraining recipe's workdir (its command above)


def get_config():
  c = base.get_config()
  c.name = "llama_sft_dailydialog"
  c.model = llama_pretrain_wiki.get_config().model  # the pretrained model's shape
  c.model.dropout = 0.1
  c.task.name = "sft"
  c.task.metrics = ("bleu1", "bleu2", "distinct1", "distinct2")
  c.task.max_decode_len = 40  # a DailyDialog turn is ~14 words; the longest replies are cut
  c.task.report_examples = 8

  c.init.checkpoint_dir = PRETRAINED
  c.tokenizer.path = f"{PRETRAINED}/tokenizer/spm.model"  # the pretrained vocabulary, chat markers included
  c.tokenizer.vocab_size = c.model.vocab_size

  c.data.source = "chat"
  c.data.train_files = "../shared/data/dailydialog/train.zip"
  c.data.dev_files = "../shared/data/dailydialog/validation.zip"
  c.data.test_files = "../shared/data/dailydialog/test.zip"
  c.data.assistant_speaker = "second"
  c.data.seq_len = 256  # longer dialogues lose their oldest turns (jaxlm/data/chat.py, truncate)
  c.data.pack_bins = 32

  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 12
  c.optim.schedule = "cosine"
  c.optim.weight_decay = 0.1

  c.train.steps = 120  # 1,920 of the 6,403 packed rows of the train split: ~7 minutes on the 2-core CPU
  c.train.batch_size = 16
  c.train.log_every = 20
  c.train.eval_every = 60
  c.train.eval_batches = 32  # 512 dev turns a time; the test split is evaluated whole
  c.checkpoint.every_steps = 60
  c.checkpoint.best_metric = "loss"
  c.checkpoint.best_mode = "min"

  c.sample.max_new_tokens = 48  # `jaxlm generate --chat`
  c.sample.temperature = 0.7
  c.sample.top_p = 0.9
  return c
