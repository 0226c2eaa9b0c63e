"""configs/t5_span_pretrain.py with SAMSum's train dialogues (the inputs only, read from the zip in place) beside
WikiText-2 and the pydoc topics: span-corruption pretraining on the text the SAMSum fine-tuning reads, where the
spans to restore are often the speakers' names that the dialogue holds elsewhere.

    jaxlm train --config configs/t5_span_pretrain_samsum.py --workdir /tmp/t5_span_samsum
    jaxlm train --config configs/t5_samsum.py --workdir /tmp/t5_samsum_pre --config.task.speaker_tags=0 \\
      --config.init.checkpoint_dir=/tmp/t5_span_samsum \\
      --config.tokenizer.path=/tmp/t5_span_samsum/tokenizer/spm.model

Only the train split's dialogues are read (data.jsonl_field picks the field; the zip's val and test files are never
opened), and the held-out 3% comes from them and the other text.

Measured 2026-12-02 (`--workdir /tmp/runs/span_sam`, a 2-core machine with a jitted float32 matmul peak of 317-323
GFLOP/s; its first ~12 minutes shared the cores with a test run): 1,200 steps in 1,345.5 s of training (~3,500-3,900
tokens/s by row); held-out loss 5.0488 / perplexity 155.8 / token accuracy 0.297 at step 600, 4.9086 / 135.5 / 0.303
at step 1,200. The SAMSum fine-tuning from it learned slower than from scratch (configs/t5_samsum.py has the figures):
this start is not a recommendation, it is the measured answer to whether such pretraining helps at this size.
"""

import t5_span_pretrain


def get_config():
  c = t5_span_pretrain.get_config()
  c.name = "t5_span_pretrain_samsum"
  c.data.train_files += ",../shared/data/samsum/samsum.zip"  # its train.json for the train split
  c.data.jsonl_field = "dialogue"  # the field of each JSON record read as a document
  c.train.steps = 1200  # ~1.7 passes over the ~2.9M tokens
  c.train.eval_every = 600
  c.checkpoint.every_steps = 600
  return c
