"""Fine-tuning rows packed with several examples (data.pack_examples): the packed rows hold every example whole, in
their own segment and positions, with the unpacked row's arrays; and for NER (softmax and CRF), classification and
relation the packed batch gives the unpacked batch's loss, gradient, predictions and metrics, through the real train
step too."""

import io
import json

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.data import example_packing, pipeline, relations
from jaxlm.data.wordpiece import WordPieceTokenizer
from jaxlm.tasks import make_task
from tests.conftest import BASE, PLAIN_ADAM, TINY_ENCODER, train_steps

SEQ = 32
M = 6  # examples a packed row at most
SPECIALS = ["[PAD]", "[unused0]", "[unused1]", "[unused2]", "[unused3]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(40)]
MARKER_PIECES = ["<", ">", "/", "e", "##1", "##2"]
VOCAB = SPECIALS + WORDS + ["##a", "##b", "##c"] + MARKER_PIECES
TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
LABELS = ("neg", "pos", "neutral")
RELATIONS = ("Other", "Cause-Effect(e1,e2)", "Cause-Effect(e2,e1)")
PACKED = ["data.pack_examples=True", f"data.pack_max_examples={M}", "data.pack_bins=4"]


def _tokenizer():
  return WordPieceTokenizer(VOCAB, lowercase=False)


def _config(task: str, *extra) -> ml_collections.ConfigDict:
  labels = {"ner": TAGS, "classification": LABELS, "relation": RELATIONS}[task]
  return config_lib.load(BASE, [f"task.name={task}", *TINY_ENCODER, f"model.vocab_size={len(VOCAB)}",
                                "model.d_ff=64", "model.attention_dropout=0.0", "task.head_dropout=0.0",
                                f"data.labels={labels!r}", f"data.seq_len={SEQ}", *extra])


def _word(rng) -> str:
  """A word of 1-3 pieces: w7, w7a, w7bc."""
  return str(rng.choice(WORDS)) + "".join(rng.choice(["a", "b", "c"], size=rng.integers(0, 3)))


def _ner_records(seed: int, n: int) -> list[dict]:
  """Sentences of 1-9 words with IOB2 tags, one of 26 words (longer than a row: tagged in windows), one empty."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    count = 26 if i == 3 else 0 if i == 5 else int(rng.integers(1, 10))
    tags = []
    while len(tags) < count:
      kind = rng.choice(["O", "PER", "LOC"])
      tags += ["O"] if kind == "O" else [f"B-{kind}"] + [f"I-{kind}"] * int(rng.integers(0, 2))
    out.append({"tokens": [_word(rng) for _ in range(count)], "tags": tags[:count]})
  return out


def _classification_records(seed: int, n: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    pair = rng.random() < 0.3
    a = " ".join(_word(rng) for _ in range(rng.integers(1, 8)))
    b = " ".join(_word(rng) for _ in range(rng.integers(1, 5))) if pair else ""
    out.append({"text_a": a, "text_b": b, "label": str(rng.choice(LABELS))})
  return out


def _relation_records(seed: int, n: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    words = [str(rng.choice(WORDS)) for _ in range(rng.integers(3, 9))]
    a, b = rng.choice(len(words), size=2, replace=False)  # either argument may come first
    words[a], words[b] = f"<e1>{words[a]}</e1>", f"<e2>{words[b]}</e2>"
    text, e1, e2 = relations.untag(" ".join(words))
    out.append({"id": str(i), "text": text, "e1": e1, "e2": e2, "label": str(rng.choice(RELATIONS)), "line": i,
                "where": f"generated:{i}"})
  return out


RECORDS = {"ner": _ner_records, "classification": _classification_records, "relation": _relation_records}


def _all_rows(config, records) -> dict[str, np.ndarray]:
  """Every row of the split as the pipeline prepares it, stacked."""
  prepared, _ = pipeline.prepare_rows(make_task(config), records, _tokenizer(), "dev", config.data)
  return prepared.take(np.arange(len(prepared)))


def _params(task, batch):
  """Random parameters of the task's model (every one non-zero, the CRF's scores too), made without compiling its
  initialisation."""
  shapes = nn.meta.unbox(jax.eval_shape(task.init_params, jax.random.key(0), batch))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.3).astype(s.dtype), shapes)


# ---- the packed rows ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ner", "classification", "relation"])
def test_packed_rows_hold_every_example_whole(name):
  records = RECORDS[name](0, 40)
  plain = _all_rows(_config(name), records)
  packed = _all_rows(_config(name, *PACKED), records)
  tokenizer = _tokenizer()
  token_keys = [k for k, v in plain.items() if v.ndim == 2]
  example_keys = [k for k, v in plain.items() if v.ndim == 1]
  rows, length = packed["input_ids"].shape
  assert length == SEQ and rows < len(plain["input_ids"]) // 2  # several examples a row
  for k in example_keys:
    assert packed[k].shape == (rows, M) and packed[k].dtype == plain[k].dtype, k
  for k in token_keys:
    assert packed[k].dtype == plain[k].dtype, k
  seen = []
  for r in range(rows):
    seg = packed["segment_ids"][r]
    n = int(seg.max())
    assert 1 <= n <= M
    used = int(np.sum(seg > 0))
    # segments 1..n lie side by side from the row's start; the rest is padding
    np.testing.assert_array_equal(seg[:used], np.repeat(np.arange(1, n + 1), np.bincount(seg[:used])[1:]))
    assert np.all(seg[used:] == 0)
    np.testing.assert_array_equal(packed["attention_mask"][r], seg > 0)
    assert np.all(packed["input_ids"][r, used:] == tokenizer.pad_id)
    for k in range(M):
      where = np.flatnonzero(seg == k + 1)
      if k >= n:  # an empty slot: the pad values
        assert packed["example_ids"][r, k] == -1 and packed["example_starts"][r, k] == 0
        continue
      start = int(packed["example_starts"][r, k])
      assert start == where[0] and packed["input_ids"][r, start] == tokenizer.cls_id
      np.testing.assert_array_equal(packed["positions"][r, where], np.arange(len(where)))
      assert packed["input_ids"][r, where[-1]] == tokenizer.sep_id
      # the unpacked row of this example (a window of a long NER sentence has its own row; they come in order)
      example = int(packed["example_ids"][r, k])
      np.testing.assert_array_equal(packed["position_example_ids"][r, where], example)
      seen.append((example, start, r, k, where))
  assert np.all(packed["position_example_ids"][packed["segment_ids"] == 0] == -1)
  # every unpacked row appears exactly once, whole: the same tokens and values, positions moved by its start
  assert sorted(e for e, *_ in seen) == sorted(plain["example_ids"].tolist())
  taken = set()
  for example, start, r, k, where in seen:
    candidates = [i for i in np.flatnonzero(plain["example_ids"] == example) if i not in taken]
    match = None
    for i in candidates:
      n_tokens = int(plain["attention_mask"][i].sum())
      if n_tokens == len(where) and np.array_equal(plain["input_ids"][i, :n_tokens], packed["input_ids"][r, where]):
        match = i
        break
    assert match is not None, (example, r, k)
    taken.add(match)
    for key in token_keys:
      np.testing.assert_array_equal(packed[key][r, where], plain[key][match, :len(where)], err_msg=key)
    for key in example_keys:
      shift = start if key in ("e1_start", "e2_start") else 0
      assert packed[key][r, k] == plain[key][match] + shift, key
  if name == "ner":  # the sentence longer than a row comes as several windows, each packed whole above
    assert np.sum(plain["example_ids"] == 3) >= 2


def test_pack_max_examples_must_fit_the_row():
  with pytest.raises(ValueError, match="data.pack_max_examples=17: a row of data.seq_len=32 holds 1..16"):
    make_task(_config("classification", "data.pack_examples=True", "data.pack_max_examples=17"))


def test_bucketed_packed_batches_keep_their_example_arrays():
  records = _classification_records(1, 60)
  config = _config("classification", *PACKED, "data.bucket_lengths=(8, 16)", "train.batch_size=4")
  task = make_task(config)
  batches = pipeline.batches(task, records, _tokenizer(), "dev", data_cfg=config.data, batch_size=4, seed=0)
  batch = next(batches)
  assert batch["input_ids"].shape[1] in (8, 16, SEQ) and batch["segment_ids"].shape == batch["input_ids"].shape
  assert batch["example_ids"].shape == (4, M) and batch["example_starts"].shape == (4, M)
  assert set(batch) == set(task.dummy_batch(4, SEQ)) | {"position_example_ids", "example_ids"}


# ---- packed == unpacked ------------------------------------------------------------------------------------------


def _outputs(task, params, batch):
  """(loss, stats, gradient, predictions) of one batch, in one compiled call."""
  loss_and_grad = jax.value_and_grad(lambda p, b: task.loss_fn(p, b, jax.random.key(1), False), has_aux=True)
  ((loss, stats), grad), predicted = jax.device_get(jax.jit(
      lambda p, b: (loss_and_grad(p, b), task.predict(p, b)))(params, batch))
  return float(loss), stats, grad, predicted


def _assert_same_loss_and_gradient(plain_outputs, packed_outputs):
  (loss_u, stats_u, grad_u, _), (loss_p, stats_p, grad_p, _) = plain_outputs, packed_outputs
  np.testing.assert_allclose(loss_p, loss_u, rtol=1e-5)
  for k in stats_u:
    np.testing.assert_allclose(np.asarray(stats_p[k]), np.asarray(stats_u[k]), rtol=1e-5, err_msg=k)
  flat_u, flat_p = jax.tree_util.tree_leaves_with_path(grad_u), jax.tree.leaves(grad_p)
  for (path, gu), gp in zip(flat_u, flat_p):
    scale = float(np.max(np.abs(gu))) or 1.0
    np.testing.assert_allclose(np.asarray(gp) / scale, np.asarray(gu) / scale, atol=2e-5,
                               err_msg=jax.tree_util.keystr(path))


def _pair(name, *extra):
  records = RECORDS[name](2, 24)
  plain_cfg, packed_cfg = _config(name, *extra), _config(name, *extra, *PACKED)
  plain_task, packed_task = make_task(plain_cfg), make_task(packed_cfg)
  plain, packed = _all_rows(plain_cfg, records), _all_rows(packed_cfg, records)
  params = _params(packed_task, packed_task.dummy_batch(2, SEQ))
  return records, plain_task, packed_task, params, plain, packed


@pytest.mark.parametrize("head", ["softmax", "crf"])
def test_ner_packed_equals_unpacked(head):
  records, plain_task, packed_task, params, plain, packed = _pair("ner", f"task.head={head}")
  plain_outputs, packed_outputs = _outputs(plain_task, params, plain), _outputs(packed_task, params, packed)
  _assert_same_loss_and_gradient(plain_outputs, packed_outputs)
  plain_pairs, packed_pairs = [(plain, plain_outputs[-1])], [(packed, packed_outputs[-1])]
  assert packed_task.words(packed_pairs) == plain_task.words(plain_pairs)
  metrics_u, metrics_p = plain_task.host_metrics(plain_pairs, records), packed_task.host_metrics(packed_pairs, records)
  assert metrics_p == metrics_u
  out_u, out_p = io.StringIO(), io.StringIO()
  assert plain_task.write_predictions(records, plain_pairs, out_u, True) == len(records)
  assert packed_task.write_predictions(records, packed_pairs, out_p, True) == len(records)
  assert out_p.getvalue() == out_u.getvalue()


@pytest.mark.parametrize("name", ["classification", "relation"])
def test_sentence_tasks_packed_equal_unpacked(name):
  records, plain_task, packed_task, params, plain, packed = _pair(name)
  plain_outputs, packed_outputs = _outputs(plain_task, params, plain), _outputs(packed_task, params, packed)
  _assert_same_loss_and_gradient(plain_outputs, packed_outputs)
  out_u, out_p = plain_outputs[-1], packed_outputs[-1]
  # each example's probabilities, found by its id, are the unpacked row's
  real = packed["example_ids"] >= 0
  assert out_p["probs"].shape == packed["example_ids"].shape + (3,)
  order = np.argsort(plain["example_ids"])
  np.testing.assert_allclose(out_p["probs"][real][np.argsort(packed["example_ids"][real])], out_u["probs"][order],
                             rtol=1e-5, atol=1e-6)
  plain_pairs, packed_pairs = [(plain, out_u)], [(packed, out_p)]
  metrics_u, metrics_p = plain_task.host_metrics(plain_pairs, records), packed_task.host_metrics(packed_pairs, records)
  assert metrics_p == metrics_u
  text_u, text_p = io.StringIO(), io.StringIO()
  assert packed_task.write_predictions(records, packed_pairs, text_p, True) == len(records)
  plain_task.write_predictions(records, plain_pairs, text_u, True)
  # the same lines but for the rounded probability, which may differ in its 6th decimal (float sums in another order)
  rows_u = [json.loads(line) for line in text_u.getvalue().splitlines()]
  rows_p = [json.loads(line) for line in text_p.getvalue().splitlines()]
  assert [{k: v for k, v in r.items() if k != "probability"} for r in rows_p] == \
      [{k: v for k, v in r.items() if k != "probability"} for r in rows_u]
  np.testing.assert_allclose([r["probability"] for r in rows_p], [r["probability"] for r in rows_u], atol=2e-6)


def _padded(batch: dict, rows: int, pad_values: dict) -> dict:
  """`batch` completed to `rows` rows the way an eval pass pads: the task's fill values, 0 elsewhere."""
  out = {}
  for k, v in batch.items():
    fill = np.full((rows - len(v),) + v.shape[1:], pad_values.get(k, 0), v.dtype)
    out[k] = np.concatenate([v, fill])
  return out


