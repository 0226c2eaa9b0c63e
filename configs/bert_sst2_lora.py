"""SST-2 sentiment from all-MiniLM-L6-v2 with LoRA: rank-8 adapters on every attention and MLP projection and on the
pooler, the classifier head trained whole, everything else frozen (1.3% of the parameters train; the optimiser state
and the checkpoints hold only those). Otherwise the full fine-tune's recipe (configs/bert_sst2.py), at the higher
learning rate adapters want.

    jaxlm train --config configs/bert_sst2_lora.py --workdir /tmp/sst2_lora

Measured (2026-11-30, an idle 2-core machine of this kind whose jitted float32 matmul peak was 151-153 GFLOP/s):
dev accuracy 0.8635 / 0.8853 / 0.8739 / 0.8922 at steps 263 / 526 / 789 / 1052 (1 epoch), 1432.6 s of training;
301,826 of 23,015,042 parameters trained (1.31%), optimiser state 2.30 MiB (the full fine-tune's: 173.40 MiB), the
checkpoint 3,955,596 bytes (the full fine-tune's: 272,863,315). Slower than the full fine-tune's 725 s (measured on a
faster machine): on XLA:CPU an adapter step costs about what a full step does (README, LoRA recipes).
"""

import bert_sst2


def get_config():
  c = bert_sst2.get_config()
  c.name = "bert_sst2_lora"
  c.peft.method = "lora"
  c.peft.rank = 8
  c.peft.alpha = 16.0
  c.peft.dropout = 0.0  # the encoder's own dropout (0.1) regularises; adapter dropout would cost masks per projection
  c.peft.targets = "attn/(qkv|o)$|mlp/(wi|wo)$|pooler$"  # the pooler feeds the head: adapted, not frozen as it is
  c.optim.learning_rate = 1e-3
  return c
