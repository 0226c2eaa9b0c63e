"""Grain worker processes: 2 workers prepare the rows no workers prepare, noise train rows into the batches of no
workers and resume them exactly, start for no other batches, and the data benchmark runs both paths."""

import itertools
import json
import multiprocessing
import os

import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import workdir as workdir_lib
from jaxlm.data import pipeline
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.bench import bench_data
from jaxlm.tasks import make_task
from tests.conftest import REPO, task_batches, train_tokenizer, with_keys


def pydoc_config(tmp_path):
  c = config_lib.load_config_file(str(REPO / "configs" / "base.py"))
  c.data.tfds_data_dir = str(tmp_path / "tfds")
  c.data.source = "pydoc"
  c.data.seq_len, c.train.batch_size = 32, 4
  c.tokenizer.vocab_size, c.tokenizer.max_sentences = 300, 2000
  c.model.vocab_size = 300
  train_tokenizer(c, str(tmp_path))
  return c


def same_batches(got, want):
  assert len(got) == len(want) > 1
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for k in w:
      np.testing.assert_array_equal(g[k], w[k])


@pytest.mark.slow
def test_two_workers_prepare_the_rows_of_none(tmp_path, shared_data):
  c = pydoc_config(tmp_path)
  # array_record files prepared from real text: workers reopen them from the prepared directory
  c.data.source, c.data.train_files = "text", str(shared_data / "text" / "tinyshakespeare.txt")
  tok = tokenizer_lib.load_tokenizer(c, str(tmp_path))
  task, records = make_task(c), workdir_lib.open_data(c).split("train").records
  # tokenised in 2 workers (chunks of records), packed here over all of them: the rows of no workers, stored once
  mine, _ = pipeline.prepare_rows(task, records, tok, "train", c.data)
  c.data.worker_count = 2
  theirs, _ = pipeline.prepare_rows(task, records, tok, "train", c.data, cache_dir=str(tmp_path / "rows"))
  assert len(records) > 20 * 256 and len(theirs) == len(mine) > 8000
  np.testing.assert_array_equal(theirs.lengths, mine.lengths)
  for k, v in mine.take(np.arange(len(mine))).items():
    np.testing.assert_array_equal(theirs.take(np.arange(len(theirs)))[k], v)
  [stored] = [d for d in (tmp_path / "rows").iterdir() if d.is_dir()]
  done = os.stat(stored / "rows.json").st_mtime_ns
  c.data.worker_count = 0  # the same rows: read back, not prepared again
  again, _ = pipeline.prepare_rows(task, records, tok, "train", c.data, cache_dir=str(tmp_path / "rows"))
  assert [d for d in (tmp_path / "rows").iterdir() if d.is_dir()] == [stored]
  assert os.stat(stored / "rows.json").st_mtime_ns == done
  np.testing.assert_array_equal(again.lengths, mine.lengths)
  c.data.read_threads = 2  # chunks mapped ahead in threads: the same rows again
  threaded, _ = pipeline.prepare_rows(task, records, tok, "train", c.data)
  for k, v in mine.take(np.arange(len(mine))).items():
    np.testing.assert_array_equal(threaded.take(np.arange(len(threaded)))[k], v)


@pytest.mark.slow
def test_noise_in_two_workers_resumes_exactly_and_other_batches_start_none(tmp_path, shared_data):
  """Span corruption noises train rows at read time, in the workers: the batches of no workers, resumed exactly.
  Its eval batches and a causal LM's train batches are gathers of prepared rows: no worker starts for them."""
  c = pydoc_config(tmp_path)
  c.data.source = "text"
  c.data.train_files = str(shared_data / "text" / "wikitext-2" / "wiki.valid.tokens")
  c.data.doc_split, c.data.seq_len = "blank_lines", 64
  c.tokenizer.vocab_size, c.tokenizer.num_sentinels, c.tokenizer.max_sentences = 512, 20, 1500
  c.model.vocab_size = 512
  train_tokenizer(c, str(tmp_path))
  tok = tokenizer_lib.load_tokenizer(c, str(tmp_path))
  span = make_task(with_keys(c, task__name="span_corruption", model__family="encoder_decoder", model__style="t5"))
  n = 4
  want = list(itertools.islice(task_batches(c, tok, "train", task=span), 2 * n))
  c.data.worker_count = 2
  it = task_batches(c, tok, "train", task=span)
  got = [next(it) for _ in range(n)]
  assert len(multiprocessing.active_children()) >= 2  # the noise runs in the workers
  state = json.loads(json.dumps(it.get_state()))
  it.close()
  resumed = task_batches(c, tok, "train", task=span)
  resumed.set_state(state)
  got += [next(resumed) for _ in range(n)]
  resumed.close()
  same_batches(got, want)

  for split, task in (("eval", span), ("train", None)):
    batches = task_batches(c, tok, split, task=task)
    first = [next(batches) for _ in range(3)]
    for worker in multiprocessing.active_children():  # workers that tokenised or were closed are on their way out;
      worker.join(timeout=30)  # a batch worker would still be serving
    assert not multiprocessing.active_children(), split
    c.data.worker_count = 0
    same_batches(first, list(itertools.islice(task_batches(c, tok, split, task=task), 3)))
    c.data.worker_count = 2


@pytest.mark.slow
def test_bench_data_reports_both_paths(tmp_path):
  c = pydoc_config(tmp_path)
  c.model.attention = "blocked"  # as the quickstart and benchmark decoders have: the MLM path's encoder uses XLA's
  result = bench_data(c, workdir=str(tmp_path), batches=5, workers=2)
  for path in ("lm", "mlm"):
    assert result[path]["tokens_per_s"] > 0 and 0.5 < result[path]["fill"] <= 1.0 and result[path]["prepare_s"] > 0
  assert result["mlm"]["tokenizer"].startswith("trained")  # the config's tokenizer has no [CLS]/[SEP]/[MASK]
  assert result["workers"] == 2
