"""`group_checks.check_same_workdir` as process 1 of a group whose process 0 ran on another host:
the same `--workdir` path on a disk process 0 does not see (node-local scratch) is refused, as is
another folder; the folder process 0 locked, by its own path or another, is accepted. Process 0's
value (what the group's key-value store passes) is given here; tests/test_group_start.py starts
real two-process groups on one host."""

from __future__ import annotations

import json
import os

import jax
import pytest

from focalnet_jax.errors import UserError
from focalnet_jax.file_lock import acquire_lock, release_lock
from focalnet_jax.run.spec import per_device_batch
from focalnet_jax.training import group_checks, group_failures


@pytest.fixture
def as_process_1(monkeypatch):
    """Runs the check as process 1 of 2, process 0's value being set by the test."""
    process0 = {}
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(group_failures, "process0_value", lambda mine: json.dumps(process0))
    monkeypatch.setattr(group_checks, "WORKDIR_WAIT_S", 0.6)
    return process0


def test_the_folder_process_0_locked_is_found_by_any_path_and_no_other(tmp_path, as_process_1):
    shared = tmp_path / "shared"
    shared.mkdir()
    lock = acquire_lock(shared / "train.lock")  # process 0's lock on the shared disk
    try:
        line = (shared / "train.lock").read_text().strip()
        holder = f"{line} (inode {os.stat(shared / 'train.lock').st_ino})"  # as process 0 sees it
        as_process_1.update(path=str(shared), holder=holder)
        (tmp_path / "link").symlink_to(shared)
        for path in (shared, tmp_path / "link", tmp_path / "link" / ".." / "shared"):
            group_checks.check_same_workdir(path, path / "train.lock")
        local = tmp_path / "node-local"  # the same path string, on process 1's own disk
        local.mkdir()
        as_process_1.update(path=str(local))
        for path in (local, tmp_path / "other"):
            with pytest.raises(UserError) as refused:
                group_checks.check_same_workdir(path, path / "train.lock")
            assert str(refused.value) == (
                f"process 1's workdir {path} holds no training lock of process 0, which trains "
                f"in {local}: another folder, or one on a disk process 0 does not see; give "
                "every process the same --workdir, on a file system every process sees"
            )
        # A stale lock of a killed run with process 0's holder line (`pid 1` in a container of
        # the same host name) is another lock.
        (local / "train.lock").write_text(line + "\n")
        with pytest.raises(UserError, match="holds no training lock of process 0"):
            group_checks.check_same_workdir(local, local / "train.lock")
    finally:
        release_lock(lock, remove=True)


def test_nothing_is_compared_where_process_0_took_no_lock(tmp_path, as_process_1):
    """A file system without file locks: process 0 trains unguarded, with a warning."""
    as_process_1.update(path=os.fspath(tmp_path / "elsewhere"), holder=None)
    group_checks.check_same_workdir(tmp_path, tmp_path / "train.lock")


def test_a_batch_the_devices_of_unequal_processes_do_not_divide_names_this_process(monkeypatch):
    """Processes of 1 and 2 devices (refused later, `check_same_device_count`): each process's
    batch message said "2 processes x 1 local devices" of 3 devices, or "2 x 2" of 3."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "local_device_count", lambda: 2)
    with pytest.raises(UserError) as refused:
        per_device_batch(4, 3)
    assert str(refused.value) == (
        "train.batch_size=4 is not divisible by the 3 devices of the 'data' mesh (2 processes, "
        "this one driving 2); choose a multiple of the device count"
    )
