"""`jaxlm convert` for every family and `jaxlm export` of LoRA runs: the converted workdir holds the Hugging Face
checkpoint's parameters (placed over the devices, never whole on one), and the exported directories give
transformers' and peft's PyTorch models the logits jaxlm computes, with the adapters merged or in PEFT's format; PEFT
adapters trained on HF modules load into a jaxlm LoRA run with the logits peft computes."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import checkpoint, cli, convert, export, peft, peft_format, train, warm_start
from jaxlm import config as config_lib
from jaxlm import workdir as workdir_lib
from jaxlm.hf import ConvertError, family_module
from jaxlm.hf import bert as hf_bert
from jaxlm.models.encdec import EncDec
from jaxlm.models.layers import LoraSpec
from jaxlm.tasks import known_tasks
from tests.conftest import BASE

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft_lib = pytest.importorskip("peft")

VOCAB = 64
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _hf_gpt2():
  cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                initializer_range=0.2, bos_token_id=0, eos_token_id=0)
  return transformers.GPT2LMHeadModel(cfg)


def _hf_llama():
  cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32,
                                 tie_word_embeddings=False, initializer_range=0.2, bos_token_id=0, eos_token_id=0)
  return transformers.LlamaForCausalLM(cfg)


def _hf_t5():
  cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                              num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                              feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
  return transformers.T5ForConditionalGeneration(cfg)


def _hf_bert(head=False):
  cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=32, layer_norm_eps=1e-12, num_labels=3,
                                attn_implementation="eager", hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)
  return (transformers.BertForSequenceClassification if head else transformers.BertModel)(cfg)


def _save(model, directory, vocab=False) -> str:
  torch.manual_seed(0)
  with torch.no_grad():  # random biases and norms: one read from the wrong place shows in the logits
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name.lower():
        p.add_(torch.randn_like(p) * 0.1)
  model.save_pretrained(directory, safe_serialization=True)
  if vocab:
    (directory / "vocab.txt").write_text("".join(f"{w}\n" for w in SPECIAL + [f"w{i}" for i in range(VOCAB - 5)]))
  return str(directory)


def _tokens(seed=0):
  return np.random.default_rng(seed).integers(5, VOCAB, size=(2, 12)).astype(np.int32)


def _torch_logits(model, tokens, **kw):
  with torch.no_grad():
    return model.eval()(torch.tensor(np.asarray(tokens, np.int64)), **kw).logits.numpy()


# ---- convert --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_convert_writes_the_model_keys_task_tokenizer_and_parameters(tmp_path, family):
  torch.manual_seed(0)
  hf_dir = _save({"gpt2": _hf_gpt2, "llama": _hf_llama, "t5": _hf_t5}[family](), tmp_path / "hf")
  spm = {"llama": "tokenizer.model", "t5": "spiece.model"}.get(family)
  if spm:
    (tmp_path / "hf" / spm).write_bytes(b"a sentencepiece model")
  notes = []
  step_dir = convert.convert_to_workdir(hf_dir, str(tmp_path / "w"), log=notes.append)
  config = workdir_lib.read_config(str(tmp_path / "w"))
  module = family_module(family)
  cfg, params = module.load(hf_dir)
  assert config_lib.apply_overrides(config, module.model_overrides(cfg)).to_dict() == config.to_dict()
  want_task = {"gpt2": "lm", "llama": "lm"}.get(family) or next(
      (t for t in ("span_corruption", "seq2seq") if t in known_tasks()), "lm")
  assert config.task.name == want_task
  if spm:
    with open(config.tokenizer.path, "rb") as f:
      assert config.tokenizer.kind == "sentencepiece" and f.read() == b"a sentencepiece model"
  else:
    assert any("tokenizer.path" in n for n in notes)
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32, sharding=one_device), params)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "w"), config.checkpoint, read_only=True)
  restored = ckpt.restore_params(0, abstract)
  ckpt.close()
  assert step_dir.endswith("/0")
  for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_converted_parameters_are_placed_split_over_the_devices(tmp_path):
  torch.manual_seed(0)
  hf_dir = _save(_hf_llama(), tmp_path / "hf")
  cfg, params = family_module("llama").load(hf_dir)
  config = config_lib.load(BASE, [])
  placed = convert.place("llama", cfg, params, config)
  total = sum(x.nbytes for x in jax.tree.leaves(placed))
  on_device_0 = sum(s.data.nbytes for x in jax.tree.leaves(placed) for s in x.addressable_shards
                    if s.device == jax.devices()[0])
  # every matrix is split 8 ways over fsdp (norm scales, 32 floats each, stay whole)
  assert len(jax.devices()) == 8 and on_device_0 < total / 7
  for x, want in zip(jax.tree.leaves(placed), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(x), want)


# ---- export ---------------------------------------------------------------------------------------------------------


def _lora_workdir(config, workdir, seed=0):
  """A LoRA run's workdir as training leaves it (trained-only checkpoint, base reference), with random adapters and
  head: returns the task model and the full parameters."""
  setup = train.build(config)
  state, base = warm_start.start_state(setup, lambda message: None)
  rng = np.random.default_rng(seed)
  mask = setup.trainable
  params = peft.map_paths(lambda p, x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype) if peft.is_adapter(p)
                          or p.startswith("classifier/") else x, state.params)
  params = jax.device_put(params, setup.state_shardings.params)
  state = state.replace(params=params, step=jnp.ones((), jnp.int32))
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.write_config(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
  ckpt.save(1, warm_start.saved_state(state, mask, base), None, config, {warm_start.BASE_KEY: base} if base else {})
  ckpt.close()
  return setup.task.model, jax.device_get(params), base


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_lora_export_merged_and_in_peft_format(tmp_path, family):
  torch.manual_seed(0)
  hf_dir = _save({"gpt2": _hf_gpt2, "llama": _hf_llama}[family](), tmp_path / "hf")
  convert.convert_to_workdir(hf_dir, str(tmp_path / "base"), log=lambda m: None)
  cfg = family_module(family).read_hf_config(hf_dir)
  config = config_lib.load(BASE, [*family_module(family).model_overrides(cfg), "task.name=lm", "data.seq_len=16",
                                  f"init.checkpoint_dir={tmp_path / 'base'}", "peft.method=lora", "peft.rank=4",
                                  "peft.targets=attn|mlp|lm_head", "checkpoint.async_save=False"])
  model, params, base = _lora_workdir(config, str(tmp_path / "run"))
  assert base is not None and base["key"] == "init.checkpoint_dir"
  tokens = _tokens()
  ours = np.asarray(model.apply({"params": params}, tokens))
  hf_class = transformers.AutoModelForCausalLM

  cli.main(["export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "merged"), "--merge"])
  np.testing.assert_allclose(_torch_logits(hf_class.from_pretrained(tmp_path / "merged"), tokens), ours, atol=1e-4)

  export.export(str(tmp_path / "run"), str(tmp_path / "peft"), log=lambda m: None)
  base_model = hf_class.from_pretrained(tmp_path / "peft")
  without = _torch_logits(base_model, tokens)
  assert np.max(np.abs(without - ours)) > 1e-2  # the model alone lacks the adapters
  adapted = peft_lib.PeftModel.from_pretrained(base_model, str(tmp_path / "peft" / export.ADAPTER_DIR))
  np.testing.assert_allclose(_torch_logits(adapted, tokens), ours, atol=1e-4)
  if family == "llama":  # k|v and gate|up share one A in jaxlm: exported per module, with that A
    saved = json.loads((tmp_path / "peft" / "adapter" / "adapter_config.json").read_text())
    assert "model.layers.0.self_attn.k_proj" in saved["target_modules"] and saved["r"] == 4


def _bert_config(hf_dir, *extra):
  keys = hf_bert.model_overrides(hf_bert.read_hf_config(hf_dir))
  return config_lib.load(BASE, [*keys, "task.name=classification", "data.labels=('a','b','c')", "data.seq_len=16",
                                f"init.hf_path={hf_dir}", "tokenizer.kind=wordpiece",
                                f"tokenizer.path={hf_dir}/vocab.txt", "model.dropout=0.0", "task.head_dropout=0.0",
                                "peft.method=lora", "checkpoint.async_save=False", *extra])


def _bert_inputs():
  tokens = _tokens(1)
  mask = np.ones_like(tokens)
  mask[1, 9:] = 0
  return tokens, np.zeros_like(tokens), mask


def test_bert_classification_lora_export_applies_to_the_original_base(tmp_path):
  torch.manual_seed(0)
  hf_dir = _save(_hf_bert(), tmp_path / "hf", vocab=True)
  config = _bert_config(hf_dir, "peft.targets=attn/(qkv|o)$|mlp/(wi|wo)$|pooler$")
  model, params, base = _lora_workdir(config, str(tmp_path / "run"))
  assert base["key"] == "init.hf_path"
  ids, types, mask = _bert_inputs()
  ours = np.asarray(model.apply({"params": params}, ids, types, mask))
  kw = {"token_type_ids": torch.tensor(types, dtype=torch.int64), "attention_mask": torch.tensor(mask)}
  cls = transformers.BertForSequenceClassification

  export.export(str(tmp_path / "run"), str(tmp_path / "merged"), merge=True, log=lambda m: None)
  merged = cls.from_pretrained(tmp_path / "merged")
  assert merged.config.id2label == {0: "a", 1: "b", 2: "c"}
  np.testing.assert_allclose(_torch_logits(merged, ids, **kw), ours, atol=1e-4)

  export.export(str(tmp_path / "run"), str(tmp_path / "peft"), log=lambda m: None)
  adapter_dir = str(tmp_path / "peft" / export.ADAPTER_DIR)
  saved = json.loads((tmp_path / "peft" / "adapter" / "adapter_config.json").read_text())
  assert saved["modules_to_save"] == ["classifier"] and saved["task_type"] == "SEQ_CLS"
  for base_dir in (tmp_path / "peft", hf_dir):  # the exported base, and the original (a random classifier there)
    adapted = peft_lib.PeftModel.from_pretrained(cls.from_pretrained(base_dir, num_labels=3), adapter_dir)
    np.testing.assert_allclose(_torch_logits(adapted, ids, **kw), ours, atol=1e-4)


def test_t5_adapters_in_peft_format(tmp_path):
  torch.manual_seed(0)
  hf_dir = _save(_hf_t5(), tmp_path / "hf")
  cfg, params = family_module("t5").load(hf_dir)
  spec = LoraSpec(rank=4, alpha=8.0, targets="attn|mlp|lm_head")
  model = peft.with_lora(EncDec(cfg), spec)
  enc, dec = _tokens(2), _tokens(3)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), enc, dec)["params"])
  rng = np.random.default_rng(0)
  full = peft.map_paths(lambda p, x: rng.normal(0, 0.1, x.value.shape).astype(np.float32), shapes)
  flat_base = {p: x for p, x in zip(peft.paths(params), jax.tree.leaves(params))}
  full = peft.map_paths(lambda p, x: flat_base.get(p, x), full)
  ours = np.asarray(model.apply({"params": full}, enc, dec))
  family_module("t5").save(str(tmp_path / "out"), cfg, peft.strip_adapters(full))
  peft_format.write_adapter_dir(str(tmp_path / "out" / "adapter"), "t5", full, spec, base_dir=str(tmp_path / "out"),
                                task_type="SEQ_2_SEQ_LM", saved_modules={})
  base_model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out")
  adapted = peft_lib.PeftModel.from_pretrained(base_model, str(tmp_path / "out" / "adapter"))
  got = _torch_logits(adapted, enc, decoder_input_ids=torch.tensor(dec, dtype=torch.int64))
  np.testing.assert_allclose(got, ours, atol=1e-4)


# ---- PEFT adapters in -----------------------------------------------------------------------------------------------


def _peft_adapters(hf_dir, out_dir, **lora):
  """Adapters trained (here: random) with the peft library on BertForSequenceClassification's own modules."""
  torch.manual_seed(1)
  base = transformers.BertForSequenceClassification.from_pretrained(hf_dir, num_labels=3)
  model = peft_lib.get_peft_model(base, peft_lib.LoraConfig(init_lora_weights=False, **lora))
  with torch.no_grad():
    model.base_model.model.classifier.modules_to_save.default.weight.add_(0.5)
  model.save_pretrained(out_dir)
  return model


