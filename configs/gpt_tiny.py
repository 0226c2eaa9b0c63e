"""A tiny GPT-2-style decoder that trains in seconds on CPU; tests and checks use it.

    jaxlm tokenizer --config configs/gpt_tiny.py --workdir /tmp/tiny
    jaxlm train     --config configs/gpt_tiny.py --workdir /tmp/tiny
"""

import base


def get_config():
  c = base.get_config()
  c.name = "gpt_tiny"
  c.model.style = "gpt2"
  c.model.vocab_size = 512
  c.model.max_len = 64
  c.model.num_layers = 2
  c.model.d_model = 64
  c.model.num_heads = 4
  c.data.source = "pydoc"
  c.data.seq_len = 64
  c.model.attention = "blocked"  # causal attention in query blocks that skip later keys (faster on CPU)
  c.tokenizer.vocab_size = 512
  c.tokenizer.max_sentences = 20000
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 10
  c.train.steps = 50
  c.train.batch_size = 8
  c.train.log_every = 5
  c.train.eval_every = 25
  c.train.eval_batches = 4
  c.checkpoint.every_steps = 25
  c.sample.max_new_tokens = 32
  return c
