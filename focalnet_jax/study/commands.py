"""`focalnet study run|status|report`: argument declarations and dispatch (docs/studies.md).

`study status` and `study report` start without importing JAX (tested); `study run` imports it
only to check each arm's config as its cells will, and each cell imports JAX in its own process.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import IO

from focalnet_jax.data.atomic_files import check_output_folder
from focalnet_jax.errors import plural
from focalnet_jax.study.cells import STUDY_FILE, Study, run_lock
from focalnet_jax.study.inputs import check_inputs
from focalnet_jax.study.slurm_options import check_partition, check_sbatch_option, check_time
from focalnet_jax.study.spec import StudyError, load_spec, validate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `focalnet study` subcommands and their flags (`--verbose` also after the action)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,  # keeps a --verbose given before the action
        help="show the traceback of an error",
    )
    sub = parser.add_subparsers(dest="study_command", required=True, metavar="ACTION")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    run = add("run", help="train and evaluate every cell not done yet")
    run.add_argument("--spec", help="spec file[:arg] (default: the one recorded in --workdir)")
    run.add_argument("--workdir", type=Path, required=True, help="study folder")
    run.add_argument("--executor", choices=("local", "slurm"), default="local")
    run.add_argument(
        "--parallel", type=int, help="local: cells at once (default: one per GPU, else 1)"
    )
    run.add_argument("--devices", help="local: GPU ids, one per worker (default: all visible)")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="start nothing: print each cell's command (local) or the job script (slurm)",
    )
    group = run.add_argument_group("slurm (default: the spec's `slurm` fields)")
    group.add_argument("--partition")
    group.add_argument("--time", help="time limit per task, e.g. 04:00:00")
    group.add_argument("--gpus", type=int, help="GPUs per task")
    group.add_argument("--cpus", type=int, help="CPUs per task")
    group.add_argument("--throttle", type=int, help="at most this many tasks at once")
    group.add_argument(
        "--sbatch", action="append", default=[], metavar="LINE", help="extra #SBATCH line"
    )
    run.epilog = "Any spec field: --spec.repeats=3 --spec.common.train.steps=500"
    status = add("status", help="table of cells: done/running/failed/pending")
    status.add_argument("--workdir", type=Path, required=True, help="study folder")
    report = add("report", help="runs.csv, stats.csv, report.md and figures")
    report.add_argument("--workdir", type=Path, required=True, help="study folder")
    report.add_argument("--partial", action="store_true", help="report while cells are missing")
    report.add_argument(
        "--iterations",
        type=int,
        default=10_000,
        help="random splits of approximate tests (default 10000)",
    )
    cell = add("cell", help="run one cell here (used by the executors)")
    cell.add_argument("--workdir", type=Path, required=True, help="study folder")
    cell.add_argument("--cell", required=True, help="ARM/rep<r>/fold<k>")


SLURM_FLAGS = ("partition", "time", "gpus", "cpus", "throttle")  # and --sbatch, a list


def _open_or_create(args: argparse.Namespace, *, write: bool = True) -> Study:
    """The study of `--workdir` (recorded from `--spec` where given), its inputs checked against
    those recorded (`check_inputs`) before anything is written; `write=False` (or a dry run):
    the same checks, nothing written."""
    if args.spec is None:
        if args.overrides:
            raise StudyError(f"{args.overrides[0]}: --spec overrides need --spec FILE")
        study = Study.open(args.workdir)
        check_inputs(study.plain, study.root / STUDY_FILE)
        return study
    plain = validate(load_spec(args.spec, args.overrides), args.spec)
    if args.dry_run or not write:
        return Study(args.workdir, Study.check_recorded(args.workdir, plain))
    return Study.create(args.workdir, plain)


def _check_run_flags(args: argparse.Namespace) -> None:
    """`study run` flags in range, checked before anything is written."""
    if args.parallel is not None and args.parallel < 1:
        raise StudyError(f"--parallel {args.parallel}: expected >= 1")
    if args.devices is not None and not all(d.isdigit() for d in args.devices.split(",")):
        raise StudyError(
            f"--devices {args.devices!r}: expected comma-separated GPU ids (integers >= 0)"
        )
    if args.devices is not None:
        ids = [int(d) for d in args.devices.split(",")]
        repeated = next((d for i, d in enumerate(ids) if d in ids[:i]), None)
        if repeated is not None:  # two workers would share the GPU
            raise StudyError(f"--devices {args.devices!r}: GPU {repeated} is given twice")
        # A cell's CUDA_VISIBLE_DEVICES replaces this process's: inside an allocation of GPUs
        # 2,3 (SLURM, a container), --devices 0,1 would name GPUs it was not given.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and (
            outside := [d for d in ids if str(d) not in visible.split(",")]
        ):
            raise StudyError(
                f"--devices {args.devices!r}: GPU {outside[0]} is not among this process's "
                f"CUDA_VISIBLE_DEVICES={visible!r}; give ids from it (they are the system's "
                "ids, as CUDA_VISIBLE_DEVICES takes them) or leave --devices out"
            )
    for key in ("gpus", "cpus", "throttle"):
        if getattr(args, key) is not None and getattr(args, key) < 0:
            raise StudyError(f"--{key} {getattr(args, key)}: expected 0 or more")
    if args.time is not None:
        check_time(args.time)
    if args.partition is not None:
        check_partition(args.partition)
    for option in args.sbatch:
        check_sbatch_option(option)
    # A flag of the other executor was ignored without a word.
    slurm = [f"--{k}" for k in SLURM_FLAGS if getattr(args, k) is not None]
    slurm += ["--sbatch"] if args.sbatch else []
    local = [f"--{k}" for k in ("parallel", "devices") if getattr(args, k) is not None]
    if args.executor == "local" and slurm:
        raise StudyError(f"{slurm[0]} is a SLURM setting: it needs --executor slurm")
    if args.executor == "slurm" and local:
        raise StudyError(f"{local[0]} is for --executor local (SLURM places each cell's task)")


def _slurm_options(study: Study, args: argparse.Namespace) -> dict:
    options = dict(study.plain["slurm"])
    for key in SLURM_FLAGS:
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    options["extra"] = list(options.get("extra") or ()) + list(args.sbatch)
    return options


RUNNABLE = ("pending", "failed", "interrupted")


def cell_states(
    study: Study, *, need_queue: bool = False, record: bool = False
) -> dict[str, tuple[str, str]]:
    """{cell name: (state, SLURM task id or '')}, with the SLURM queue's view: a cell not done
    whose latest submitted task is in the queue takes that task's state (`queued` while it
    waits), whatever an earlier attempt recorded (`failed`, `interrupted`), so it is not
    submitted twice; a cell `running` on another host whose own task (the one that started it)
    has left the queue (e.g. killed at its time limit) is `interrupted`; a cell whose task left
    the queue without starting it (e.g. the task's shell failed) is `failed`. `need_queue`: raise
    `StudyError` when `squeue` does not answer (e.g. it timed out on a busy controller) and a
    cell not done was submitted, since a queued cell would look runnable: trained here while its
    task waits, or submitted twice. An array whose `study run` died before recording it counts
    as recorded when it is in the queue (`slurm.adopt_unrecorded`; `record`, under the run lock:
    recorded in jobs.json)."""
    from focalnet_jax.study import slurm

    adopted = slurm.adopt_unrecorded(study, record=record, strict=need_queue or record)
    tasks = slurm.task_ids([*slurm.read_jobs(study), *([] if record else adopted)])
    queue = slurm.queue_states(list(tasks.values()))
    submitted = [c for c in study.cells() if c.name in tasks] if queue is None else []
    if any(study.state(c).state != "done" for c in submitted):
        if need_queue:
            raise StudyError(
                f"{study.root}: `squeue` did not answer, so which submitted cells are still "
                "queued is unknown; nothing started or submitted (run again where `squeue` works)"
            )
        print(  # `study status`
            "warning: `squeue` did not answer: cells submitted to SLURM show their last "
            "recorded state (a queued cell reads pending)",
            file=sys.stderr,
        )
    states = {}
    for cell in study.cells():
        state = study.state(cell)
        latest = tasks.get(cell.name, "")
        own_task = state.record.get("slurm_job")  # the task running it, where SLURM runs it
        name, task = state.state, own_task or latest
        if name != "done" and queue and latest in queue:
            name, task = ("queued" if queue[latest] == "PENDING" else queue[latest].lower()), latest
        elif name != "done" and own_task and latest not in (own_task, "") and queue is not None:
            # submitted again after an attempt of `own_task`, and gone without starting the cell
            # (each attempt records its task): the earlier attempt's state would be shown
            name, task = "failed", latest
        elif (
            name == "running"
            and own_task
            and queue is not None
            and own_task not in queue
            and not state.seen_alive
        ):
            # Run on another host (its pids mean nothing here). A process seen alive here keeps
            # it running: a `focalnet train` whose runner was killed outlives its task where
            # SLURM tracks processes by parent (proctrack/linuxproc), or saves its step still.
            name = "interrupted"
        elif name == "pending" and latest and queue is not None and latest not in queue:
            name = "failed"  # its task ended before the cell started (its output says why)
        states[cell.name] = (name, task)
    return states


def _run(args: argparse.Namespace) -> int:
    from focalnet_jax.evaluation import picai

    _check_run_flags(args)
    if reason := picai.available():  # each cell would train, then leave out three of the four
        raise StudyError(f"{reason}: the report compares arms on picai_eval's metrics")
    check_output_folder(args.workdir, "--workdir")  # a dry run too: as the real run would
    study = _open_or_create(args, write=False)  # every check, nothing written
    if args.executor == "local":
        _local_slots(args)
    if args.dry_run:  # writes nothing, so it needs no lock (and the folder may not exist yet)
        return _start_cells(study, args)
    # The spec is recorded under the lock: a run refused because another holds it changes
    # nothing (a grown spec recorded then could never be shrunk back).
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with run_lock(args.workdir) as lock:
        return _start_cells(_open_or_create(args), args, lock)


def _local_slots(args: argparse.Namespace) -> tuple[list[str], int]:
    """(GPU ids, cells at once) of a local run: `--devices`, else the GPUs this host sees, and
    `--parallel` (default one per GPU); more cells at once than GPUs is refused (`StudyError`),
    before anything is written and by a dry run too."""
    from focalnet_jax.study import local

    devices = args.devices.split(",") if args.devices else local.visible_gpus()
    parallel = local.worker_slots(args.parallel, devices)
    if devices and parallel > len(devices):
        raise StudyError(
            f"--parallel {parallel}: more than the {plural(len(devices), 'GPU')} {devices}"
        )
    return devices, parallel


def _start_cells(study: Study, args: argparse.Namespace, lock: IO[str] | None = None) -> int:
    """Run (local) or submit (slurm) the cells not done, queued or running; the exit status.
    `lock`: the run lock held (None for a dry run), shared with `sbatch`."""
    from focalnet_jax.study import local, slurm

    cells = study.cells()
    # Either executor needs the queue where a submitted cell is not done: a queued cell would
    # look runnable, be trained here while its task waits (local) or be submitted twice (slurm).
    found = cell_states(study, need_queue=True, record=not args.dry_run)
    states = {n: state for n, (state, _) in found.items()}
    todo = [c for c in cells if states[c.name] in RUNNABLE]
    done = sum(s == "done" for s in states.values())
    print(
        f"{plural(len(cells), 'cell')}: {done} done, {len(cells) - done - len(todo)} running or "
        f"queued elsewhere, {len(todo)} to run"
    )
    if args.executor == "slurm":
        if not todo:
            print("nothing to submit")
        elif job := slurm.submit(
            study, todo, _slurm_options(study, args), dry_run=args.dry_run, lock=lock
        ):
            print(
                f"submitted job array {job} ({plural(len(todo), 'task')}); `focalnet study status`"
            )
        if not args.dry_run:  # the cells' tasks leave the ensembles of done members to a run
            _ensembles(study)
        return 0
    devices, parallel = _local_slots(args)
    if args.dry_run:
        for cell in todo:
            print(shlex.join(local.cell_argv(study, cell)))
        print(
            f"dry run: {plural(len(todo), 'cell')} would run, {parallel} at once; nothing started"
        )
        return 0
    results = local.run_local(study, todo, parallel=parallel, devices=devices)
    _ensembles(study)
    failed = [name for name, end in results.items() if end.result == "failed"]
    for name in failed:
        log = results[name].log or "none: it ended before writing one"
        print(f"FAILED {name}: {results[name].reason} (log: {log})")
    interrupted = [name for name, end in results.items() if end.result == "interrupted"]
    for name in interrupted:
        print(f"INTERRUPTED {name}: its runner ended before the cell did; a re-run resumes it")
    return 1 if failed or interrupted else 0


def _ensembles(study: Study) -> None:
    from focalnet_jax.study.ensembles import update_ensembles

    computed = [n for n, r in update_ensembles(study).items() if r == "computed"]
    if computed:
        print(f"ensembles computed: {', '.join(computed)}")


def _status(args: argparse.Namespace) -> int:
    from focalnet_jax.study import slurm
    from focalnet_jax.study.attempts import time_so_far
    from focalnet_jax.study.ensembles import ensemble_state

    study = Study.open(args.workdir)
    states = cell_states(study)
    rows, counts = [], {}
    for cell in study.cells():
        state = study.state(cell)
        name, task = states[cell.name]
        # a task that made no attempt: the cell never started, or its attempt was another task's
        own = state.record.get("slurm_job")
        later = bool(task) and (state.state == "pending" or bool(own) and task != own)
        ended = name in ("interrupted", "failed") and bool(task)
        ended = ended and (later or "error" not in state.record)
        why = (slurm.task_end(study, task) or "task left the queue, no output") if ended else None
        detail = (why if later else None) or state.record.get("error") or why
        detail = detail or state.record.get("log", "")
        spent = time_so_far(state.record, study.path(cell))
        seconds, attempts = (str(spent[0]), str(spent[1])) if spent else ("", "")
        rows.append((cell.name, name, task, seconds, attempts, detail))
        counts[name] = counts.get(name, 0) + 1
    for cell in study.ensemble_cells():
        name = ensemble_state(study, cell)  # outdated: computed by the next run or report
        rows.append((cell.name, name, "", "", "", "ensemble"))
    # s: seconds over all attempts (one running or killed: until its folder's latest write)
    header = ("cell", "state", "slurm job", "s", "attempts", "log / error")
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(5)]
    for row in [header, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(row[:5], widths, strict=True)) + "  " + row[5])
    print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 0


def _report(args: argparse.Namespace) -> int:
    from focalnet_jax.study.report import check_report_folder, write_report

    if args.iterations < 1:
        raise StudyError(f"--iterations {args.iterations}: expected at least 1 random split")
    study = Study.open(args.workdir)
    check_report_folder(study)  # before the ensembles are computed
    _ensembles(study)
    out = write_report(study, partial=args.partial, iterations=args.iterations)
    print(f"wrote {out / 'runs.csv'}, {out / 'stats.csv'}, {out / 'report.md'} and figures")
    return 0


def _cell(args: argparse.Namespace) -> int:
    from focalnet_jax.study.cell_runner import run_cell

    return run_cell(args.workdir, args.cell)


ACTIONS = {"run": _run, "status": _status, "report": _report, "cell": _cell}


def run(args: argparse.Namespace) -> int:
    """Dispatch `focalnet study ACTION` (user errors are `StudyError`s: one line, by the CLI)."""
    if args.study_command != "run" and args.overrides:
        raise StudyError("unrecognized arguments: " + " ".join(args.overrides))
    return ACTIONS[args.study_command](args)
