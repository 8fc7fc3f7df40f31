#!/usr/bin/env bash
# Data-parallel training over several nodes: one process per node, each driving its GPUs.
# jax.distributed.initialize reads the ranks from SLURM's variables; the coordinator is the
# step's first node, its port derived from the job and step ids (JAX_COORDINATOR_PORT=P sets it).
# Usage: CONFIG=configs/focalnet.py:fold=0 WORKDIR=runs/x sbatch launch/slurm_multinode.sh \
#            --config.data.store=STORE
#SBATCH --job-name=focalnet
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
# Relative to the submit folder; SLURM expands % patterns in the whole path: a folder whose path
# holds % fails to start the job (submit elsewhere, or give --output with its % doubled).
#SBATCH --output=%x-%j.out
# A requeued job appends to its output, which keeps why its earlier run ended.
#SBATCH --open-mode=append
set -euo pipefail
if [[ -z ${CONFIG:-} || -z ${WORKDIR:-} ]]; then
    echo "$0: CONFIG and WORKDIR must be set: CONFIG=... WORKDIR=... sbatch $0" \
        "[--config.KEY=VALUE ...]" >&2
    exit 2
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
# On the shared file system: a requeued job reuses the compiled steps.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORKDIR/compilation_cache}
# srun does not inherit sbatch's --cpus-per-task (Slurm 22.05 to 23.02: "must be requested
# again"): each task would get one CPU for its input pipeline. A task that fails ends the others,
# which would wait for it in a collective.
srun_flags=(--kill-on-bad-exit=1)
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    srun_flags+=("--cpus-per-task=${SLURM_CPUS_PER_TASK}")
fi
# Not exec: srun takes a SIGTERM as an order to kill its tasks (SIGKILL, no checkpoint), while a
# signal for the batch shell (`sbatch --signal=B:TERM@120`, `scancel --batch`) ends bash, and SLURM
# then ends the step with SIGTERM, which the training takes to save the step it stops at.
srun "${srun_flags[@]}" python -m focalnet_jax.cli train --config="$CONFIG" \
    --workdir="$WORKDIR" "$@"
