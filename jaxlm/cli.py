"""The `jaxlm` command: parses arguments, loads the config, calls library functions. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys

from jaxlm import config as config_lib


def _load(args, overrides):
  return config_lib.load(args.config, overrides)


def cmd_train(args, overrides):
  config = _load(args, overrides)
  from jaxlm import train
  train.run(config, args.workdir)


def cmd_eval(args, overrides):
  config = _load(args, overrides)
  from jaxlm import train
  print(json.dumps(train.run_eval_only(config, args.workdir)))


def cmd_generate(args, overrides):
  from jaxlm import generate
  config = generate.load_config_for_sampling(args.workdir, overrides)
  for key in ("max_new_tokens", "temperature", "top_k", "seed"):
    value = getattr(args, key)
    if value is not None:
      config.sample[key] = value
  print(generate.generate_text(config, args.workdir, args.prompt))


def cmd_tokenizer(args, overrides):
  config = _load(args, overrides)
  from jaxlm.data.tokenizer import train_tokenizer
  path = train_tokenizer(config, args.workdir)
  print(f"tokenizer written to {path}")


def cmd_bench(args, overrides):
  config = _load(args, overrides)
  from jaxlm import bench
  print(json.dumps(bench.bench_train_step(config, steps=args.steps, warmup=args.warmup, peak_gflops=args.peak_gflops)))


def cmd_plot(args, overrides):
  from jaxlm import plot
  print(f"plot written to {plot.plot_metrics(args.workdir, args.output)}")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jaxlm", description="Train, evaluate and sample transformer language models in JAX.",
      epilog="Config values are overridden with --config.KEY=VALUE (dotted keys, e.g. --config.train.steps=100).")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("train", help="train (or resume) a model in a workdir")
  p.add_argument("--config", required=True, help="experiment config file, e.g. configs/gpt_tiny.py")
  p.add_argument("--workdir", required=True, help="where config.json, metrics, checkpoints go")
  p.set_defaults(func=cmd_train)

  p = sub.add_parser("eval", help="evaluate the latest checkpoint of a workdir")
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True)
  p.set_defaults(func=cmd_eval)

  p = sub.add_parser("generate", help="sample text from the latest checkpoint (KV cache)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--prompt", required=True)
  p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=None)
  p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
  p.add_argument("--top-k", dest="top_k", type=int, default=None, help="0 = no top-k filter")
  p.add_argument("--seed", type=int, default=None)
  p.set_defaults(func=cmd_generate)

  p = sub.add_parser("tokenizer", help="train the sentencepiece model the config names")
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True)
  p.set_defaults(func=cmd_tokenizer)

  p = sub.add_parser("bench", help="time the training step on random tokens; prints one JSON line")
  p.add_argument("--config", required=True)
  p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--peak-gflops", dest="peak_gflops", type=float, default=None,
                 help="device peak for MFU; default: measured with a jitted float32 matmul")
  p.set_defaults(func=cmd_bench)

  p = sub.add_parser("plot", help="PNG of loss / learning rate / throughput curves from metrics.jsonl")
  p.add_argument("--workdir", required=True)
  p.add_argument("--output", default=None, help="default: WORKDIR/metrics.png")
  p.set_defaults(func=cmd_plot)
  return parser


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  overrides, rest = config_lib.split_config_args(argv)
  args = build_parser().parse_args(rest)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)  # library chatter (orbax, grain) stays out of the user's terminal
  from jaxlm.sharding import MeshError
  try:
    args.func(args, overrides)
  except config_lib.ConfigError as e:
    sys.exit(f"jaxlm: config error: {e}")
  except (MeshError, FileNotFoundError) as e:
    sys.exit(f"jaxlm: error: {e}")


if __name__ == "__main__":
  main()
