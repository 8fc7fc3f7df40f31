"""Files that are either whole or absent: each is written to a temporary name beside its final
path and renamed over it (`os.replace`, atomic on one file system), so a killed or failing write
leaves the previous file (or none), never a half-written one. A folder of outputs is filled under
a temporary name, then renamed over the old one (`replaced_folder`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Collection
from pathlib import Path

from focalnet_jax.data.deferred_signals import signals_deferred
from focalnet_jax.data.writer_folders import (
    missing_folders,
    remove_dead_leftovers,
    remove_empty_folders,
    remove_replaced,
    restore_moved_aside,
    swap_in,
    target_folder,
    writer_folder,
)
from focalnet_jax.errors import UserError, naming_the_disk


@contextlib.contextmanager
def replaced_atomically(path: str | os.PathLike):
    """Yields a temporary path beside `path` to write; renamed to `path` when the block ends
    without an error, removed when it raises (a full or read-only disk names `path`). Creates the
    parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with naming_the_disk(path, tmp):
            yield tmp
            os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):  # not `missing_ok`: a read-only disk refuses even that (EROFS)
            tmp.unlink()


@contextlib.contextmanager
def replaced_outputs(
    out_dir: str | os.PathLike, marker: str, outputs: Collection[str], writer: str = "focalnet"
):
    """Yields a new temporary folder inside `out_dir` (`.<marker>.tmp-<writer>`, made with the
    parents) to write one set of output files in: `marker` (e.g. `metrics.json`) and others of
    `outputs` (its report, its figures). When the block ends without an error the files reach
    the disk, then the earlier set is removed (the files of `outputs`, where `out_dir` holds its
    `marker`: none of it is left beside the new one; without a marker no file is removed, a
    user's file of such a name stays) and the new files are renamed in, `marker` last. When the
    block raises (a full disk) the temporary folder is removed and the earlier set stays whole; a
    Ctrl-C or SIGTERM during the swap waits for its end. Temporary folders of writers that died
    are removed first (`writer`, the command, names them in the log)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(out_dir / marker, writer)
    tmp = writer_folder(out_dir / marker)
    try:
        with naming_the_disk(out_dir, tmp):
            tmp.mkdir()
            yield tmp
            sync_folder(tmp)
        with signals_deferred():  # a Ctrl-C here lost both sets (the new one with `tmp`)
            if (out_dir / marker).is_file():
                for name in outputs:
                    (out_dir / name).unlink(missing_ok=True)
            for file in sorted(tmp.iterdir(), key=lambda file: file.name == marker):
                os.replace(file, out_dir / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(value, path: str | os.PathLike) -> Path:
    """Writes `value` (plain JSON types; NaN refused) as indented JSON to `path`, atomically; its
    bytes reach the disk before the rename, so a machine that crashes leaves the old file or the
    new one, not an empty one (a file system may order the rename first)."""
    text = json.dumps(value, indent=1, allow_nan=False) + "\n"
    with replaced_atomically(path) as tmp:
        with open(tmp, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
    return Path(path)


def sync_folder(folder: Path) -> None:
    """Makes the bytes of every file in `folder` (and of subfolders) and the folder's entries
    reach the disk (fsync), so that a folder renamed into place after it holds whole files, not
    empty or zero-filled ones, even after a crash (a file system may order the rename first)."""
    entries = sorted(folder.rglob("*"))  # one walk: the files, then their folders, deepest first
    for file in (p for p in entries if p.is_file() and not p.is_symlink()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    for sub in reversed([folder, *(p for p in entries if p.is_dir() and not p.is_symlink())]):
        descriptor = os.open(sub, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def replaced_folder(
    path: str | os.PathLike, writer: str = "focalnet", before_swap: Callable[[], None] | None = None
):
    """Yields a new temporary folder beside `path` to fill, named after this process
    (`writer_folders.writer_folder`). When the block ends without an error it becomes `path`
    (`writer_folders.swap_in`: an existing `path` is replaced whole, the old one removed after the
    rename; a process killed between the two renames leaves the old one aside, and the next
    `replaced_folder` of `path` moves it back first). Its files reach the disk before the rename
    (`sync_folder`). When the block raises, the temporary folder is removed, so are the parent
    folders it created, and `path` stays as it was (a full disk
    names `path`, or the file being written there: `errors.naming_the_disk`). Leftovers of
    writers of `path` that died are removed first (`writer`, the command, names them in the log).
    A symbolic link `path` is kept and the folder it points to replaced (`target_folder`).
    `before_swap` is called once the new folder is on disk, right before the rename (e.g. to
    remove what describes the folder it replaces).
    """
    path = target_folder(path)
    created = missing_folders(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    restore_moved_aside(path, writer)
    remove_dead_leftovers(path, writer)
    tmp = writer_folder(path)
    try:
        tmp.mkdir(mode=0o755)
    except OSError as error:  # e.g. under /proc, or read-only: named as the folder asked for
        raise OSError(error.errno, error.strerror, str(path)) from error
    done = False
    try:
        with naming_the_disk(path, tmp):
            yield tmp
            sync_folder(tmp)
        if before_swap is not None:
            before_swap()
        old = swap_in(tmp, path)
        done = True
        remove_replaced(old, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            remove_empty_folders(created)


def check_output_folder(path: Path | None, flag: str = "--out") -> None:
    """Raises a one-line `UserError` naming `flag` when `path` or a folder above it exists as
    something other than a folder."""
    if path is None:
        return
    path = Path(path)
    for where in (path, *path.parents):
        if where.exists():
            if not where.is_dir():
                blocker = "" if where == path else f": {where}"
                raise UserError(f"{flag} {path}{blocker} exists and is not a folder")
            return


def foreign_entries(
    folder: Path, own: Callable[[str], bool], own_folders: Collection[str] = ()
) -> list[str]:
    """The sorted names of what `folder` (a folder a command replaces whole) holds that is not a
    file whose name `own` accepts, nor a folder named in `own_folders`: what replacing it would
    delete. [] where it does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p.name for p in folder.iterdir()
        if not (p.is_file() and own(p.name)) and not (p.is_dir() and p.name in own_folders)
    )  # fmt: skip


def check_replaceable(out: Path, overwrite: bool, marker: str, made_by: str, inputs=()) -> None:
    """Refuses a non-empty folder `out` (to be replaced whole by `replaced_folder`) unless
    `overwrite`, and even then unless it is an earlier output of `made_by` (it holds the file
    `marker`) in which none of the `inputs` (paths or None) lies: any other folder, e.g. the data
    folder, would be deleted whole. One-line `UserError`s naming `out`."""
    out = Path(out)
    check_output_folder(out)
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not overwrite:
        raise UserError(
            f"--out {out} is not empty (outputs of an earlier run?); choose a new folder or add "
            "--overwrite to replace it"
        )
    root = out.resolve()
    inside = [str(p) for p in inputs if p is not None and Path(p).resolve().is_relative_to(root)]
    if inside or not (out / marker).is_file():
        why = f"holds the input {inside[0]}" if inside else f"has no {marker}"
        raise UserError(
            f"--out {out} {why}: it is not the output folder of an earlier {made_by}, and "
            "--overwrite would delete it whole; choose a new folder"
        )
