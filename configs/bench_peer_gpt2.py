"""The peer benchmark's GPT-2-small-like config: bench_peer_small.py at 12 layers, d_model 768, 12 heads,
seq 512, global batch 4, vocab 32000 (same optimiser, float32).

    jaxlm bench --config configs/bench_peer_gpt2.py
"""

import bench_peer_small


def get_config():
  c = bench_peer_small.get_config()
  c.name = "bench_peer_gpt2"
  c.model.vocab_size = 32000
  c.model.max_len = 512
  c.model.num_layers = 12
  c.model.d_model = 768
  c.model.num_heads = 12
  c.data.seq_len = 512
  c.train.batch_size = 4
  return c
