"""T5 dialogue summarisation on SAMSum (read in place from its zip), scored by ROUGE-1/2/L/Lsum (rouge-score, Porter
stemmer) with beam search, beside the LEAD-3 baseline (the first three turns) computed by the same code; the best
dev-ROUGE-L checkpoint is the one tested.

From scratch (the run trains its own 8k sentencepiece model on both sides of the train split):

    jaxlm train --config configs/t5_samsum.py --workdir /tmp/t5_samsum

From the span-corruption pretraining of configs/t5_span_pretrain.py (same architecture; its tokenizer, which has no
speaker tags):

    jaxlm train --config configs/t5_samsum.py --workdir /tmp/t5_samsum_pre --config.task.speaker_tags=0 \
      --config.init.checkpoint_dir=/tmp/t5_span --config.tokenizer.path=/tmp/t5_span/tokenizer/spm.model

LEAD-3 alone, on the test split, with the task's own metric code (no model):

    python -c "from jaxlm import config; from jaxlm.tasks import seq2seq; \
print(seq2seq.lead_baseline(config.load('configs/t5_samsum.py'), 'test', 3)[1])"

Every dev/test row of metrics.jsonl also carries lead3_rouge1 .. lead3_rougeLsum (task.lead_turns=3).

Measured 2026-12-02, later (the recipe as written, `--workdir /tmp/runs/sam_tags`, alone on a 2-core machine with a
jitted float32 matmul peak of 333-357 GFLOP/s; ROUGE F1 x100, beam 4): the budget ended training at step 3,650 after
1,783.0 s (~0.49 s a step, ~4,070 tokens/s, 3,744 non-padding). task.speaker_tags=16 writes each dialogue's speakers
as <speaker_1> .. in input and summary and puts the names back in the outputs. Dev ROUGE-1/2/L at steps 500 / 1,000 /
1,500 / 2,000 / 2,500 / 3,000 / 3,500 / 3,650: 25.57 / 4.85 / 20.22, 27.85 / 5.36 / 22.00, 26.95 / 5.77 / 22.01,
30.05 / 7.41 / 23.54, 31.32 / 8.27 / 24.64, 31.82 / 8.24 / 24.90, 32.08 / 8.72 / 25.05, 32.89 / 8.84 / 25.75 (the run
below without the tags: 7.89 / 1.28 / 7.30 at step 500, 17.90 / 3.20 / 15.48 at 1,000). The length penalty, chosen on
dev with `jaxlm eval` of copies of the workdir (`--config.data.test_files=` keeps them off test): 0.6 -> 32.89 / 8.84 /
25.75, 1.0 -> 33.02 / 8.87 / 25.80, **1.4 -> 33.52 / 9.15 / 25.92**, 1.7 -> 30.66 / 9.15 / 23.26, 2.0 -> 26.88 / 8.30 /
20.34; 8 beams at 0.6: 32.19 / 8.74 / 25.40. Test with the recipe's 1.4 (`jaxlm eval`, 86.4 s for 819 dialogues):
ROUGE-1/2/L/Lsum **32.98 / 8.75 / 25.70** / 28.82 against LEAD-3's 31.31 / 8.68 / 24.17 / 28.60 by the same code:
above LEAD-3 on all three within 30 minutes (by 1.67 / 0.07 / 1.53: ROUGE-2 only just). At 0.6, as trained: 32.19 /
8.42 / 25.60 (ROUGE-2 below LEAD-3). A second seed of this recipe as it stands (`--config.train.seed=1`, 2026-12-03,
1,794.2 s of training): test 33.11 / 9.51 / 25.92 / 29.37, above LEAD-3 again. The names come back right, the content
is often wrong (WORKDIR/report_test_step3650.txt: "Eric and Rob are going to watch a stand-up on youtube." came out as
"Eric and Rob are going to watch "A" and watch "FFFs" by Eric. ..."; `jaxlm generate --workdir /tmp/runs/sam_tags
--prompt $'Amanda: I baked cookies. Do you want some?\nJerry: Sure!\nAmanda: I\'ll bring you tomorrow :-)' --beam-size
4`: "Jerry will bring Amanda tomorrow."). The run trained with a looser name rule (up to four words of any characters)
than the one the evals and the recipe use (up to three words of letters, digits, apostrophes, dots and hyphens); on
SAMSum the two differ in 3 of 16,369 dialogues, all in train ('June, thanks!' was a speaker).

The earlier runs, without speaker tags. Measured 2026-12-02 (train.steps=6000 stopped by SIGTERM past 1,775 s of
training, `--workdir /tmp/runs/sam_d0`, a matmul peak of 317-323 GFLOP/s, length penalty 0.6): ~0.52 s a step, ~3,800
tokens/s (source + target, ~3,500 non-padding); dev ROUGE-1/2/L and perplexity at steps 500 / 1,000 / 1,500 / 2,000 /
2,500 / 3,000 / 3,483 (276 / 531 / 795 / 1,053 / 1,308 / 1,564 / 1,816 s of training): 7.89 / 1.28 / 7.30 (177.7), 17.90
/ 3.20 / 15.48 (115.4), 21.07 / 4.59 / 18.20 (89.0), 23.51 / 5.28 / 20.04 (72.8), 25.76 / 6.68 / 21.73 (64.4), 27.84 /
7.47 / 22.76 (58.7), 26.95 / 7.24 / 22.24 (55.6). Test, the best checkpoint (step 3,000, 26 minutes): ROUGE-1/2/L/Lsum
26.48 / 6.96 / 22.28 / 24.37, perplexity 57.2, against LEAD-3's 31.31 / 8.68 / 24.17 / 28.60 by the same code: the
target (above LEAD-3 within 30 minutes) is NOT met. Outputs name the speakers but often twice ("Hannah and Hannah are
going to the cinema together."), and a few loop on a name ("Eric, Eric, Eric, ..."). `jaxlm eval` of a copy of the
workdir with `--config.task.no_repeat_ngram_size=3` (no trigram twice in an output) scored dev 29.48 / 8.05 / 23.67
(against 27.84 / 7.47 / 22.76) and test **28.34 / 7.54 / 23.38** / 26.10: the recipe now decodes so (chosen on dev),
still below LEAD-3 (by 3.0 / 1.1 / 0.8). The recipe now trains for 30 minutes of train_seconds
(train.time_limit_s=1800), however many steps the machine makes of them (the 2026-12-01 machine, peak ~120 GFLOP/s, ran
~1.5 s a step). Length penalty 1.0 / 1.5 / 2.0 on that checkpoint (step 3,000, no_repeat_ngram_size 3, dev only) scored
ROUGE-1/2/L 29.59 / 8.06 / 23.75, 26.37 / 7.88 / 20.25 and 22.75 / 6.61 / 17.06 against 0.6's 29.48 / 8.05 / 23.67: no
decoding setting closes the gap.

Dropout is 0 (as in configs/t5_multi30k_de_en.py): the 2026-12-01 run with dropout 0.1 (1,200 steps, 1794.1 s on that
slower machine) stood at dev perplexity 129.5 and ROUGE-1 16.26 at its end, where this one passed 115.4 and 17.90 by
step 1,000; its test: 15.15 / 2.54 / 13.39.

From configs/t5_span_pretrain_samsum.py (WikiText-2, pydoc and SAMSum's train dialogues, 1,200 steps, 1,345.5 s; its
tokenizer) the same fine-tuning trailed the from-scratch run (`--workdir /tmp/runs/sam_pre`): dev perplexity 171.8 /
141.2 / 131.1 and ROUGE-1/2/L 7.44 / 1.20 / 6.59, 8.55 / 0.72 / 7.70, 9.29 / 1.27 / 8.31 at steps 500 / 1,000 / 1,500
(265 / 529 / 796 s of training; the run from scratch: 89.0 and 21.07 / 4.59 / 18.20 at 1,500), and was stopped there;
its outputs at step 500 were one sentence for every dialogue ("Tom is going to go for a lot."). The
2026-11-30 AdamW recipe (400 steps of 16 rows) had scored test ROUGE-1/2/L 10.46 / 1.48 / 9.58 from scratch and 5.12 /
0.36 / 5.03 from configs/t5_span_pretrain.py.
"""

