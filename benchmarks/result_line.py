"""The one JSON line a benchmark prints on stdout: the fields that say what ran where, and the
redirection that keeps everything else off stdout. Imported by the scripts beside it (the script
directory is on `sys.path` when one runs)."""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
from pathlib import Path

import jax


def model_description(config) -> str:
    """The model of `config`, e.g. 'deeplab-18 width 0.125 OS 16 float32' (name-depth, width
    multiplier, output stride, compute dtype)."""
    m = config.model
    return f"{m.name}-{m.depth} width {m.width} OS {m.output_stride} {m.dtype}"


def device_fields() -> dict:
    """`device_kind` and `platform` of the first device, and `num_devices` (all processes)."""
    device = jax.devices()[0]
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "num_devices": jax.device_count(),
    }


def device_peak_bytes() -> int | None:
    """The first local device's peak bytes in use since the process started (a running maximum,
    not reset between measurements); None where the device keeps no count (CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def commit() -> str | None:
    """The code measured: `$BENCHMARK_COMMIT` where set (a copy of the tree without its git
    history), else `git describe --always --dirty` of this checkout, else None."""
    if os.environ.get("BENCHMARK_COMMIT"):
        return os.environ["BENCHMARK_COMMIT"]
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def provenance() -> dict:
    """`jax_version`, `date` (ISO) and `commit` (`commit()`) of the run."""
    return {
        "jax_version": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
    }


def stdout_to_stderr() -> contextlib.AbstractContextManager:
    """Sends what the code under measurement prints to stderr: stdout carries only the line."""
    return contextlib.redirect_stdout(sys.stderr)
