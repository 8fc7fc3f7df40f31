"""The forms of a study's SLURM options (`--time`, `--partition`, `--sbatch` and the spec's
`slurm` fields), checked before any is written into an `sbatch` job script: a value holding a
newline wrote a shell line into the script."""

from __future__ import annotations

import re
from collections.abc import Mapping

from focalnet_jax.study.errors import StudyError

# sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (numbers of any length).
TIME_FORMAT = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}")
# sbatch --partition: one name, or several separated by commas.
PARTITION_FORMAT = re.compile(r"[\w.-]+(,[\w.-]+)*")


def check_time(value: str, source: str = "--time") -> str:
    """Returns `value` when it is one of SLURM's time limit formats (`TIME_FORMAT`), else raises
    `StudyError` naming it and the formats ('' too: a spec's `slurm.time` '' is no limit)."""
    if not TIME_FORMAT.fullmatch(str(value)):
        raise StudyError(
            f"{source} {value!r}: expected a SLURM time limit: minutes, MM:SS, HH:MM:SS, D-HH, "
            "D-HH:MM or D-HH:MM:SS"
        )
    return value


def check_partition(value: str, source: str = "--partition") -> None:
    """Raises `StudyError` naming `source` unless `value` is '' (the cluster's default) or
    partition names separated by commas (`PARTITION_FORMAT`)."""
    if value and not PARTITION_FORMAT.fullmatch(value):
        raise StudyError(f"{source} {value!r}: expected partition names separated by commas")


def check_sbatch_option(value: str, source: str = "--sbatch") -> None:
    """Raises `StudyError` naming `source` unless `value` is one '#SBATCH' option on one line (a
    newline wrote a shell line into the job script)."""
    if not value.strip() or "\n" in value or "\r" in value:
        raise StudyError(f"{source} {value!r}: expected one '#SBATCH' option on one line")


def check_slurm_forms(slurm: Mapping) -> None:
    """The forms of the `slurm` options written into a job script (`partition`, `time`, each
    `extra` item; an empty or absent partition or time is the cluster's default)."""
    if slurm.get("partition"):
        check_partition(slurm["partition"], "slurm.partition")
    if slurm.get("time"):
        check_time(slurm["time"], "slurm.time")
    for item in slurm.get("extra") or ():
        check_sbatch_option(item, "slurm.extra item")


def check_slurm_options(slurm: Mapping, forms: bool = True) -> None:
    """The spec's `slurm` fields of the types `sbatch` takes (`spec.defaults`), and with `forms`
    their forms (`check_slurm_forms`; a recorded study's are checked where the job script is
    written: a spec may replace them)."""
    if not isinstance(slurm.get("partition"), str):
        raise StudyError(f"slurm.partition={slurm.get('partition')!r}: expected a partition name")
    if not isinstance(slurm.get("time"), str):
        raise StudyError(f"slurm.time={slurm.get('time')!r}: expected text, e.g. '08:00:00'")
    for key in ("gpus", "cpus", "throttle"):
        value = slurm.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise StudyError(f"slurm.{key}={value!r}: expected an integer >= 0")
    extra = slurm.get("extra")
    if not isinstance(extra, list | tuple) or not all(isinstance(e, str) for e in extra):
        raise StudyError(f"slurm.extra={extra!r}: expected a list of '#SBATCH' options as text")
    if forms:
        check_slurm_forms(slurm)
