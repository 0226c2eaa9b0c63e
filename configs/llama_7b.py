"""A 7B Llama-style decoder with the shapes of Llama 2 7B (32 layers, d_model 4096, 32 heads, SwiGLU 11008, vocab
32000, untied output; 6,738,415,616 parameters), fully sharded (FSDP) over every device, bfloat16 compute, full
remat. The target of the memory dry run; training it needs a cluster and a text corpus.

    jaxlm train --config configs/llama_7b.py --workdir /tmp/llama_7b --dry-run --devices 32 --device-memory-gib 88.5
    jaxlm train --config configs/llama_7b.py --workdir /tmp/llama_7b --dry-run --devices 8 --device-memory-gib 74.5 \
        --config.optim.grad_accum_steps=8 --config.model.attention=cudnn

(v5p-64: 32 chips of 95 GB = 88.5 GiB, fits at 70.0 GiB per device; 8 x H100 80 GB = 74.5 GiB: fits at 27.5 GiB
with 8 micro-batches and cuDNN attention, not at 278 GiB without.)
    launch/slurm.sbatch, launch/tpu_vm.sh, launch/gke_jobset.yaml run it with --config.data.train_files=...
"""

import base


def get_config():
  c = base.get_config()
  c.name = "llama_7b"
  c.model.style = "llama"
  c.model.vocab_size = 32000
  c.model.max_len = 4096
  c.model.num_layers = 32
  c.model.d_model = 4096
  c.model.num_heads = 32
  c.model.num_kv_heads = 0  # plain multi-head attention, as in Llama 2 7B
  c.model.d_ff = 11008
  c.model.tie_embeddings = False
  c.model.use_bias = False
  c.model.norm_eps = 1e-5
  c.model.rope_theta = 10000.0
  c.model.dtype = "bfloat16"
  c.model.remat = "full"  # keeps only each block's input: ~4 GiB of activations per device at 4 x 4096 tokens
  c.model.scan_layers = True  # one compiled block instead of 32: minutes less compile time
  c.mesh.data = 1
  c.mesh.fsdp = -1  # ZeRO-3 over every device: 7B of float32 state is ~108 GB before it is split
  c.mesh.tensor = 1
  c.data.source = "text"
  c.data.seq_len = 4096
  c.tokenizer.vocab_size = 32000
  c.tokenizer.model_type = "bpe"
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 2000
  c.optim.weight_decay = 0.1
  c.train.steps = 250000
  c.train.batch_size = 256  # 1M tokens per step; 4 sequences per device on 64 devices
  c.train.log_every = 10
  c.train.eval_every = 1000
  c.checkpoint.every_steps = 1000
  return c
