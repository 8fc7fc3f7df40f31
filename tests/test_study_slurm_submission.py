"""The SLURM executor on a one-node cluster started here (tests/slurm_cluster.py) submits each cell
once: two `study run` at once on one folder; arrays submitted within one second keep their own task
lists; nothing is submitted while `squeue` does not answer; an array whose `study run` was killed
right after `sbatch` is adopted by the next run, not submitted again; one killed while its `sbatch`
still submits, or interrupted then, leaves the run lock held until that `sbatch` has ended."""

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
import slurm_calls
import study_calls
from slurm_calls import queued_cells, text, wait_for
from study_calls import ARMS, ENV, study, write_spec
from test_train_helpers import REPO

from focalnet_jax.file_lock import LockHeld, acquire_lock, release_lock
from focalnet_jax.study.cells import RUN_LOCK

store = study_calls.store  # a module-scoped fixture
spec_file = study_calls.spec_file  # a module-scoped fixture
cluster = slurm_calls.cluster  # a fixture


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
    assert sorted(queued_cells(workdir, env)) == ["ce/rep0/fold0", "fl/rep0/fold0"]
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
    assert sorted(queued_cells(workdir, env)) == ["ce/rep0/fold0", "fl/rep0/fold0"]


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
    wait_for(lambda: _jobs_named(intent["job_name"], env) == [job], "the twin cancelled")
    status = study("status", "--workdir", str(workdir), env=env).stdout
    assert re.search(rf"ce/rep0/fold0\s+queued\s+{job}_0", status), status
    again = study("run", "--workdir", str(workdir), "--executor=slurm", env=env).stdout
    assert f"adopted job array {job} (1 task)" in again and "nothing to submit" in again, again
    [recorded] = json.loads((workdir / "slurm" / "jobs.json").read_text())
    assert recorded["job_id"] == job and recorded["cells"] == ["ce/rep0/fold0"]
    assert json.loads((workdir / "slurm" / "submitting.json").read_text()) == []
    subprocess.run(["scontrol", "release", job], env=env, check=True)
    state_file = workdir / "ce" / "rep0" / "fold0" / "study_cell.json"
    cell_log = lambda: text(state_file.parent / "cell.log")[-2000:]  # noqa: E731
    wait_for(lambda: not queued_cells(workdir, env), "the adopted task ended", cell_log)
    state = json.loads(state_file.read_text())
    assert state["state"] == "done" and state["slurm_job"] == f"{job}_0", state
    assert state["attempts"] == 1
    assert text(state_file.parent / "cell.log").count("=== cell ce/rep0/fold0") == 1
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
        wait_for(lambda: text(pid_file).strip() or run.poll() is not None, "sbatch started")
        sbatch = text(pid_file).strip()
        noted = f"its sbatch: pid {sbatch}"  # in the run lock once `sbatch` has started
        wait_for(lambda: noted in text(workdir / RUN_LOCK), "sbatch noted", timeout_s=60)
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
