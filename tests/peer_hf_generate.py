"""The generation peer: Hugging Face `generate` (torch, CPU) on a random-init GPT-2 saved to a directory that
`jaxlm bench --generate --hf DIR` times too, with the same lengths and no EOS (every run does the same work).

    python tests/peer_hf_generate.py --out /tmp/gpt2_peer                # saves the model, prints one JSON line
    jaxlm bench --generate --config configs/bench_peer_gpt2.py --hf /tmp/gpt2_peer

Kept with the tests because it needs the test extra (torch, transformers).
"""

import argparse
import json
import statistics
import time

import torch
import transformers


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True, help="where the random-init GPT2LMHeadModel is saved")
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--d-model", dest="d_model", type=int, default=768)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--positions", type=int, default=512)
  parser.add_argument("--batch-sizes", dest="batch_sizes", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--prompt-len", dest="prompt_len", type=int, default=32)
  parser.add_argument("--new-tokens", dest="new_tokens", type=int, default=64)
  parser.add_argument("--beam", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=args.vocab, n_positions=args.positions, n_embd=args.d_model,
                                   n_layer=args.layers, n_head=args.heads, activation_function="gelu_new",
                                   bos_token_id=None, eos_token_id=None)
  model = transformers.GPT2LMHeadModel(config).eval()
  model.save_pretrained(args.out)
  runs = []
  for b in args.batch_sizes:
    prompt = torch.randint(0, args.vocab, (b, args.prompt_len))
    for beams in sorted({1, args.beam}):
      def generate(prompt=prompt, beams=beams):
        with torch.inference_mode():
          return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens, num_beams=beams, do_sample=False,
                                early_stopping=False, eos_token_id=None, pad_token_id=0)
      generate()  # warm-up
      times = []
      for _ in range(args.repeats):
        start = time.perf_counter()
        generate()
        times.append(time.perf_counter() - start)
      seconds = statistics.median(times)
      runs.append({"search": "greedy" if beams == 1 else f"beam{beams}", "batch": b, "seconds": round(seconds, 4),
                   "tokens_per_s": round(b * args.new_tokens / seconds, 1)})
  print(json.dumps({"peer": "transformers.generate", "torch_threads": torch.get_num_threads(),
                    "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "runs": runs}))


if __name__ == "__main__":
  main()
