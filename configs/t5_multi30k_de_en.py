"""T5 from scratch on Multi30k German -> English (task 1, raw text), scored by detokenised sacreBLEU and chrF with
beam search on test_2016_flickr; the best dev-BLEU checkpoint is the one tested.

    jaxlm train --config configs/t5_multi30k_de_en.py --workdir /tmp/t5_multi30k

The run trains its joint 8k sentencepiece model (both languages, shared embedding) on first use. The PyTorch
reference (3+3-layer d=256 transformer, joint sentencepiece 8k, Adam with inverse-sqrt warmup, label smoothing 0.1,
token-bucketed batches) reached test BLEU 29.9 greedy after 25 minutes at ~3,700 tokens/s on this 2-core CPU; the
target here is test BLEU >= 33 with beam 4 within 25 minutes of training (train_seconds). The recipe trains for
exactly that budget (train.time_limit_s=1500; train.steps is only a ceiling): on a faster machine it takes more steps,
on a slower one fewer.

Measured 2026-12-02 on a 2-core machine with a jitted float32 matmul peak of 243-289 GFLOP/s, nothing else running:
`jaxlm train --config configs/t5_multi30k_de_en.py --workdir /tmp/runs/m30k_nh --config.model.mlp_dropout=False` (the
recipe as now written, which sets that key): the budget ended training at step 4,100 after 1,497.0 s (~0.365 s a step
against ~0.426 below, ~2,820 non-padding tokens/s: dropout is off the MLP's hidden units, and the training accuracy is
counted without an argmax). Dev BLEU 20.91 / 28.09 / 32.05 / 35.04 / 35.66, chrF 38.92 / 47.50 / 52.57 / 54.58 / 55.20,
perplexity 15.92 / 10.55 / 8.36 / 7.12 / 7.11 at steps 1,000 / 2,000 / 3,000 / 4,000 / 4,100 (6.5 / 12.5 / 18.4 / 24.3 /
24.9 minutes of training; at equal steps ahead of the run below, which dropped the hidden units too). Test_2016_flickr
from step 4,100 (best by dev BLEU): **beam 4 BLEU 35.13**, chrF 54.56 (brevity penalty 0.970), 36.1 s for the 1,000
sentences (27.7 a second; an epoch of training is ~3.1 minutes); greedy (`jaxlm eval` of a copy with
`--config.task.beam_size=1`) 33.93, chrF 53.70, in 6.9 s. **The target (>= 33 within 25 minutes) is met**, and greedy
decoding passes the PyTorch reference's 29.9 (greedy) by 4.0. With the decoding cache's layout changed afterwards
(README, Benchmark), `jaxlm eval` of copies of the workdir decodes the test split with beam 4 in 25.0 / 25.8 s
(32.4 s before that change, the same session), the same BLEU.

Measured earlier that day on a 2-core machine with a jitted float32 matmul peak of 280-294 GFLOP/s,
nothing else running, the recipe then written (dropout on the MLP's hidden units too): `jaxlm train --config
configs/t5_multi30k_de_en.py --workdir /tmp/runs/m30k_t --config.train.steps=20000 --config.train.time_limit_s=1500`:
the budget ended training at step 3,500 after 1,491.5 s
(~0.426 s a step, ~2,450 tokens/s); dev BLEU 19.84 / 27.92 / 31.06 / 33.35 at steps 1,000 / 2,000 / 3,000 / 3,500 (the
same curve as below: same seed and data order). Test_2016_flickr from step 3,500: **beam 4 BLEU 32.67**, chrF 52.61
(brevity penalty 0.971), 37.4 s for the 1,000 sentences: the target is **missed by 0.33 BLEU** on this machine. With a
cooldown over the last 700 of 3,500 planned steps (`--config.train.steps=3500 --config.optim.cooldown_fraction=0.2`, same
budget, which ended it at step 3,450, 1,479.6 s): dev 31.58 at 3,000 and 33.00 at 3,450, test 32.60 (n-gram precisions
up, brevity penalty 0.944). Length penalty 1.5 / 2.0 scored dev 30.75 / 23.94 (step 3,500) and 31.73 / 25.76 (the
cooldown's 3,450) against 1.0's 33.35 / 33.00: 1.0 stays.

Measured earlier that day on a 2-core machine with a jitted float32 matmul peak of 317-323 GFLOP/s, nothing else
running: `jaxlm train --config configs/t5_multi30k_de_en.py --workdir /tmp/runs/m30k_b` (the recipe then, train.steps
3,850 without a budget; its own tokenizer): 3,850 steps in 1,524.1 s of training (25.4 minutes: 24 s past the 25, the step time here ~0.396 s),
~2,400-2,660 non-padding tokens/s (source + target); dev BLEU 19.84 / 27.92 / 31.06 / 34.63, chrF 37.91 / 47.00 / 51.76
/ 54.33, perplexity 16.48 / 10.98 / 8.66 / 7.56 at steps 1,000 / 2,000 / 3,000 / 3,850 (6.7 / 13.0 / 19.6 / 25.4 minutes
of training). Test_2016_flickr, the best (step 3,850): **beam 4 BLEU 34.16**, chrF 53.82 (brevity penalty 0.983), 35.4 s
for the 1,000 sentences (28.2 a second; an epoch of training is ~3.2 minutes). The PyTorch reference's 29.9 (greedy) is
passed; the target (>= 33 within 25 minutes) is reached 24 s late by the letter.

The run before it (`--workdir /tmp/runs/m30k`, dropout 0.1, `--config.train.steps=20000 --config.train.eval_every=1000`,
stopped by SIGTERM at the first log row past 1,490 s of training, then resumed with `--config.train.steps=3941` for the
final dev pass and the test pass): ~0.387 s a step, ~2,550 non-padding tokens/s (source + target); dev BLEU 19.84 /
27.92 / 31.06 / 33.84, chrF 37.91 / 47.00 / 51.76 / 54.07, perplexity 16.48 / 10.98 / 8.66 / 7.57 at steps 1,000 / 2,000
/ 3,000 / 3,941 (6.7 / 13.1 / 19.3 / 25.4 minutes of training). Its test pass took step 3,000 (BLEU 31.48, chrF 51.50),
because a checkpoint saved by a stop was not then ranked by the dev pass that follows its resume (now it is); `jaxlm
eval` of a copy
holding only step 3,941 scored test BLEU 34.37 (brevity penalty 0.986), chrF 53.94 — 23 s past the 25 minutes.

Earlier the same day, on a 2-core machine about three times slower (jitted float32 matmul peak 97-114 GFLOP/s), the
recipe then written (dropout 0, length penalty 0.6, 2,800 steps): 2,000 steps, then resumed to 2,800 (train.steps is
free on resume; the rsqrt schedule does not depend on it), 1,505.8 s of training in all, ~2,050 non-padding tokens/s
(source and target) past the first 400 steps;
dev BLEU 16.58 / 21.84 / 24.02 / 26.27 / 26.18 / 25.86 / 25.96 at steps 400 / 800 / 1,200 / 1,600 / 2,000 / 2,400 /
2,800 (4.2 / 7.7 / 11.0 / 14.3 / 18.1 / 21.7 / 25.1 minutes of training), dev perplexity 11.70 at the end (train loss
~1.7 against dev 2.46: the model overfits from ~1,600 steps, ~3.4 epochs); test_2016_flickr from the best (step 1,600):
beam 4 BLEU 25.72, chrF 45.70 (brevity penalty 0.960; 49.7 s, 20.1 sentences/s). That run's evaluations used length
penalty 0.6; `jaxlm eval` of its best checkpoint with length penalty 1.0 scored dev 26.48 (against 26.27) and test 26.11
(brevity penalty 0.977), and on 2026-12-01 1.0 had also scored higher on dev (25.55 against 25.17): the recipe now
decodes with 1.0. That run did not reach the target; the
PyTorch reference reads 11.1 / 18.3 / 22.3 / 29.3 on val at 10 / 15 / 20 / 25 minutes: this recipe is ahead of it up
to 20 minutes and behind at 25. At equal steps, dropout 0.1 learns slower here (400 steps: dev perplexity 29.13 and
BLEU 14.58 against 25.50 and 16.58 without; the 2026-12-01 run with dropout 0.1 reached test BLEU 24.85 after 25.6
minutes); without it the model overfits from ~1,600 steps, so a rate between the two may do better (not tried).

The optimiser and the batch were chosen by runs of the same session, compared at equal pairs seen (3,200 packed rows,
~0.85 epoch, ~6 minutes each): AdamW at 2e-3 with 32 rows a step (the 2026-11-30 recipe, test BLEU 12.08 after 25
minutes) reached dev perplexity 108.2, AdamW at 1e-3 with 8 rows 61.8, Adafactor at 1e-2 with 8 rows 29.3 (greedy dev
BLEU 4.1 / 6.1 / 12.4); Adafactor with 16 rows stood at 92.2 where 8 rows stood at 49.9 (1,600 rows).
"""

