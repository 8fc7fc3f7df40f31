"""`focalnet study cell --workdir DIR --cell ARM/rep<r>/fold<k>`: one cell.

A cell is an ordinary `focalnet train --config BASE --workdir CELL --config.k=v ...` (which resumes
from the cell's latest checkpoint) followed by `focalnet evaluate --workdir CELL`, each run as
`python -m focalnet_jax.cli` in a child process (so the study package never imports the CLI that
imports it). Everything the cell prints goes to `CELL/cell.log` (appended: a resumed cell keeps
the log of its earlier attempts); a failed command's last line of output (the one-line user
error, or the exception of a traceback), or the signal that killed it, is the cell's recorded
reason. Its state file counts the seconds of this attempt and of every earlier one (module
`attempts`). A cell already done returns at once. The local and SLURM executors both start cells
with this command.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from focalnet_jax.errors import UserError
from focalnet_jax.processes import boot_id, pid_space, process_start
from focalnet_jax.study.attempts import HEARTBEAT_S, attempt_fields, earlier_attempts
from focalnet_jax.study.cells import STUDY_FILE, Study
from focalnet_jax.study.inputs import check_inputs
from focalnet_jax.study.spec import cell_overrides, evaluation_slices

# `focalnet CMD: error: ...` (a user error), `focalnet CMD: stopped by SIGTERM ...` or
# `... interrupted by ...` (a signal), or `SomeError: ...` (the end of a traceback).
REASON = re.compile(
    r"^(focalnet [\w ]+: (error: |stopped by |interrupted by )"
    r"|[\w.]+(Error|Exception|Exit|Interrupt)\b)"
)


def cell_commands(study: Study, cell) -> tuple[list[str], list[str]]:
    """The `focalnet train` and `focalnet evaluate` argument lists of a training cell."""
    workdir = str(study.path(cell))
    train = ["train", f"--config={study.plain['base']}", f"--workdir={workdir}"]
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # else the cache set there, as in train
        train += ["--compilation_cache", str(study.root.resolve() / "compilation_cache")]
    train += cell_overrides(study.plain, cell.arm, cell.repeat, cell.fold)
    options = study.plain["evaluate"]
    evaluate = ["evaluate", f"--workdir={workdir}", "--label", cell.name]
    evaluate += ["--slices", evaluation_slices(study.plain)]  # every arm on the same slices
    evaluate += [f"--picai-bootstraps={int(options.get('picai_bootstraps', 0))}"]
    if not options.get("figures", False):
        evaluate.append("--no-figures")
    return train, evaluate


def run_focalnet(argv: list[str], log: Path, heartbeat=None, started=None) -> str | None:
    """Run `focalnet ARGV` in a child process, its output appended to `log`, calling
    `started(pid)` (if given) once it runs and `heartbeat()` (if given) every `HEARTBEAT_S`
    seconds while it runs; None on success, else a one-line reason: the signal that killed it
    (with the last user error or exception line it printed, if any), else that line (else its
    last line, else its exit status)."""
    with open(log, "ab", buffering=0) as out:
        out.write(f"$ focalnet {shlex.join(argv)}\n".encode())
        start = out.tell()
        child = subprocess.Popen(
            [sys.executable, "-m", "focalnet_jax.cli", *argv], stdout=out, stderr=subprocess.STDOUT
        )
        if started is not None:
            started(child.pid)
        while True:
            try:
                status = child.wait(timeout=HEARTBEAT_S)
                break
            except subprocess.TimeoutExpired:
                if heartbeat is not None:
                    heartbeat()
    if status == 0:
        return None
    with open(log, "rb") as written:
        written.seek(start)
        lines = [line.strip() for line in written.read().decode(errors="replace").splitlines()]
    if status < 0:  # killed by a signal (e.g. the out-of-memory killer): no line of its own says so
        killed = f"focalnet {argv[0]} killed by {signal_name(-status)}"
        said = [line for line in lines if REASON.match(line)]
        return f"{killed} ({said[-1]})" if said else killed
    return failure_reason(lines) or f"focalnet {argv[0]} exited with status {status}"


def signal_name(number: int) -> str:
    """'SIGKILL' for 9; 'signal N' for a number no signal of this platform has."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def failure_reason(lines: list[str]) -> str | None:
    """The last of a failed command's output `lines` that says why (REASON), else its last
    non-empty line; None without one."""
    reasons = [line for line in lines if REASON.match(line)] or [line for line in lines if line]
    return reasons[-1] if reasons else None


def _one_line(error: Exception) -> str:
    """A cell's reason for `error`: a user error's message, else the exception's name and text."""
    text = " ".join(str(error).split())
    return text if isinstance(error, UserError) else f"{type(error).__name__}: {text}"


def _placement() -> dict:
    """Where the cell runs, kept in its state: the SLURM task, and its GPU(s) (one per worker slot
    of the local executor, or SLURM's allocation)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    placement = {"slurm_job": f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"} if job else {}
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    return {**placement, **({"gpus": gpus} if gpus is not None else {})}


def run_cell(study_dir: str | Path, name: str) -> int:
    """Train and evaluate cell `name` of the study in `study_dir`; 0 when done, 1 when failed.
    Its state file counts this attempt's seconds and those of the earlier ones (`attempts`)."""
    study = Study.open(study_dir)
    cell = study.cell(name)
    previous = study.state(cell)
    if previous.state == "done":
        return 0
    log = study.log_path(cell)
    earlier = earlier_attempts(previous.record, study.path(cell))  # before this attempt writes
    placement, start = _placement(), time.time()
    here = {
        "pid": os.getpid(),
        "pid_started": process_start(os.getpid()),
        "host": socket.gethostname(),
        "pid_space": pid_space(),
        "boot_id": boot_id(),
    }

    def record(state: str, **fields) -> None:  # each with this runner's pid: `local` tells its own
        seconds = attempt_fields(earlier, time.time() - start)
        study.write_state(cell, state, log=str(log), **seconds, **placement, **here, **fields)

    def heartbeat() -> None:
        record("running", started=start)

    heartbeat()
    log.parent.mkdir(parents=True, exist_ok=True)
    gpus = placement.get("gpus")
    on = f", CUDA_VISIBLE_DEVICES={gpus}" if gpus is not None else ""
    with open(log, "a") as out:
        out.write(f"=== cell {name}, seed {study.seed(cell)}{on}, {time.ctime()} ===\n")
    try:  # a cell may start hours after `study run`, from a queue, on another node
        check_inputs(study.plain, study.root / STUDY_FILE)
        commands, error = cell_commands(study, cell), None
    except Exception as unusable:  # noqa: BLE001 - a config or store gone unreadable: recorded
        commands, error = (), _one_line(unusable)

    def child_started(pid: int) -> None:  # the cell runs while it does, this runner killed or not
        here.update(child_pid=pid, child_started=process_start(pid))
        heartbeat()

    for argv in commands:
        error = run_focalnet(argv, log, heartbeat, child_started)
        if error:
            break
    if error:
        with open(log, "a") as out:
            out.write(f"cell {name} failed: {error}\n")
        record("failed", error=error)
        print(f"cell {name} failed: {error} (log: {log})", file=sys.stderr)
        return 1
    record("done")
    return 0
