"""The SLURM executor on a one-node cluster started here (tests/slurm_cluster.py), as SLURM ends its
tasks: a task ended by SLURM (`scancel`, time limit) leaves its cell `interrupted` with slurmstepd's
reason in `study status`, and the next `study run` submits it again; a task that fails before its
cell starts is `failed` with its output; a requeued task appends to its output and its cell counts
both attempts; a task ended while training saves its step, and the requeued task resumes there."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import slurm_calls
import study_calls
from slurm_calls import queued_cells, text, wait_for
from slurm_cluster import KILL_WAIT_S
from study_calls import ARMS, ENV, study, write_spec

store = study_calls.store  # a module-scoped fixture
spec_file = study_calls.spec_file  # a module-scoped fixture
cluster = slurm_calls.cluster  # a fixture


@pytest.mark.slow
def test_task_ended_by_slurm_is_interrupted_with_its_reason_and_submitted_again(
    store, cluster, tmp_path
):
    """`scancel` (as a time limit or a node failure) kills the cell without a word in its state
    file or cell.log: `study status` showed it `interrupted` with its log path only. It shows
    slurmstepd's line from the task's output, and `study run` submits the cell again."""
    workdir, env, cell_log, job = _one_cell_on_slurm(store, cluster, tmp_path)
    started = lambda: "$ focalnet train" in text(cell_log)  # noqa: E731
    wait_for(started, "training started", lambda: text(cell_log)[-2000:], task=(job, env))
    subprocess.run(["scancel", job], env=env, check=True)
    # The cell is `interrupted` (and its reason shown) once the task has left the queue: after its
    # training has saved its step, up to KILL_WAIT_S after the SIGTERM.
    status = ""

    def cancelled() -> bool:
        nonlocal status
        status = study("status", "--workdir", str(workdir), env=env).stdout
        return "CANCELLED" in status

    wait_for(cancelled, "the cancelled task in `study status`", lambda: status)
    line = (
        rf"ce/rep0/fold0\s+interrupted\s+{job}_0\s+[\d.]+\s+1\s+"
        r"ended by SLURM: JOB \d+ ON \S+ CANCELLED AT \S+$"
    )
    assert re.search(line, status, re.M), status
    again = study("run", "--workdir", str(workdir), "--executor=slurm", "--dry-run", env=env)
    assert "0 running or queued elsewhere, 1 to run" in again.stdout, again.stdout
    # Submitted again, its task ends before the cell starts (its task list gone): the earlier
    # attempt's task and reason were shown, the new task's output nowhere.
    study("run", "--workdir", str(workdir), "--executor=slurm", "--sbatch=--hold", env=env)
    second = json.loads((workdir / "slurm" / "jobs.json").read_text())[-1]
    Path(second["script"]).with_suffix(".txt").unlink()
    subprocess.run(["scontrol", "release", second["job_id"]], env=env, check=True)
    wait_for(lambda: not queued_cells(workdir, env), "the released task ended")
    status = study("status", "--workdir", str(workdir), env=env).stdout
    line = rf"ce/rep0/fold0\s+failed\s+{second['job_id']}_0\s+.*task output: sed: can't read"
    assert re.search(line, status), status
    # Then run here (`--executor local`: its attempt records no SLURM task) and failed: its own
    # error is shown, not the last task's output.
    from focalnet_jax.study.cells import Cell, Study

    Study.open(workdir).write_state(Cell("ce", 0, 0), "failed", error="train: a local failure")
    status = study("status", "--workdir", str(workdir), env=env).stdout
    assert re.search(r"ce/rep0/fold0\s+failed\s+.*train: a local failure", status), status


def _one_cell_on_slurm(store: Path, cluster, tmp_path: Path) -> tuple[Path, dict, Path, str]:
    """Submits a one-cell study (arm `ce`, 5000 steps: it runs until stopped) to `cluster`;
    returns (its workdir, the environment reaching the cluster, the cell's log, the job id)."""
    one_arm = write_spec(tmp_path / "one_arm.py", store, {"ce": ARMS["ce"]}, {})
    env = {**ENV, **cluster.env}
    workdir = tmp_path / "study"
    args = ["run", "--spec", str(one_arm), "--workdir", str(workdir), "--executor=slurm"]
    study(*args, "--spec.repeats=1", "--spec.folds=(0,)", "--spec.common.train.steps=5000", env=env)
    job = json.loads((workdir / "slurm" / "jobs.json").read_text())[0]["job_id"]
    return workdir, env, workdir / "ce" / "rep0" / "fold0" / "cell.log", job


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["study", "runs 50%j/study"])
def test_task_that_fails_before_its_cell_starts_is_failed_with_its_output(
    spec_file, cluster, tmp_path, folder
):
    """A task whose shell fails before the cell starts (here its task list is gone; on a cluster,
    e.g., a node without the submitting Python) wrote no state: its cell stayed `pending` with
    nothing said. It is `failed` with the task output's last line. sbatch expands `%` patterns
    anywhere in `--output`: in a folder `runs 50%j` every task's output went to `runs 50<job
    id>`, a folder that does not exist, and each task ended before its shell ran, `failed`
    with no output on every run."""
    env = {**ENV, **cluster.env}
    workdir = tmp_path / folder
    args = ["run", "--spec", str(spec_file), "--workdir", str(workdir), "--executor=slurm"]
    study(*args, "--spec.repeats=1", "--spec.folds=(0,)", "--sbatch=--hold", env=env)
    [job] = json.loads((workdir / "slurm" / "jobs.json").read_text())
    Path(job["script"]).with_suffix(".txt").unlink()
    subprocess.run(["scontrol", "release", job["job_id"]], env=env, check=True)
    wait_for(lambda: not queued_cells(workdir, env), "the released task ended")
    output = workdir / "slurm" / f"{job['job_id']}_0.out"
    assert "sed: can't read" in output.read_text()
    status = study("status", "--workdir", str(workdir), env=env).stdout
    line = rf"ce/rep0/fold0\s+failed\s+{job['job_id']}_0\s+task output: sed: can't read .*\.txt"
    assert re.search(line, status), status
    again = study("run", "--workdir", str(workdir), "--executor=slurm", "--dry-run", env=env)
    assert "0 running or queued elsewhere, 2 to run" in again.stdout, again.stdout


