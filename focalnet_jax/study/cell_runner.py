"""`focalnet study cell --workdir DIR --cell ARM/rep<r>/fold<k>`: one cell, in this process.

A cell is an ordinary `focalnet train --config BASE --workdir CELL --config.k=v ...` (which resumes
from the cell's latest checkpoint) followed by `focalnet evaluate --workdir CELL`, both through
the CLI's `main` in this process (one JAX start-up per cell). Everything the cell prints, from
Python and from native code, goes to `CELL/cell.log` (appended: a resumed cell keeps the log of
its earlier attempts). A cell already done returns at once. The local and SLURM executors both
start cells with this command.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import traceback
from pathlib import Path

from focalnet_jax.study.cells import Study
from focalnet_jax.study.spec import cell_overrides


def cell_commands(study: Study, cell) -> tuple[list[str], list[str]]:
    """The `focalnet train` and `focalnet evaluate` argument lists of a training cell."""
    workdir = str(study.path(cell))
    train = ["train", "--config", study.plain["base"], "--workdir", workdir]
    train += ["--compilation_cache", str(study.root.resolve() / "compilation_cache")]
    train += cell_overrides(study.plain, cell.arm, cell.repeat, cell.fold)
    options = study.plain["evaluate"]
    evaluate = ["evaluate", "--workdir", workdir, "--label", cell.name]
    evaluate += [f"--picai-bootstraps={int(options.get('picai_bootstraps', 0))}"]
    if not options.get("figures", False):
        evaluate.append("--no-figures")
    return train, evaluate


@contextlib.contextmanager
def _output_to(log: Path):
    """stdout and stderr (file descriptors 1 and 2, so native output too) appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "ab", buffering=0) as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _run_command(argv: list[str]) -> str | None:
    """Run one `focalnet` command; None on success, else a one-line reason."""
    from focalnet_jax import cli

    print(f"$ focalnet {' '.join(argv)}", flush=True)
    try:
        status = cli.main(argv)
    except SystemExit as stop:
        status = stop.code
        if isinstance(status, str):
            return status.splitlines()[-1]
    except Exception as error:  # a failed cell is reported; the study goes on
        traceback.print_exc()
        return f"{type(error).__name__}: {error}".splitlines()[0]
    return None if status in (0, None) else f"focalnet {argv[0]} exited with status {status}"


def run_cell(study_dir: str | Path, name: str) -> int:
    """Train and evaluate cell `name` of the study in `study_dir`; 0 when done, 1 when failed."""
    study = Study.open(study_dir)
    cell = study.cell(name)
    if study.state(cell).state == "done":
        return 0
    log = study.log_path(cell)
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    slurm = {"slurm_job": f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"} if job else {}
    start = time.time()
    study.write_state(
        cell, "running", pid=os.getpid(), host=socket.gethostname(), log=str(log), **slurm
    )
    error = None
    with _output_to(log):
        print(f"=== cell {name}, seed {study.seed(cell)}, {time.ctime()} ===", flush=True)
        for argv in cell_commands(study, cell):
            error = _run_command(argv)
            if error:
                print(f"cell {name} failed: {error}", flush=True)
                break
    elapsed = round(time.time() - start, 1)
    if error:
        study.write_state(cell, "failed", error=error, log=str(log), seconds=elapsed, **slurm)
        print(f"cell {name} failed: {error} (log: {log})", file=sys.stderr)
        return 1
    study.write_state(cell, "done", log=str(log), seconds=elapsed, **slurm)
    return 0
