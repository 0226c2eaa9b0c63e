#!/usr/bin/env bash
# N processes on this machine, each with its own simulated CPU devices, joined by jax.distributed over loopback
# (gloo collectives): the multi-host code paths, on a laptop.
#
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS -- jaxlm train --config ... --workdir ...
#
# Every process runs the command after `--` with JAXLM_COORDINATOR / JAXLM_NUM_PROCESSES / JAXLM_PROCESS_ID set.
# The script waits for all of them; when one fails it stops the others (SIGTERM, then SIGKILL after GRACE_S) and
# exits with that first failure's code.
set -uo pipefail

usage() { echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- COMMAND [ARGS...]" >&2; exit 2; }
[[ $# -ge 3 && "$3" == "--" ]] || usage

NUM_PROCESSES="$1"                        # processes to start, ids 0 .. NUM_PROCESSES-1
DEVICES_PER_PROCESS="$2"                  # simulated CPU devices in each process (JAX_NUM_CPU_DEVICES)
COORDINATOR_HOST="127.0.0.1"              # loopback only: nothing listens beyond this machine
COORDINATOR_PORT="${COORDINATOR_PORT:-}"  # process 0's coordinator port; empty = a free port picked now
LOG_DIR="${LOG_DIR:-}"                    # empty = all output to this terminal; else LOG_DIR/process_<i>.log
GRACE_S="${GRACE_S:-20}"                  # seconds the others get to exit after SIGTERM before SIGKILL
PYTHON="${PYTHON:-python3}"               # used to find a free port
shift 3
for n in "$NUM_PROCESSES" "$DEVICES_PER_PROCESS"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "$0: NUM_PROCESSES and DEVICES_PER_PROCESS must be positive" >&2; exit 2; }
done

if [[ -z "$COORDINATOR_PORT" ]]; then
  COORDINATOR_PORT="$("$PYTHON" -c \
    'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
[[ -n "$LOG_DIR" ]] && mkdir -p "$LOG_DIR"

# A device count left in XLA_FLAGS (e.g. by a test harness) would contradict DEVICES_PER_PROCESS: replace it.
xla_flags="$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')"

# Job control puts each process in its own process group, so stopping one also stops whatever it started.
set -m
pids=()
stop_all() {  # SIGTERM to the process groups still running, SIGKILL to any left after GRACE_S
  local pid deadline=$((SECONDS + GRACE_S))
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do
    while kill -0 -- "-$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null
  done
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  (
    export JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES="$DEVICES_PER_PROCESS" JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
    export XLA_FLAGS="$xla_flags --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
    export JAXLM_COORDINATOR="$COORDINATOR_HOST:$COORDINATOR_PORT" JAXLM_NUM_PROCESSES="$NUM_PROCESSES"
    export JAXLM_PROCESS_ID="$i"
    if [[ -n "$LOG_DIR" ]]; then exec "$@" >"$LOG_DIR/process_$i.log" 2>&1; else exec "$@"; fi
  ) &
  pids+=("$!")
done
set +m  # the groups stay; bash's own job reports ("Terminated ...") would only clutter the output
echo "local_multiprocess: $NUM_PROCESSES processes x $DEVICES_PER_PROCESS CPU devices," \
  "coordinator $COORDINATOR_HOST:$COORDINATOR_PORT, pids ${pids[*]}" >&2

first_rc=0
running=("${!pids[@]}")
while (( ${#running[@]} )); do
  still=()
  for i in "${running[@]}"; do
    if kill -0 "${pids[$i]}" 2>/dev/null; then still+=("$i"); continue; fi
    wait "${pids[$i]}"; rc=$?
    if (( rc != 0 && first_rc == 0 )); then
      first_rc=$rc
      echo "local_multiprocess: process $i exited with code $rc; stopping the others" >&2
      stop_all
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  (( ${#running[@]} )) && sleep 0.2
done
exit "$first_rc"
