"""CoNLL-2003 NER from all-MiniLM-L6-v2 with LoRA and the CRF head: rank-8 adapters on every attention and MLP
projection, the tag classifier and the CRF trained whole, everything else frozen. Otherwise the full fine-tune's
recipe (configs/bert_conll2003_crf.py), at the higher learning rate adapters want.

    jaxlm train --config configs/bert_conll2003_lora.py --workdir /tmp/conll_lora

Not measured yet: to come from a run on the idle 2-core CPU (dev F1 per epoch, test entity F1
with the best checkpoint, training seconds).
"""

import bert_conll2003_crf


def get_config():
  c = bert_conll2003_crf.get_config()
  c.name = "bert_conll2003_lora"
  c.peft.method = "lora"
  c.peft.rank = 8
  c.peft.alpha = 16.0
  c.peft.dropout = 0.0
  c.peft.targets = "attn/(qkv|o)$|mlp/(wi|wo)$"
  c.optim.learning_rate = 1e-3
  return c
