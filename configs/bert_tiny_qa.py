"""A tiny BERT extractive-QA run with the MiniLM WordPiece vocabulary, on SQuAD-format JSON named by overrides
(tests generate small files):

    jaxlm train --config configs/bert_tiny_qa.py --workdir /tmp/tiny_qa --config.data.train_files=train.json \
        --config.data.dev_files=dev.json --config.data.test_files=test.json
"""

import base
import bert_tiny_ner


def get_config():
  c = bert_tiny_ner.tiny_encoder(base.get_config())
  c.name = "bert_tiny_qa"
  c.task.name = "qa"
  c.data.source = "squad"
  c.data.doc_stride = 16
  c.data.max_query_length = 16
  c.data.bucket_lengths = ()
  c.checkpoint.best_metric = "f1"
  return c
