"""Whole or absent: atomic JSON files and output folders (data/atomic_files.py: an interrupted
swap of folders keeps the old one whole and the next writer restores it), and the writers built
on them (metrics.json, <case>.npz)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from focalnet_jax.data.atomic_files import replaced_folder, replaced_outputs, write_json_atomic
from focalnet_jax.errors import UserError, is_user_error
from focalnet_jax.evaluation.predictions import read_case, write_case
from focalnet_jax.evaluation.report import write_json

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("lesion_score.nii.gz", "detections.csv", "overlay.png")


def test_a_failed_json_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    write_json_atomic({"a": 1}, path)
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(ValueError, match="Out of range float"):
        write_json_atomic({"a": float("nan")}, path)  # NaN is refused, before any byte is written
    with pytest.raises(TypeError):
        write_json_atomic({"a": object()}, path)
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(path.parent) == ["metrics.json"]
    write_json({"auc": np.float32(0.5), "nan": np.nan}, path)  # report's writer: JSON-safe first
    assert json.loads(path.read_text()) == {"auc": 0.5, "nan": None}


def test_a_json_write_syncs_the_file_before_renaming_it(tmp_path, monkeypatch):
    """A rename that reached the disk before the file's bytes left an empty file after a crash
    (a study's state file): the bytes are synced first."""
    from focalnet_jax.data import atomic_files

    calls = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(atomic_files.os, "fsync", lambda fd: calls.append("fsync") or fsync(fd))
    monkeypatch.setattr(
        atomic_files.os, "replace", lambda a, b: calls.append("replace") or replace(a, b)
    )
    write_json_atomic({"state": "done"}, tmp_path / "state.json")
    assert calls == ["fsync", "replace"]
    assert json.loads((tmp_path / "state.json").read_text()) == {"state": "done"}


def test_replaced_folder_is_all_new_or_all_old(tmp_path):
    final = tmp_path / "case1"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), replaced_folder(final) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("killed")
    assert os.listdir(tmp_path) == ["case1"] and os.listdir(final) == ["old.txt"]
    with replaced_folder(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert os.listdir(tmp_path) == ["case1"] and os.listdir(final) == ["new.txt"]


def test_a_folder_that_cannot_be_made_is_named_as_the_one_asked_for(capsys):
    """`synth --out /proc/s0` named its temporary folder `/proc/.s0.tmp-<pid>@<host>`."""
    from focalnet_jax.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["synth", "--out", "/proc/s0", "--cases", "1"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 2
    assert line == "focalnet synth: error: [Errno 2] No such file or directory: '/proc/s0'"


def test_a_folder_given_by_a_link_is_replaced_where_the_link_points(tmp_path):
    # `--out results` with `results -> /disk/results`: the link itself was renamed aside and
    # became the new folder, the folder it pointed to kept the old files, and the link moved
    # aside stayed beside it (rmtree refuses a link) after every run.
    real, link = tmp_path / "disk" / "results", tmp_path / "results"
    real.mkdir(parents=True)
    (real / "old.txt").write_text("old")
    link.symlink_to(real)
    for _ in range(2):
        with replaced_folder(link) as tmp:
            (tmp / "new.txt").write_text("new")
    assert link.is_symlink() and link.resolve() == real
    assert os.listdir(real) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["disk", "results"]
    assert os.listdir(real.parent) == ["results"]


def test_the_working_folder_given_as_dot_is_replaced(tmp_path, monkeypatch):
    # `cd results/exam1 && focalnet predict ... --out .`: '.' has no name to put the writer
    # folder beside, and the command ended, after predicting, in a ValueError traceback.
    out = tmp_path / "exam1"
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.chdir(out)
    with replaced_folder(".") as tmp:
        assert tmp.parent == tmp_path
        (tmp / "new.txt").write_text("new")
    assert os.listdir(out) == ["new.txt"] and os.listdir(tmp_path) == ["exam1"]


def test_a_failed_replaced_folder_removes_the_parents_it_created(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), replaced_folder(tmp_path / "kept/new/deeper/out") as tmp:
        (tmp / "x.txt").write_text("x")
        raise RuntimeError("killed")
    assert os.listdir(tmp_path) == ["kept"] and os.listdir(tmp_path / "kept") == []


def _fill(folder, text: str) -> dict[str, str]:
    """Writes OUTPUTS into `folder`, each holding `text`; returns {name: text}."""
    folder.mkdir(exist_ok=True)
    for name in OUTPUTS:
        (folder / name).write_text(text)
    return dict.fromkeys(OUTPUTS, text)


def _contents(folder) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir()}


@pytest.mark.parametrize(("k", "after"), [(1, False), (2, False), (1, True)])
def test_a_swap_interrupted_at_either_rename_keeps_the_old_folder_whole(
    tmp_path, monkeypatch, k, after
):
    """The k-th rename fails (OSError), or Ctrl-C comes right after it (`after`)."""
    out = tmp_path / "out"
    old = _fill(out, "old")
    replace, renames = os.replace, []

    def interrupted_replace(src, dst):
        renames.append((src, dst))
        if len(renames) == k and not after:
            raise OSError("Input/output error")
        replace(src, dst)
        if len(renames) == k:
            raise KeyboardInterrupt

    with pytest.raises((OSError, KeyboardInterrupt)), replaced_folder(out) as tmp:
        _fill(tmp, "new")
        monkeypatch.setattr(os, "replace", interrupted_replace)
    monkeypatch.undo()
    assert _contents(out) == old and os.listdir(tmp_path) == ["out"]
    assert len(renames) == k + (k == 2 or after)  # and the old folder moved back


KILLED_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from focalnet_jax.data.atomic_files import replaced_folder

replace = os.replace

def killed_after_the_first(src, dst):
    replace(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)

with replaced_folder(sys.argv[1], "focalnet predict") as tmp:
    for name in sys.argv[2:]:
        (tmp / name).write_text("new")
    os.replace = killed_after_the_first
"""


def test_a_writer_killed_between_the_renames_loses_nothing_and_the_next_restores(tmp_path):
    """A real kill: the child dies after moving the old folder aside. Nothing is lost: the old
    files lie whole in `<its folder>.old`; the next writer of `out` moves them back first, so a
    failing one leaves `out` all old, and a finishing one all new, with no leftover."""
    out = tmp_path / "out"
    old = _fill(out, "old")
    child = subprocess.run(
        [sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(out), *OUTPUTS],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    aside = [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    written = [p for p in tmp_path.iterdir() if p not in aside]
    assert not out.exists() and len(aside) == 1 and _contents(aside[0]) == old
    assert len(written) == 1 and _contents(written[0]) == dict.fromkeys(OUTPUTS, "new")
    with pytest.raises(RuntimeError), replaced_folder(out) as tmp:
        _fill(tmp, "newer")
        raise RuntimeError("failed")
    assert _contents(out) == old and os.listdir(tmp_path) == ["out"]
    with replaced_folder(out) as tmp:
        new = _fill(tmp, "newer")
    assert _contents(out) == new and os.listdir(tmp_path) == ["out"]


def test_an_earlier_folder_that_cannot_be_removed_is_named_and_never_restored(
    tmp_path, monkeypatch, caplog
):
    """The replaced folder could not be removed (another user's files): it stayed, without a
    word, under the `.old` name a writer killed between the renames leaves, so that once `out`
    was deleted the next run restored it as the earlier `out`."""
    import logging
    import shutil

    from focalnet_jax.data import writer_folders

    out = tmp_path / "out"
    _fill(out, "old")
    real_rmtree = shutil.rmtree

    def denied(path, onerror=None, **kwargs):
        if not Path(path).name.endswith(".old"):
            return real_rmtree(path, onerror=onerror, **kwargs)
        file = os.path.join(path, OUTPUTS[0])
        onerror(
            os.unlink, file, (PermissionError, PermissionError(13, "Permission denied", file), None)
        )

    monkeypatch.setattr(writer_folders.shutil, "rmtree", denied)
    with caplog.at_level(logging.WARNING, logger="focalnet_jax"), replaced_folder(out) as tmp:
        new = _fill(tmp, "new")
    monkeypatch.undo()
    assert _contents(out) == new
    (left,) = [p for p in tmp_path.iterdir() if p != out]
    assert left.name.startswith(".out.replaced-") and _contents(left) == dict.fromkeys(
        OUTPUTS, "old"
    )
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(
        f"could not remove the earlier {out}, now replaced (Permission denied: "
        f"{tmp_path / '.out.tmp-'}"
    )
    assert message.endswith(f".old/{OUTPUTS[0]}); what is left of it is at {left}: rm -r {left}")
    shutil.rmtree(out)
    with pytest.raises(RuntimeError), replaced_folder(out) as tmp:
        raise RuntimeError("failed")
    assert not out.exists() and writer_folders.moved_aside_note(out) == ""


def test_prediction_file_written_atomically_under_its_own_name(tmp_path, monkeypatch):
    scores = np.full((1, 4, 4, 5), 0.25, np.float32)
    lesions = np.zeros((1, 4, 4), np.int32)
    args = dict(lesions=lesions, lesion_classes=np.zeros(0, np.int32), spacing=(0.5, 0.5))
    path = write_case(tmp_path, "c1", scores=scores, patient_id="p1", **args)
    assert os.listdir(tmp_path) == ["c1.npz"] and path == tmp_path / "c1.npz"
    np.testing.assert_array_equal(read_case(path).scores, scores)

    def disk_full(file, **arrays):  # a write that fails half-way
        file.write(b"PK\x03\x04 half")
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_case(tmp_path, "c1", scores=scores * 2, patient_id="p1", **args)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["c1.npz"]
    np.testing.assert_array_equal(read_case(path).scores, scores)


def test_a_write_on_a_read_only_mount_names_the_file_not_its_temporary(tmp_path):
    """The cleanup `unlink(missing_ok=True)` of the temporary file that was never created raised
    EROFS on a read-only mount, in place of the error naming the file: `focalnet train` on a run
    in such a mount said `Read-only file system: 'run/.store.json.tmp-5551'`."""
    mount = tmp_path / "ro"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"no read-only tmpfs can be mounted here: {mounted.stderr.strip()}")
    try:
        with pytest.raises(OSError) as raised:
            write_json_atomic({"a": 1}, mount / "store.json")
        assert (raised.value.errno, raised.value.filename) == (
            errno.EROFS,
            str(mount / "store.json"),
        )
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_ctrl_c_during_the_swap_of_output_files_leaves_the_new_set_whole(tmp_path, monkeypatch):
    """`replaced_outputs` removed the earlier set, then renamed the new files in: a Ctrl-C (or
    SIGTERM) between removed the new files with their temporary folder too (`focalnet evaluate`
    left an empty OUT). The swap ends first now, and the interrupt comes after it."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("metrics.json", "report.md"):
        (out / name).write_text("old")
    replace = os.replace

    def interrupted(src, dst):
        signal.raise_signal(signal.SIGINT)
        replace(src, dst)

    with pytest.raises(KeyboardInterrupt):
        with replaced_outputs(out, "metrics.json", ["report.md", "froc.png"]) as tmp:
            for name in ("metrics.json", "report.md"):
                (tmp / name).write_text("new")
            monkeypatch.setattr(os, "replace", interrupted)
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "metrics.json": "new",
        "report.md": "new",
    }


def test_a_rename_that_another_run_beats_is_one_line_naming_the_folder(tmp_path, monkeypatch):
    """Two runs replacing one folder at once (`predict` of one exam, a store's commit): the loser's
    rename met the other's folder, a traceback naming a temporary name."""
    out = tmp_path / "out"
    replace = os.replace

    def beaten(src, dst):
        (out / "other").mkdir(parents=True, exist_ok=True)  # the other run's commit, just before
        replace(src, dst)

    with pytest.raises(UserError) as raised:
        with replaced_folder(out) as tmp:
            (tmp / "mine").write_text("new")
            monkeypatch.setattr(os, "replace", beaten)
    monkeypatch.undo()
    assert str(raised.value) == (
        f"{out} was replaced by another run while this one wrote it: that run's output is kept "
        "and this one's dropped; run again to replace it"
    )
    assert os.listdir(out) == ["other"] and os.listdir(tmp_path) == ["out"]


def test_a_name_too_long_for_the_temporary_or_a_link_loop_is_one_line(tmp_path):
    """A legal name too long once the temporary's suffix is added, and a link loop given as
    `--out`, ended in tracebacks (ENAMETOOLONG, Python's RuntimeError) naming no output."""
    path = tmp_path / ("x" * 245 + ".json")  # legal; its temporary is >= 257 whatever the pid
    with pytest.raises(OSError) as raised:
        write_json_atomic({"a": 1}, path)
    assert (raised.value.errno, raised.value.filename) == (errno.ENAMETOOLONG, str(path))
    assert is_user_error(raised.value)
    (tmp_path / "loop").symlink_to("loop")
    argv = [sys.executable, "-m", "focalnet_jax.cli", "synth", "--out", "loop", "--cases=1"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (
        2,
        f"focalnet synth: error: {tmp_path / 'loop'}: a loop of symbolic links, naming no folder\n",
    )


AS_NOBODY = """
import json, os, sys
from pathlib import Path
from focalnet_jax.data.atomic_files import replaced_outputs, write_json_atomic
from focalnet_jax.data.writer_folders import writer_lock
os.setgid(65534)
os.setuid(65534)
root = Path(sys.argv[1])
found = []
for write in (
    lambda: write_json_atomic({"a": 1}, root / "closed" / "x.json"),
    lambda: replaced_outputs(root / "closed", "metrics.json", []).__enter__(),
    lambda: writer_lock(root / "closed" / "open", "summarize").__enter__(),
):
    try:
        write()
    except OSError as error:
        found.append(error.filename)
print(json.dumps(found))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to write as another user")
def test_a_folder_refusing_a_write_for_its_permissions_names_the_output():
    """A folder the user may not write named the temporary file or folder that was never made
    (`.x.json.tmp-15070`, `.metrics.json.tmp-…`), and a lock refused in the folder above
    `--out` named `--out`, which could be written."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp())  # below /tmp: another user can reach it
    try:
        os.chmod(root, 0o755)
        (root / "closed" / "open").mkdir(parents=True)
        os.chmod(root / "closed" / "open", 0o777)
        os.chmod(root / "closed", 0o555)
        argv = [sys.executable, "-c", AS_NOBODY, str(root)]
        done = subprocess.run(argv, env=dict(os.environ, PYTHONPATH=str(REPO)),
                              capture_output=True, text=True)  # fmt: skip
        assert json.loads(done.stdout) == [
            str(root / "closed" / "x.json"),
            str(root / "closed"),
            str(root / "closed" / ".open.summarize.lock"),
        ], done.stderr
    finally:
        shutil.rmtree(root)


def test_a_writer_lock_on_a_file_system_without_locks_writes_unguarded(
    tmp_path, monkeypatch, caplog
):
    """Where `flock` fails (Lustre mounted without `flock`), `preprocess`, which took no lock
    before, was refused, and the lock file and the folders made for it were left behind; now the
    block runs with a warning, as `train` does, and leaves no lock file."""
    import fcntl
    import logging
    import types

    from focalnet_jax import file_lock
    from focalnet_jax.data.writer_folders import writer_lock

    def no_locks(file, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    no_flock = types.SimpleNamespace(flock=no_locks, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB)
    monkeypatch.setattr(file_lock, "fcntl", no_flock)
    out = tmp_path / "x" / "store"
    with caplog.at_level(logging.WARNING, logger="focalnet_jax.data.writer_folders"):
        with writer_lock(out, "preprocess"):
            out.mkdir()
    assert os.listdir(tmp_path / "x") == ["store"]
    assert caplog.messages == [
        f"the file system of {out} has no file locks (No locks available): writing it without a "
        "lock, so a second focalnet preprocess into it meanwhile is not refused"
    ]


def test_a_lock_whose_holder_cannot_be_written_leaves_no_lock_or_folder(tmp_path, monkeypatch):
    """A full disk failed the write of the holder into the lock file: the lock stayed taken (its
    file never closed) and the file and the folders made for it were left behind."""
    from focalnet_jax import file_lock
    from focalnet_jax.data.writer_folders import writer_lock

    def full(lock, note):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_lock, "_write_holder", full)
    out = tmp_path / "sub" / "store"
    with pytest.raises(OSError) as raised:
        with writer_lock(out, "preprocess"):
            pytest.fail("the block ran without its lock")
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(out))
    assert os.listdir(tmp_path) == []
