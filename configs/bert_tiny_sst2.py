"""A tiny BERT sentence classifier on SST-2 (dev split only) with the MiniLM WordPiece vocabulary; tests use it on
slices of the data:

    jaxlm train --config configs/bert_tiny_sst2.py --workdir /tmp/tiny_sst2
"""

import base
import bert_tiny_ner


def get_config():
  c = bert_tiny_ner.tiny_encoder(base.get_config())
  c.name = "bert_tiny_sst2"
  c.task.name = "classification"
  c.data.source = "tsv"
  c.data.train_files = "../shared/data/sst2/train.tsv"
  c.data.dev_files = "../shared/data/sst2/dev.tsv"
  c.checkpoint.best_metric = "accuracy"
  return c
