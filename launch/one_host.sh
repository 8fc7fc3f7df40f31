#!/usr/bin/env bash
# Train on every GPU of one machine (one process drives all local devices).
# Usage: launch/one_host.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
#   e.g. launch/one_host.sh configs/focalnet.py:fold=0 runs/focalnet/fold0 --config.data.store=STORE
set -euo pipefail
if (( $# < 2 )); then
    echo "usage: $0 CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
    exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
# A restart in the same WORKDIR reuses the compiled steps instead of compiling again.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORKDIR/compilation_cache}
exec python -m focalnet_jax.cli train --config="$CONFIG" --workdir="$WORKDIR" "$@"
