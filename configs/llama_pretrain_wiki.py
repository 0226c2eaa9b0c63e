"""A small Llama-style decoder (6 layers, d_model 256, grouped-query attention, 8k sentencepiece vocabulary) pretrained
on WikiText-2 and CPython's pydoc topics, sized to train in about 10 minutes on the 2-core CPU: the base of the
DailyDialog chat recipes (configs/llama_sft_dailydialog.py, configs/llama_sft_dailydialog_lora.py).

    jaxlm train --config configs/llama_pretrain_wiki.py --workdir runs/llama_pretrain_wiki

WikiText-2's train split is not available here (../shared/data/README.md), so its valid and test files are the text,
with the pydoc topics added to the train split (data.add_pydoc); eval is a fixed 2% of those documents held out. The
tokenizer, trained on first use, holds the chat template's markers (data.chat_*) as single pieces, so the chat
recipes fine-tune with the same vocabulary.

Measured (2026-11-30, an idle 2-core machine of this kind, jitted float32 matmul peak 151-153 GFLOP/s): 200 steps in
559.7 s of training (~1,500 tokens/s in the steady rows), held-out loss 4.8183 / 4.5008 (perplexity 123.76 / 90.09)
at steps 100 / 200.
"""

import base

CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # data.chat_*'s defaults, whitespace aside


def get_config():
  c = base.get_config()
  c.name = "llama_pretrain_wiki"
  c.task.name = "lm"

  c.model.style = "llama"
  c.model.vocab_size = 8192
  c.model.max_len = 256
  c.model.num_layers = 6
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.tie_embeddings = False
  c.model.use_bias = False
  c.model.norm_eps = 1e-6
  c.model.scan_layers = True  # XLA:CPU: a scanned block step is faster and leaner than unrolled (bench_peer_small)
  c.model.remat = "dots"  # keep the matmul outputs, recompute the rest: faster than storing it all on XLA:CPU

  c.data.source = "text"
  c.data.train_files = ("../shared/data/text/wikitext-2/wiki.valid.tokens,"
                        "../shared/data/text/wikitext-2/wiki.test.tokens")
  c.data.add_pydoc = True
  c.data.doc_split = "blank_lines"  # a paragraph (or heading) a document
  c.data.eval_fraction = 0.02
  c.data.seq_len = 256
  c.model.attention = "blocked"  # causal attention in query blocks that skip later keys (faster on CPU)
  c.data.pack_bins = 64

  c.tokenizer.vocab_size = 8192
  c.tokenizer.user_defined_symbols = CHAT_MARKERS

  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 20
  c.optim.schedule = "cosine"
  c.optim.weight_decay = 0.1

  c.train.steps = 200  # ~0.8M tokens: ~1.1 passes over the 2,901 packed rows (~0.74M tokens) of the train split
  c.train.batch_size = 16
  c.train.log_every = 20
  c.train.eval_every = 100
  c.train.eval_batches = 16
  c.checkpoint.every_steps = 100
  c.sample.max_new_tokens = 48
  return c
