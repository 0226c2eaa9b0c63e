"""Training options through the real train step: the LM task's z-loss against a direct numpy computation (value,
reported metrics, and its pull on the log-partition), bfloat16 compute (model.dtype) tracking float32 for the
decoder and the encoder, Adafactor's first update against the paper, and the learning-rate cooldown."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import optim, train
from jaxlm.tasks import make_task
from tests.conftest import BASE, PLAIN_ADAM, TINY, TINY_ENCODER, train_steps

SEQ = 32
LM = ["data.seq_len=32", "train.batch_size=8", "optim.learning_rate=3e-3", *PLAIN_ADAM]


def _lm_batches(seed: int, vocab: int = 512):
  """Endless LM batches of counting sequences (each token the previous one plus a per-row step, mod 64, from a
  random start): learnable in a few dozen steps. Two documents share each row, and the last positions are padding."""
  rng = np.random.default_rng(seed)
  while True:
    start = rng.integers(0, 64, size=(8, 1))
    step = rng.integers(1, 4, size=(8, 1))
    tokens = (start + step * np.arange(SEQ + 1)) % 64 + 3  # [8, SEQ + 1]
    segment = np.where(np.arange(SEQ) < 20, 1, 2) * np.ones((8, 1), np.int32)
    positions = np.where(np.arange(SEQ) < 20, np.arange(SEQ), np.arange(SEQ) - 20) * np.ones((8, 1), np.int32)
    weights = np.ones((8, SEQ), np.float32)
    weights[:, 19] = 0.0  # the last token of the first document does not predict the second
    weights[:, -3:] = 0.0
    yield {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
           "segment_ids": segment.astype(np.int32), "positions": positions.astype(np.int32), "weights": weights}


def _log_softmax_parts(logits: np.ndarray, targets: np.ndarray):
  """log Z and the target logits, in float64."""
  logits = logits.astype(np.float64)
  top = logits.max(-1, keepdims=True)
  log_z = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
  return log_z, np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def test_lm_z_loss_matches_numpy():
  z = 0.05
  config = config_lib.load(TINY, LM + [f"optim.z_loss={z}"])
  task = make_task(config)
  batch = next(_lm_batches(0))
  params = nn.meta.unbox(task.init_params(jax.random.key(1), batch))
  # larger logits than a fresh init gives (the final norm's scale), so that log Z moves away from log V
  params["ln_final"]["scale"] = 40 * params["ln_final"]["scale"]
  loss, stats = jax.jit(task.loss_fn, static_argnums=3)(params, batch, jax.random.key(0), False)
  logits = np.asarray(task.model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]))
  log_z, gold = _log_softmax_parts(logits, batch["targets"])
  w = batch["weights"].astype(np.float64)
  ce = np.sum((log_z - gold) * w)
  z_term = z * np.sum(log_z ** 2 * w)
  assert z_term > 1e-3 * ce  # the term is there to be seen
  np.testing.assert_allclose(float(stats["loss"][0]), ce, rtol=2e-5)  # "loss" reports the cross-entropy alone
  np.testing.assert_allclose(float(stats["z_loss"][0]), z_term, rtol=2e-5)
  assert float(stats["loss"][1]) == float(stats["z_loss"][1]) == w.sum()
  np.testing.assert_allclose(float(loss), (ce + z_term) / w.sum(), rtol=2e-5)  # what the gradient is taken of

  # the real train step reports both means at the step's starting parameters
  setup = train.build(config)
  state = train.init_state(setup, config.train.seed)
  state = state.replace(params=jax.device_put(params, setup.state_shardings.params))
  _, metrics = train.compile_train_step(setup)(state, train.global_batch(batch, setup.batch_shardings))
  np.testing.assert_allclose(float(metrics["loss"]), ce / w.sum(), rtol=2e-5)
  np.testing.assert_allclose(float(metrics["z_loss_mean"]), z_term / w.sum(), rtol=2e-5)


def _mean_log_z_squared(config, params, batch) -> float:
  task = make_task(config)
  logits = np.asarray(task.model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]))
  log_z, _ = _log_softmax_parts(logits, batch["targets"])
  return float(np.sum(log_z ** 2 * batch["weights"]) / batch["weights"].sum())


def test_z_loss_pulls_the_log_partition_towards_zero():
  held_out = next(_lm_batches(99))
  drift = {}
  for z in (0.0, 0.1):
    config = config_lib.load(TINY, LM + [f"optim.z_loss={z}"])
    state, losses = train_steps(config, _lm_batches(1), 40)
    assert losses[-1] < 0.5 * losses[0]  # it learns either way
    drift[z] = _mean_log_z_squared(config, jax.device_get(state.params), held_out)
  assert drift[0.1] < 0.5 * drift[0.0], drift


# ---- bfloat16 ------------------------------------------------------------------------------------------------------

# bfloat16 keeps 8 bits of mantissa (relative rounding ~0.4%) in the matmuls and activations while parameters, the
# loss and the optimiser stay float32. The two runs drift apart step by step, most visibly once the loss is small:
# over these short runs each step's loss stays within 5% (plus 0.03 absolute) of float32's.
BF16_RTOL, BF16_ATOL = 0.05, 0.03


def _losses(config_path, overrides, batches_fn, steps):
  out = {}
  for dtype in ("float32", "bfloat16"):
    config = config_lib.load(config_path, overrides + [f"model.dtype={dtype}"])
    state, out[dtype] = train_steps(config, batches_fn(), steps)
    # bfloat16 is the compute dtype only: the parameters (and the optimiser's moments) stay float32
    assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state)) if x.ndim} == {np.dtype("float32")}
  f32, bf16 = np.array(out["float32"]), np.array(out["bfloat16"])
  print(f"bfloat16 vs float32 losses: largest relative difference {np.max(np.abs(bf16 - f32) / f32):.4f}")
  return f32, bf16


def test_bf16_decoder_tracks_float32():
  f32, bf16 = _losses(TINY, LM, lambda: _lm_batches(2), 40)
  assert bf16[-1] < 0.5 * bf16[0] and f32[-1] < 0.5 * f32[0]
  assert not np.array_equal(f32, bf16)  # the dtype did change the computation
  np.testing.assert_allclose(bf16, f32, rtol=BF16_RTOL, atol=BF16_ATOL)


def _classification_batches():
  """The label is how many times token 7 occurs in the row (0, 1, 2+): it needs attention over the whole row."""
  rng = np.random.default_rng(3)
  while True:
    ids = rng.integers(10, 256, size=(16, 16)).astype(np.int32)
    labels = rng.integers(0, 3, size=16).astype(np.int32)
    for row, label in enumerate(labels):
      ids[row, rng.choice(np.arange(1, 12), size=label, replace=False)] = 7
    ids[:, 0] = 2
    yield {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": np.ones_like(ids),
           "labels": labels, "example_weights": np.ones((16,), np.float32)}


def test_bf16_encoder_tracks_float32():
  overrides = ["task.name=classification", *TINY_ENCODER, "model.d_ff=64", "task.head_dropout=0.0",
               "data.labels=('zero','one','more')", "train.batch_size=16", "optim.learning_rate=3e-3", *PLAIN_ADAM]
  f32, bf16 = _losses(BASE, overrides, _classification_batches, 60)
  assert bf16[-1] < 0.5 * bf16[0] and f32[-1] < 0.5 * f32[0]
  assert not np.array_equal(f32, bf16)
  np.testing.assert_allclose(bf16, f32, rtol=BF16_RTOL, atol=BF16_ATOL)


def _adafactor_first_update(g: np.ndarray, w: np.ndarray, lr: float) -> np.ndarray:
  """Adafactor's first step (Shazeer & Stern 2018, T5's settings) written from the paper in float64: at step 1 the
  second-moment decay 1 - 1**-0.8 is 0, so the moments are this gradient's; a matrix keeps its row and column means
  of g^2 only; the update is clipped to RMS <= 1 and scaled by lr * max(RMS(w), 1e-3)."""
  g, w = g.astype(np.float64), w.astype(np.float64)
  g2 = g * g + 1e-30
  if g.ndim == 2 and min(g.shape) >= 128:
    row, col = g2.mean(axis=1), g2.mean(axis=0)
    v = np.outer(row, col) / row.mean()
  else:
    v = g2
  u = g / np.sqrt(v)
  u = u / max(1.0, np.sqrt(np.mean(u * u)))
  return -lr * max(np.sqrt(np.mean(w * w)), 1e-3) * u


def test_adafactor_first_step_follows_the_paper():
  c = config_lib.load(TINY, ["optim.name=adafactor", "optim.learning_rate=1e-2", "optim.schedule=constant",
                             "optim.warmup_steps=0", "optim.grad_clip=0", "optim.weight_decay=0"])
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(0, 0.05, (256, 384)).astype(np.float32),  # factored
            "q": rng.normal(0, 0.05, (128, 4, 32)).astype(np.float32),  # two largest dims 128 and 32: full moments
            "scale": np.ones((128,), np.float32)}
  grads = {k: rng.normal(0, 1e-3, v.shape).astype(np.float32) for k, v in params.items()}
  grads["w"][:, :8] *= 50  # uneven columns, so a full-moment update would differ from the factored one
  tx, _ = optim.make_optimizer(c.optim, 10)
  updates, state = tx.update(grads, tx.init(params), params)
  for k in params:
    np.testing.assert_allclose(np.asarray(updates[k]), _adafactor_first_update(grads[k], params[k], 1e-2),
                               rtol=2e-4, atol=1e-9, err_msg=k)
  factored = jax.tree.leaves(state)  # the matrix keeps 256 + 384 numbers of second moments, not 256 * 384
  assert sum(x.size for x in factored) < params["w"].size + params["q"].size + 2 * 128 + 256 + 384 + 16


def test_cooldown_ramps_the_last_steps_of_any_schedule():
  steps, warmup, peak = 200, 20, 1e-2
  count = np.arange(steps)
  rsqrt = np.where(count < warmup, peak * count / warmup, peak * np.sqrt(warmup / np.maximum(count, 1)))
  ramp = np.minimum(1.0, (steps - count) / 50)  # the last quarter of 200 steps
  for schedule, plain in (("rsqrt", rsqrt), ("constant", np.where(count < warmup, peak * count / warmup, peak))):
    c = config_lib.load(TINY, [f"optim.schedule={schedule}", f"optim.warmup_steps={warmup}",
                               f"optim.learning_rate={peak}", "optim.cooldown_fraction=0.25"])
    lr = np.asarray(jax.vmap(optim.learning_rate_schedule(c.optim, steps))(count))
    np.testing.assert_allclose(lr, plain * ramp, rtol=1e-5, atol=1e-9, err_msg=schedule)
  with pytest.raises(ValueError, match="optim.cooldown_fraction"):
    config_lib.load(TINY, ["optim.cooldown_fraction=1.5"])
