"""Which cells a `study run` may start, as the SLURM queue says (`commands.cell_states`), without a
cluster: `slurm.queue_states` stands in for `squeue` (None: it did not answer; {}: nothing
queued); and an interrupted submission (`slurm.run_sbatch`, with a stand-in `sbatch`). The real
queue is used in the slow SLURM tests of tests/test_study_slurm_tasks.py and
tests/test_study_slurm_submission.py."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

import pytest

from focalnet_jax.processes import boot_id, pid_space
from focalnet_jax.study import commands, slurm
from focalnet_jax.study.cells import Study
from focalnet_jax.study.spec import StudyError

PLAIN = {"arms": {"ce": {}}, "ensembles": {}, "repeats": 1, "folds": [0], "seed": 0}


def _submitted_once(tmp_path) -> Study:
    """A study whose one cell `ce/rep0/fold0` was submitted as task 99_0 of array 99."""
    study = Study(tmp_path, PLAIN)
    (tmp_path / "slurm").mkdir()
    jobs = [{"job_id": "99", "job_name": "study-x", "script": "x", "cells": ["ce/rep0/fold0"]}]
    (tmp_path / "slurm" / "jobs.json").write_text(json.dumps(jobs))
    return study


@pytest.mark.parametrize("executor", ["local", "slurm"])
def test_no_cell_is_started_while_squeue_cannot_say_whether_it_is_queued(
    tmp_path, monkeypatch, capsys, executor
):
    """The local executor trained a cell whose SLURM task still waited in the queue when `squeue`
    did not answer (the guard held for `--executor slurm` only): two trainings, one folder."""
    study = _submitted_once(tmp_path)  # never started: its task may still wait
    monkeypatch.setattr(slurm, "queue_states", lambda ids: None)
    args = argparse.Namespace(executor=executor, dry_run=True, devices=None, parallel=1)
    with pytest.raises(StudyError, match="`squeue` did not answer.*nothing started or submitted"):
        commands._start_cells(study, args)
    # `study status` shows the recorded state, and says why it may be out of date (it did not).
    capsys.readouterr()
    assert commands.cell_states(study) == {"ce/rep0/fold0": ("pending", "99_0")}
    assert capsys.readouterr().err == (
        "warning: `squeue` did not answer: cells submitted to SLURM show their last recorded "
        "state (a queued cell reads pending)\n"
    )
    monkeypatch.setattr(slurm, "queue_states", lambda ids: {"99_0": "PENDING"})
    assert commands.cell_states(study) == {"ce/rep0/fold0": ("queued", "99_0")}


def test_a_cell_running_here_stays_running_when_an_older_task_of_it_leaves_the_queue(
    tmp_path, monkeypatch
):
    """A cell submitted once (array 99, long gone) and now trained by the local executor: its
    state has no task of its own, and it read as `interrupted` (runnable: trained twice) because
    task 99_0 was not in the queue. Only the task that runs a cell can leave it interrupted."""
    study = _submitted_once(tmp_path)
    monkeypatch.setattr(slurm, "queue_states", lambda ids: {})  # 99 has left the queue
    cell = study.cell("ce/rep0/fold0")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        here = {"pid": live.pid, "host": socket.gethostname(), "pid_space": pid_space()}
        study.write_state(cell, "running", **here)
        assert commands.cell_states(study)["ce/rep0/fold0"][0] == "running"
        # A cell that task 99_0 itself ran, on another host, is interrupted once 99_0 has left.
        study.write_state(cell, "running", host="elsewhere", pid=1, slurm_job="99_0")
        assert commands.cell_states(study)["ce/rep0/fold0"] == ("interrupted", "99_0")
    finally:
        live.kill()
        live.wait()


def test_a_cell_whose_training_outlives_its_task_here_stays_running(tmp_path, monkeypatch):
    """Task 99_0 ran the cell here; its runner was killed and its `focalnet train` lived on
    (re-parented to init: SLURM's proctrack/linuxproc lets it out of the job, which leaves the
    queue; also while a scancelled training saves its step). The cell read as `interrupted` and
    was submitted again, whose training was refused ("being trained by pid ...") and the cell
    failed, the old training writing on into its log. It stays running while that pid lives."""
    study = _submitted_once(tmp_path)
    monkeypatch.setattr(slurm, "queue_states", lambda ids: {})  # 99 has left the queue
    cell = study.cell("ce/rep0/fold0")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    here = {"host": socket.gethostname(), "pid_space": pid_space(), "slurm_job": "99_0"}
    try:
        dead_runner = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                     capture_output=True, text=True, check=True)  # fmt: skip
        runner = int(dead_runner.stdout)
        study.write_state(cell, "running", pid=runner, child_pid=live.pid, **here)
        assert commands.cell_states(study)["ce/rep0/fold0"] == ("running", "99_0")
    finally:
        live.kill()
        live.wait()
    assert commands.cell_states(study)["ce/rep0/fold0"] == ("interrupted", "99_0")


def test_a_cell_left_running_by_an_earlier_boot_of_this_host_is_interrupted(tmp_path):
    """A cell whose state a reboot (or crash) of this host left `running` read so for good: its
    pid space, which holds the boot, was not this one, so its pids could not be checked, and
    `study run` never ran it again. The state records the boot: an earlier boot of this host
    name is interrupted; this boot in another PID namespace (a container), or a state without
    the boot, cannot be checked and stays running."""
    study = Study(tmp_path, PLAIN)
    cell = study.cell("ce/rep0/fold0")
    host = socket.gethostname()
    cases = [
        ({"boot_id": "0" * 8 + "-earlier-boot"}, "interrupted"),
        ({"boot_id": boot_id()}, "running"),  # another container of this boot
        ({}, "running"),  # written before the boot was recorded
        ({"boot_id": "0" * 8 + "-earlier-boot", "host": "elsewhere"}, "running"),
    ]
    for fields, expected in cases:
        record = {"pid": 1, "host": host, "pid_space": "0123abcd", **fields}
        study.write_state(cell, "running", **record)
        assert study.state(cell).state == expected, fields


def test_an_interrupt_as_the_sbatch_is_noted_in_the_run_lock_waits_for_it(
    tmp_path, monkeypatch, capsys
):
    """A Ctrl-C or SIGTERM that came while the run lock noted its `sbatch` (the note written,
    then fsynced) ended the run at once, without waiting for the `sbatch` that may have
    submitted an array. Here the interrupt comes as the note is written."""
    from focalnet_jax import file_lock

    ended = tmp_path / "ended"
    stand_in = tmp_path / "bin" / "sbatch"
    stand_in.parent.mkdir()
    stand_in.write_text(f"#!/bin/sh\nsleep 1\ntouch {ended}\necho 7\n")
    stand_in.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stand_in.parent}:{os.environ['PATH']}")

    def noted_then_interrupted(lock, note):
        file_lock.note_sharer(lock, note)
        raise KeyboardInterrupt

    monkeypatch.setattr(slurm, "note_sharer", noted_then_interrupted)
    lock = file_lock.acquire_lock(tmp_path / "run.lock")
    try:
        with pytest.raises(KeyboardInterrupt):
            slurm.run_sbatch(tmp_path / "array.sbatch", lock)
        assert ended.exists()  # it waited for its sbatch to end
        assert capsys.readouterr().err.startswith("waiting for sbatch (pid ")
    finally:
        file_lock.release_lock(lock)
