"""`focalnet preprocess` interrupted (SIGTERM, Ctrl-C, to it or its process group, also while its
worker pool starts) or losing a worker: one line, its exit status, no store or process left."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import data_cli_calls
import pytest
from data_cli_calls import picai_args
from test_train_helpers import REPO

from focalnet_jax.data.store import open_store

dataset = data_cli_calls.dataset  # a module-scoped fixture


def test_sigterm_mid_run_removes_the_temporary_store(dataset, tmp_path):
    """`kill` (SIGTERM) while cases are being read: one line, status 143, nothing left behind.
    Every T2w file is a FIFO that no one writes, so both workers block reading their case."""
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    for t2w in root.glob("images/*/*_t2w.mha"):
        t2w.unlink()
        os.mkfifo(t2w)
    out = tmp_path / "store"
    argv = [sys.executable, "-m", "focalnet_jax.cli", *picai_args(root, out, "--workers", "2")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".store.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".store.tmp-*")), "the run never started writing its store"
    time.sleep(1.0)  # the pool is up and its workers wait on the FIFOs
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143
    assert stderr.strip().splitlines()[-1] == "focalnet preprocess: interrupted by SIGTERM"
    assert "Traceback" not in stderr
    assert not out.exists() and not list(tmp_path.glob(".store.tmp-*"))


# Runs `focalnet preprocess` with the signal sent from inside the pool's construction, to the whole
# process group (as Ctrl-C, or SLURM ending a step, reaches the parent and its workers): right after
# the first worker process is spawned ("worker"), or after the thread that keeps the pool's workers
# alive started ("thread"; an interrupt from there used to leave that thread respawning workers
# that the exit waits for, for ever).
SIGNAL_IN_POOL_CONSTRUCTION = """
import os, sys, threading
from multiprocessing import pool, popen_spawn_posix
from focalnet_jax.cli import main

signum, where = int(sys.argv[1]), sys.argv[2]
def send_once():
    if not getattr(send_once, "sent", False):
        send_once.sent = True
        os.killpg(os.getpgrp(), signum)

launch, start = popen_spawn_posix.Popen._launch, threading.Thread.start
def launch_then_signal(self, process_obj):
    launch(self, process_obj)
    if where == "worker":
        send_once()
def start_then_signal(self):
    start(self)
    if where == "thread" and self._target == pool.Pool._handle_workers:
        send_once()
popen_spawn_posix.Popen._launch = launch_then_signal
threading.Thread.start = start_then_signal
sys.exit(main(sys.argv[3:]))
"""


def _group_alive(pgid: int, timeout: float) -> bool:
    """Whether a process of group `pgid` is still there after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("where", ["worker", "thread"])
@pytest.mark.parametrize(
    "signum, line",
    [(signal.SIGINT, "interrupted by Ctrl-C"), (signal.SIGTERM, "interrupted by SIGTERM")],
)
def test_a_signal_while_the_worker_pool_starts_ends_in_one_line(
    dataset, tmp_path, signum, line, where
):
    """The signal is held while the pool is being built and raised once it stands, so the pool is
    terminated, the temporary store removed, and no process of the run is left; the worker already
    started ignores Ctrl-C (no traceback) and ends on the pool's SIGTERM."""
    out = tmp_path / "store"
    code = [sys.executable, "-c", SIGNAL_IN_POOL_CONSTRUCTION, str(int(signum)), where]
    argv = [*code, *picai_args(dataset, out, "--workers", "2")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        argv, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=60)
        left = _group_alive(process.pid, timeout=5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # only if the run hung or left a worker
    assert process.returncode == 128 + signum, stderr
    assert not left, "a process of the run outlived it"
    bar = re.compile(r"preprocess: +\d+%")  # tqdm's progress bar, redrawn after each \r
    assert [s for s in stderr.splitlines() if s and not bar.match(s)] == [
        f"focalnet preprocess: {line}"
    ], stderr
    assert not out.exists() and not list(tmp_path.glob(".store.tmp-*"))


def _hold_fifos_open(fifos: list, timeout: float) -> list[int]:
    """Write ends of `fifos`, each opened once a reader has it open (that reader then blocks in
    its read until they are closed)."""
    fds, deadline = [], time.monotonic() + timeout
    for fifo in fifos:
        while True:
            try:
                fds.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                break
            except OSError:  # ENXIO: no reader yet
                assert time.monotonic() < deadline, f"no worker opened {fifo}"
                time.sleep(0.05)
    return fds


def _preprocess_with_fifos_held(root, out, workers: int, fifos: list, act, *extra):
    """`focalnet preprocess` of `root` into `out` (`extra`: more arguments) in a session of its
    own, `fifos` (T2w files made FIFOs) held open once read (their readers block), then
    `act(process)`: (exit status, stderr, whether a process of the run outlived it). The run is
    killed if it hangs."""
    argv = [sys.executable, "-m", "focalnet_jax.cli"]
    argv += picai_args(root, out, "--workers", str(workers), *extra)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        argv, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, start_new_session=True
    )
    fds = []
    try:
        fds = _hold_fifos_open(fifos, timeout=120)
        act(process)
        _, stderr = process.communicate(timeout=60)
        left = _group_alive(process.pid, timeout=5)
    finally:
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # only if the run hung or left a worker
    return process.returncode, stderr, left


