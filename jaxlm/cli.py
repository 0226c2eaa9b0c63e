"""The `jaxlm` command: parses arguments, loads the config, calls library functions. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys

from absl import logging as absl_logging

from jaxlm import bench, convert, distributed, evaluation, export, generate, memory, plot, predict, run
from jaxlm import config as config_lib
from jaxlm import workdir as workdir_lib
from jaxlm.bench_checkpoint import bench_checkpoint
from jaxlm.bench_generate import bench_generate
from jaxlm.checkpoint import CorruptCheckpointError, ignore_closed_loop_callbacks
from jaxlm.data.bench import bench_data
from jaxlm.data.sources import DataError
from jaxlm.data.tokenizer import train_tokenizer
from jaxlm.distributed import DistributedError
from jaxlm.hf.io import ConvertError
from jaxlm.sharding import MeshError


def _load(args, overrides):
  return config_lib.load(args.config, overrides)


def cmd_train(args, overrides):
  if args.profile:  # --profile START:STOP is train.profile, checked with the other keys
    overrides = [*overrides, f"train.profile={args.profile}"]
  config = _load(args, overrides)
  if args.dry_run:
    workdir_lib.resolve_labels(config)  # classification/NER heads are sized by the labels the train split holds
    print(memory.dry_run(config, args.devices, args.device_memory_gib, args.compile, args.topology))
    return
  distributed.initialize(config.distributed, coordinator=args.coordinator, num_processes=args.num_processes,
                         process_id=args.process_id)
  run.run(config, args.workdir)


def cmd_eval(args, overrides):
  config = _load(args, overrides)
  print(json.dumps(evaluation.run_eval_only(config, args.workdir)))


def cmd_generate(args, overrides):
  config = generate.load_config_for_sampling(args.workdir, overrides)
  for key in ("max_new_tokens", "temperature", "top_k", "top_p", "beam_size", "length_penalty", "no_repeat_ngram_size",
              "seed"):
    value = getattr(args, key)
    if value is not None:
      config.sample[key] = value
  config_lib.validate(config, "", overrides)  # the sampling flags pass the sample.* keys' checks too
  if args.chat or args.chat_input:
    generate.run_chat(config, args.workdir, args.chat_input, args.chat_output, args.system)
    return
  if args.prompt is None:
    raise ValueError("jaxlm generate needs --prompt TEXT (or --chat for a conversation)")
  print(generate.generate_text(config, args.workdir, args.prompt))


def cmd_tokenizer(args, overrides):
  config = _load(args, overrides)
  path = train_tokenizer(config, args.workdir, workdir_lib.open_data(config).texts())
  print(f"tokenizer written to {path}")


def cmd_bench(args, overrides):
  config = _load(args, overrides)
  if args.checkpoint:
    print(json.dumps(bench_checkpoint(config, args.checkpoint)))
    return
  if args.generate:
    print(json.dumps(bench_generate(config, hf_dir=args.hf, batch_sizes=tuple(args.batch_sizes),
                                    prompt_len=args.prompt_len, new_tokens=args.new_tokens, beam_size=args.beam)))
    return
  result = bench.bench_train_step(config, steps=args.steps, warmup=args.warmup, peak_gflops=args.peak_gflops)
  if args.data:
    if not args.workdir:
      raise config_lib.ConfigError("bench --data needs --workdir (the tokenizer is read from there)")
    data = bench_data(config, workdir=args.workdir, batches=args.data_batches, workers=args.workers)
    result = {"train_step": result, "data": data,
              "data_over_step": {p: round(data[p]["tokens_per_s"] / result["tokens_per_s"], 2) for p in ("lm", "mlm")}}
  print(json.dumps(result))


def cmd_predict(args, overrides):
  if overrides:
    raise config_lib.ConfigError("predict reads WORKDIR/config.json; it takes no --config.KEY overrides")
  n = predict.predict(args.workdir, args.input, args.output, args.input_format,
                      log=lambda message: print(message, file=sys.stderr, flush=True))
  if args.output:
    print(f"{n} predictions written to {args.output}")


def cmd_convert(args, overrides):
  # the overrides pass their keys' checks before anything is read or written
  config_lib.validate(config_lib.apply_overrides(config_lib.base_config(), overrides), "", overrides)
  print(f"checkpoint written to {convert.convert_to_workdir(args.hf, args.workdir, tuple(overrides))}")


def cmd_export(args, overrides):
  if overrides:
    raise config_lib.ConfigError("export reads WORKDIR/config.json; it takes no --config.KEY overrides")
  export.export(args.workdir, args.out, merge=args.merge)


def cmd_plot(args, overrides):
  print(f"plot written to {plot.plot_metrics(args.workdir, args.output)}")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jaxlm", description="Train, evaluate and sample transformer language models in JAX.",
      epilog="Config values are overridden with --config.KEY=VALUE (dotted keys, e.g. --config.train.steps=100).")
  parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback instead of one line")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("train", help="train (or resume) a model in a workdir")
  p.add_argument("--config", required=True, help="experiment config file, e.g. configs/gpt_tiny.py")
  p.add_argument("--workdir", required=True, help="where config.json, metrics, checkpoints go")
  p.add_argument("--profile", default="", metavar="START:STOP",
                 help="write a jax.profiler trace of steps START..STOP-1 to WORKDIR/profile (TensorBoard, Perfetto)")
  g = p.add_argument_group("multi-process (see jaxlm/distributed.py; SLURM and Cloud TPU need none of these)")
  g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (else $JAXLM_COORDINATOR)")
  g.add_argument("--num-processes", dest="num_processes", type=int, default=None,
                 help="processes in the run (else $JAXLM_NUM_PROCESSES)")
  g.add_argument("--process-id", dest="process_id", type=int, default=None,
                 help="this process's id, 0..N-1 (else $JAXLM_PROCESS_ID)")
  g = p.add_argument_group("dry run: per-device memory, without training (see jaxlm/memory.py)")
  g.add_argument("--dry-run", dest="dry_run", action="store_true",
                 help="report parameter, gradient, optimizer and activation bytes per device, then exit")
  g.add_argument("--devices", type=int, default=None, help="devices to plan for (need not exist here); default: this "
                 "machine's")
  g.add_argument("--device-memory-gib", dest="device_memory_gib", type=float, default=None,
                 help="memory of one device, to say whether it fits (e.g. 80 for H100, 95 for v5p)")
  g.add_argument("--compile", action="store_true", help="also compile the train step for this machine's devices "
                 "and report XLA's own sizes")
  g.add_argument("--topology", default=None, help="also compile for a TPU topology such as v5p:4x4x4 (needs libtpu, "
                 "not the TPU)")
  p.set_defaults(func=cmd_train)

  p = sub.add_parser("eval", help="evaluate the latest checkpoint of a workdir")
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True)
  p.set_defaults(func=cmd_eval)

  p = sub.add_parser("generate", help="text from the best (else latest) checkpoint (KV cache): a decoder continues "
                     "the prompt; a seq2seq or span-corruption (T5) workdir answers it as its input")
  p.add_argument("--workdir", required=True)
  p.add_argument("--prompt", default=None, help="the text to continue (or, for a seq2seq workdir, to answer)")
  p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=None)
  p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
  p.add_argument("--top-k", dest="top_k", type=int, default=None, help="0 = no top-k filter")
  p.add_argument("--top-p", dest="top_p", type=float, default=None, help="nucleus mass; 1 = no top-p filter")
  p.add_argument("--beam-size", dest="beam_size", type=int, default=None,
                 help="> 1: beam search (temperature, top-k and top-p unused)")
  p.add_argument("--length-penalty", dest="length_penalty", type=float, default=None,
                 help="beam search: alpha of ((5 + length) / 6) ** alpha")
  p.add_argument("--no-repeat-ngram-size", dest="no_repeat_ngram_size", type=int, default=None,
                 help="n > 0: never generate an n-gram twice (sampling and beam search)")
  p.add_argument("--seed", type=int, default=None)
  g = p.add_argument_group("chat (an sft workdir, or any decoder whose tokenizer has the data.chat_* markers)")
  g.add_argument("--chat", action="store_true", help="a conversation in the workdir's chat template: user turns from "
                 "stdin, a reply printed to each; the history is cut from the left to fit model.max_len")
  g.add_argument("--chat-input", dest="chat_input", default=None, metavar="FILE", help="instead of stdin: a user "
                 "turn per line (one conversation), or .jsonl/.json conversations ending with a user turn")
  g.add_argument("--chat-output", dest="chat_output", default=None, metavar="FILE", help="default: stdout, a reply "
                 "per line; a .jsonl file gets each conversation with its reply as {messages: [...]}")
  g.add_argument("--system", default="", help="a system message that starts the conversation (turns, stdin)")
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
  p.add_argument("--data", action="store_true",
                 help="also time the input pipeline (packed causal LM and MLM) and compare with the train step")
  p.add_argument("--workdir", default=None, help="with --data: where the tokenizer is")
  p.add_argument("--workers", type=int, default=2, help="with --data: grain worker processes")
  p.add_argument("--data-batches", dest="data_batches", type=int, default=100, help="with --data: timed batches")
  p.add_argument("--checkpoint", default=None, metavar="DIR",
                 help="instead: time saving and restoring the train state under DIR, beside dd's speed on that disk")
  g = p.add_argument_group("generation (--generate): KV-cache decoding of the config's decoder, greedy and beam")
  g.add_argument("--generate", action="store_true", help="instead: time decoding (prefill and per-token apart)")
  g.add_argument("--hf", default=None, metavar="DIR", help="a Hugging Face GPT-2/Llama directory to take the model and "
                 "weights from (the same model tests/peer_hf_generate.py times in transformers)")
  g.add_argument("--batch-sizes", dest="batch_sizes", type=int, nargs="+", default=[1, 8])
  g.add_argument("--prompt-len", dest="prompt_len", type=int, default=32)
  g.add_argument("--new-tokens", dest="new_tokens", type=int, default=64)
  g.add_argument("--beam", type=int, default=4, help="beam size of the beam-search runs; 1 = greedy only")
  p.set_defaults(func=cmd_bench)

  p = sub.add_parser("predict", help="predictions of a fine-tuned workdir's best (else latest) checkpoint for new text")
  p.add_argument("--workdir", required=True)
  p.add_argument("--input", required=True, help="classification: a sentence per line (a tab between a pair); ner: "
                 "whitespace-tokenised sentences one per line, or CoNLL; qa: SQuAD JSON; seq2seq: an input per line, "
                 "or JSON lines (.jsonl) with the input in data.input_field or 'source'")
  p.add_argument("--output", default=None, help="default: stdout. '.jsonl' writes JSON lines; otherwise "
                 "label<TAB>text (classification), CoNLL word<TAB>tag (ner) or an output per line (seq2seq); qa "
                 "always writes JSON lines")
  p.add_argument("--input-format", dest="input_format", default="auto", choices=("auto", "lines", "conll", "squad"),
                 help="auto: CoNLL when the file has blank lines or -DOCSTART-, else one sentence per line")
  p.set_defaults(func=cmd_predict)

  p = sub.add_parser("convert", help="a Hugging Face BERT, GPT-2, Llama or T5 directory -> a jaxlm workdir (config, "
                     "tokenizer where jaxlm reads it, checkpoint)")
  p.add_argument("--hf", required=True, help="directory with config.json and model.safetensors (sharded or not)")
  p.add_argument("--workdir", required=True, help="fine-tune from it with --config.init.checkpoint_dir=WORKDIR")
  p.set_defaults(func=cmd_convert)

  p = sub.add_parser("export", help="a workdir's best (else latest) checkpoint -> a Hugging Face model directory")
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True, help="the directory to write (config.json, model.safetensors, tokenizer)")
  p.add_argument("--merge", action="store_true", help="LoRA: fold the adapters into the weights; without it they go "
                 "to OUT/adapter in PEFT's format, beside the model without them")
  p.set_defaults(func=cmd_export)

  p = sub.add_parser("plot", help="PNG of loss / learning rate / throughput curves from metrics.jsonl")
  p.add_argument("--workdir", required=True)
  p.add_argument("--output", default=None, help="default: WORKDIR/metrics.png")
  p.set_defaults(func=cmd_plot)
  return parser


# Failures a user causes (a config, a file, a workdir, data, a checkpoint that does not fit): their message is the
# whole story. Any other exception is reported in one line too, marked unexpected; --debug shows its traceback.
USER_ERRORS = (config_lib.ConfigError, MeshError, DistributedError, FloatingPointError, DataError, ConvertError,
               workdir_lib.SetupError, OSError, ValueError, KeyError, CorruptCheckpointError)


def error_line(e: BaseException) -> str:
  """One line for the terminal: the message (the file and line where it has them), without a traceback."""
  if isinstance(e, OSError) and e.filename is not None and e.strerror:
    text = f"{e.filename}: {e.strerror}" + (f" ({e.filename2})" if e.filename2 else "")
  elif isinstance(e, KeyError) and len(e.args) == 1:
    text = str(e.args[0])
  else:
    text = str(e)
  text = " ".join(part.strip() for part in text.strip().splitlines() if part.strip()) or type(e).__name__
  if not isinstance(e, USER_ERRORS):
    text = f"unexpected {type(e).__name__}: {text} (rerun with --debug for the traceback)"
  return f"jaxlm: error: {text}"


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  overrides, rest = config_lib.split_config_args(argv)
  debug = "--debug" in rest  # accepted before or after the command
  args = build_parser().parse_args([a for a in rest if a != "--debug"])
  absl_logging.set_verbosity(absl_logging.ERROR)  # library chatter (orbax, grain) stays out of the user's terminal
  ignore_closed_loop_callbacks()  # a damaged checkpoint is reported in one line, not a traceback per array
  try:
    args.func(args, overrides)
  except KeyboardInterrupt:
    if debug:
      raise
    print("jaxlm: interrupted", file=sys.stderr)
    sys.exit(130)
  except Exception as e:  # every failure ends in one line naming what is wrong; --debug re-raises it whole
    if debug:
      raise
    sys.exit(error_line(e))


if __name__ == "__main__":
  main()
