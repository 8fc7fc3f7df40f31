"""A cell's attempts: a study killed mid-cell finishes when run again and counts every attempt's
time; a failed cell is reported while the others finish; a failed or signalled command records
its one line; SLURM arrays submit no cell twice and resubmit one whose job was forgotten."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import study_calls
from slurm_cluster import OneNodeCluster
from study_calls import ARMS, ENV, read_csv, require_slurm, study, write_spec
from test_train_helpers import REPO

store = study_calls.store  # a module-scoped fixture
spec_file = study_calls.spec_file  # a module-scoped fixture


@pytest.mark.slow
def test_killed_study_resumes_the_interrupted_cell(store, tmp_path):
    """A study killed mid-cell resumes the cell from its checkpoint. The cell's time counts
    every attempt (its `seconds` counted the last one only): here one killed, one that really
    fails (its `focalnet train` finds no JAX platform of the name given) and the one that
    finishes; the state file, `study status`, runs.csv and report.md give their sum and number."""
    workdir = tmp_path / "killed"
    spec = write_spec(tmp_path / "one_cell.py", store, arms={"ce": ARMS["ce"]}, ensembles={})
    args = ["--spec", str(spec), "--workdir", str(workdir), "--spec.repeats=1"]
    args += ["--spec.folds=(0,)", "--spec.common.train.steps=6"]
    run = [sys.executable, "-m", "focalnet_jax.cli", "study", "run", *args]
    process = subprocess.Popen(
        run,
        env=ENV,
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cell = workdir / "ce" / "rep0" / "fold0"
    first_checkpoint = cell / "checkpoints" / "3"
    deadline = time.time() + 300
    while not first_checkpoint.is_dir() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the study and its cell processes
    process.wait()
    killed_at = time.time()
    assert first_checkpoint.is_dir()
    killed = json.loads((cell / "study_cell.json").read_text())
    assert killed["state"] == "running" and isinstance(killed["pid_started"], int)  # pid reuse
    assert isinstance(killed["child_pid"], int) and isinstance(killed["child_started"], int)
    last_write = max(p.stat().st_mtime for p in [cell, *cell.rglob("*")])
    lived = first_checkpoint.stat().st_mtime - killed["started"]  # removed by the later run
    refused = study("report", "--workdir", str(workdir), check=False)
    assert refused.returncode != 0 and "1 cell not done (ce/rep0/fold0)" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    began = time.time()
    nope = {**ENV, "JAX_PLATFORMS": "nope"}
    failing = study("run", "--workdir", str(workdir), env=nope, check=False, process=True)
    failing_run = time.time() - began
    assert failing.returncode == 1 and "FAILED ce/rep0/fold0" in failing.stdout, failing.stdout
    failed = json.loads((cell / "study_cell.json").read_text())
    began = time.time()
    study("run", "--workdir", str(workdir))
    last_run = time.time() - began
    study("report", "--workdir", str(workdir))
    log = (cell / "cell.log").read_text()
    starts = [int(s) for s in re.findall(r"start at (\d+)", log)]
    assert starts[0] == 0 and starts[-1] > 0  # the last attempt resumed from a checkpoint
    assert len(read_csv(workdir / "report" / "runs.csv")) == 1
    # The killed attempt counts until its last sign of life (the latest write in its folder): at
    # least until its first checkpoint, at most until it was killed.
    killed_s = round(last_write - killed["started"], 1)
    assert lived - 0.1 <= killed_s <= killed_at - killed["started"] + 0.1
    assert failed["state"] == "failed" and failed["attempt_seconds"] == [
        killed_s,
        failed["seconds"],
    ]
    state = json.loads((cell / "study_cell.json").read_text())
    assert state["attempt_seconds"] == [killed_s, failed["seconds"], state["seconds"]]
    assert 0 < failed["seconds"] <= failing_run and 0 < state["seconds"] <= last_run
    total = state["total_seconds"]
    assert state["attempts"] == 3 and total == pytest.approx(
        sum(state["attempt_seconds"]), abs=0.051
    )
    status = study("status", "--workdir", str(workdir)).stdout
    assert re.search(rf"ce/rep0/fold0\s+done\s+{total}\s+3\s", status), status
    [row] = read_csv(workdir / "report" / "runs.csv")
    assert float(row["total_seconds"]) == total and row["attempts"] == "3"
    report = (workdir / "report" / "report.md").read_text()
    assert f"| ce | {total:.1f} +- n/a | {total / 3600:.3f} | 3 | 1 |" in report, report


@pytest.mark.slow
def test_failed_cell_is_reported_and_the_others_finish(store, tmp_path):
    workdir = tmp_path / "failing"
    # A valid config (so `study run` starts it) whose pretrained weights file is damaged: the
    # cell's `focalnet train` fails when it initialises the model.
    weights = tmp_path / "w.npz"
    weights.write_bytes(b"not an npz archive")
    bad = {"loss": {"name": "focal", "mfl": False}, "model": {"pretrained": str(weights)}}
    spec = write_spec(tmp_path / "failing.py", store, arms={"ce": ARMS["ce"], "fl": bad})
    args = ["--spec", str(spec), "--workdir", str(workdir), "--spec.repeats=1"]
    args += ["--spec.folds=(1,)"]
    done = study("run", *args, check=False)
    assert done.returncode == 1
    log = workdir / "fl" / "rep0" / "fold1" / "cell.log"
    # The cell's state keeps the one-line user error of `focalnet train` (also in its log).
    reason = f"focalnet train: error: pretrained weights {weights}: unreadable .npz file"
    assert f"FAILED fl/rep0/fold1: {reason}" in done.stdout
    assert str(log) in done.stdout and reason in log.read_text()
    status = study("status", "--workdir", str(workdir)).stdout
    assert re.search(r"fl/rep0/fold1\s+failed", status) and re.search(
        r"ce/rep0/fold1\s+done", status
    )
    assert study("report", "--workdir", str(workdir), check=False).returncode != 0
    study("report", "--workdir", str(workdir), "--partial")
    rows = read_csv(workdir / "report" / "runs.csv")
    assert [(r["arm"], r["fold"]) for r in rows] == [("ce", "1")]  # no ensemble without fl


def test_failed_command_records_its_one_line_error(tmp_path):
    from focalnet_jax.study.cell_runner import run_focalnet

    log = tmp_path / "cell.log"
    log.write_text("earlier attempt\n")
    reason = run_focalnet(["folds", f"--store={tmp_path / 'none'}"], log)
    assert reason == f"focalnet folds: error: store {tmp_path / 'none'} does not exist"
    text = log.read_text()
    assert text.startswith("earlier attempt\n$ focalnet folds --store=") and text.endswith(
        reason + "\n"
    )


def test_a_command_killed_by_a_signal_records_the_signal_not_its_last_progress_line(
    tmp_path, monkeypatch
):
    from focalnet_jax.study.cell_runner import run_focalnet

    # A child that prints a progress-bar frame and is then killed (as by the out-of-memory killer).
    child = tmp_path / "python"
    child.write_text("#!/bin/sh\necho 'train:  40%|####      | 160/400'\nkill -9 $$\n")
    child.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(child))
    log = tmp_path / "cell.log"
    assert run_focalnet(["train", "--workdir", "w"], log) == "focalnet train killed by SIGKILL"
    child.write_text("#!/bin/sh\necho 'ValueError: x'\necho '10/400'\nkill -15 $$\n")
    assert run_focalnet(["evaluate"], log) == "focalnet evaluate killed by SIGTERM (ValueError: x)"


def _one_fold_one_repeat_study(spec_file, workdir):
    """The study of `spec_file` cut to fold 0 and one repeat, created (not run) in `workdir`."""
    from focalnet_jax.study.cells import Study
    from focalnet_jax.study.spec import load_spec, validate

    plain = validate(load_spec(str(spec_file), ["--spec.folds=(0,)", "--spec.repeats=1"]), "spec")
    return Study.create(workdir, plain)


@pytest.mark.slow
def test_slurm_submits_no_cell_whose_new_task_waits_in_the_queue(spec_file, tmp_path):
    """A cell whose last task failed (its state records that task) and that was submitted again:
    while the new task waits (held) in the queue, the cell is `queued`, and another `study run`
    submits nothing, so no two tasks train the same cell folder."""
    require_slurm()
    cluster = OneNodeCluster(tmp_path / "cluster")
    env = {**ENV, **cluster.env}
    workdir = tmp_path / "requeued"
    tiny = _one_fold_one_repeat_study(spec_file, workdir)
    failed = tiny.cell("ce/rep0/fold0")
    # What the cell runner of an earlier task (job 0 is never a SLURM job id) left.
    tiny.write_state(failed, "failed", error="RuntimeError: boom", slurm_job="0_0")
    run = ["run", "--workdir", str(workdir), "--executor=slurm"]
    try:
        cluster.start()
        first = study(*run, "--sbatch=--hold", env=env).stdout
        assert "2 to run" in first and "submitted job array" in first
        status = study("status", "--workdir", str(workdir), env=env).stdout
        assert re.search(r"ce/rep0/fold0\s+queued\s+\d+_0", status), status
        again = study(*run, env=env).stdout
        assert "0 to run" in again and "nothing to submit" in again, again
    finally:
        cluster.stop()


@pytest.mark.slow
def test_slurm_array_of_a_study_folder_with_a_space(spec_file, tmp_path):
    """sbatch splits an unquoted `#SBATCH` value at a space and refuses the script ("Invalid
    directive found in batch script"); the folder's name and output path are quoted."""
    require_slurm()
    cluster = OneNodeCluster(tmp_path / "cluster")
    env = {**ENV, **cluster.env}
    workdir = tmp_path / "my study"
    args = ["run", "--spec", str(spec_file), "--workdir", str(workdir), "--executor=slurm"]
    try:
        cluster.start()
        study(*args, "--spec.repeats=1", "--spec.folds=(0,)", "--sbatch=--hold", env=env)
        job = json.loads((workdir / "slurm" / "jobs.json").read_text())[0]["job_id"]
        shown = subprocess.run(
            ["scontrol", "show", "job", f"{job}_0"], env=env, capture_output=True, text=True
        ).stdout
        assert "JobName=study-my study" in shown, shown
        assert f"StdOut={(workdir / 'slurm').resolve()}/{job}_0.out" in shown, shown
    finally:
        cluster.stop()


@pytest.mark.slow
def test_slurm_resubmits_a_cell_whose_forgotten_job_left_it_running(spec_file, tmp_path):
    """A task killed at its time limit leaves its cell `running`; once slurmctld has forgotten the
    job (`MinJobAge`), `squeue -j <job>` fails ('Invalid job id specified'). The cell is then
    `interrupted` and submitted again, not taken for one running elsewhere."""
    from focalnet_jax.data.atomic_files import write_json_atomic

    require_slurm()
    cluster = OneNodeCluster(tmp_path / "cluster")
    env = {**ENV, **cluster.env}
    workdir = tmp_path / "forgotten"
    tiny = _one_fold_one_repeat_study(spec_file, workdir)
    killed = tiny.cell("ce/rep0/fold0")
    # Job 999999 is unknown to the new cluster, as a long-finished job is to a real one.
    tiny.write_state(killed, "running", slurm_job="999999_0")
    jobs = [{"job_id": "999999", "script": "-", "cells": [killed.name]}]
    write_json_atomic(jobs, workdir / "slurm" / "jobs.json")
    try:
        cluster.start()
        status = study("status", "--workdir", str(workdir), env=env).stdout
        assert re.search(r"ce/rep0/fold0\s+interrupted\s+999999_0", status), status
        run = study("run", "--workdir", str(workdir), "--executor=slurm", "--dry-run", env=env)
        assert "0 running or queued elsewhere, 2 to run" in run.stdout, run.stdout
    finally:
        cluster.stop()
