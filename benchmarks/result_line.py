"""The one JSON line a benchmark prints on stdout: the fields that say what ran where, and the
redirection that keeps everything else off stdout. Imported by the scripts beside it (the script
directory is on `sys.path` when one runs)."""

from __future__ import annotations

import contextlib
import datetime
import sys

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


def provenance() -> dict:
    """`jax_version` and `date` (ISO) of the run."""
    return {"jax_version": jax.__version__, "date": datetime.date.today().isoformat()}


def stdout_to_stderr() -> contextlib.AbstractContextManager:
    """Sends what the code under measurement prints to stderr: stdout carries only the line."""
    return contextlib.redirect_stdout(sys.stderr)
