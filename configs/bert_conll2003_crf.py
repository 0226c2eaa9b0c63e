"""CoNLL-2003 NER with the linear-chain CRF head (IOB2-constrained), otherwise the softmax recipe's budget and settings.

    jaxlm train --config configs/bert_conll2003_crf.py --workdir /tmp/conll_crf

Result on the 2-core CPU: see README, "BERT family: fine-tuning and results".
"""

import bert_conll2003


def get_config():
  c = bert_conll2003.get_config()
  c.name = "bert_conll2003_crf"
  c.task.head = "crf"
  c.task.crf_constrained = True
  return c
