#!/usr/bin/env bash
# 5-fold cross-validation as a SLURM job array: task k trains fold k in WORKDIR/fold<k>.
# Usage: CONFIG=configs/focalnet.py WORKDIR=runs/focalnet sbatch launch/slurm_folds.sh \
#            --config.data.store=STORE
#SBATCH --job-name=focalnet-cv
#SBATCH --array=0-4
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
# Relative to the submit folder; SLURM expands % patterns in the whole path: a folder whose path
# holds % fails to start the job (submit elsewhere, or give --output with its % doubled).
#SBATCH --output=%x-%A_%a.out
# A requeued job appends to its output, which keeps why its earlier run ended.
#SBATCH --open-mode=append
set -euo pipefail
if [[ -z ${CONFIG:-} || -z ${WORKDIR:-} ]]; then
    echo "$0: CONFIG and WORKDIR must be set: CONFIG=... WORKDIR=... sbatch $0" \
        "[--config.KEY=VALUE ...]" >&2
    exit 2
fi
if [[ -z ${SLURM_ARRAY_TASK_ID:-} ]]; then
    echo "$0: SLURM_ARRAY_TASK_ID is not set (task k of a SLURM job array trains fold k); submit" \
        "it as an array: CONFIG=... WORKDIR=... sbatch --array=0-4 $0 [--config.KEY=VALUE ...]" >&2
    exit 2
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
# One cache for the array: a requeued or restarted task reuses the compiled steps, and since the
# MFL weight is an operand of the step, every fold's step is the same executable.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORKDIR/compilation_cache}
# exec: the task is the batch shell, so a signal for it (`sbatch --signal=B:TERM@120`, `scancel
# --batch`) reaches the training, which saves the step it stops at; bash would die of it at once
# and leave the training to SLURM's SIGKILL at the job's end.
exec python -m focalnet_jax.cli train --config="$CONFIG" \
    --workdir="$WORKDIR/fold${SLURM_ARRAY_TASK_ID}" \
    --fold "${SLURM_ARRAY_TASK_ID}" "$@"
