"""CoNLL-2003 NER with the linear-chain CRF head (IOB2-constrained), otherwise the softmax recipe's budget and settings.

    jaxlm train --config configs/bert_conll2003_crf.py --workdir /tmp/conll_crf

Measured on the 2-core CPU for one epoch only (README, "BERT family: fine-tuning and results"): dev F1 0.8987 at
step 438 (~270 s of training), against the softmax recipe's 0.8798 at the same step; the full 3 epochs were not run.
"""

import bert_conll2003


def get_config():
  c = bert_conll2003.get_config()
  c.name = "bert_conll2003_crf"
  c.task.head = "crf"
  c.task.crf_constrained = True
  return c
