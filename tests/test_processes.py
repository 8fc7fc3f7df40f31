"""Whether a recorded process still runs: a zombie does not, a pid now held by a process started at
another time does not, and a pid is judged only from the pid space it was taken in (a study
cell's `running` state, a store writer's temporary folder)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from focalnet_jax.processes import pid_alive, pid_space, process_start
from focalnet_jax.study.cells import STATE_FILE, Cell, Study


def test_a_zombie_process_counts_as_ended():
    """A cell process killed with its parent stays a zombie until init reaps it: `os.kill(pid, 0)`
    still succeeds, but the cell is not running (it was taken for running, and never resumed)."""
    running = subprocess.Popen(["sleep", "30"])
    ended = subprocess.Popen(["true"])  # not waited for: a zombie of this process
    try:
        deadline = time.time() + 10
        while Path(f"/proc/{ended.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.time() < deadline
            time.sleep(0.01)
        assert pid_alive(running.pid) and not pid_alive(ended.pid)
    finally:
        running.kill()
        running.wait()
        ended.wait()
    assert not pid_alive(running.pid) and not pid_alive(ended.pid)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a check as another user")
def test_another_users_process_is_judged_by_its_start_time_and_state():
    """`os.kill(pid, 0)` of another user's process is refused (EPERM): it was taken for running
    whatever its start time, so a pid reused by another user's process kept a dead writer's
    leftovers (and a study cell `running`) for good. /proc still tells its start and state."""
    ended = subprocess.Popen(["true"])  # root's zombie once it ends, not waited for
    deadline = time.time() + 10
    while Path(f"/proc/{ended.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.time() < deadline
        time.sleep(0.01)
    check = (
        "import os, sys; from focalnet_jax.processes import pid_alive, process_start; "
        "s = process_start(1); os.setgid(65534); os.setuid(65534); "
        f"print(pid_alive(1, s), pid_alive(1, s + 1), pid_alive(1), pid_alive({ended.pid}))"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
    ended.wait()
    assert out.stdout.split() == ["True", "False", "True", "False"], out.stderr


def _ended_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_running_cell_is_judged_only_from_its_pid_space(tmp_path):
    """An ended pid makes a `running` cell `interrupted` only when it was recorded in this pid
    space; a cell recorded with this host name in another space (a container with its own PID
    namespace on a shared file system) may run there, and stays `running`. States written before
    the space was kept are judged by host name."""
    study, cell = Study(tmp_path, {}), Cell("ce", 0, 0)
    state_file = study.path(cell) / STATE_FILE
    state_file.parent.mkdir(parents=True)
    other_space = f"{(int(pid_space(), 16) + 1) % 2**32:08x}"
    host, ended = socket.gethostname(), _ended_pid()
    expected = [
        ({"pid_space": pid_space(), "pid": ended}, "interrupted"),
        ({"pid_space": pid_space(), "pid": os.getpid()}, "running"),
        ({"pid_space": other_space, "pid": ended}, "running"),
        ({"pid": ended}, "interrupted"),  # an older state: this host name
        ({"pid": ended, "host": f"not-{host}"}, "running"),
    ]
    for fields, state in expected:
        record = {"state": "running", "host": host, **fields}
        state_file.write_text(json.dumps(record))
        assert study.state(cell).state == state, record


def test_a_pid_reused_by_another_process_leaves_the_cell_interrupted(tmp_path):
    """A cell killed with SIGKILL (the OOM killer) writes no end; once another process held its
    pid, the cell stayed `running` for good: `study run` never resumed it and `study report`
    called it missing. The state records the process's start time beside its pid."""
    me = process_start(os.getpid())
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert process_start(child.pid) >= me  # clock ticks after boot: started after this one
        assert pid_alive(child.pid, process_start(child.pid))
        assert not pid_alive(child.pid, process_start(child.pid) - 1)
    finally:
        child.kill()
        child.wait()
    assert process_start(child.pid) is None and not pid_alive(child.pid, None)
    study, cell = Study(tmp_path, {}), Cell("ce", 0, 0)
    state_file = study.path(cell) / STATE_FILE
    state_file.parent.mkdir(parents=True)
    here = {"state": "running", "pid_space": pid_space(), "pid": os.getpid()}
    for started, state in ((me, "running"), (me - 1, "interrupted"), (None, "running")):
        state_file.write_text(json.dumps({**here, "pid_started": started}))
        assert study.state(cell).state == state, started


