"""A local `study run` stopped by SIGTERM while a cell trains: it holds the run lock until the
cell has ended, the cell's `focalnet train` included (before, it ended at once and released the
lock while the cell trained on, and the next `study run` started the cell a second time in the
same folder)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from study_calls import ARMS, ENV, write_spec
from test_train_helpers import REPO, small_synthetic_store

from focalnet_jax.file_lock import LockHeld, acquire_lock, release_lock
from focalnet_jax.processes import pid_alive
from focalnet_jax.study.cells import RUN_LOCK


def _wait_for(condition, what: str, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_study_run_stopped_by_sigterm_holds_its_lock_until_its_cell_has_ended(tmp_path):
    store = small_synthetic_store(tmp_path / "data", cases=8, seed=3)
    spec = write_spec(tmp_path / "one_cell.py", store, arms={"ce": ARMS["ce"]}, ensembles={})
    workdir = tmp_path / "study"
    argv = [sys.executable, "-m", "focalnet_jax.cli", "study", "run", "--spec", str(spec)]
    argv += ["--workdir", str(workdir), "--spec.repeats=1", "--spec.folds=(0,)"]
    argv += ["--spec.common.train.steps=100000"]
    run = subprocess.Popen(
        argv, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    state_file = workdir / "ce" / "rep0" / "fold0" / "study_cell.json"
    train = None
    try:
        _wait_for(lambda: "child_pid" in _read(state_file), "the cell's train started")
        train = _read(state_file)["child_pid"]
        run.send_signal(signal.SIGTERM)  # to `study run` alone: its cell trains on
        time.sleep(2)
        assert run.poll() is None and pid_alive(train)
        with pytest.raises(LockHeld):
            release_lock(acquire_lock(workdir / RUN_LOCK))
        os.kill(train, signal.SIGTERM)  # the training stops at a step, with a checkpoint
        output, _ = run.communicate(timeout=300)
    finally:
        run.kill()
        run.wait()
        if train is not None and pid_alive(train):
            os.kill(train, signal.SIGKILL)
    assert run.returncode == 143, output
    assert "waiting for cell ce/rep0/fold0 (pid " in output
    assert _read(state_file)["state"] != "running"
    release_lock(acquire_lock(workdir / RUN_LOCK))  # free


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
