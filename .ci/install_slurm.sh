#!/usr/bin/env bash
# Installs Debian's slurm-wlm and munge (as root) where they are absent, so that the study tests
# can start their one-node SLURM cluster (tests/slurm_cluster.py). Nothing is started here.
set -euo pipefail
# Every program tests/slurm_cluster.py runs (its BINARIES), also where only some are installed
# (a controller or login-node image without slurmd).
missing=0
for program in munged mungekey slurmctld slurmd sbatch squeue sinfo scancel; do
    found=$(PATH="$PATH:/usr/sbin:/sbin" command -v "$program" || true)
    { [ -f "$found" ] && [ -x "$found" ]; } || missing=1
done
if [ "$missing" = 0 ]; then
    exit 0
fi
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge
