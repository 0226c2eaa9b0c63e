"""A small BERT (4 layers, d_model 256) pre-trained from scratch with MLM + NSP on WikiText-2 text, tokenised with the
MiniLM WordPiece vocabulary; eval reports MLM and NSP accuracy.

    jaxlm train --config configs/bert_pretrain.py --workdir /tmp/bert_pretrain

The workdir can then start fine-tuning: --config.init.checkpoint_dir=/tmp/bert_pretrain (with the same model keys).
"""

import base
import bert_conll2003


def get_config():
  c = base.get_config()
  c.name = "bert_pretrain"
  c.task.name = "mlm_nsp"
  c.task.head = "mlm_nsp"
  c.task.mlm_max_predictions = 20  # ~15% of 128 positions: the vocabulary projection only where it is scored
  c.model.family = "encoder"
  c.model.vocab_size = 30522  # the MiniLM vocab.txt
  c.model.max_len = 128
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.d_ff = 1024
  c.model.dropout = 0.1
  c.model.norm_eps = 1e-12
  c.tokenizer.kind = "wordpiece"
  c.tokenizer.path = bert_conll2003.minilm_dir() + "/vocab.txt"
  c.tokenizer.lowercase = True
  c.data.source = "text"
  c.data.train_files = "../shared/data/text/wikitext-2/wiki.valid.tokens"
  c.data.eval_files = "../shared/data/text/wikitext-2/wiki.test.tokens"
  c.data.doc_split = "blank_lines"
  c.data.seq_len = 128
  c.optim.learning_rate = 5e-4
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.01
  c.optim.schedule = "linear"
  c.optim.warmup_steps = 100
  c.optim.end_lr_fraction = 0.0
  c.train.steps = 2000
  c.train.batch_size = 32
  c.train.log_every = 20
  c.train.eval_every = 500
  c.train.eval_batches = 20
  c.checkpoint.every_steps = 500
  return c
