"""SST-2 sentiment from all-MiniLM-L6-v2 with LoRA: rank-8 adapters on every attention and MLP projection and on the
pooler, the classifier head trained whole, everything else frozen (1.3% of the parameters train; the optimiser state
and the checkpoints hold only those). Otherwise the full fine-tune's recipe (configs/bert_sst2.py), at the higher
learning rate adapters want.

    jaxlm train --config configs/bert_sst2_lora.py --workdir /tmp/sst2_lora

Not measured yet: to come from a run on the idle 2-core CPU (dev accuracy per evaluation,
training seconds). Targets: dev accuracy >= 0.88, training time no worse than the full fine-tune's 725 s.
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
