"""SST-2 sentiment from all-MiniLM-L6-v2 with LoRA: rank-8 adapters on every attention and MLP projection, the pooler
and the classifier head trained whole, everything else frozen (1.93% of the parameters train; the optimiser state and
the checkpoints hold only those). Otherwise the full fine-tune's recipe (configs/bert_sst2.py), at the higher learning
rate adapters want.

    jaxlm train --config configs/bert_sst2_lora.py --workdir /tmp/sst2_lora

Measured (2026-12-01, an idle 2-core machine of this kind, jitted float32 matmul peak 172-183 GFLOP/s at n = 2048, one
run after another): dev accuracy 0.8555 / 0.8750 / 0.8716 / 0.8853 at steps 263 / 526 / 789 / 1052 (1 epoch), 756.4 s
of training, against the full fine-tune's 1033.0 s (dev 0.8956) right before it; 443,522 of 23,008,898 parameters
trained (1.93%), optimiser state 3.38 MiB (the full fine-tune's: 173.29 MiB), the checkpoint 5,648,139 bytes (the full
fine-tune's: 272,866,650). With --config.train.seed=1: dev 0.8865 at step 1052, 779.9 s. With a rank-8 adapter on the frozen pooler instead (the recipe before): 859.1 s, dev
0.8704 at step 1052 (0.8922 on 2026-11-30: one-epoch runs differ by a point or two).
"""

import bert_sst2


def get_config():
  c = bert_sst2.get_config()
  c.name = "bert_sst2_lora"
  c.peft.method = "lora"
  c.peft.rank = 8
  c.peft.alpha = 16.0
  c.peft.dropout = 0.0  # the encoder's own dropout (0.1) regularises; adapter dropout would cost masks per projection and
  # the merged product (layers._merged_lora)
  c.peft.targets = "attn/(qkv|o)$|mlp/(wi|wo)$"
  # The pooler trains whole: all-MiniLM-L6-v2 was trained with mean pooling, and its checkpoint's pooler looks untrained
  # (bias all zero, weights of std 0.009); it feeds the head, so it moves as the head does (147,840 parameters)
  c.optim.trainable = "pooler"
  c.optim.learning_rate = 1e-3
  return c
