#!/usr/bin/env bash
# The accelerator check: the bf16 training step of a ~1B Llama-style model (configs/llama_1b.py) with cuDNN fused
# attention, timed by `jaxlm bench` (tokens/s, MFU against the device's bf16 peak, peak device memory), then the same
# step with XLA's attention; the losses of the two must agree. One JSON line per run and a verdict line; exit 1 if
# the losses differ. Takes ~3-5 minutes on one H100/H200 (two compiles, 2x13 steps).
#
#   launch/gpu_check.sh                              # one GPU, defaults below
#   PEAK_GFLOPS=989000 STEPS=10 launch/gpu_check.sh  # H100/H200 SXM dense bf16 peak: 989 TFLOP/s
#   CONFIG=configs/llama_tiny.py ATTENTION=xla PEAK_GFLOPS=200 launch/gpu_check.sh   # the CPU path (tests)
set -euo pipefail

CONFIG="${CONFIG:-configs/llama_1b.py}"
STEPS="${STEPS:-10}"
WARMUP="${WARMUP:-3}"
PEAK_GFLOPS="${PEAK_GFLOPS:-989000}"   # the MFU denominator: the device's dense bf16 peak in GFLOP/s
ATTENTION="${ATTENTION:-cudnn}"        # the fused path to check; `xla` is always the reference
TOLERANCE="${TOLERANCE:-0.02}"         # largest relative loss difference between the two attention paths (bf16)
JAXLM="${JAXLM:-python -m jaxlm}"
OUT="${OUT:-$(mktemp -d)}"

run_bench() {  # $1: attention implementation, $2: output file
  # shellcheck disable=SC2086  # JAXLM may be a command with arguments
  $JAXLM bench --config "$CONFIG" --steps "$STEPS" --warmup "$WARMUP" --peak-gflops "$PEAK_GFLOPS" \
    --config.model.attention="$1" "${@:3}" | tail -n 1 | tee "$2"
}

run_bench "$ATTENTION" "$OUT/fused.json" "$@"
run_bench xla "$OUT/xla.json" "$@"

python - "$OUT/fused.json" "$OUT/xla.json" "$TOLERANCE" "$ATTENTION" <<'PY'
import json, sys
fused, xla = (json.load(open(p)) for p in sys.argv[1:3])
tolerance, attention = float(sys.argv[3]), sys.argv[4]
worst = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(fused["losses"], xla["losses"]))
ok = worst <= tolerance and len(fused["losses"]) == len(xla["losses"])
print(json.dumps({"check": "ok" if ok else "LOSSES DIFFER", "attention": attention, "max_rel_loss_diff": worst,
                  "tokens_per_s": fused["tokens_per_s"], "xla_tokens_per_s": xla["tokens_per_s"], "mfu": fused["mfu"],
                  "peak_device_memory_gb": fused.get("peak_device_memory_gb"), "devices": fused["devices"],
                  "platform": fused.get("platform")}))
sys.exit(0 if ok else 1)
PY
