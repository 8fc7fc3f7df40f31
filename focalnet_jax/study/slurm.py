"""The SLURM executor: one `sbatch` job array, one task per cell not yet done.

`submit` writes `DIR/slurm/array-<time>.txt` (the task list: line i+1 is task i's cell) and
`DIR/slurm/array-<time>.sbatch`, submits the script with `sbatch --parsable` and appends the job
id and its tasks to `DIR/slurm/jobs.json`. So that no array goes untracked when `study run` dies
between `sbatch` and that write, the array's name carries a token of its own
(`study-<folder>-<token>`) and is recorded with its cells in `DIR/slurm/submitting.json` before
`sbatch` runs; the next `study run` or `study status` finds such an array in `squeue --name` and
adopts it (`adopt_unrecorded`). `sbatch` shares the run lock and runs in a session of its own,
so a `study run` that dies while `sbatch` is still submitting (killed, hung up) leaves the lock
held until `sbatch` has ended: the next `study run` cannot look in the queue before the array is
there and drop its intent (`run_sbatch`). Each task `cd`s to the submitting folder and runs the
cell with the submitting Python (`sys.executable`); `sbatch` exports the submitting environment
by default (`--export=ALL`), so the task sees the same `PYTHONPATH`, virtual environment and
variables. Task output: `DIR/slurm/<job>_<task>.out` (the cell's own log is `CELL/cell.log`).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from focalnet_jax.data.atomic_files import write_json_atomic
from focalnet_jax.errors import plural
from focalnet_jax.file_lock import note_sharer
from focalnet_jax.study.cells import Cell, Study, read_json_file
from focalnet_jax.study.local import cell_argv
from focalnet_jax.study.slurm_options import check_slurm_forms
from focalnet_jax.study.spec import StudyError

JOBS_FILE = "jobs.json"
INTENTS_FILE = "submitting.json"  # arrays being submitted: written before `sbatch`
# What slurmstepd writes to a task's output when it ends the task, e.g. `slurmstepd-n1: error:
# *** JOB 11 ON n1 CANCELLED AT 2026-12-01T11:20:00 DUE TO TIME LIMIT ***` (also DUE TO NODE
# FAILURE, DUE TO PREEMPTION, or CANCELLED ... without a reason: `scancel`).
STOPPED = re.compile(r"\*\*\* ((JOB|STEP) .+) \*\*\*")


def _directive_value(value: str) -> str:
    """`value` in double quotes, as sbatch reads an `#SBATCH` value holding spaces (it splits an
    unquoted one there and refuses the script); sbatch has no escape for a double quote itself."""
    if '"' in value:
        raise StudyError(f"{value!r}: a study folder for SLURM may not contain a double quote")
    return f'"{value}"'


def _output_pattern(slurm_dir: Path) -> str:
    """sbatch's `--output` for each task's `<slurm_dir>/<job>_<task>.out`: sbatch expands `%`
    patterns anywhere in the path (a folder `runs 50%j` became `runs 504`, where no task could
    write: each ended before its shell ran), so the folder's `%` are doubled; a backslash turns the
    patterns off (every task would write one file), so it is refused."""
    if "\\" in str(slurm_dir):
        raise StudyError(
            f"{str(slurm_dir)!r}: a study folder for SLURM may not contain a backslash"
        )
    return f"{str(slurm_dir).replace('%', '%%')}/%A_%a.out"


def job_name(study: Study, token: str) -> str:
    """`study-<folder>-<token>`: the folder's name for people reading the queue, the token to find
    the array by (`squeue --name` splits its argument at commas, so a comma becomes `_`)."""
    return f"study-{study.root.resolve().name.replace(',', '_')}-{token}"


def sbatch_script(
    study: Study, tasks_file: Path, num_tasks: int, options: Mapping, name: str
) -> str:
    """The job array script, called `name`, for `num_tasks` cells listed in `tasks_file`."""
    slurm_dir = (study.root / "slurm").resolve()
    throttle = int(options.get("throttle") or 0)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={_directive_value(name)}",
        f"#SBATCH --array=0-{num_tasks - 1}" + (f"%{throttle}" if throttle else ""),
        f"#SBATCH --output={_directive_value(_output_pattern(slurm_dir))}",
        "#SBATCH --open-mode=append",  # a requeued task keeps why its earlier run ended
        "#SBATCH --ntasks=1",
    ]
    # Checked here too: a study.json recorded before the checks, or edited by hand, is not.
    check_slurm_forms(options)
    if options.get("partition"):
        lines.append(f"#SBATCH --partition={options['partition']}")
    if options.get("time"):
        lines.append(f"#SBATCH --time={options['time']}")
    if int(options.get("gpus") or 0):
        lines.append(f"#SBATCH --gpus-per-task={int(options['gpus'])}")
    if int(options.get("cpus") or 0):
        lines.append(f"#SBATCH --cpus-per-task={int(options['cpus'])}")
    lines += [f"#SBATCH {extra}" for extra in options.get("extra") or ()]
    argv = cell_argv(study, Cell("ARM", 0, 0))[:-1]  # the cell name comes from the task list
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        f'CELL=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(tasks_file))})',
        " ".join(shlex.quote(a) for a in argv) + ' "$CELL"',
    ]
    return "\n".join(lines) + "\n"


def submit(
    study: Study,
    cells: Sequence[Cell],
    options: Mapping,
    *,
    dry_run: bool = False,
    lock: IO[str] | None = None,
) -> str | None:
    """Write and submit the job array of `cells`; returns the job id (None for a dry run, which
    prints the script and writes nothing). The array is recorded in `INTENTS_FILE` before
    `sbatch` and in `JOBS_FILE` after it; `lock`, the run lock held, is shared with `sbatch`
    (module docstring)."""
    slurm_dir = study.root / "slurm"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = job_name(study, uuid.uuid4().hex[:12])
    if dry_run:
        tasks_file = (slurm_dir / f"array-{stamp}.txt").resolve()
        print(sbatch_script(study, tasks_file, len(cells), options, name), end="")
        return None
    if shutil.which("sbatch") is None:
        raise StudyError("--executor slurm: `sbatch` is not on PATH (see docs/studies.md)")
    slurm_dir.mkdir(parents=True, exist_ok=True)
    stem = _new_name(slurm_dir, f"array-{stamp}")
    tasks_file = (slurm_dir / f"{stem}.txt").resolve()
    tasks_file.write_text("".join(f"{cell.name}\n" for cell in cells))
    script_file = slurm_dir / f"{stem}.sbatch"
    script_file.write_text(sbatch_script(study, tasks_file, len(cells), options, name))
    array = {"job_name": name, "script": str(script_file), "cells": [c.name for c in cells]}
    write_json_atomic([*read_intents(study), array], slurm_dir / INTENTS_FILE)
    job_id = run_sbatch(script_file, lock)
    record_job(study, {"job_id": job_id, **array})
    return job_id


def run_sbatch(script_file: Path, lock: IO[str] | None = None) -> str:
    """Submit `script_file` (`sbatch --parsable`); its job id, or a `StudyError` with sbatch's
    last line. `sbatch` gets `lock` (the run lock's open file, its pid noted in it) and a session
    of its own, and is never killed here: this process may die (SIGKILL, a hang-up) while
    `sbatch` submits, but the lock lasts until `sbatch` has ended, and by then its array is in the
    queue for the next `study run` to adopt, or was not submitted. Interrupted (Ctrl-C, SIGTERM),
    this process waits for `sbatch` to end before it ends."""
    child = subprocess.Popen(
        ["sbatch", "--parsable", str(script_file)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a Ctrl-C or hang-up of the terminal does not reach it
        pass_fds=(lock.fileno(),) if lock is not None else (),
    )
    try:  # an interrupt as soon as the note is written (where a user sees it) waits too
        if lock is not None:
            note_sharer(lock, f"its sbatch: pid {child.pid}")
        stdout, stderr = child.communicate()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM; slurmctld may have the array already
        print(
            f"waiting for sbatch (pid {child.pid}) to end, so that the next `study run` finds "
            "its array",
            file=sys.stderr,
            flush=True,
        )
        child.wait()  # a second interrupt leaves it running, the lock held
        raise
    if child.returncode != 0:
        reason = (stderr or stdout).strip().splitlines()
        raise StudyError(f"sbatch {script_file}: {reason[-1] if reason else child.returncode}")
    return stdout.strip().split(";")[0]


def record_job(study: Study, job: Mapping) -> None:
    """Append submitted array `job` ({job_id, job_name, script, cells}) to `JOBS_FILE`, then drop
    its intent from `INTENTS_FILE` (dying in between leaves an intent that `adopt_unrecorded`
    finds recorded)."""
    slurm_dir = study.root / "slurm"
    write_json_atomic([*read_jobs(study), dict(job)], slurm_dir / JOBS_FILE)
    left = [i for i in read_intents(study) if i["job_name"] != job["job_name"]]
    write_json_atomic(left, slurm_dir / INTENTS_FILE)


def _new_name(folder: Path, stem: str) -> str:
    """`stem`, or `stem-2`, `stem-3`, ...: the first whose task list is not in `folder` yet
    (created here, empty), so that an array submitted within the same second as an earlier one
    does not overwrite the task list that the earlier array's tasks are still to read."""
    name, n = stem, 1
    while True:
        try:
            (folder / f"{name}.txt").open("x").close()
            return name
        except FileExistsError:
            n += 1
            name = f"{stem}-{n}"


def read_jobs(study: Study) -> list[dict]:
    """The arrays recorded in `JOBS_FILE` ([] before the first)."""
    return _read_list(study.root / "slurm" / JOBS_FILE, "list of submitted job arrays")


def read_intents(study: Study) -> list[dict]:
    """The arrays being submitted, recorded in `INTENTS_FILE` ([] where none is)."""
    return _read_list(study.root / "slurm" / INTENTS_FILE, "list of job arrays being submitted")


def _read_list(path: Path, what: str) -> list[dict]:
    arrays = read_json_file(path, what, list) if path.is_file() else []
    if not all(isinstance(array, dict) for array in arrays):
        raise StudyError(f"{path}: not a readable {what} (expected a JSON array of objects)")
    return arrays


def adopt_unrecorded(study: Study, *, record: bool, strict: bool) -> list[dict]:
    """The arrays submitted by a `study run` that died before recording them in `JOBS_FILE`: each
    intent in `INTENTS_FILE` whose name `squeue --name` finds, as a `JOBS_FILE` entry.

    `record` (only under the run lock, so that the intents' writer and its `sbatch` have ended,
    `run_sbatch`): append them to `JOBS_FILE` and clear `INTENTS_FILE`; an intent not in the queue
    is dropped, since its `sbatch` submitted nothing or its array has left the queue (its cells'
    state files say how they ended). `strict`: raise `StudyError` when `squeue` does not answer
    and an intent is unresolved, or when more than one job carries an intent's name, naming them
    (else such intents are left out)."""
    recorded = {job.get("job_name") for job in read_jobs(study)}
    waiting = [i for i in read_intents(study) if i["job_name"] not in recorded]
    found = queued_names([i["job_name"] for i in waiting]) if waiting else {}
    if found is None and strict:
        raise StudyError(
            f"{study.root / 'slurm' / INTENTS_FILE}: job array {waiting[0]['job_name']!r} was "
            "being submitted and is not in jobs.json, and `squeue` did not answer, so whether "
            "it is queued is unknown; nothing started (run again once `squeue` works)"
        )
    adopted = []
    for intent in waiting if found else ():
        ids = sorted(found.get(intent["job_name"], []), key=lambda i: (len(i), i))
        if len(ids) > 1 and strict:
            raise StudyError(
                f"jobs {', '.join(ids)} are all called {intent['job_name']!r}, the array of "
                f"{plural(len(intent['cells']), 'cell')} one `study run` submitted; cancel all but "
                "one (`scancel`) and run again"
            )
        adopted += [{"job_id": ids[0], **intent}] if len(ids) == 1 else []
    if record and found is not None:
        for job in adopted:
            record_job(study, job)
            print(
                f"adopted job array {job['job_id']} ({plural(len(job['cells']), 'task')}): "
                "submitted by a `study run` that ended before recording it"
            )
        if read_intents(study):
            write_json_atomic([], study.root / "slurm" / INTENTS_FILE)
    return adopted


def queued_names(names: Sequence[str]) -> dict[str, list[str]] | None:
    """{job name: [array job ids in the queue]} of `names` (`squeue --name`); None where squeue
    is absent or fails."""
    if not has_queue():
        return None
    names_flag = f"--name={','.join(names)}"
    done = subprocess.run(  # -a: arrays on hidden partitions too (only -j lists them without)
        ["squeue", "-a", "-h", "-o", "%F %j", names_flag],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return None
    found: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        job_id, _, name = line.strip().partition(" ")
        if job_id and job_id not in found.setdefault(name, []):
            found[name].append(job_id)
    return found


def task_ids(jobs: Sequence[Mapping]) -> dict[str, str]:
    """{cell name: `<job>_<task>`} of the latest submission of each cell among `jobs` (entries
    of `JOBS_FILE`)."""
    ids = {}
    for job in jobs:
        for index, name in enumerate(job["cells"]):
            ids[name] = f"{job['job_id']}_{index}"
    return ids


def task_end(study: Study, task: str) -> str | None:
    """Why task `<job>_<task>` ended without finishing its cell, from its output
    `DIR/slurm/<job>_<task>.out`: slurmstepd's last `*** JOB ... ***` line (time limit, `scancel`,
    node failure: `ended by SLURM: JOB 11 ON n1 CANCELLED AT ... DUE TO TIME LIMIT`), else the
    output's last line (e.g. the shell's error where the cell could not start); None without
    output."""
    try:
        text = (study.root / "slurm" / f"{task}.out").read_text(errors="replace")
    except OSError:
        return None
    found = STOPPED.findall(text)
    if found:
        return f"ended by SLURM: {found[-1][0]}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"task output: {lines[-1]}" if lines else None


def has_queue() -> bool:
    """Whether `squeue` can be asked (this host is a SLURM submit host)."""
    return shutil.which("squeue") is not None


def queue_states(job_ids: Sequence[str]) -> dict[str, str] | None:
    """{`<job>_<task>`: SLURM state} of the array tasks still in the queue (`squeue`); None where
    squeue is absent or fails (the queue is unknown), but for the one job it was asked about
    having left slurmctld (then {})."""
    if not job_ids:
        return {}
    if not has_queue():
        return None
    jobs = sorted({task.split("_")[0] for task in job_ids})
    done = subprocess.run(
        ["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(jobs)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        # One job id that slurmctld has forgotten (done more than `MinJobAge` ago) fails the
        # whole call; none of its tasks is in the queue.
        return {} if len(jobs) == 1 and "Invalid job id" in done.stderr else None
    return dict(line.split()[:2] for line in done.stdout.splitlines() if len(line.split()) >= 2)
