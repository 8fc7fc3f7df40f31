"""Temporary folders of the writers of a whole folder (a store, an exam's predictions): named after
their writer, removed once it has died.

A store (or any folder replaced whole, `atomic_files.replaced_folder`) is written in the sibling
folder `.<name>.tmp-<pid>.<start>@<host>-<space>-<token>`: `pid`, `start` (`process_start`, when
it started; `.<start>` is left out where unknown) and `host` of the writing process, and `space`,
8 hex digits of a hash of the host name, the kernel's boot id and the process's PID namespace
(Linux; elsewhere the host name alone). A pid that runs under another start time was reused: the
writer has ended. The pid can be checked only from the same space: on a shared file system
another host, or a container with the same host name but its own PID namespace (`docker
--network=host`), may be writing right now, and its pid means nothing here. So a leftover is
removed only when its space is this process's and its process has ended; every other one is left
and named in one log line, to be removed by hand once no run writes it (its age proves nothing: a
run elsewhere may take hours). A commit (`swap_in`) moves the old folder aside to `<folder>.old`
before moving the new one in; when its writer died between the two, the next writer moves the old
folder back first (`restore_moved_aside`). A folder named as before the space was
(`.<name>.tmp-<pid>@<host>-<token>`) is never removed: its name cannot tell this PID namespace and
boot from another container's with the same host name, or an earlier boot; its log line names
the pid and host and gives the command that removes it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import re
import secrets
import shlex
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from focalnet_jax.errors import UserError
from focalnet_jax.file_lock import LockHeld, LocksUnsupported, acquire_lock, release_lock
from focalnet_jax.processes import pid_alive, pid_space, process_start

log = logging.getLogger(__name__)

_NAME = (
    r"^\.{name}\.tmp-(?P<pid>\d+)(\.(?P<start>\d+))?@(?P<host>.+)-(?P<space>[0-9a-f]{{8}})"
    r"-[0-9a-f]{{8}}(\.old)?$"
)
# Before the pid space was named (`.<name>.tmp-<pid>@<host>-<token>`): the pid may belong to
# another container with this host name, or to an earlier boot, so its writer cannot be checked.
_OLD_NAME = r"^\.{name}\.tmp-(?P<pid>\d+)@(?P<host>.+)-[0-9a-f]{{8}}(?P<old>\.old)?$"


def target_folder(path: str | os.PathLike) -> Path:
    """The folder to replace for `path`: absolute, without `.` or `..` (`--out .` has no name to
    put a writer folder beside), and where it points when it is a symbolic link, which is kept
    (renamed over, the link itself became the new folder, beside it, and the folder it points
    to was left as it was)."""
    path = Path(os.path.abspath(path))
    try:
        return path.resolve() if path.is_symlink() else path
    except RuntimeError:  # Python 3.11's link loop
        raise UserError(f"{path}: a loop of symbolic links, naming no folder") from None


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and the folders above it that do not exist yet, deepest first: those a writer
    about to make `folder` creates, for `remove_empty_folders` when it fails."""
    return [p for p in (folder, *folder.parents) if not p.exists()]


