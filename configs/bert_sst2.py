"""SST-2 sentiment (sequence classification) fine-tuned from all-MiniLM-L6-v2; the dev split is the only labelled
eval split (test.tsv has no labels), so the best dev accuracy is reported.

    jaxlm train --config configs/bert_sst2.py --workdir /tmp/sst2

Measured on the 2-core CPU (README, "BERT family: fine-tuning and results"): 1052 steps (1 epoch, batch 64) in
725.4 s of training as counted then (low: the train steps still queued when a dev evaluation began were counted as
evaluation; the whole run took 841 s of wall time); dev accuracy 0.8624 / 0.8670 / 0.8830 / 0.9002 at steps 263 /
526 / 789 / 1052.
"""

import base
import bert_conll2003


def get_config():
  c = bert_conll2003.finetune_defaults(base.get_config())
  c.name = "bert_sst2"
  c.task.name = "classification"
  c.data.source = "tsv"
  c.data.train_files = "../shared/data/sst2/train.tsv"
  c.data.dev_files = "../shared/data/sst2/dev.tsv"
  c.data.text_fields = "sentence"
  c.data.label_field = "label"
  c.data.seq_len = 64
  c.data.bucket_lengths = (8, 12, 16, 20, 24, 32, 40, 48)  # half the sentences are 10 tokens or fewer
  c.optim.learning_rate = 1e-4
  c.train.batch_size = 64  # short rows: 64 of them use the 2 cores better than 32
  c.train.steps = 1052  # 1 epoch of 67,349 sentences
  c.optim.warmup_steps = 105
  c.train.eval_each_epoch = False
  c.train.eval_every = 263  # 4 evaluations per epoch
  c.checkpoint.best_metric = "accuracy"
  c.checkpoint.every_steps = 1052
  return c
