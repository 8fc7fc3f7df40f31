#!/usr/bin/env bash
# Try the multi-host path on one machine: N CPU processes with D fake devices each, talking
# through a local coordinator (gloo collectives). Only process 0 writes logs.
# Usage: [PORT=P] launch/local_cpu_processes.sh N D CONFIG WORKDIR [--config.KEY=VALUE ...]
#   e.g. launch/local_cpu_processes.sh 2 2 configs/demo.py runs/mh --config.data.store=STORE
# PORT: the coordinator's port (default: a free one, so that two runs at once do not meet).
set -euo pipefail
if (( $# < 4 )); then
    echo "usage: [PORT=P] $0 N D CONFIG WORKDIR [--config.KEY=VALUE ...] (N processes of D" \
        "devices each)" >&2
    exit 2
fi
N=$1; D=$2; CONFIG=$3; WORKDIR=$4
shift 4
if [[ ! $N =~ ^[1-9][0-9]*$ || ! $D =~ ^[1-9][0-9]*$ ]]; then
    echo "$0: N (processes) and D (devices per process) must be positive integers, got N=$N D=$D" >&2
    exit 2
fi
PORT=${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${D}"  # D wins over one before
pids=()
# A SIGTERM for this script, or Ctrl-C, goes on to every process as SIGTERM, and they all stop at
# the same step with its checkpoint (focalnet_jax/training/graceful_stop.py); a second one ends
# them at once. Untrapped, it ended this script alone and left the processes training (they ignore
# Ctrl-C's SIGINT, as every background job of a script does).
stopping=
trap 'stopping=1; kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
for ((i = 0; i < N; i++)); do
    python -m focalnet_jax.cli train --config="$CONFIG" --workdir="$WORKDIR" \
        --coordinator_address "localhost:${PORT}" --num_processes "$N" --process_id "$i" "$@" &
    pids+=("$!")
done
# The first process to fail ends the others, which would wait for it (JAX's start-up timeout is
# 5 minutes).
status=0
for ((i = 0; i < N; i++)); do
    wait -n && continue
    status=$?
    [[ -n $stopping ]] && break
    kill "${pids[@]}" 2>/dev/null || true
    break
done
if [[ -n $stopping ]]; then # the processes' own statuses: 143 stopped, 0 complete
    status=0
    for pid in "${pids[@]}"; do
        wait "$pid" || status=$?
    done
fi
wait
exit "$status"