import base


def t5_model(c):
  """The architecture this fine-tuning and configs/t5_span_pretrain.py share: a 4+4-layer T5 (v1.0 style), d_model
  256, an 8k vocabulary with 32 sentinels."""
  c.model.family = "encoder_decoder"
  c.model.style = "t5"
  c.model.vocab_size = 8000
  c.model.num_layers = 4
  c.model.num_decoder_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.head_dim = 64
  c.model.d_ff = 1024
  c.model.dropout = 0.1
  c.model.norm_eps = 1e-6
  c.tokenizer.vocab_size = 8000
  c.tokenizer.num_sentinels = 32  # 128-token inputs need 5 or 6; fine-tuning keeps them unused
  return c


def get_config():
  c = t5_model(base.get_config())
  c.name = "t5_samsum"
  c.task.name = "seq2seq"
  c.task.prefix = "summarize: "
  c.task.label_smoothing = 0.1
  c.task.beam_size = 4
  c.task.length_penalty = 1.4  # chosen on dev (docstring)
  c.task.no_repeat_ngram_size = 3  # chosen on dev (docstring): the outputs had looped on a name
  c.task.speaker_tags = 16  # speakers as <speaker_1> .. (the names come back in the outputs); SAMSum has up to 14
  c.task.max_decode_len = 64
  c.task.metrics = ("rouge1", "rouge2", "rougeL", "rougeLsum")
  c.task.lead_turns = 3
  c.task.report_examples = 10

  c.model.dropout = 0.0  # see the docstring: 0.1 learned slower within the 30 minutes

  c.data.source = "pairs"
  samsum = "../shared/data/samsum/samsum.zip"  # train.json, val.json and test.json inside, each read for its split
  c.data.train_files = c.data.dev_files = c.data.test_files = samsum
  c.data.input_field, c.data.target_field = "dialogue", "summary"
  c.data.seq_len = 256  # dialogue tokens kept (the turns after are cut); ~90% of dialogues fit
  c.data.target_len = 64  # summaries: 20 words on average
  c.data.pack_pairs = True
  c.data.pack_bins = 32
  c.data.bucket_lengths = (64, 128, 192)
  c.data.length_group_batches = 16

  c.optim.name = "adafactor"  # T5's optimiser (see configs/t5_multi30k_de_en.py for the comparison with AdamW)
  c.optim.learning_rate = 1e-2
  c.optim.schedule = "rsqrt"
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.0

  c.train.time_limit_s = 1800  # 30 minutes of training: ~3,450 steps at ~0.52 s a step (matmul peak ~320 GFLOP/s)
  c.train.steps = 20000  # a ceiling: the budget ends the run first
  c.train.batch_size = 8  # packed 256-token rows: ~12 dialogues a step
  c.train.log_every = 50
  c.train.eval_every = 500  # dev ROUGE with beam 4 on the 818 dialogues: ~2-6 minutes, not counted as training
  c.train.eval_batches = 0
  c.checkpoint.every_steps = 500
  c.checkpoint.best_metric = "rougeL"
  c.checkpoint.keep = 1
  c.sample.temperature = 0.0
  c.sample.beam_size = 4
  return c
