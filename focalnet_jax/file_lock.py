"""An exclusive lock held by one process on a file (`fcntl.flock`): the system releases it when
the process ends, also when it is killed (SIGKILL, a node lost), so a lock is never left stale. A
child given the lock's file (`subprocess.Popen(pass_fds=...)`) shares it: the lock then lasts until
the holder and that child have both ended. The holder writes its pid and host (and such a child's
pid, `note_sharer`) into the file, for the refusal of a second process to name."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from focalnet_jax.errors import UserError

# `flock` on a file system that has no locks (Lustre mounted without `flock`, some FUSE and
# network file systems).
_NO_LOCKS = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})


class LockHeld(Exception):
    """Another process holds the lock; `holder` is what it wrote ('pid N on HOST')."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


class LocksUnsupported(UserError):
    """The file system of `path` has no file locks (`flock` fails there)."""

    def __init__(self, path: Path, error: OSError):
        super().__init__(
            f"{path}: its file system does not support file locks ({error.strerror}); mount it "
            "with locks (Lustre: -o flock), or write to a local or lock-capable file system"
        )
        self.path, self.reason = path, error.strerror


def acquire_lock(path: str | os.PathLike) -> IO[str]:
    """Takes the exclusive lock of `path` (created if missing) without waiting and writes this
    process into it; returns the open file that holds it (`release_lock`). Raises `LockHeld` when
    another process holds it, or when `path` was removed or replaced while this one waited for it
    (its holder removed it when done: the lock of that file guards nothing any more), and
    `LocksUnsupported` when its file system has no locks."""
    path = Path(path)
    lock = open(path, "a+")  # noqa: SIM115 - it stays open while the lock is held
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise LockHeld(path, holder) from None
    except OSError as error:
        lock.close()
        if error.errno in _NO_LOCKS:
            raise LocksUnsupported(path, error) from None
        raise
    try:
        same = os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        lock.close()
        raise LockHeld(path, "a process that has just finished with it")
    try:
        _write_holder(lock, "")
    except OSError:  # a full disk: no lock is left taken, nor its file
        release_lock(lock, remove=True)
        raise
    return lock


def note_sharer(lock: IO[str], note: str) -> None:
    """Adds `note` (e.g. 'its sbatch: pid N') to the holder written in the file of `lock`, taken by
    `acquire_lock`: a child that shares the lock holds it on after this process has ended."""
    _write_holder(lock, f", {note}")


def _write_holder(lock: IO[str], note: str) -> None:
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}{note}\n")
    lock.flush()
    os.fsync(lock.fileno())  # seen by other hosts' processes of a group (`group_checks`)


def release_lock(lock: IO[str], remove: bool = False) -> None:
    """Empties the file of a lock taken by `acquire_lock` and releases it; with `remove` the file
    is removed first (while still held, and only if its path is still that file), and a process
    that opened it meanwhile is refused by `acquire_lock` when it gets the lock."""
    try:
        lock.truncate(0)
        if remove and os.stat(lock.name).st_ino == os.fstat(lock.fileno()).st_ino:
            os.unlink(lock.name)
    except FileNotFoundError:
        pass
    finally:
        lock.close()


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Holds the lock of `path` in the block (`acquire_lock`; raises `LockHeld`)."""
    lock = acquire_lock(path)
    try:
        yield
    finally:
        release_lock(lock)
