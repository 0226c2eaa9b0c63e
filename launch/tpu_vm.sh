#!/usr/bin/env bash
# A Cloud TPU VM slice (v4/v5e/v5p/v6e, one or many hosts): the same command on every worker over
# `gcloud compute tpus tpu-vm ssh --worker=all`. JAX finds the other workers itself (TPU metadata).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_vm.sh [--config.KEY=VALUE ...]
#
# jaxlm must already be installed on every worker (SETUP can do it). WORKDIR must be a filesystem every worker
# sees (Filestore/NFS, or a gcsfuse mount of a bucket): all workers write the checkpoint together.
set -euo pipefail

TPU_NAME="${TPU_NAME:?set TPU_NAME to the TPU VM's name}"
ZONE="${ZONE:?set ZONE to the TPU VM's zone, e.g. us-east5-a}"
PROJECT="${PROJECT:-}"                          # empty = gcloud's configured project
CONFIG="${CONFIG:-configs/llama_7b.py}"         # experiment config file, relative to REPO_DIR
WORKDIR="${WORKDIR:-/mnt/shared/jaxlm/llama_7b}"  # shared by all workers
REPO_DIR="${REPO_DIR:-jaxlm}"                   # the checkout on each worker, relative to the remote home
SETUP="${SETUP:-}"                              # run first on each worker, e.g. "pip install -e ."
JAXLM="${JAXLM:-jaxlm}"                         # the jaxlm command on the workers
GCLOUD_ARGS="${GCLOUD_ARGS:-}"                  # extra gcloud flags, e.g. "--internal-ip"

# One string for the remote shell; every piece quoted so paths and overrides arrive intact.
remote="cd $(printf '%q' "$REPO_DIR")"
[[ -n "$SETUP" ]] && remote+=" && $SETUP"
remote+=" && $JAXLM train --config $(printf '%q' "$CONFIG") --workdir $(printf '%q' "$WORKDIR")"
for arg in "$@"; do remote+=" $(printf '%q' "$arg")"; done

# shellcheck disable=SC2086  # GCLOUD_ARGS may hold several flags
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all \
  $GCLOUD_ARGS --command="$remote"
