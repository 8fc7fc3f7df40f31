"""The local executor: cells as processes on this machine, `parallel` at a time.

Each cell runs `python -m focalnet_jax.cli study cell ...` (module `cell_runner`) in its own
process, so a failing or crashing cell cannot take the others down. With GPUs, each worker slot
owns one device (`CUDA_VISIBLE_DEVICES` set per cell process), so a multi-GPU host trains one
cell per device at a time; on CPU, `parallel` cells share the cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from focalnet_jax.errors import plural
from focalnet_jax.study.cell_runner import signal_name
from focalnet_jax.study.cells import Cell, Study
from focalnet_jax.study.spec import StudyError


def cell_argv(study: Study, cell: Cell) -> list[str]:
    """The command line that runs one cell in the submitting environment's Python."""
    root = str(study.root.resolve())
    return [sys.executable, "-m", "focalnet_jax.cli", "study", "cell", "--workdir", root] + [
        "--cell",
        cell.name,
    ]


def visible_gpus() -> list[str]:
    """GPU ids this process may use: `CUDA_VISIBLE_DEVICES` when set, else `nvidia-smi -L`'s
    count, else none (without starting JAX, which would claim the GPUs' memory)."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d for d in given.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return [str(i) for i, line in enumerate(listed.stdout.splitlines()) if line.startswith("GPU")]


def worker_slots(parallel: int | None, devices: Sequence[str]) -> int:
    """Cells at once: `--parallel` when given (an explicit 1 included), else one per GPU of
    `devices`, else 1."""
    if parallel is not None:
        return parallel
    return len(devices) if devices else 1


class Ended(NamedTuple):
    """How a cell's attempt ended: `result` 'done' | 'failed' | 'interrupted', for a failed one
    its `reason`, and for one not done its `log` (None where its runner wrote none)."""

    result: str
    reason: str | None = None
    log: Path | None = None


def run_local(
    study: Study, cells: Sequence[Cell], *, parallel: int = 1, devices: Sequence[str] = ()
) -> dict[str, Ended]:
    """Run `cells`, at most `parallel` at once; returns {cell name: `Ended`} (interrupted: its
    runner ended before the cell did, e.g. killed alone; a slot stays taken until the `focalnet`
    command such a runner started has ended too).

    `devices`: GPU ids; worker slot i runs its cells with `CUDA_VISIBLE_DEVICES=devices[i]`, so
    `parallel` may not exceed their number.
    """
    if parallel < 1:
        raise StudyError(f"--parallel {parallel}: expected >= 1")
    if devices and parallel > len(devices):
        raise StudyError(
            f"--parallel {parallel}: more than the {plural(len(devices), 'GPU')} {devices}"
        )
    queue, running, results, orphaned = list(cells), {}, {}, set()
    total, start = len(queue), time.time()
    try:
        while queue or running:
            free = [slot for slot in range(parallel) if slot not in running]
            while queue and free:
                slot, cell = free.pop(0), queue.pop(0)
                env = dict(os.environ)
                if devices:
                    env["CUDA_VISIBLE_DEVICES"] = devices[slot]
                process = subprocess.Popen(
                    cell_argv(study, cell), env=env, stdin=subprocess.DEVNULL
                )
                running[slot] = (cell, process, time.time())
                print(f"started {cell.name}" + (f" on GPU {devices[slot]}" if devices else ""))
            time.sleep(0.2)
            for slot, (cell, process, cell_start) in list(running.items()):
                if process.poll() is None:
                    continue
                state = study.state(cell)
                if _runs(state, process.pid):  # its runner killed alone: its command runs on
                    if cell.name not in orphaned:
                        orphaned.add(cell.name)
                        print(
                            f"the runner of cell {cell.name} ended; waiting for its command "
                            f"(pid {state.record.get('child_pid')}) to end",
                            flush=True,
                        )
                    continue
                del running[slot]
                end = _ended(study, cell, state, process)
                results[cell.name] = end
                where = f": see {end.log}" if end.log else ""
                now = time.time()
                print(
                    f"[{len(results)}/{total}] {cell.name} {end.result} in "
                    f"{now - cell_start:.0f} s (study: {(now - start) / 60:.1f} min){where}",
                    flush=True,
                )
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: the run lock is held until the cells end
        _wait_for_cells(study, [(cell, process) for cell, process, _ in running.values()])
        raise
    return results


def _ended(study: Study, cell: Cell, state, process: subprocess.Popen) -> Ended:
    """How the attempt of `cell` whose runner `process` has ended went. Interrupted: this
    runner's state, no end written. Failed: this runner's error, or where the state is an earlier
    attempt's (the runner ended before it wrote its own, e.g. killed during its imports) how the
    runner ended: that attempt's error was reported as this one's, or '?' for a new cell."""
    mine = state.record.get("pid") == process.pid
    log = study.log_path(cell)
    if state.state == "done":
        return Ended("done")
    if state.state == "interrupted" and mine:
        return Ended("interrupted", log=log)
    if mine:
        return Ended("failed", state.record.get("error") or "?", log)
    code = process.returncode
    how = f"killed by {signal_name(-code)}" if code < 0 else f"ended with exit status {code}"
    reason = f"its runner (`focalnet study cell`) {how} before the cell started"
    return Ended("failed", reason, log if log.exists() else None)


def _wait_for_cells(study: Study, started) -> None:
    """Waits for each (cell, runner process) of `started` to end, and for the command its runner
    started (`focalnet train`, which outlives a runner killed alone): until then another `study
    run` would take the cell for one not running. The cells are not signalled: a signal that
    reached only this process leaves them training (Ctrl-C in the terminal, or `kill -- -PGID`,
    reaches them too). A second interrupt ends the wait."""
    for cell, process in started:
        print(f"waiting for cell {cell.name} (pid {process.pid}) to end ...", flush=True)
        process.wait()
        while _runs(study.state(cell), process.pid):
            time.sleep(0.2)


def _runs(state, runner: int) -> bool:
    """Whether a cell whose runner (pid `runner`) has ended still runs: its state is that
    runner's, and the command the runner started lives (`Study.state`)."""
    return state.state == "running" and state.record.get("pid") == runner
