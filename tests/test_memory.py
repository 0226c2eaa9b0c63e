"""The memory dry run: per-device parameter and optimizer bytes against the parameter count worked out from the
architecture, activation bytes against what each remat policy must keep, and the state bytes against what XLA
itself allocates for the compiled train step."""

import math

import jax
import pytest

from conftest import REPO
from jaxlm import cli, memory, train
from jaxlm import config as config_lib

CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.py") if p.name != "__init__.py")
TINY = str(REPO / "configs" / "gpt_tiny.py")


def load(name, overrides=()):
  return config_lib.load(str(REPO / "configs" / name), list(overrides))


def decoder_param_counts(m) -> tuple[int, int]:
  """(matrices, vectors) of a decoder from its hyperparameters: matrices all have a d_model dimension (sharded over
  fsdp), vectors (norm scales, biases) are replicated."""
  gpt2 = m.style == "gpt2"
  v, d, n_layers, h = m.vocab_size, m.d_model, m.num_layers, m.num_heads
  k = m.num_kv_heads or h
  e = m.head_dim or d // h
  f = m.d_ff or (4 * d if gpt2 else 64 * math.ceil(int(8 * d / 3) / 64))  # Llama: 8/3 d_model rounded up to 64
  matrices = v * d + (m.max_len * d if gpt2 else 0) + (0 if m.tie_embeddings else d * v)
  matrices += n_layers * (d * h * e + 2 * d * k * e + h * e * d + (2 if gpt2 else 3) * d * f)
  norm = 2 * d if gpt2 else d  # LayerNorm has a bias, RMSNorm does not
  vectors = n_layers * 2 * norm + norm
  if m.use_bias:
    vectors += n_layers * ((h + 2 * k) * e + d + (f if gpt2 else 0) + d)
  return matrices, vectors


def encoder_param_counts(config) -> tuple[int, int]:
  """(matrices, vectors) of the BERT encoder and its task head: MLM(+NSP) pretraining, sequence classification
  (pooled -> labels), token classification (softmax, or CRF with transitions/start/end), extractive QA (start/end)."""
  m, task = config.model, config.task.name
  v, d, n_layers = m.vocab_size, m.d_model, m.num_layers
  f = m.d_ff or 4 * d
  matrices = (v + m.max_len + m.type_vocab_size) * d + n_layers * (4 * d * d + 2 * d * f)
  vectors = 2 * d + n_layers * (3 * d + d + 2 * d + f + d + 2 * d)  # ln_embed; qkv/o biases, 2 LayerNorms, MLP biases
  if m.pooler:
    matrices, vectors = matrices + d * d, vectors + d
  n = len(config.data.labels)
  if task == "mlm_nsp":
    matrices += d * d  # MLM transform
    vectors += d + 2 * d + v  # its bias, its LayerNorm, the output bias over the vocabulary
    if config.task.head in ("", "mlm_nsp"):
      matrices, vectors = matrices + 2 * d, vectors + 2  # NSP head
  elif task in ("classification", "ner"):
    matrices, vectors = matrices + d * n, vectors + n  # the classifier over the labels
    if task == "ner" and config.task.head == "crf":
      vectors += n * n + 2 * n  # transitions, start and end scores: small, replicated
  elif task == "qa":
    matrices, vectors = matrices + d * 2, vectors + 2
  elif task == "relation":
    matrices, vectors = matrices + 2 * d * n, vectors + n  # the classifier over the [E1] and [E2] states, concatenated
  else:
    raise AssertionError(f"add the task.name={task} head to this test's formula")
  return matrices, vectors


