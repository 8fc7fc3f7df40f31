"""`file_lock`: one process holds the lock; a second is refused naming the holder; the system
frees it when the holder is killed (SIGKILL).
`study run` refuses a second run on one folder with its one-line error."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from focalnet_jax.file_lock import LockHeld, acquire_lock, exclusive_lock, release_lock
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
