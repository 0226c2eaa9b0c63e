"""CoNLL-2003 NER with the linear-chain CRF head (IOB2-constrained), otherwise the softmax recipe's budget and settings.

    jaxlm train --config configs/bert_conll2003_crf.py --workdir /tmp/conll_crf

Measured on the idle 2-core CPU (README, "BERT family: fine-tuning and results"): 1314 steps (3 epochs) in 800.3 s
of training; dev F1 0.8959 / 0.9056 / 0.9165 after epochs 1 / 2 / 3; test entity F1 0.8719 (P 0.8729, R 0.8709)
with the best checkpoint (step 1314), against 0.8604 for the softmax recipe with the same settings.
"""

import bert_conll2003


def with_crf_head(c, name: str):
  """The IOB2-constrained CRF head on a CoNLL-2003 recipe's config (also configs/bert_conll2003_crf_packed.py)."""
  c.name = name
  c.task.head = "crf"
  c.task.crf_constrained = True
  return c


def get_config():
  return with_crf_head(bert_conll2003.get_config(), "bert_conll2003_crf")