def test_a_cell_whose_runner_alone_was_killed_runs_while_its_command_does(tmp_path):
    """`kill` of a local cell runner left its `focalnet train` training; the cell read
    `interrupted` (the runner's pid had ended), and the next `study run` started a second
    training in the same folder. The state records the command's pid and start time too."""
    runner = subprocess.Popen(["true"])
    runner.wait()
    study, cell = Study(tmp_path, {}), Cell("ce", 0, 0)
    state_file = study.path(cell) / STATE_FILE
    state_file.parent.mkdir(parents=True)
    command = subprocess.Popen(["sleep", "30"])
    here = {"state": "running", "pid_space": pid_space(), "pid": runner.pid, "pid_started": 1}
    try:
        record = {**here, "child_pid": command.pid, "child_started": process_start(command.pid)}
        state_file.write_text(json.dumps(record))
        assert study.state(cell).state == "running"
        state_file.write_text(json.dumps({**record, "child_started": record["child_started"] - 1}))
        assert study.state(cell).state == "interrupted"  # that pid is another process's now
    finally:
        command.kill()
        command.wait()
    state_file.write_text(json.dumps(record))
    assert study.state(cell).state == "interrupted"


# A stand-in `study cell` runner: records the cell running as `cell_runner` does (its own pid
# and its command's), with a `sleep` as its command, and is then killed alone (SIGKILL).
_RUNNER_KILLED_ALONE = """
import os, signal, subprocess, sys, time
from focalnet_jax.processes import pid_space, process_start
from focalnet_jax.study.cells import Cell, Study
study, cell = Study(sys.argv[1], {}), Cell(sys.argv[2], 0, 0)
study.path(cell).mkdir(parents=True, exist_ok=True)
command = subprocess.Popen(["sleep", "1.5"], start_new_session=True)
study.write_state(cell, "running", pid=os.getpid(), pid_started=process_start(os.getpid()),
    pid_space=pid_space(), child_pid=command.pid, child_started=process_start(command.pid),
    started=time.time(), command_ends=time.time() + 1.5)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_runner_killed_alone_keeps_its_slot_until_its_command_ends(tmp_path, monkeypatch):
    """A local cell runner killed alone was reported `failed` at once and its slot given to the
    next cell while its `focalnet train` trained on: two trainings on one GPU under
    `--parallel 1`. The slot stays taken until the command ends; the cell is `interrupted`."""
    from focalnet_jax.study import local

    def stand_in(study, cell):
        return [sys.executable, "-c", _RUNNER_KILLED_ALONE, str(study.root), cell.arm]

    monkeypatch.setattr(local, "cell_argv", stand_in)
    study, first, second = Study(tmp_path, {}), Cell("a", 0, 0), Cell("b", 0, 0)
    results = local.run_local(study, [first, second], parallel=1)
    assert results == {
        "a/rep0/fold0": ("interrupted", None, study.log_path(first)),
        "b/rep0/fold0": ("interrupted", None, study.log_path(second)),
    }
    first_ends = study.state(first).record["command_ends"]
    assert study.state(second).record["started"] >= first_ends  # not beside the first's command


def test_a_runner_that_fails_before_writing_its_state_is_failed_not_interrupted(
    tmp_path, monkeypatch
):
    """A cell left `interrupted` by an earlier attempt whose new runner failed at once (a broken
    environment) was reported `interrupted`, 'a re-run resumes it'."""
    from focalnet_jax.study import local

    def broken(study, cell):
        return [sys.executable, "-c", "raise SystemExit('runner broke')"]

    monkeypatch.setattr(local, "cell_argv", broken)
    study, cell = Study(tmp_path, {}), Cell("a", 0, 0)
    study.path(cell).mkdir(parents=True)
    study.write_state(cell, "running", pid=_ended_pid(), pid_space=pid_space())
    assert study.state(cell).state == "interrupted"  # the earlier attempt's
    (end,) = local.run_local(study, [cell], parallel=1).values()
    assert end == (
        "failed", "its runner (`focalnet study cell`) ended with exit status 1 before the cell "
        "started", None,
    )  # fmt: skip


def test_a_runner_killed_before_writing_its_state_is_named_not_an_earlier_attempts_error(
    tmp_path, monkeypatch
):
    """A runner killed during its imports (before its first state write) was reported with the
    error of the cell's earlier attempt (a cause since mended), or '?' and `log: None` for a new
    cell, and its progress line named a cell.log that did not exist."""
    from focalnet_jax.study import local

    def killed(study, cell):
        return [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]

    monkeypatch.setattr(local, "cell_argv", killed)
    study, new, failed = Study(tmp_path, {}), Cell("a", 0, 0), Cell("b", 0, 0)
    study.path(failed).mkdir(parents=True)
    study.write_state(failed, "failed", error="focalnet train: error: an earlier cause", pid=1)
    reason = "its runner (`focalnet study cell`) killed by SIGKILL before the cell started"
    results = local.run_local(study, [new, failed], parallel=1)
    assert results == {"a/rep0/fold0": ("failed", reason, None),
                       "b/rep0/fold0": ("failed", reason, None)}  # fmt: skip
    study.log_path(failed).write_text("an earlier attempt's log\n")
    assert local.run_local(study, [failed], parallel=1)["b/rep0/fold0"].log == study.log_path(
        failed
    )