def remove_empty_folders(folders: list[Path]) -> None:
    """Removes each of `folders` (deepest first) that is empty; one where something else was
    written meanwhile stays (and so do the folders above it)."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def lock_beside(path: str | os.PathLike, command: str) -> Path:
    """`.<name>.<command>.lock` beside `path` (the folder a link `path` points to): the lock of the
    `focalnet <command>` run writing `path`, never inside the folder it replaces."""
    folder = target_folder(path)
    if not folder.name:
        raise UserError(f"--out {path}: a file system's root cannot be an output folder")
    return folder.with_name(f".{folder.name}.{command}.lock")


def take_writer_lock(path: str | os.PathLike, command: str) -> IO[str]:
    """Takes the lock beside `path` (`lock_beside`) for this `focalnet <command>` run; returns it
    (`release_lock`). One line naming the holder while another run holds it."""
    try:
        return acquire_lock(lock_beside(path, command))
    except LockHeld as held:
        raise UserError(
            f"{path} is being written by another focalnet {command} ({held.holder}); wait for it "
            "to end"
        ) from None


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike, command: str) -> Iterator[None]:
    """Holds the lock beside `path` (`take_writer_lock`) in the block, its file removed at the
    end: a second `focalnet <command>` writing `path` meanwhile is refused in one line naming
    this one (two runs mixed their outputs, or the later one replaced the other's without a
    word). On a file system without locks the block runs unguarded, with a warning, as `train`
    does. The folders made for the lock are removed again when the block fails or the lock
    cannot be taken (a user error leaves none)."""
    lock_path = lock_beside(path, command)
    made = missing_folders(lock_path.parent)
    done, lock = False, None
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = take_writer_lock(path, command)
    except LocksUnsupported as unsupported:
        lock_path.unlink(missing_ok=True)  # made by the attempt
        log.warning(
            "the file system of %s has no file locks (%s): writing it without a lock, so a second "
            "focalnet %s into it meanwhile is not refused", path, unsupported.reason, command,
        )  # fmt: skip
    except OSError as error:  # named as the folder asked for, unless the lock file is at fault
        remove_empty_folders(made)
        # (another user's, or its folder, the one above `path`, refuses it)
        refused = error.errno in (errno.EACCES, errno.EPERM)
        at_lock = os.path.lexists(lock_path) or refused and str(error.filename) == str(lock_path)
        raise OSError(error.errno, error.strerror, str(lock_path if at_lock else path)) from None
    except BaseException:  # held by another run
        remove_empty_folders(made)
        raise
    try:
        yield
        done = True
    finally:
        if lock is not None:
            release_lock(lock, remove=True)
        if not done:
            remove_empty_folders(made)


# `swap_in`'s renames failing so: `path` removed, or put back, by another run between them.
_REPLACED_MEANWHILE = (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST)


def writer_folder(path: Path) -> Path:
    """A new temporary folder name for this process writing `path` (not created)."""
    pid, start = os.getpid(), process_start(os.getpid())
    process = f"{pid}" if start is None else f"{pid}.{start}"
    owner = f"{process}@{socket.gethostname()}-{pid_space()}-{secrets.token_hex(4)}"
    return path.with_name(f".{path.name}.tmp-{owner}")


def _writer_folders(path: Path, tail: str = "*"):
    """(folder, match of `_NAME` or None) for each `.<name>.tmp-<tail>` folder beside `path`."""
    pattern = re.compile(_NAME.format(name=re.escape(path.name)))
    for folder in sorted(path.parent.glob(f".{glob.escape(path.name)}.tmp-{tail}")):
        yield folder, pattern.match(folder.name)


def _writer_alive(match: re.Match) -> bool:
    """Whether the writer a `_NAME` match of this pid space names runs (its pid, and its start
    time where the name records one)."""
    start = match["start"]
    return pid_alive(int(match["pid"]), None if start is None else int(start))


def swap_in(tmp: Path, path: Path, aside: Path | None = None) -> Path | None:
    """Renames the finished writer folder `tmp` (`writer_folder(path)`, or another folder beside
    `path` given with `aside`, a `writer_folder(path)` name ending in `.old`) to `path`. An
    existing `path` is first moved aside to `<tmp>.old` (or `aside`): left there if this process
    is killed between the two renames (for `restore_moved_aside`), moved back if either rename
    raises (also Ctrl-C right after the first) before `path` is the new folder; a rename that
    another run's removal or commit of `path` beat is a `UserError` saying so. Returns the
    folder moved aside, for the caller to remove, or None."""
    old = aside or tmp.with_name(f"{tmp.name}.old")
    try:
        if not path.exists():
            os.replace(tmp, path)
            return None
        os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as error:
        if old.exists() and not path.exists():
            os.replace(old, path)
        if isinstance(error, OSError) and error.errno in _REPLACED_MEANWHILE:
            raise UserError(
                f"{path} was replaced by another run while this one wrote it: that run's output "
                "is kept and this one's dropped; run again to replace it"
            ) from error
        raise
    return old


def remove_replaced(old: Path | None, path: Path) -> None:
    """Removes `old`, the folder `swap_in` moved aside from `path` (None: nothing). One that
    cannot be removed whole (e.g. another user's files) is renamed `.<name>.replaced-<token>`,
    which no later run takes for the `.old` of a writer killed between the renames (it would be
    restored as the earlier `path`), and named in one warning with the reason."""
    if old is None:
        return
    errors: list[OSError] = []
    shutil.rmtree(old, onerror=lambda function, file, info: errors.append(info[1]))
    if not os.path.lexists(old):
        return
    left = old.with_name(f".{path.name}.replaced-{secrets.token_hex(4)}")
    try:
        os.replace(old, left)
    except OSError:
        left = old
    reason = f"{errors[0].strerror}: {errors[0].filename}" if errors else "unknown reason"
    log.warning(
        "could not remove the earlier %s, now replaced (%s); what is left of it is at %s: "
        "rm -r %s", path, reason, left, shlex.quote(str(left)),
    )  # fmt: skip


def restore_moved_aside(path: str | os.PathLike, writer: str = "preprocess") -> Path | None:
    """Moves back the old folder at `path` that a writer (`writer`: the command, for the log)
    killed between the two renames of `swap_in` left as `<its folder>.old`: only when `path` is
    missing and the writer is known dead (same pid space, pid ended). Returns the folder restored
    from, if any."""
    path = Path(path)
    if path.exists():
        return None
    for folder, match in _writer_folders(path, "*.old"):
        if match and match["space"] == pid_space() and not _writer_alive(match):
            os.replace(folder, path)
            log.warning(
                "restored %s from %s: %s pid %s ended before it replaced that folder",
                path,
                folder,
                writer,
                match["pid"],
            )
            return folder
    return None


def moved_aside_note(path: str | os.PathLike, writer: str = "preprocess") -> str:
    """For a missing folder `path` (or the folder a link `path` points to): the words naming the
    earlier versions of it that a writer (`writer`: the command) killed between the two renames
    of `swap_in` left moved aside (`.<name>.tmp-….old`), and how to get one back; "" where there
    is none."""
    target = target_folder(path)
    folders = [folder for folder, _ in _writer_folders(target, "*.old")]
    if target.exists() or not folders:
        return ""
    names = ", ".join(str(folder) for folder in folders)
    return (
        f"; its earlier version was moved aside to {names} by a `focalnet {writer}` stopped "
        f"before it replaced {target.name}: run `focalnet {writer}` again (it moves the folder "
        f"back once that run has ended), or move it back: mv {shlex.quote(str(folders[-1]))} "
        f"{shlex.quote(str(target))}"
    )


def remove_dead_leftovers(path: str | os.PathLike, writer: str = "preprocess") -> list[Path]:
    """Removes the temporary folders of writers of `path` that died before committing (same pid
    space, pid ended); names every other one in a log line (`writer`: the command that writes
    `path`). Returns the removed folders."""
    path = Path(path)
    removed = []
    for folder, match in _writer_folders(path):
        if match is None:
            log.warning("%s", _unchecked_leftover(folder, path, writer))
        elif match["space"] != pid_space():
            log.warning(
                "leaving %s: written by %s pid %s on %s, which cannot be checked from here "
                "(another host or container); once no %s run writes %s, remove it: rm -r %s",
                folder,
                writer,
                match["pid"],
                match["host"],
                writer,
                path,
                shlex.quote(str(folder)),
            )
        elif _writer_alive(match):
            log.warning("leaving %s: its writer, pid %s of this host, runs", folder, match["pid"])
        else:
            shutil.rmtree(folder, ignore_errors=True)
            if folder.exists():
                log.warning("could not remove %s, left by %s pid %s", folder, writer, match["pid"])
                continue
            log.warning("removed %s, left by %s pid %s that ended", folder, writer, match["pid"])
            removed.append(folder)
    return removed


def _unchecked_leftover(folder: Path, path: Path, writer: str) -> str:
    """The log line for a leftover beside `path` whose name does not say where its pid can be
    checked (`_OLD_NAME`, or no writer at all): who left it, as far as the name says, and the
    command that removes it once no run writes `path`."""
    old = re.match(_OLD_NAME.format(name=re.escape(path.name)), folder.name)
    who = "a leftover that does not name its writer"
    if old:
        who = (
            f"left by {writer} pid {old['pid']} on {old['host']}, named as before the pid's "
            "container and boot were recorded, so whether it still runs cannot be checked"
        )
    todo = f"remove it: rm -r {shlex.quote(str(folder))}"
    if old and old["old"]:
        todo = (
            f"it may be an earlier {path} that run moved aside: move it elsewhere to keep it, "
            f"else {todo}"
        )
    return (
        f"leaving {folder}: {who}; once no {writer} run writes {path} (on any host or "
        f"container), {todo}"
    )