@pytest.mark.slow
def test_a_requeued_task_keeps_the_output_of_its_earlier_run(store, cluster, tmp_path):
    """A requeued task (node failure, preemption, `scontrol requeue`) ran again into a truncated
    output file: slurmstepd's line saying why the first run ended was lost."""
    workdir, env, cell_log, job = _one_cell_on_slurm(store, cluster, tmp_path)
    output = workdir / "slurm" / f"{job}_0.out"
    state_file = cell_log.parent / "study_cell.json"
    records = []

    def logs() -> str:
        return text(cell_log)[-2000:] + text(output)[-1000:]

    for attempt, stage in enumerate(("first run started", "requeued run started")):
        starts = lambda n=attempt + 1: text(cell_log).count("$ focalnet train") >= n  # noqa: E731
        wait_for(starts, stage, logs, task=(job, env))
        records.append((json.loads(state_file.read_text()), time.time()))
        if attempt == 0:
            subprocess.run(["scontrol", "requeue", f"{job}_0"], env=env, check=True)
            _start_now(f"{job}_0", env)
    subprocess.run(["scancel", job], env=env, check=True)
    # The requeued attempt's record counts the killed one: from its start to at most now.
    (first, _), (second, seen) = records
    assert second["attempts"] == 2 and len(second["attempt_seconds"]) == 2, second
    assert 0 < second["attempt_seconds"][0] <= seen - first["started"], (first, second)
    # slurmstepd's line for the requeue, then the one for `scancel` appended after it.
    ended = r"\*\*\* JOB \d+ ON \S+ CANCELLED AT \S+ DUE TO JOB REQUEUE \*\*\*\n"
    ended += r"(.*\n)*.*\*\*\* JOB \d+ ON \S+ CANCELLED AT \S+ \*\*\*"
    wait_for(lambda: re.search(ended, text(output)), "both ends in the task output",
              lambda: text(output)[-2000:])  # fmt: skip


def _start_now(task: str, env: dict, timeout_s: float = 600.0) -> None:
    """Lifts the begin time SLURM gives a requeued task (about two minutes) once it is pending
    again, i.e. once its earlier run has ended (on a loaded node that may take a while), in the
    next second of the clock; returns at once where the requeued run has started already.
    slurmd revoked the earlier run's credential before the task was pending, and refuses a
    credential issued within that second ('Job credential revoked': the requeued task fails)."""
    show = ["scontrol", "show", "job", task]
    update = ["scontrol", "update", f"JobId={task}", "StartTime=now"]
    deadline = time.time() + timeout_s
    while True:
        job = subprocess.run(show, env=env, capture_output=True, text=True).stdout
        if "Restarts=0" not in job and "JobState=RUNNING" in job:
            return
        if "JobState=PENDING" in job:
            time.sleep(1.05 - time.time() % 1)  # into the next second
            lifted = subprocess.run(update, env=env, capture_output=True, text=True)
            if lifted.returncode == 0:
                return
        assert time.time() < deadline, ("requeued task pending", job, timeout_s)
        time.sleep(0.2)


@pytest.mark.slow
def test_a_task_ended_while_training_saves_its_step_and_the_requeued_task_resumes_there(
    store, cluster, tmp_path
):
    """SLURM ends a task (requeue, preemption, time limit, `scancel`) with SIGTERM to all its
    processes, then SIGKILL after KillWait: the cell's `focalnet train` saves the step it is at,
    says so in cell.log and exits with status 143 (the `study cell` above it ends at once, the
    cell is `interrupted` as before); the requeued task's training starts at that step."""
    workdir, env, cell_log, job = _one_cell_on_slurm(store, cluster, tmp_path)
    output = workdir / "slurm" / f"{job}_0.out"

    def logs() -> str:
        return text(cell_log)[-2000:] + text(output)[-1000:]

    # Until the progress bar shows a step: the training loop runs.
    steps = re.compile(r"\b[1-9]\d*/5000\b")
    wait_for(lambda: steps.search(text(cell_log)), "training", logs, task=(job, env))
    subprocess.run(["scontrol", "requeue", f"{job}_0"], env=env, check=True)
    stopped = re.compile(
        r"focalnet train: stopped by SIGTERM at step (\d+) in \S+; checkpoint saved"
    )
    # SIGKILL comes KILL_WAIT_S after SIGTERM: the message comes before, or never.
    wait_for(lambda: stopped.search(text(cell_log)), "stopped", logs, KILL_WAIT_S + 60, (job, env))
    step = int(stopped.search(text(cell_log)).group(1))
    checkpoints = sorted(
        p.name for p in (workdir / "ce" / "rep0" / "fold0" / "checkpoints").iterdir()
    )
    assert str(step) in checkpoints, (step, checkpoints)
    _start_now(f"{job}_0", env)
    wait_for(lambda: f"start at {step}," in text(cell_log), "resumed", logs, task=(job, env))
    subprocess.run(["scancel", job], env=env, check=True)
