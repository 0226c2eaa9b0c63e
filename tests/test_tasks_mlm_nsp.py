"""MLM + NSP pretraining task: losses against a direct computation, the masked-position shortcut, training, errors."""

import itertools

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.tasks import make_task
from tests.conftest import BASE, PLAIN_ADAM, TINY_ENCODER, train_steps

TINY = ["task.name=mlm_nsp", *TINY_ENCODER, "model.d_ff=64"]


def _task(*extra):
  return make_task(config_lib.load(BASE, TINY + list(extra)))


def _batch(seed=0, b=8, length=32):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, 256, size=(b, length)).astype(np.int32)
  lengths = rng.integers(length // 2, length + 1, size=b)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  mlm_weights = ((rng.random((b, length)) < 0.25) & (mask > 0)).astype(np.float32)
  weights = np.ones((b,), np.float32)
  weights[-1] = 0.0  # a padding row
  mlm_weights[-1] = 0.0
  return {"input_ids": np.where(mlm_weights > 0, 4, ids * mask), "token_type_ids": np.zeros_like(ids),
          "attention_mask": mask, "mlm_targets": ids, "mlm_weights": mlm_weights,
          "nsp_labels": rng.integers(0, 2, size=b).astype(np.int32), "example_weights": weights}


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) - x.max(-1, keepdims=True)


def test_losses_and_accuracies_match_a_direct_computation():
  task = _task()
  batch = _batch()
  params = nn.meta.unbox(task.init_params(jax.random.key(0), batch))
  loss, stats = jax.jit(task.loss_fn, static_argnums=3)(params, batch, jax.random.key(0), False)
  mlm_logits, nsp_logits = jax.jit(task.model.apply)({"params": params}, batch["input_ids"], batch["token_type_ids"],
                                                     batch["attention_mask"])
  logp = _log_softmax(mlm_logits)
  w = batch["mlm_weights"]
  nll = -np.take_along_axis(logp, batch["mlm_targets"][..., None], -1)[..., 0]
  mlm = np.sum(nll * w) / np.sum(w)
  mlm_acc = np.sum((np.argmax(logp, -1) == batch["mlm_targets"]) * w) / np.sum(w)
  ew = batch["example_weights"]
  nsp_logp = _log_softmax(nsp_logits)
  nsp = -np.sum(nsp_logp[np.arange(8), batch["nsp_labels"]] * ew) / np.sum(ew)
  nsp_acc = np.sum((np.argmax(nsp_logp, -1) == batch["nsp_labels"]) * ew) / np.sum(ew)
  mean = {k: float(s) / float(n) for k, (s, n) in stats.items()}
  np.testing.assert_allclose(mean["mlm_loss"], mlm, rtol=1e-5)
  np.testing.assert_allclose(mean["nsp_loss"], nsp, rtol=1e-5)
  np.testing.assert_allclose(mean["mlm_accuracy"], mlm_acc, rtol=1e-6)
  np.testing.assert_allclose(mean["nsp_accuracy"], nsp_acc, rtol=1e-6)
  np.testing.assert_allclose(float(loss), mlm + nsp, rtol=1e-5)
  np.testing.assert_allclose(mean["loss"], mlm + nsp, rtol=1e-5)


def test_max_predictions_scores_only_masked_positions():
  batch = _batch(1)
  per_row = batch["mlm_weights"].sum(-1).astype(int)
  full_task = _task()
  params = nn.meta.unbox(full_task.init_params(jax.random.key(0), batch))
  _, full = jax.jit(full_task.loss_fn, static_argnums=3)(params, batch, jax.random.key(0), False)
  # room for every masked token: the same numbers as scoring every position
  _, roomy = jax.jit(_task(f"task.mlm_max_predictions={per_row.max()}").loss_fn, static_argnums=3)(
      params, batch, jax.random.key(0), False)
  for k in full:
    np.testing.assert_allclose(roomy[k], full[k], rtol=1e-5, err_msg=k)
  # too little room: only the first 3 masked tokens of each row are scored
  _, tight = jax.jit(_task("task.mlm_max_predictions=3").loss_fn, static_argnums=3)(
      params, batch, jax.random.key(0), False)
  assert float(tight["mlm_loss"][1]) == np.minimum(per_row, 3).sum()


@pytest.mark.parametrize("head", ["mlm_nsp", "mlm"])
def test_training_lowers_the_loss_and_mlm_only_head(head):
  config = config_lib.load(BASE, TINY + [f"task.head={head}", "task.mlm_max_predictions=12", "train.batch_size=8",
                                         "optim.learning_rate=3e-3", *PLAIN_ADAM])
  task = make_task(config)
  batch = _batch(2)
  state, losses = train_steps(config, itertools.repeat(batch), 30, task=task)
  assert ("nsp_head" in state.params) == (head == "mlm_nsp")
  assert losses[-1] < 0.5 * losses[0], losses
  _, stats = task.loss_fn(state.params, batch, jax.random.key(0), False)
  assert ("nsp_accuracy" in stats) == (head == "mlm_nsp")


def test_bad_input():
  with pytest.raises(ValueError, match="task.head='crf' does not fit task.name='mlm_nsp'"):
    _task("task.head=crf")
  with pytest.raises(ValueError, match="model.pooler=True"):
    _task("model.pooler=false").init_params(jax.random.key(0), _batch())
