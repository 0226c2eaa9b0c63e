"""A tiny BERT NER run (2 layers, d_model 32) on CoNLL-2003 with the MiniLM WordPiece vocabulary; tests use it on
slices of the data. Trains from scratch in seconds:

    jaxlm train --config configs/bert_tiny_ner.py --workdir /tmp/tiny_ner --config.train.steps=40
"""

import base
import bert_conll2003


def tiny_encoder(c):
  """A 2-layer encoder over the MiniLM vocabulary, with settings that keep small test runs quick."""
  c.model.family = "encoder"
  c.model.vocab_size = 30522  # the MiniLM vocab.txt
  c.model.max_len = 64
  c.model.num_layers = 2
  c.model.d_model = 32
  c.model.num_heads = 4
  c.model.d_ff = 64
  c.model.norm_eps = 1e-12
  c.tokenizer.kind = "wordpiece"
  c.tokenizer.path = bert_conll2003.minilm_dir() + "/vocab.txt"
  c.tokenizer.lowercase = True
  c.data.seq_len = 64
  c.data.bucket_lengths = (32,)
  c.data.length_group_batches = 4
  c.data.prefetch = 0
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 5
  c.optim.schedule = "linear"
  c.train.steps = 30
  c.train.batch_size = 8
  c.train.log_every = 5
  c.train.eval_every = 10
  c.train.eval_batches = 0
  c.train.progress_bar = False
  c.checkpoint.every_steps = 30
  c.checkpoint.keep = 1
  c.checkpoint.keep_best = 1
  c.checkpoint.async_save = False
  return c


def get_config():
  c = tiny_encoder(base.get_config())
  c.name = "bert_tiny_ner"
  c.task.name = "ner"
  c.data.source = "conll"
  c.data.train_files = "../shared/data/conll2003/train.txt"
  c.data.dev_files = "../shared/data/conll2003/valid.txt"
  c.data.test_files = "../shared/data/conll2003/test.txt"
  c.checkpoint.best_metric = "f1"
  return c