def encoder_decoder_param_counts(m) -> tuple[int, int]:
  """(matrices, vectors) of T5: a shared embedding, self-attention (+ cross-attention in the decoder) without biases,
  a ReLU (t5) or gated-GELU (t5_v1_1) MLP, an lm_head when untied, RMS norm scales, and one relative position table
  [buckets, heads] per stack (no d_model dimension: replicated like the vectors)."""
  v, d, f = m.vocab_size, m.d_model, m.d_ff
  inner = m.num_heads * (m.head_dim or d // m.num_heads)
  mlp = (3 if m.style == "t5_v1_1" else 2) * d * f
  enc, dec = m.num_layers, m.num_decoder_layers or m.num_layers
  matrices = v * d + enc * (4 * d * inner + mlp) + dec * (8 * d * inner + mlp)
  if not m.tie_embeddings:
    matrices += d * v  # an untied output projection (t5_v1_1 sets tie_embeddings=False)
  vectors = enc * 2 * d + d + dec * 3 * d + d + 2 * m.relative_attention_num_buckets * m.num_heads
  return matrices, vectors


def param_counts(config) -> tuple[int, int]:
  if config.model.family == "encoder_decoder":
    return encoder_decoder_param_counts(config.model)
  if config.model.family == "decoder":
    return decoder_param_counts(config.model)
  if config.model.family == "encoder":
    return encoder_param_counts(config)
  raise AssertionError(f"add the model.family={config.model.family} formula to this test")


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_bytes_follow_the_parameter_count(name):
  config = load(name)
  if config.task.name in ("classification", "ner", "relation") and not config.data.labels:
    # these recipes read their label set from the train split; any label set sizes the head the same way
    config = config_lib.apply_overrides(config, ["data.labels=('O','B-X','I-X','B-Y','I-Y')"])
  # the formulas count the model without LoRA adapters (tests/test_peft.py counts those), every parameter trained
  check_parameter_bytes(config_lib.apply_overrides(config, ["peft.method=none", "optim.trainable="]))


@pytest.mark.parametrize("head", ["mlm_nsp", "mlm"])
def test_parameter_bytes_of_the_encoder(head):
  check_parameter_bytes(load("base.py", ["model.family=encoder", "task.name=mlm_nsp", f"task.head={head}"]))


def check_parameter_bytes(config):
  """On 8 devices, replicated: 4 bytes a parameter; pure FSDP: every matrix split 8 ways by its d_model dimension,
  norms and biases whole on each device."""
  matrices, vectors = param_counts(config)
  assert config.model.d_model % 8 == 0, config.name

  def on_mesh(data, fsdp, fn):
    mesh = [f"mesh.data={data}", f"mesh.fsdp={fsdp}", "mesh.tensor=1"]
    return fn(config_lib.apply_overrides(config, mesh + ["train.batch_size=8", "optim.grad_accum_steps=1"]), 8)

  # the whole estimate (activations traced too) once for every config; the sharded layout needs the state only
  replicated = on_mesh(8, 1, memory.estimate)
  assert replicated["param_count"] == matrices + vectors
  assert replicated["bytes_per_device"]["params"] == 4 * (matrices + vectors)
  sharded = on_mesh(1, 8, memory.state_bytes)
  b = sharded["bytes_per_device"]
  assert matrices % 8 == 0 and b["params"] == 4 * (matrices // 8 + vectors)
  assert b["gradients"] == b["params"]
  if config.optim.name == "adamw":
    # AdamW: two float32 moments per parameter, plus the step counters of the chained transforms (int32 scalars)
    assert 0 <= b["optimizer"] - 2 * b["params"] <= 16
  else:  # Adafactor: one moment per parameter at most, row and column means only for the matrices it factors
    assert config.optim.name == "adafactor" and 0 < b["optimizer"] < b["params"]


def test_llama_7b_on_devices_that_are_not_here():
  config = load("llama_7b.py")
  est = memory.estimate(config, 64)
  assert est["param_count"] == 6_738_415_616  # published size of Llama 2 7B, whose shapes the config copies
  assert sum(decoder_param_counts(config.model)) == est["param_count"]
  assert est["mesh"] == {"data": 1, "fsdp": 64, "tensor": 1}
  b = est["bytes_per_device"]
  assert b["params"] == 4 * est["param_count"] // 64 + 4 * (config.model.num_layers * 2 + 1) * 4096 * 63 // 64
  assert est["micro_batch_rows_per_device"] == 256 // 64
  # full remat keeps each block's input, [rows, seq, d_model] in bfloat16
  assert est["activations_per_layer"] == 4 * 4096 * 4096 * 2
  text = memory.format_estimate(est, 95)
  assert "6,738,415,616 parameters on 64 devices" in text and "fits" in text


def test_activation_estimate_follows_the_remat_policy():
  per_layer = {}
  for remat in ("none", "dots", "dots_no_batch", "full"):
    est = memory.estimate(load("gpt_tiny.py", [f"model.remat={remat}", "mesh.data=-1"]), 8)
    per_layer[remat] = est["activations_per_layer"]
    recompute = est["bytes_per_device"]["activations_recompute"]
    assert (recompute == 0) == (remat == "none")
  c = load("gpt_tiny.py").model
  rows = 8 // 8
  assert per_layer["full"] == rows * load("gpt_tiny.py").data.seq_len * c.d_model * 4  # the block input only
  assert per_layer["full"] < per_layer["dots_no_batch"] <= per_layer["dots"] < per_layer["none"]


def test_activations_scale_with_rows_and_dtype_and_tensor_parallelism():
  base = memory.estimate(load("llama_tiny.py", ["mesh.data=-1"]), 2)  # 8 rows over 2 replicas
  half_rows = memory.estimate(load("llama_tiny.py", ["mesh.data=-1", "optim.grad_accum_steps=2"]), 2)
  assert (base["micro_batch_rows_per_device"], half_rows["micro_batch_rows_per_device"]) == (4, 2)
  # the estimate's state and batch are memory.state_bytes', which the per-config tests read on their own
  state = memory.state_bytes(load("llama_tiny.py", ["mesh.data=-1"]), 2)
  assert state["bytes_per_device"] == {k: base["bytes_per_device"][k] for k in state["bytes_per_device"]}
  assert state["bytes_per_device"]["params"] > 0 and state["param_count"] == base["param_count"]
  # proportional to the rows, up to a few parameter-sized residuals (broadcast norm scales)
  assert base["activations_per_layer"] == pytest.approx(2 * half_rows["activations_per_layer"], rel=1e-3)
  tensor = memory.estimate(load("llama_tiny.py", ["mesh.data=-1", "mesh.tensor=2"]), 4)
  assert tensor["micro_batch_rows_per_device"] == 4
  assert tensor["activations_per_layer"] < base["activations_per_layer"]
  bf16 = memory.estimate(load("llama_tiny.py", ["mesh.data=-1", "model.dtype=bfloat16"]), 2)
  assert bf16["activations_per_layer"] < base["activations_per_layer"]


def test_fused_attention_drops_the_score_matrices():
  xla = memory.estimate(load("gpt_tiny.py", ["mesh.data=-1"]), 8)
  fused = memory.estimate(load("gpt_tiny.py", ["mesh.data=-1", "model.attention=cudnn"]), 8)
  c = load("gpt_tiny.py")
  scores = c.model.num_heads * c.data.seq_len ** 2  # per row; the XLA form keeps several such float32 arrays
  assert xla["activations_per_layer"] - fused["activations_per_layer"] >= 2 * 4 * scores


def test_batch_that_does_not_split_is_named():
  with pytest.raises(ValueError, match="optim.grad_accum_steps"):
    memory.estimate(load("gpt_tiny.py", ["mesh.data=-1", "train.batch_size=8", "optim.grad_accum_steps=2"]), 8)


def test_state_bytes_match_what_xla_allocates():
  """XLA's arguments for the compiled step are exactly the state and the batch, per device."""
  config = load("gpt_tiny.py", ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "model.remat=full"])
  est = memory.estimate(config, 8)
  compiled = memory.compiled_memory(config, jax.devices())
  setup = train.build(config)
  state = train.abstract_state(setup)
  counters = sum(x.size * x.dtype.itemsize for x in (state.step, state.nonfinite_skips))
  b = est["bytes_per_device"]
  assert compiled["argument_size_in_bytes"] == b["params"] + b["optimizer"] + b["batch"] + counters


def test_dry_run_command(capsys):
  cli.main(["train", "--config", TINY, "--workdir", "/nonexistent/never-written", "--dry-run", "--devices", "64",
            "--device-memory-gib", "16", "--config.train.batch_size=64", "--config.mesh.fsdp=8"])
  out = capsys.readouterr().out
  assert "on 64 devices (data=8 x fsdp=8 x tensor=1)" in out and "fits" in out
  cli.main(["train", "--config", TINY, "--workdir", "/nonexistent/never-written", "--dry-run", "--compile"])
  assert "XLA, train step compiled for 8 cpu devices" in capsys.readouterr().out
