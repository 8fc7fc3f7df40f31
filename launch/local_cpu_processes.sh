#!/usr/bin/env bash
# Try the multi-host path on one machine: N CPU processes with D fake devices each, talking
# through a local coordinator (gloo collectives). Only process 0 writes logs.
# Usage: launch/local_cpu_processes.sh N D CONFIG WORKDIR [--config.KEY=VALUE ...]
#   e.g. launch/local_cpu_processes.sh 2 2 configs/demo.py runs/mh --config.data.store=STORE
set -euo pipefail
N=${1:?processes}; D=${2:?devices per process}; CONFIG=${3:?config}; WORKDIR=${4:?workdir}
shift 4
PORT=${PORT:-12355}
export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=${D}"
pids=()
for ((i = 0; i < N; i++)); do
    python -m focalnet_jax.cli train --config "$CONFIG" --workdir "$WORKDIR" \
        --coordinator_address "localhost:${PORT}" --num_processes "$N" --process_id "$i" "$@" &
    pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
