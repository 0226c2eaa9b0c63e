"""`jaxlm bench --generate` and its peer script: both time the same saved model with the same lengths."""

import json
import subprocess
import sys

import pytest

from jaxlm import config as config_lib
from jaxlm.bench_generate import bench_generate
from tests.conftest import REPO, TINY


def test_bench_generate_reports_every_run():
  config = config_lib.load(TINY)
  result = bench_generate(config, batch_sizes=(1, 2), prompt_len=8, new_tokens=4, beam_size=2, repeats=1)
  assert [(r["search"], r["batch"]) for r in result["runs"]] == [("greedy", 1), ("beam2", 1), ("greedy", 2),
                                                                    ("beam2", 2)]
  for r in result["runs"]:
    assert r["tokens_per_s"] == pytest.approx(r["batch"] * 4 / r["seconds"], rel=0.01)
  assert all(r["prefill_ms"] > 0 and r["per_token_ms"] > 0 for r in result["runs"] if r["search"] == "greedy")


@pytest.mark.slow
def test_peer_script_and_bench_time_the_same_saved_model(tmp_path):
  pytest.importorskip("transformers")
  peer = subprocess.run([sys.executable, str(REPO / "tests" / "peer_hf_generate.py"), "--out", str(tmp_path / "m"),
                         "--layers", "2", "--d-model", "32", "--heads", "4", "--vocab", "128", "--positions", "64",
                         "--batch-sizes", "2", "--prompt-len", "8", "--new-tokens", "4", "--beam", "2",
                         "--repeats", "1"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert peer.returncode == 0, peer.stderr[-2000:]
  theirs = json.loads(peer.stdout.strip().splitlines()[-1])
  ours = bench_generate(config_lib.load(TINY), hf_dir=str(tmp_path / "m"), batch_sizes=(2,), prompt_len=8,
                        new_tokens=4, beam_size=2, repeats=1)
  assert [(r["search"], r["batch"]) for r in ours["runs"]] == [(r["search"], r["batch"]) for r in theirs["runs"]]
  assert ours["params"] == 2 * (4 * 32 * 32 + 4 * 32 + 2 * 32 * 128 + 128 + 32 + 4 * 32) + 128 * 32 + 64 * 32 + 2 * 32