@pytest.mark.slow
def test_train_step_on_packed_rows_follows_the_unpacked_one():
  """The real jitted train step, sharded over the devices: three Adam steps on the same sentences, packed and not,
  give the same losses (NER with the CRF head: the encoder's segments and the chain's restarts both at work)."""
  devices = len(jax.devices())
  records = _ner_records(3, 12)
  plain_cfg = _config("ner", "task.head=crf", *PLAIN_ADAM, "optim.learning_rate=1e-3")
  packed_cfg = _config("ner", "task.head=crf", *PLAIN_ADAM, "optim.learning_rate=1e-3", *PACKED)
  plain, packed = _all_rows(plain_cfg, records), _all_rows(packed_cfg, records)
  assert len(packed["input_ids"]) < len(plain["input_ids"])
  n_plain = -(-len(plain["input_ids"]) // devices) * devices
  n_packed = -(-len(packed["input_ids"]) // devices) * devices
  plain_cfg.train.batch_size, packed_cfg.train.batch_size = n_plain, n_packed
  plain_task, packed_task = make_task(plain_cfg), make_task(packed_cfg)
  tok = _tokenizer()
  plain = _padded(plain, n_plain, plain_task.pad_values(tok))
  packed = _padded(packed, n_packed, packed_task.pad_values(tok))

  def repeat(batch):
    while True:
      yield batch

  _, losses_u = train_steps(plain_cfg, repeat(plain), 3, task=plain_task)
  _, losses_p = train_steps(packed_cfg, repeat(packed), 3, task=packed_task)
  assert losses_u[-1] < losses_u[0]
  np.testing.assert_allclose(losses_p, losses_u, rtol=1e-4)


def test_dummy_batch_matches_the_packed_rows():
  for name in ("ner", "classification", "relation"):
    config = _config(name, *PACKED)
    rows = _all_rows(config, RECORDS[name](4, 10))
    dummy = make_task(config).dummy_batch(3, SEQ)
    for k, v in dummy.items():
      assert k in rows and rows[k].dtype == v.dtype and rows[k].shape[1:] == v.shape[1:], (name, k)
    assert set(example_packing.dummy_arrays(1, SEQ, M)) <= set(rows)
