#!/usr/bin/env bash
# Installs Debian's dicom3tools (as root) where absent: its `dciodvfy` checks the DICOM files that
# `focalnet predict --dicom` writes against their IODs (tests/test_predict_dicom.py).
set -euo pipefail
if command -v dciodvfy >/dev/null; then
    exit 0
fi
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dicom3tools
