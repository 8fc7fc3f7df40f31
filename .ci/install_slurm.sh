#!/usr/bin/env bash
# Installs Debian's slurm-wlm and munge (as root) where they are absent, so that the study tests
# can start their one-node SLURM cluster (tests/slurm_cluster.py). Nothing is started here.
set -euo pipefail
if command -v sbatch >/dev/null && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/munged ]; then
    exit 0
fi
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge
