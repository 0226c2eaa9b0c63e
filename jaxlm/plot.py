"""`jaxlm plot`: loss, learning-rate and throughput curves from a workdir's metrics.jsonl, as one PNG."""

from __future__ import annotations

import json
import os


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: nothing has been trained in {workdir}")
  rows = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not JSON ({e}): {line[:80]}") from None
  return rows


def plot_metrics(workdir: str, output: str | None = None) -> str:
  # matplotlib is imported only to plot, with the file backend chosen before pyplot loads (no display needed)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: E402 - after the backend is set

  rows = read_metrics(workdir)
  train_rows = [r for r in rows if r["split"] == "train"]
  eval_rows = [r for r in rows if r["split"] != "train" and "loss" in r]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  ax = axes[0]
  ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train")
  for split in sorted({r["split"] for r in eval_rows}):
    pts = [r for r in eval_rows if r["split"] == split]
    ax.plot([r["step"] for r in pts], [r["loss"] for r in pts], "o-", label=split)
  ax.set(title="loss", xlabel="step")
  ax.legend()
  axes[1].plot([r["step"] for r in train_rows], [r["learning_rate"] for r in train_rows])
  axes[1].set(title="learning rate", xlabel="step")
  axes[2].plot([r["step"] for r in train_rows], [r["tokens_per_s"] for r in train_rows])
  axes[2].set(title="tokens/s", xlabel="step")
  fig.tight_layout()
  output = output or os.path.join(workdir, "metrics.png")
  fig.savefig(output, dpi=90)
  plt.close(fig)
  return output
