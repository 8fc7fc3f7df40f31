"""The SLURM executor on a one-node cluster started here (tests/slurm_cluster.py): two `study run`
at once on one folder submit each cell once; arrays submitted within one second keep their own
task lists; a task ended by SLURM (`scancel`, time limit) leaves its cell `interrupted` with
slurmstepd's reason in `study status`, and the next `study run` submits it again; a requeued
task appends to its output and its cell counts both attempts; an array whose `study run` was
killed right after `sbatch` is adopted by the next run, not submitted again; one killed while its
`sbatch` still submits leaves the run lock held until that `sbatch` has ended, then is adopted."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import study_calls
from slurm_cluster import KILL_WAIT_S, OneNodeCluster
from study_calls import ARMS, ENV, require_slurm, study, write_spec
from test_train_helpers import REPO

from focalnet_jax.file_lock import LockHeld, acquire_lock, release_lock
from focalnet_jax.study.cells import RUN_LOCK

store = study_calls.store  # a module-scoped fixture
spec_file = study_calls.spec_file  # a module-scoped fixture


@pytest.fixture
def cluster(tmp_path):
    require_slurm()
    started = OneNodeCluster(tmp_path / "cluster")
    try:
        yield started.start()
    finally:
        started.stop()


def _queued_cells(workdir: Path, env: dict) -> list[str]:
    """The cell of every array task in the queue (from each job's task list)."""
    listed = subprocess.run(
        ["squeue", "-h", "-r", "-o", "%i"], env=env, capture_output=True, text=True, check=True
    )
    cells = []
    for job in json.loads((workdir / "slurm" / "jobs.json").read_text()):
        for index, name in enumerate(job["cells"]):
            cells += [name] if f"{job['job_id']}_{index}" in listed.stdout.split() else []
    return cells


@pytest.mark.slow
def test_two_study_runs_at_once_submit_each_cell_once(spec_file, cluster, tmp_path):
    """Each `study run` reads which cells are not done, then submits them: two at once on one
    folder took the same cells, and two tasks trained each cell in one folder. The first run's
    sbatch (the real one) waits here until the second run has ended."""
    entered, release = tmp_path / "entered", tmp_path / "release"
    wrapper = tmp_path / "bin" / "sbatch"
    wrapper.parent.mkdir()
    wrapper.write_text(
        f"#!/bin/sh\nif mkdir {entered} 2>/dev/null; then\n"
        f"  while [ ! -e {release} ]; do sleep 0.1; done\nfi\n"
        f'exec {shutil.which("sbatch")} "$@"\n'
    )
    wrapper.chmod(0o755)
    env = {**ENV, **cluster.env, "PATH": f"{wrapper.parent}:{ENV['PATH']}"}
    workdir = tmp_path / "study"
    args = ["run", "--spec", str(spec_file), "--workdir", str(workdir), "--spec.repeats=1"]
    args += ["--spec.folds=(0,)", "--executor=slurm", "--sbatch=--hold"]
    cli = [sys.executable, "-m", "focalnet_jax.cli", "study"]
    first = subprocess.Popen([*cli, *args], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not entered.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        assert entered.exists(), "the first study run did not reach sbatch"
        second = study(*args, env=env, check=False)
    finally:
        release.touch()
        first_out = first.communicate(timeout=120)[0]
    assert first.returncode == 0 and "submitted job array" in first_out, first_out
    assert second.returncode == 2, second.stdout + second.stderr  # a user error
    assert "another `study run`" in second.stderr, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert sorted(_queued_cells(workdir, env)) == ["ce/rep0/fold0", "fl/rep0/fold0"]
    # The lock ends with its run: the next one finds both cells queued and submits nothing.
    assert "nothing to submit" in study(*args, env=env).stdout


@pytest.mark.slow
def test_arrays_submitted_in_one_second_keep_their_own_task_lists(
    spec_file, cluster, tmp_path, monkeypatch
):
    """The task list was named by the second of submission: a second array in the same second
    overwrote the first's list before its (held) tasks read it, so they ran the wrong cells."""
    from focalnet_jax.study import slurm
    from focalnet_jax.study.cells import Study
    from focalnet_jax.study.spec import load_spec, validate

    for key, value in cluster.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(slurm.time, "strftime", lambda *_: "20260101-000000")  # one second
    plain = validate(load_spec(str(spec_file), ["--spec.folds=(0,)", "--spec.repeats=1"]), "spec")
    tiny = Study.create(tmp_path / "study", plain)
    ce, fl = tiny.cells()
    options = {"extra": ["--hold"]}
    slurm.submit(tiny, [ce], options)
    slurm.submit(tiny, [fl], options)
    jobs = slurm.read_jobs(tiny)
    assert [job["cells"] for job in jobs] == [[ce.name], [fl.name]]
    for job in jobs:
        script = Path(job["script"]).read_text()
        tasks_file = re.search(r"(\S+\.txt)\)$", script, re.M).group(1)
        assert Path(tasks_file).read_text() == job["cells"][0] + "\n"


@pytest.mark.slow
def test_task_ended_by_slurm_is_interrupted_with_its_reason_and_submitted_again(
    store, cluster, tmp_path
):
    """`scancel` (as a time limit or a node failure) kills the cell without a word in its state
    file or cell.log: `study status` showed it `interrupted` with its log path only. It shows
    slurmstepd's line from the task's output, and `study run` submits the cell again."""
    workdir, env, cell_log, job = _one_cell_on_slurm(store, cluster, tmp_path)
    started = lambda: "$ focalnet train" in _text(cell_log)  # noqa: E731
    _wait_for(started, "training started", lambda: _text(cell_log)[-2000:], task=(job, env))
    subprocess.run(["scancel", job], env=env, check=True)
    # The cell is `interrupted` (and its reason shown) once the task has left the queue: after its
    # training has saved its step, up to KILL_WAIT_S after the SIGTERM.
    status = ""

    def cancelled() -> bool:
        nonlocal status
        status = study("status", "--workdir", str(workdir), env=env).stdout
        return "CANCELLED" in status

    _wait_for(cancelled, "the cancelled task in `study status`", lambda: status)
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
    _wait_for(lambda: not _queued_cells(workdir, env), "the released task ended")
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


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


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
    _wait_for(lambda: not _queued_cells(workdir, env), "the released task ended")
    output = workdir / "slurm" / f"{job['job_id']}_0.out"
    assert "sed: can't read" in output.read_text()
    status = study("status", "--workdir", str(workdir), env=env).stdout
    line = rf"ce/rep0/fold0\s+failed\s+{job['job_id']}_0\s+task output: sed: can't read .*\.txt"
    assert re.search(line, status), status
    again = study("run", "--workdir", str(workdir), "--executor=slurm", "--dry-run", env=env)
    assert "0 running or queued elsewhere, 2 to run" in again.stdout, again.stdout


@pytest.mark.slow
def test_run_submits_nothing_while_squeue_does_not_answer(spec_file, cluster, tmp_path):
    """`squeue` fails now and then on a busy controller ('Socket timed out'); sbatch may still
    work. The queued cells then looked pending and were submitted a second time. `squeue` here
    fails as it does then (a stand-in that prints its error), sbatch is the real one."""
    env = {**ENV, **cluster.env}
    workdir = tmp_path / "study"
    args = ["run", "--spec", str(spec_file), "--workdir", str(workdir), "--executor=slurm"]
    args += ["--spec.repeats=1", "--spec.folds=(0,)", "--sbatch=--hold"]
    study(*args, env=env)
    failing = tmp_path / "bin" / "squeue"
    failing.parent.mkdir()
    failing.write_text(
        "#!/bin/sh\necho 'squeue: error: slurm_load_jobs error: Socket timed out on send/recv "
        "operation' >&2\nexit 1\n"
    )
    failing.chmod(0o755)
    busy = {**env, "PATH": f"{failing.parent}:{env['PATH']}"}
    again = study(*args, env=busy, check=False)
    assert again.returncode == 2, again.stdout + again.stderr
    assert "`squeue` did not answer" in again.stderr, again.stderr
    assert len(json.loads((workdir / "slurm" / "jobs.json").read_text())) == 1
    assert sorted(_queued_cells(workdir, env)) == ["ce/rep0/fold0", "fl/rep0/fold0"]


@pytest.mark.slow
def test_a_requeued_task_keeps_the_output_of_its_earlier_run(store, cluster, tmp_path):
    """A requeued task (node failure, preemption, `scontrol requeue`) ran again into a truncated
    output file: slurmstepd's line saying why the first run ended was lost."""
    workdir, env, cell_log, job = _one_cell_on_slurm(store, cluster, tmp_path)
    output = workdir / "slurm" / f"{job}_0.out"
    state_file = cell_log.parent / "study_cell.json"
    records = []

    def logs() -> str:
        return _text(cell_log)[-2000:] + _text(output)[-1000:]

    for attempt, stage in enumerate(("first run started", "requeued run started")):
        starts = lambda n=attempt + 1: _text(cell_log).count("$ focalnet train") >= n  # noqa: E731
        _wait_for(starts, stage, logs, task=(job, env))
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
    _wait_for(lambda: re.search(ended, _text(output)), "both ends in the task output",
              lambda: _text(output)[-2000:])  # fmt: skip


def _wait_for(condition, stage: str, detail=lambda: "", timeout_s=600.0, task=None) -> None:
    """Polls `condition()` every 0.2 s until it holds; fails naming `stage` (with `detail()`)
    after `timeout_s` (generous: a loaded machine starts and stops tasks slowly), or at once
    when job `task` ((job id, env)) has left the queue (its task failed: it will not hold)."""
    deadline = checked = time.time()
    deadline += timeout_s
    while not condition():
        assert time.time() < deadline, (f"{stage}: not within {timeout_s:.0f} s", detail())
        if task and time.time() > checked + 5:
            checked = time.time()
            assert _in_queue(*task) or condition(), (f"{stage}: the job left the queue", detail())
        time.sleep(0.2)


def _in_queue(job: str, env: dict) -> bool:
    """Whether `job` is in the queue (pending, running or completing); True while unknown."""
    listed = ["squeue", "-h", "-o", "%i", "-j", job]
    queued = subprocess.run(listed, env=env, capture_output=True, text=True)
    if queued.returncode == 0:
        return bool(queued.stdout.strip())  # nothing listed: ended, slurmctld still knows it
    return "Invalid job id" not in queued.stderr  # not known any more: ended


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
def test_array_of_a_run_killed_after_sbatch_is_adopted_not_submitted_again(
    store, cluster, tmp_path
):
    """`study run` killed between `sbatch` and writing jobs.json left a queued array that no later
    run knew of: the next run submitted its cells again, and two tasks trained each cell in one
    folder. Here `sbatch` is the real one, then SIGKILLs the `study run` that called it. The
    array's name and cells, written before `sbatch`, let `study status` show it and the next
    `study run` adopt it (or refuse, naming the jobs, while two carry its name); its cell trains
    once."""
    killing = tmp_path / "bin" / "sbatch"
    killing.parent.mkdir()
    killing.write_text(f'#!/bin/sh\n{shutil.which("sbatch")} "$@"\nkill -9 $PPID\n')
    killing.chmod(0o755)
    env = {**ENV, **cluster.env}
    one_arm = write_spec(tmp_path / "one_arm.py", store, {"ce": ARMS["ce"]}, {})
    workdir = tmp_path / "study"
    args = ["run", "--spec", str(one_arm), "--workdir", str(workdir), "--executor=slurm"]
    args += ["--spec.repeats=1", "--spec.folds=(0,)", "--sbatch=--hold"]
    killing_env = {**env, "PATH": f"{killing.parent}:{env['PATH']}"}
    killed = study(*args, env=killing_env, check=False, process=True)  # the run it kills
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    _wait_until_unlocked(workdir)  # the wrapper, which shares the run lock, is ending
    assert not (workdir / "slurm" / "jobs.json").exists()
    [intent] = json.loads((workdir / "slurm" / "submitting.json").read_text())
    [job] = _jobs_named(intent["job_name"], env)
    twin = subprocess.run(["sbatch", "--parsable", intent["script"]], env=env, capture_output=True)
    twin_id = twin.stdout.decode().strip()
    refused = study("run", "--workdir", str(workdir), "--executor=slurm", env=env, check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert f"jobs {job}, {twin_id} are all called {intent['job_name']!r}" in refused.stderr
    subprocess.run(["scancel", twin_id], env=env, check=True)
    _wait_for(lambda: _jobs_named(intent["job_name"], env) == [job], "the twin cancelled")
    status = study("status", "--workdir", str(workdir), env=env).stdout
    assert re.search(rf"ce/rep0/fold0\s+queued\s+{job}_0", status), status
    again = study("run", "--workdir", str(workdir), "--executor=slurm", env=env).stdout
    assert f"adopted job array {job} (1 task)" in again and "nothing to submit" in again, again
    [recorded] = json.loads((workdir / "slurm" / "jobs.json").read_text())
    assert recorded["job_id"] == job and recorded["cells"] == ["ce/rep0/fold0"]
    assert json.loads((workdir / "slurm" / "submitting.json").read_text()) == []
    subprocess.run(["scontrol", "release", job], env=env, check=True)
    state_file = workdir / "ce" / "rep0" / "fold0" / "study_cell.json"
    cell_log = lambda: _text(state_file.parent / "cell.log")[-2000:]  # noqa: E731
    _wait_for(lambda: not _queued_cells(workdir, env), "the adopted task ended", cell_log)
    state = json.loads(state_file.read_text())
    assert state["state"] == "done" and state["slurm_job"] == f"{job}_0", state
    assert state["attempts"] == 1
    assert _text(state_file.parent / "cell.log").count("=== cell ce/rep0/fold0") == 1
    last = study("run", "--workdir", str(workdir), "--executor=slurm", env=env).stdout
    assert "1 done" in last and "nothing to submit" in last, last


@pytest.mark.slow
def test_run_killed_while_its_sbatch_submits_leaves_no_array_untracked(
    spec_file, cluster, tmp_path
):
    """`study run` killed while its `sbatch` was still submitting released the run lock at once:
    the next run found no array in the queue, dropped the intent and submitted the cells again,
    then the first `sbatch` submitted its array too, recorded nowhere, and two tasks trained each
    cell. Here `sbatch` (a wrapper of the real one) SIGKILLs its `study run`, then waits until
    released: the next run meanwhile refuses, naming that `sbatch`, and once it has ended adopts
    its array."""
    release, pid_file = tmp_path / "release", tmp_path / "sbatch.pid"
    wrapper = tmp_path / "bin" / "sbatch"
    wrapper.parent.mkdir()
    workdir = tmp_path / "study"
    wrapper.write_text(  # kills its run once the run lock names it (at most 30 s later)
        f"#!/bin/sh\necho $$ > {pid_file}\nn=0\n"
        f'while ! grep -q "its sbatch: pid $$" {workdir / RUN_LOCK} && [ $n -lt 600 ]; do\n'
        "  sleep 0.05; n=$((n + 1))\ndone\nkill -9 $PPID\n"
        f"while [ ! -e {release} ]; do sleep 0.1; done\n"
        f'exec {shutil.which("sbatch")} "$@"\n'
    )
    wrapper.chmod(0o755)
    env = {**ENV, **cluster.env}
    args = ["run", "--spec", str(spec_file), "--workdir", str(workdir), "--executor=slurm"]
    args += ["--spec.repeats=1", "--spec.folds=(0,)", "--sbatch=--hold"]
    try:
        wrapped = {**env, "PATH": f"{wrapper.parent}:{env['PATH']}"}
        killed = study(*args, env=wrapped, check=False, process=True)  # the run it kills
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        refused = study(*args, env=env, check=False)  # its sbatch would be the real one
    finally:
        release.touch()
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused
    holder = (
        rf"another `study run` \(pid \d+ on \S+, its sbatch: pid {pid_file.read_text().strip()}\)"
    )
    assert re.search(holder, refused.stderr), refused.stderr
    _wait_until_unlocked(workdir)
    [intent] = json.loads((workdir / "slurm" / "submitting.json").read_text())
    [job] = _jobs_named(intent["job_name"], env)
    again = study(*args, env=env).stdout
    assert f"adopted job array {job} (2 tasks)" in again and "nothing to submit" in again, again
    listed = ["squeue", "-h", "-o", "%F"]
    queued = subprocess.run(listed, env=env, capture_output=True, text=True, check=True).stdout
    assert set(queued.split()) == {job}, queued  # one array, no second one of the same cells
    [recorded] = json.loads((workdir / "slurm" / "jobs.json").read_text())
    assert recorded["job_id"] == job and sorted(recorded["cells"]) == sorted(intent["cells"])


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_waits_for_its_sbatch(signum, spec_file, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) of a `study run` while its `sbatch`
    submitted killed that `sbatch` too, maybe after slurmctld had its array, and released the run
    lock. `sbatch` (here a stand-in that waits until released) is left to end, in a session of
    its own, and the run ends after it, the run lock held until then. SIGTERM (`kill`, a job
    script's trap) ended the run at once, without a word."""
    release, pid_file = tmp_path / "release", tmp_path / "sbatch.pid"
    stand_in = tmp_path / "bin" / "sbatch"
    stand_in.parent.mkdir()
    stand_in.write_text(
        f"#!/bin/sh\necho $$ > {pid_file}\nwhile [ ! -e {release} ]; do sleep 0.1; done\necho 7\n"
    )
    stand_in.chmod(0o755)
    workdir = tmp_path / "study"
    args = ["run", "--spec", str(spec_file), "--workdir", str(workdir), "--executor=slurm"]
    args += ["--spec.repeats=1", "--spec.folds=(0,)"]
    env = {**ENV, "PATH": f"{stand_in.parent}:{ENV['PATH']}"}
    cli = [sys.executable, "-m", "focalnet_jax.cli", "study", *args]
    run = subprocess.Popen(cli, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)  # fmt: skip
    try:
        _wait_for(lambda: _text(pid_file).strip() or run.poll() is not None, "sbatch started")
        sbatch = _text(pid_file).strip()
        noted = f"its sbatch: pid {sbatch}"  # in the run lock once `sbatch` has started
        _wait_for(lambda: noted in _text(workdir / RUN_LOCK), "sbatch noted", timeout_s=60)
        os.killpg(run.pid, signum)  # SIGINT: as a terminal's Ctrl-C
        waiting = run.stderr.readline()
        assert waiting.startswith(f"waiting for sbatch (pid {sbatch}) to end"), waiting
        with pytest.raises(LockHeld, match=f"pid {run.pid} on \\S+, its sbatch: pid {sbatch}$"):
            acquire_lock(workdir / RUN_LOCK)
    finally:
        release.touch()
        rest = run.communicate(timeout=120)[1]
    said = "interrupted by Ctrl-C" if signum == signal.SIGINT else "interrupted by SIGTERM"
    assert run.returncode == 128 + signum and said in rest, rest
    _wait_until_unlocked(workdir, timeout_s=5)  # the run has waited for its sbatch
    [intent] = json.loads((workdir / "slurm" / "submitting.json").read_text())  # to adopt
    assert intent["cells"] == ["ce/rep0/fold0", "fl/rep0/fold0"], intent


def _wait_until_unlocked(workdir: Path, timeout_s: float = 120.0) -> None:
    """Waits until no process holds the study's run lock (a killed run's `sbatch` shares it)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            release_lock(acquire_lock(workdir / RUN_LOCK))
            return
        except LockHeld as held:
            assert time.time() < deadline, f"run lock still held by {held.holder}"
            time.sleep(0.1)


def _jobs_named(name: str, env: dict) -> list[str]:
    """The ids of the job arrays called `name` in the queue."""
    listed = ["squeue", "-h", "-o", "%F", f"--name={name}"]
    queued = subprocess.run(listed, env=env, capture_output=True, text=True, check=True).stdout
    return sorted(set(queued.split()))


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
        return _text(cell_log)[-2000:] + _text(output)[-1000:]

    # Until the progress bar shows a step: the training loop runs.
    steps = re.compile(r"\b[1-9]\d*/5000\b")
    _wait_for(lambda: steps.search(_text(cell_log)), "training", logs, task=(job, env))
    subprocess.run(["scontrol", "requeue", f"{job}_0"], env=env, check=True)
    stopped = re.compile(
        r"focalnet train: stopped by SIGTERM at step (\d+) in \S+; checkpoint saved"
    )
    # SIGKILL comes KILL_WAIT_S after SIGTERM: the message comes before, or never.
    _wait_for(
        lambda: stopped.search(_text(cell_log)), "stopped", logs, KILL_WAIT_S + 60, (job, env)
    )
    step = int(stopped.search(_text(cell_log)).group(1))
    checkpoints = sorted(
        p.name for p in (workdir / "ce" / "rep0" / "fold0" / "checkpoints").iterdir()
    )
    assert str(step) in checkpoints, (step, checkpoints)
    _start_now(f"{job}_0", env)
    _wait_for(lambda: f"start at {step}," in _text(cell_log), "resumed", logs, task=(job, env))
    subprocess.run(["scancel", job], env=env, check=True)