import base


def get_config():
  c = base.get_config()
  c.name = "t5_multi30k_de_en"
  c.task.name = "seq2seq"
  c.task.label_smoothing = 0.1
  c.task.beam_size = 4
  c.task.length_penalty = 1.0  # chosen on dev (docstring)
  c.task.max_decode_len = 64
  c.task.metrics = ("bleu", "chrf")

  c.model.family = "encoder_decoder"
  c.model.style = "t5"  # ReLU MLP, output tied to the (shared) embedding
  c.model.vocab_size = 8000
  c.model.num_layers = 3  # encoder
  c.model.num_decoder_layers = 3
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.head_dim = 64
  c.model.d_ff = 1024
  c.model.dropout = 0.1  # see the docstring: 0 overfits from ~1,600 steps; 25 minutes here are ~4,100
  c.model.mlp_dropout = False  # on embeddings and residual branches only: ~10% faster steps, no worse at equal steps
  c.model.norm_eps = 1e-6
  c.model.relative_attention_num_buckets = 32
  c.model.relative_attention_max_distance = 128

  c.data.source = "pairs"
  c.data.train_files = "../shared/data/multi30k/train.de.gz"  # the German side; train.en.gz is found beside it
  c.data.dev_files = "../shared/data/multi30k/val.de.gz"
  c.data.test_files = "../shared/data/multi30k/test_2016_flickr.de.gz"
  c.data.source_lang, c.data.target_lang = "de", "en"
  c.data.seq_len = 128  # packed rows: ~7.7 pairs each, ~3,780 rows an epoch (the longest sentence has ~70 tokens)
  c.data.target_len = 128
  c.data.pack_pairs = True
  c.data.pack_bins = 64
  c.data.bucket_lengths = (32, 48, 64, 96)  # dev/test rows hold one pair: cut to the batch's longest
  c.data.length_group_batches = 16  # dev/test batches of similar lengths: less padding in beam search

  c.tokenizer.vocab_size = 8000
  c.tokenizer.model_type = "unigram"

  # T5's optimiser: Adafactor scales each update by the tensor's RMS, so the unit-variance shared embedding (input and
  # output) moves as fast, relative to its size, as the projections; AdamW at 2e-3 left it nearly where it started
  c.optim.name = "adafactor"
  c.optim.learning_rate = 1e-2
  c.optim.schedule = "rsqrt"  # needs no total: train.steps can follow the measured speed without reshaping it
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0

  # 8 packed rows (~62 pairs, ~1,000 source tokens) a step: at equal pairs seen, more and smaller updates learn faster
  # here than 16 or 32 rows. 25 minutes of training, however many steps the machine makes of them: ~4,100 (~8.7
  # epochs) at ~0.365 s a step on an idle 2-core CPU with a float32 matmul peak of ~250-290 GFLOP/s
  c.train.time_limit_s = 1500
  c.train.steps = 20000  # a ceiling: the budget ends the run first
  c.train.batch_size = 8
  c.train.log_every = 50
  c.train.eval_every = 1000  # dev loss, perplexity, BLEU and chrF (beam 4, the whole dev split); not training time
  c.train.eval_batches = 0
  c.checkpoint.every_steps = 1000
  c.checkpoint.best_metric = "bleu"
  c.checkpoint.keep = 1
  c.sample.temperature = 0.0  # `jaxlm generate`: beam search like the evaluation
  c.sample.beam_size = 4
  return c
