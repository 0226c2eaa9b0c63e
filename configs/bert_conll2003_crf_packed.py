"""CoNLL-2003 NER from all-MiniLM-L6-v2 with the IOB2-constrained CRF head on packed rows:
configs/bert_conll2003_packed.py (whole sentences first-fit into rows of 96 tokens, 8 rows a step, the CRF's chain
restarting at each sentence) with the head of configs/bert_conll2003_crf.py. The fine-tuning recipe to set beside the
HF Trainer: its throughput and the CRF's F1.

    jaxlm train --config configs/bert_conll2003_crf_packed.py --workdir /tmp/conll_crf_packed

Measured (2026-12-03, beside a run of the HF Trainer peer on the same 2 cores): dev F1 0.8959 / 0.9115 / 0.9197 /
0.9218 at steps 376 / 752 / 1128 / 1314, test entity F1 0.8792 (P 0.8794, R 0.8791) from the step-1314 checkpoint,
1,314 steps in 988.8 s of training at a median of 1,002 non-padding tokens/s.
"""

import bert_conll2003_crf
import bert_conll2003_packed


def get_config():
  return bert_conll2003_crf.with_crf_head(bert_conll2003_packed.get_config(), "bert_conll2003_crf_packed")
