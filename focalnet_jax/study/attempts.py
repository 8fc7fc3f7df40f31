"""A cell's time over all its attempts, kept in its state file (`CELL/study_cell.json`).

An attempt is one `focalnet study cell` process: the first run, a retry after a failure, a
resumption after `study run` or its SLURM task was killed (time limit, `scancel`, node failure,
requeue). Every record the cell runner writes holds, in seconds of wall-clock time:

- `seconds`: the latest attempt's (while it runs: so far);
- `attempt_seconds`: every attempt's, oldest first, the latest one last;
- `attempts`: their number; `total_seconds`: their sum, what the cell cost.

While an attempt runs, its runner rewrites the record every `HEARTBEAT_S` seconds. An attempt
killed without writing its end counts until its last sign of life: the latest write into the
cell's folder (its record, `cell.log`, checkpoints, TensorBoard events), so it is short by at
most `HEARTBEAT_S` and never longer than it ran. A record written before these fields
existed counts as one attempt of its `seconds` (or, while it was running, from its `time`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path

HEARTBEAT_S = 30.0


def earlier_attempts(record: Mapping, folder: Path) -> list[float]:
    """Seconds of each attempt the cell's last state `record` knows, before a new attempt starts;
    [] for a cell never started. A record still `running` is an attempt killed without writing
    its end (its runner is gone: the executors start a cell only then); it counts until the
    latest write into the cell's `folder` (module docstring)."""
    if not record:
        return []
    legacy = [record["seconds"]] if "seconds" in record else []  # one attempt, if it says so
    known = [float(s) for s in record.get("attempt_seconds", legacy)]
    if record.get("state") != "running":
        return known
    started = float(record.get("started", record.get("time", 0.0)))
    last = max([float(record.get("time", started)), *_write_times(folder)])
    killed = round(max(0.0, last - started), 1)
    return [*known[:-1], killed] if "attempt_seconds" in record else [killed]


def time_so_far(record: Mapping, folder: Path) -> tuple[float, int] | None:
    """(seconds over all attempts, their number) of a cell's state `record`, an attempt still
    `running` counted until the latest write into the cell's `folder`; None when unknown."""
    every = earlier_attempts(record, folder)
    return (round(sum(every), 1), len(every)) if every else None


def _write_times(folder: Path) -> list[float]:
    """Modification times (s since the epoch) of `folder` and everything under it."""
    times = []
    for path in [folder, *folder.rglob("*")]:
        with contextlib.suppress(OSError):  # e.g. a temporary file renamed meanwhile
            times.append(path.stat().st_mtime)
    return times


def attempt_fields(earlier: Sequence[float], seconds: float) -> dict:
    """The state file's time fields of an attempt that has run `seconds` after `earlier` ones."""
    every = [*(round(float(s), 1) for s in earlier), round(seconds, 1)]
    return {
        "seconds": every[-1],
        "attempt_seconds": every,
        "attempts": len(every),
        "total_seconds": round(sum(every), 1),
    }
