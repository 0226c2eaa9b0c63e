"""T5 span-corruption pretraining on WikiText-2 (validation tokens + raw test text) and CPython's pydoc topics, the
starting point of the SAMSum fine-tuning in configs/t5_samsum.py (same architecture and tokenizer).

    jaxlm train --config configs/t5_span_pretrain.py --workdir /tmp/t5_span

The run trains its 8k sentencepiece model with 32 sentinels (<extra_id_0> ..) on the training text first. Evaluation:
loss and perplexity of the decoder targets on a held-out 3% of the lines. Try it: `jaxlm generate --workdir
/tmp/t5_span --prompt 'The <extra_id_0> of the river' --temperature 0`.

Measured 2026-11-30 (the recipe as written, `--workdir /tmp/runs/t5_span`, a 2-core machine with a jitted float32
matmul peak of 146-153 GFLOP/s; the first ~5 minutes shared the cores with a short test run): 600 steps in 1338.0 s
of training (1,730-2,100 tokens/s by row), train loss 7.14 at step 50 -> 5.12 at 600; held-out eval: loss 5.2933 /
perplexity 199.0 / token accuracy 0.294 at step 300, loss 5.1035 / perplexity 164.6 / accuracy 0.298 at step 600;
peak RSS 2.1 GB. What it gives the fine-tunings is measured in configs/t5_dailydialog.py and configs/t5_samsum.py.
"""

import base
import t5_samsum

WIKI = "../shared/data/text/wikitext-2/"


def get_config():
  c = t5_samsum.t5_model(base.get_config())  # the architecture of the fine-tuning it starts
  c.name = "t5_span_pretrain"
  c.task.name = "span_corruption"
  c.data.source = "text"
  c.data.train_files = WIKI + "wiki.valid.tokens," + WIKI + "wiki.test.raw.nonblank-crlf.txt"
  c.data.add_pydoc = True  # + the pydoc topics
  c.data.doc_split = "lines"  # a paragraph a line (the raw test file has no blank lines)
  c.data.eval_fraction = 0.03
  c.data.seq_len = 128  # encoder tokens; the decoder gets the ~40 that the sentinels stand for
  c.data.noise_density = 0.15
  c.data.mean_noise_span_length = 3.0

  c.optim.learning_rate = 1e-3
  c.optim.schedule = "rsqrt"
  c.optim.warmup_steps = 200
  c.optim.weight_decay = 0.0
  c.optim.b2 = 0.98

  c.train.steps = 600  # ~20 minutes on 2 cores
  c.train.batch_size = 32
  c.train.log_every = 50
  c.train.eval_every = 300
  c.train.eval_batches = 20
  c.checkpoint.every_steps = 300
  c.checkpoint.keep = 1
  c.sample.temperature = 0.0
  return c
