"""A tiny Llama-style decoder (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied output) for CPU checks.

    jaxlm train --config configs/llama_tiny.py --workdir /tmp/llama_tiny
"""

import gpt_tiny


def get_config():
  c = gpt_tiny.get_config()
  c.name = "llama_tiny"
  c.model.style = "llama"
  c.model.num_kv_heads = 2
  c.model.tie_embeddings = False
  c.model.use_bias = False
  c.model.norm_eps = 1e-6
  return c