def test_peft_adapters_with_separate_q_k_v_load_into_a_lora_run(tmp_path):
  torch.manual_seed(0)
  hf_dir = _save(_hf_bert(), tmp_path / "hf", vocab=True)
  theirs = _peft_adapters(hf_dir, str(tmp_path / "adapter"), r=4, lora_alpha=8,
                          target_modules=["query", "key", "value", "dense"], modules_to_save=["classifier"])
  # q, k and v have an A each: the fused qkv adapter holds them stacked, rank 3 * 4
  config = _bert_config(hf_dir, f"init.peft_path={tmp_path / 'adapter'}", "peft.rank=12", "peft.alpha=6",
                        "peft.targets=attn/(qkv|o)$|mlp/(wi|wo)$|pooler$")
  setup = train.build(config)
  state, _ = warm_start.start_state(setup, lambda message: None)
  ids, types, mask = _bert_inputs()
  ours = np.asarray(setup.task.model.apply({"params": state.params}, ids, types, mask))
  kw = {"token_type_ids": torch.tensor(types, dtype=torch.int64), "attention_mask": torch.tensor(mask)}
  np.testing.assert_allclose(ours, _torch_logits(theirs, ids, **kw), atol=1e-4)

  for extra, error in ((["peft.rank=8"], r"need rank 12 here.*--config.peft.rank=12"),
                       (["peft.rank=12", "peft.targets=attn/qkv$"], "widen peft.targets")):
    bad = _bert_config(hf_dir, f"init.peft_path={tmp_path / 'adapter'}", "peft.targets=attn|mlp|pooler$", *extra)
    with pytest.raises(ConvertError, match=error):
      peft_format.source_tree(bad, train.abstract_state(train.build(bad)).params, bad.init.peft_path)
