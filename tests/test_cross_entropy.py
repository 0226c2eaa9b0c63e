"""The shared softmax cross-entropy (jaxlm.tasks.common.cross_entropy) against numpy: the weighted sums, the z-loss,
and `correct` counted exactly as argmax == label, the first of tied maxima winning."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.tasks.common import cross_entropy


def _numpy_reference(logits, labels, weights, z_loss):
  shift = logits.max(-1, keepdims=True)
  log_z = np.log(np.exp(logits - shift).sum(-1)) + shift[..., 0]
  gold = np.take_along_axis(logits, np.clip(labels, 0, logits.shape[-1] - 1)[..., None], -1)[..., 0]
  ce = ((log_z - gold) * weights).sum()
  correct = ((logits.argmax(-1) == labels) * weights).sum()
  return ce + z_loss * (log_z ** 2 * weights).sum(), ce, correct, weights.sum()


@pytest.mark.parametrize("levels", [None, 3])  # continuous logits, or three values: ties in most rows
def test_sums_and_correct_match_numpy(levels):
  rng = np.random.default_rng(0)
  shape = (6, 50, 11)
  logits = (rng.standard_normal(shape) if levels is None else rng.integers(0, levels, shape)).astype(np.float32)
  labels = rng.integers(0, shape[-1], shape[:-1]).astype(np.int32)
  labels[0, :5] = -1  # padding ids, and one past the last class: never correct, whatever their weight
  labels[1, :5] = shape[-1]
  weights = rng.integers(0, 3, shape[:-1]).astype(np.float32)
  got = cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights), z_loss=1e-3)
  want = _numpy_reference(logits, labels, weights, 1e-3)
  np.testing.assert_allclose([got.loss, got.ce], want[:2], rtol=1e-5)
  assert float(got.correct) == want[2] and float(got.count) == want[3]
  if levels:  # the data holds ties that decide: counting every label that reaches the maximum would differ
    gold = np.take_along_axis(logits, np.clip(labels, 0, shape[-1] - 1)[..., None], -1)[..., 0]
    tie_blind = ((gold >= logits.max(-1)) & (labels >= 0) & (labels < shape[-1])) * weights
    assert tie_blind.sum() > want[2]
