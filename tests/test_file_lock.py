"""`file_lock`: one process holds the lock; a second is refused naming the holder; the system
frees it when the holder is killed (SIGKILL), or, where the holder gave it to a child, once the
child has ended too.
`study run` refuses a second run on one folder with its one-line error."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from focalnet_jax.file_lock import (
    LockHeld,
    acquire_lock,
    exclusive_lock,
    note_sharer,
    release_lock,
)
from focalnet_jax.study.cells import RUN_LOCK, run_lock
from focalnet_jax.study.spec import StudyError

REPO = Path(__file__).resolve().parents[1]
HOLD = "import sys, time; from focalnet_jax.file_lock import acquire_lock; " \
    "lock = acquire_lock(sys.argv[1]); print('held', flush=True); time.sleep(600)"  # fmt: skip


def test_a_held_lock_names_its_holder_and_is_freed_when_the_holder_is_killed(tmp_path):
    path = tmp_path / "run.lock"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], env=env,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout.readline() == "held\n"
        with pytest.raises(LockHeld) as held:
            acquire_lock(path)
        assert held.value.holder == f"pid {child.pid} on {socket.gethostname()}"
        with pytest.raises(StudyError, match=rf"another `study run` \(pid {child.pid} on "):
            with _study_lock(tmp_path, path):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    lock = acquire_lock(path)
    assert path.read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
    release_lock(lock)
    assert path.read_text() == ""


SHARE = "import subprocess, sys, time; from focalnet_jax.file_lock import acquire_lock, " \
    "note_sharer; lock = acquire_lock(sys.argv[1]); child = subprocess.Popen(['sleep', '600'], " \
    "pass_fds=(lock.fileno(),)); note_sharer(lock, f'its child: pid {child.pid}'); " \
    "print(child.pid, flush=True); time.sleep(600)"  # fmt: skip


def test_a_child_given_the_lock_holds_it_until_it_ends_after_the_holder_is_killed(tmp_path):
    """`study run` gives its lock to `sbatch`: killed meanwhile, the lock lasts until `sbatch`
    ends, and the refusal names both."""
    path = tmp_path / "run.lock"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", SHARE, str(path)], env=env,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    child = int(holder.stdout.readline())
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with pytest.raises(LockHeld) as held:
            acquire_lock(path)
        host = socket.gethostname()
        assert held.value.holder == f"pid {holder.pid} on {host}, its child: pid {child}"
    finally:
        os.kill(child, signal.SIGKILL)
    deadline = time.time() + 60
    while True:  # the child is gone once the system has released its files
        try:
            release_lock(acquire_lock(path))
            break
        except LockHeld:
            assert time.time() < deadline, "the lock outlived its holder's child"
            time.sleep(0.05)
    lock = acquire_lock(path)
    note_sharer(lock, "its sbatch: pid 7")
    assert path.read_text() == f"pid {os.getpid()} on {host}, its sbatch: pid 7\n"
    release_lock(lock)


def _study_lock(tmp_path: Path, held: Path):
    """`run_lock` of a study folder whose lock file is `held` (hard-linked: the same file)."""
    study = tmp_path / "study"
    study.mkdir(exist_ok=True)
    os.link(held, study / RUN_LOCK)
    return run_lock(study)


def test_a_second_holder_in_one_process_is_refused_until_the_first_releases(tmp_path):
    path = tmp_path / "run.lock"
    with exclusive_lock(path):
        with pytest.raises(LockHeld) as held:
            acquire_lock(path)
        assert held.value.holder == f"pid {os.getpid()} on {socket.gethostname()}"
    release_lock(acquire_lock(path))


def test_a_holder_removes_the_file_of_its_lock_only_while_the_path_is_still_that_file(tmp_path):
    path = tmp_path / "run.lock"
    lock = acquire_lock(path)
    release_lock(lock, remove=True)
    assert not path.exists()
    lock = acquire_lock(path)
    path.unlink()
    other = acquire_lock(path)  # a new file at the path, held by another holder
    release_lock(lock, remove=True)
    assert path.read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
    release_lock(other, remove=True)
    assert not path.exists()
