#!/usr/bin/env bash
# One host, one process: every local device (the GPUs, the TPU chips, or the CPU) in one mesh.
#
#   CONFIG=configs/gpt_tiny.py WORKDIR=/tmp/jaxlm/gpt_tiny launch/local.sh [--config.KEY=VALUE ...]
#
# Extra arguments go to `jaxlm train` unchanged (config overrides, e.g. --config.train.steps=100).
set -euo pipefail

CONFIG="${CONFIG:-configs/gpt_tiny.py}"    # experiment config file
WORKDIR="${WORKDIR:-/tmp/jaxlm/gpt_tiny}"  # config.json, metrics.jsonl, checkpoints/ and the tokenizer go here
JAXLM="${JAXLM:-jaxlm}"                    # the jaxlm command; e.g. JAXLM="python -m jaxlm" without the console script

# JAXLM_NUM_PROCESSES=1 keeps this a single process even inside a SLURM allocation or on a TPU VM.
export JAXLM_NUM_PROCESSES=1
# shellcheck disable=SC2086  # JAXLM may be a command with arguments
exec $JAXLM train --config "$CONFIG" --workdir "$WORKDIR" "$@"
