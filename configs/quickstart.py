"""The default job: a small GPT-2-style decoder trained for a few minutes on CPU on the English documentation
text that ships with CPython (pydoc_data), so it runs on any machine with no data to fetch.

    jaxlm train    --config configs/quickstart.py --workdir runs/quickstart
    jaxlm generate --workdir runs/quickstart --prompt "The list"
"""

import base


def get_config():
  c = base.get_config()
  c.name = "quickstart"
  c.model.style = "gpt2"
  c.model.vocab_size = 4096
  c.model.max_len = 128
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.data.source = "pydoc"
  c.data.seq_len = 128
  c.model.attention = "blocked"  # causal attention in query blocks that skip later keys (faster on CPU)
  c.tokenizer.vocab_size = 4096
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.1
  c.train.steps = 300
  c.train.batch_size = 16
  c.train.log_every = 20
  c.train.eval_every = 100
  c.train.eval_batches = 8
  c.checkpoint.every_steps = 100
  c.sample.max_new_tokens = 48
  return c
