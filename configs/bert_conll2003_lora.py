"""CoNLL-2003 NER from all-MiniLM-L6-v2 with LoRA and the CRF head: rank-8 adapters on every attention and MLP
projection, the tag classifier and the CRF trained whole, everything else frozen. Otherwise the full fine-tune's
recipe (configs/bert_conll2003_crf.py), at the higher learning rate adapters want.

    jaxlm train --config configs/bert_conll2003_lora.py --workdir /tmp/conll_lora

Measured (2026-11-30, a 2-core machine of this kind, jitted float32 matmul peak 151-153 GFLOP/s): 298,476 of
23,011,692 parameters trained (1.30%), dev F1 0.8532 / 0.8819 / 0.8994 after epochs 1 / 2 / 3, 1314 steps in 1465.4 s
of training; test entity F1 0.8571 (P 0.8602, R 0.8541) with the best checkpoint (step 1314), beside the full CRF
fine-tune's 0.8719.
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
