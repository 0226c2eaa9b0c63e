"""configs/t5_span_pretrain.py with SAMSum's train dialogues (the inputs only, read from the zip in place) beside
WikiText-2 and the pydoc topics: span-corruption pretraining on the text the SAMSum fine-tuning reads, where the
spans to restore are often the speakers' names that the dialogue holds elsewhere.

    jaxlm train --config configs/t5_span_pretrain_samsum.py --workdir /tmp/t5_span_samsum
    jaxlm train --config configs/t5_samsum.py --workdir /tmp/t5_samsum_pre \\
      --config.init.checkpoint_dir=/tmp/t5_span_samsum \\
      --config.tokenizer.path=/tmp/t5_span_samsum/tokenizer/spm.model

Only the train split's dialogues are read (data.jsonl_field picks the field; the zip's val and test files are never
opened), and the held-out 3% comes from them and the other text.
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