def test_sigterm_to_the_process_group_with_an_idle_worker_ends_the_run(dataset, tmp_path):
    """`kill -TERM -- -PGID` (a container stop, a job script's trap) reaches every worker: one
    that had finished its case and waited for the next, killed while it held the lock of the task
    queue, used to leave the parent waiting for that lock in `Pool.terminate` for ever. 4 cases,
    4 workers: 3 block reading a T2w that is a FIFO, the 4th case is read and its worker waits."""
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    fifos = sorted(root.glob("images/*/*_t2w.mha"))[1:]
    for t2w in fifos:
        t2w.unlink()
        os.mkfifo(t2w)
    out = tmp_path / "store"

    def stop(process):
        time.sleep(3.0)  # the first case is read, its worker waits for another
        os.killpg(process.pid, signal.SIGTERM)

    returncode, stderr, left = _preprocess_with_fifos_held(root, out, 4, fifos, stop)
    assert returncode == 143, stderr
    assert not left, "a process of the run outlived it"
    assert stderr.strip().splitlines()[-1] == "focalnet preprocess: interrupted by SIGTERM"
    assert "Traceback" not in stderr, stderr
    assert not out.exists() and not list(tmp_path.glob(".store.tmp-*"))


def _reader_of(fifo: Path, parent: int) -> int:
    """The pid of the child of `parent` that has `fifo` open."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        tasks = Path(f"/proc/{parent}/task").glob("*/children")  # each thread's children
        for child in {int(pid) for task in tasks for pid in task.read_text().split()}:
            with contextlib.suppress(FileNotFoundError):
                fds = Path(f"/proc/{child}/fd")
                if any(os.readlink(fd) == str(fifo) for fd in fds.iterdir()):
                    return child
        time.sleep(0.05)
    raise AssertionError(f"no child of {parent} has {fifo} open")


def _kill_a_reader(dataset, tmp_path, k: int, *extra):
    """`focalnet preprocess --workers 2` (`extra`: more arguments) of a copy of `dataset` whose
    case k has a FIFO for its T2w, the worker reading it killed (SIGKILL): (case, store, exit
    status, stderr, whether a process of the run outlived it)."""
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    fifo = sorted(root.glob("images/*/*_t2w.mha"))[k]
    fifo.unlink()
    os.mkfifo(fifo)
    out = tmp_path / "store"

    def kill_its_reader(process):
        os.kill(_reader_of(fifo, process.pid), signal.SIGKILL)

    returncode, stderr, left = _preprocess_with_fifos_held(
        root, out, 2, [fifo], kill_its_reader, *extra
    )
    return fifo.name.removesuffix("_t2w.mha"), out, returncode, stderr, left


def test_a_worker_killed_in_a_case_ends_the_run_naming_the_case(dataset, tmp_path):
    """A worker killed while it reads a case (the out-of-memory killer, a crash in a reader):
    `multiprocessing.Pool` replaced it and the run waited for that case for ever; now one line
    names the case and how its worker ended, and nothing is left behind."""
    case, out, returncode, stderr, left = _kill_a_reader(dataset, tmp_path, 0)
    assert returncode == 2, stderr
    assert not left, "a process of the run outlived it"
    assert stderr.strip().splitlines()[-1] == (
        f"focalnet preprocess: error: case {case!r}, file '': its worker process died (killed "
        "by SIGKILL)"
    ), stderr
    assert not out.exists() and not list(tmp_path.glob(".store.tmp-*"))


def test_a_case_whose_worker_was_killed_is_skipped_with_skip_bad_cases(dataset, tmp_path):
    """With --skip-bad-cases the run stopped at a case whose worker died, as without; now that
    case is listed in errors.csv like any bad case and the others are stored."""
    case, out, returncode, stderr, left = _kill_a_reader(dataset, tmp_path, 1, "--skip-bad-cases")
    assert returncode == 0, stderr
    assert not left, "a process of the run outlived it"
    stored = open_store(out).case_ids
    assert len(stored) == 3 and case not in stored
    assert stored == sorted(stored)  # in input order, the lost case's place left out
    with (out / "errors.csv").open() as f:
        rows = list(csv.reader(f))[1:]
    assert rows == [[case, "", "its worker process died (killed by SIGKILL)"]]
    assert not list(tmp_path.glob(".store.tmp-*"))
