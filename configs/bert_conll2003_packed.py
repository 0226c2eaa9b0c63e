"""CoNLL-2003 NER from all-MiniLM-L6-v2 (softmax head) with several sentences a row: whole sentences first-fit into
rows of 96 tokens with segment ids and per-sentence positions (data.pack_examples), 8 rows a step (~34 sentences,
rows 97-98% full, an epoch 376 steps). Otherwise configs/bert_conll2003.py (lr 1e-4, 10% warm-up, 1,314 steps: 3.5
epochs here).

    jaxlm train --config configs/bert_conll2003_packed.py --workdir /tmp/conll_packed

Measured (2026-11-30, an otherwise idle 2-core machine of this kind, jitted float32 matmul peak 112-149 GFLOP/s that
day, run with the same keys as --config overrides of bert_conll2003.py): dev F1 0.8758 / 0.8966 / 0.9074 / 0.9108 at
steps 376 / 752 / 1128 / 1314, test entity F1 0.8633 (P 0.8554, R 0.8713), 965.5 s of training at a median of 1,005
non-padding tokens/s; the unpacked recipe's first 150 steps right after it: 734-767 non-padding tokens/s.
"""

import bert_conll2003


def get_config():
  c = bert_conll2003.get_config()
  c.name = "bert_conll2003_packed"
  c.data.pack_examples = True
  c.data.seq_len = 96  # a row; the few longer sentences are tagged in windows (data.ner_stride)
  c.data.bucket_lengths = (48, 64)  # full rows run at 96; a batch of short leftovers is cut
  c.train.batch_size = 8  # rows: ~34 sentences a step
  return c
