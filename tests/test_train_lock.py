"""One training at a time in a workdir (`run_start.training_lock`): a second `train` of a workdir
being trained (a job submitted twice, a requeue while the old job runs) saved the same steps at
once; both runs ended in Orbax tracebacks and left no checkpoint, while their event files mixed."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from test_train_helpers import FakeStore, tiny_config

from focalnet_jax.errors import UserError
from focalnet_jax.training import train_and_evaluate
from focalnet_jax.training.run_start import LOCK_FILE

HOLD = """
import sys, time
from focalnet_jax.file_lock import acquire_lock
lock = acquire_lock(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_a_workdir_being_trained_is_refused_naming_the_run_that_trains_it(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(workdir / LOCK_FILE)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        config = tiny_config(overrides=["--config.loss.mfl=false", "--config.train.steps=2"])
        with pytest.raises(UserError) as refused:
            train_and_evaluate(config, workdir, store=FakeStore())
    finally:
        holder.kill()
        holder.wait()
    assert str(refused.value) == (
        f"workdir {workdir} is being trained by pid {holder.pid} on {socket.gethostname()}: wait "
        "for that run to end, or train in another --workdir"
    )
    assert [p.name for p in workdir.iterdir()] == [LOCK_FILE]  # nothing of this run written


def test_a_refused_start_leaves_no_workdir_and_a_run_no_lock_file(tmp_path):
    config = tiny_config(overrides=["--config.loss.mfl=false", "--config.data.fold=7"])
    with pytest.raises(UserError, match="fold"):
        train_and_evaluate(config, tmp_path / "cv" / "fold7", store=FakeStore())
    assert not (tmp_path / "cv").exists()  # neither the run's folder nor the one above it
    config = tiny_config(overrides=["--config.loss.mfl=false", "--config.train.steps=1"])
    train_and_evaluate(config, tmp_path / "run", store=FakeStore())
    assert (tmp_path / "run" / "config.json").is_file()
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_file_system_without_locks_trains_with_a_warning(tmp_path, monkeypatch, caplog):
    """Where `flock` fails (Lustre mounted without `flock`: ENOSYS), `train` ended in an OSError
    traceback once it took the workdir's lock; it trains unguarded and says so. The lock's other
    users (`predict`, `study run`) refuse in one line naming the file."""
    import errno
    import fcntl
    import logging
    import types

    from focalnet_jax import file_lock
    from focalnet_jax.file_lock import LocksUnsupported, acquire_lock

    def no_locks(file, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    # The project's locks only: JAX's compilation cache keeps its own (a patched `fcntl.flock`
    # left the test session's cache unusable, compiling the step again, ~1 min on 2 cores).
    no_flock = types.SimpleNamespace(flock=no_locks, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB)
    monkeypatch.setattr(file_lock, "fcntl", no_flock)
    config = tiny_config(overrides=["--config.loss.mfl=false", "--config.train.steps=1"])
    with caplog.at_level(logging.WARNING, logger="focalnet_jax.training.run_start"):
        train_and_evaluate(config, tmp_path / "run", store=FakeStore())
    assert (tmp_path / "run" / "config.json").is_file()
    assert [r.getMessage() for r in caplog.records] == [
        f"the file system of {tmp_path / 'run'} has no file locks (Function not implemented): "
        "training without the workdir's lock, so a second run started in it meanwhile is not "
        "refused"
    ]
    with pytest.raises(LocksUnsupported) as refused:
        acquire_lock(tmp_path / "x.lock")
    assert isinstance(refused.value, UserError)
    # A start refused there leaves neither the lock file nor the folders it made.
    config = tiny_config(overrides=["--config.loss.mfl=false", "--config.data.fold=7"])
    with pytest.raises(UserError, match="fold"):
        train_and_evaluate(config, tmp_path / "cv" / "fold7", store=FakeStore())
    assert not (tmp_path / "cv").exists()
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # nor does a run that trained
    assert str(refused.value) == (
        f"{tmp_path / 'x.lock'}: its file system does not support file locks (Function not "
        "implemented); mount it with locks (Lustre: -o flock), or write to a local or "
        "lock-capable file system"
    )
