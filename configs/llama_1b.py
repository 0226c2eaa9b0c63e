"""A ~1.2B Llama-style decoder (22 layers, d_model 2048, 16 heads with 4 key/value heads, SwiGLU 5632, vocab 32000,
untied output; TinyLlama's shapes) in bfloat16 with cuDNN fused attention: the single-accelerator check of
launch/gpu_check.sh (throughput and MFU of the bf16 training step, peak memory, losses against the XLA attention).

    launch/gpu_check.sh                   # on one GPU: bench with model.attention=cudnn, then xla, and compare
    jaxlm bench --config configs/llama_1b.py --steps 10 --peak-gflops 989000   # one H100/H200, dense bf16
"""

import base


def get_config():
  c = base.get_config()
  c.name = "llama_1b"
  c.model.style = "llama"
  c.model.vocab_size = 32000
  c.model.max_len = 2048
  c.model.num_layers = 22
  c.model.d_model = 2048
  c.model.num_heads = 32
  c.model.num_kv_heads = 4
  c.model.d_ff = 5632
  c.model.tie_embeddings = False
  c.model.use_bias = False
  c.model.norm_eps = 1e-5
  c.model.dtype = "bfloat16"
  c.model.attention = "cudnn"
  c.model.remat = "dots"  # keep matmul outputs, recompute the rest: fits one 80 GB+ accelerator at 8 x 2048 tokens
  c.model.scan_layers = True
  c.mesh.data = -1
  c.data.seq_len = 2048
  c.tokenizer.vocab_size = 32000
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 100
  c.train.batch_size = 8
  c.train.steps = 1000
  return c
