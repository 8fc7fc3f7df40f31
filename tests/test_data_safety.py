"""Inputs that used to change the stored data silently, refused through `focalnet preprocess` with
one line naming the file, line or setting and the reason: manifest labels, unsafe case ids, a store
made with other settings, and temporary folders of killed runs."""

from __future__ import annotations

import csv
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from focalnet_jax.cli import main
from focalnet_jax.data.case_ids import check_case_id
from focalnet_jax.data.layouts import discover_picai, read_manifest, write_manifest
from focalnet_jax.data.store import open_store
from focalnet_jax.data.store_settings import read_settings
from focalnet_jax.data.writer_folders import (
    pid_space,
    remove_dead_leftovers,
    restore_moved_aside,
    writer_folder,
    writer_lock,
)
from focalnet_jax.errors import UserError
from focalnet_jax.processes import process_start


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(root), "--cases", "2", "--seed", "5", "--small"]) == 0
    return root


@pytest.fixture()
def manifest_rows(dataset):
    """The dataset's two cases as manifest rows (dicts, absolute paths)."""
    path = dataset / "all.csv"
    write_manifest(discover_picai(dataset / "images", dataset / "labels"), path)
    with path.open() as f:
        return list(csv.DictReader(f))


def _write(path, rows, columns=None):
    columns = columns or list(rows[0])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _preprocess(manifest, out, *extra):
    return ["preprocess", "--layout", "manifest", "--manifest", str(manifest), "--out", str(out),
            *extra]  # fmt: skip


def _user_error(capsys, argv) -> str:
    """Runs the CLI expecting a user error: exit status 2, exactly one line on stderr, which is
    returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert str(raised.value) == err.strip()
    return err.strip()


def _only(folder, *names):
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


# --- manifest labels ------------------------------------------------------------------------------


@pytest.mark.parametrize("column", [None, "lable"])
def test_manifest_without_label_column_is_an_error(manifest_rows, tmp_path, capsys, column):
    rows = [{**r, "lable": r["label"]} for r in manifest_rows]
    columns = [c for c in manifest_rows[0] if c != "label"] + ([column] if column else [])
    manifest = _write(tmp_path / "cases.csv", rows, columns)
    line = _user_error(capsys, _preprocess(manifest, tmp_path / "store"))
    assert line.startswith("focalnet preprocess: error: manifest ")
    assert str(manifest) in line and "no 'label' column" in line and "--unlabelled negative" in line
    _only(tmp_path, "cases.csv")
    # --unlabelled skip would leave out every case: still an error.
    line = _user_error(capsys, _preprocess(manifest, tmp_path / "store", "--unlabelled", "skip"))
    assert "no 'label' column" in line and "every case" in line
    # --unlabelled negative: both cases stored without lesions.
    assert main(_preprocess(manifest, tmp_path / "store", "--unlabelled", "negative")) == 0
    store = open_store(tmp_path / "store")
    assert len(store.cases) == 2 and all(r["lesion_classes"] == [] for r in store.cases)
    assert not store.classes.any()


def test_empty_label_cell_names_the_line(manifest_rows, tmp_path, capsys):
    rows = [dict(r) for r in manifest_rows]
    rows[1]["label"] = ""
    manifest = _write(tmp_path / "cases.csv", rows)
    bad = rows[1]["case_id"]
    line = _user_error(capsys, _preprocess(manifest, tmp_path / "store"))
    assert f"manifest {manifest}, line 3: case {bad!r} has an empty label cell" in line
    _only(tmp_path, "cases.csv")
    # skip: the row is left out; negative: stored without lesions; --skip-bad-cases: errors.csv.
    assert main(_preprocess(manifest, tmp_path / "s1", "--unlabelled", "skip")) == 0
    assert open_store(tmp_path / "s1").case_ids == [rows[0]["case_id"]]
    assert main(_preprocess(manifest, tmp_path / "s2", "--unlabelled", "negative")) == 0
    store = open_store(tmp_path / "s2")
    assert store.case_ids == [r["case_id"] for r in rows]
    assert (
        store.case(bad)["lesion_classes"] == [] and store.case(rows[0]["case_id"])["lesion_classes"]
    )
    assert main(_preprocess(manifest, tmp_path / "s3", "--skip-bad-cases")) == 0
    assert open_store(tmp_path / "s3").case_ids == [rows[0]["case_id"]]
    with (tmp_path / "s3" / "errors.csv").open() as f:
        (error,) = list(csv.DictReader(f))
    assert error["case"] == bad and error["file"] == str(manifest)
    assert "line 3" in error["reason"] and "empty label cell" in error["reason"]


def test_prediction_manifests_need_no_labels(manifest_rows, tmp_path):
    columns = [c for c in manifest_rows[0] if c != "label"]
    manifest = _write(tmp_path / "cases.csv", manifest_rows, columns)
    cases = read_manifest(manifest, labels=False)
    assert [c.case_id for c in cases] == [r["case_id"] for r in manifest_rows]
    assert all(c.label is None for c in cases)
    with pytest.raises(UserError, match="no 'label' column"):
        read_manifest(manifest)


# --- case ids -------------------------------------------------------------------------------------


def test_check_case_id_accepts_the_safe_set_only():
    for good in ("ProstateX-0000", "10000_1000000", "a.b_c-D9", "x"):
        assert check_case_id(good, "here") == good
    refused = {"../x": "starts with '.'", ".hidden": "starts with '.'", "a/b": "contains '/'",
               "a b": "contains ' '", "": "is empty", "c:\\x": "contains ':'",
               "é": "contains 'é'"}  # fmt: skip
    for bad, reason in refused.items():
        with pytest.raises(UserError) as raised:
            check_case_id(bad, "manifest m.csv, line 7")
        assert str(raised.value).startswith(f"manifest m.csv, line 7: case id {bad!r} {reason}")


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("case_id", "../escape", "case id '../escape' starts with '.'"),
        ("case_id", "sub/dir", "case id 'sub/dir' contains '/'"),
        ("patient_id", "p 1", "patient id 'p 1' contains ' '"),
    ],
)
def test_unsafe_manifest_id_is_refused(manifest_rows, tmp_path, capsys, column, value, reason):
    rows = [dict(r) for r in manifest_rows]
    rows[1][column] = value
    manifest = _write(tmp_path / "cases.csv", rows)
    line = _user_error(capsys, _preprocess(manifest, tmp_path / "store"))
    assert line == (
        f"focalnet preprocess: error: manifest {manifest}, line 3: {reason}; ids may hold only "
        "letters, digits, '.', '_', '-' and must not start with '.'"
    )
    _only(tmp_path, "cases.csv")
    assert main(_preprocess(manifest, tmp_path / "store", "--skip-bad-cases")) == 0
    assert open_store(tmp_path / "store").case_ids == [rows[0]["case_id"]]
    with (tmp_path / "store" / "errors.csv").open() as f:
        (error,) = list(csv.DictReader(f))
    assert error["case"] == rows[1]["case_id"] and reason in error["reason"]


def test_unsafe_picai_file_name_is_refused(dataset, tmp_path, capsys):
    root = tmp_path / "picai"
    shutil.copytree(dataset, root)
    folder = sorted((root / "images").iterdir())[0]
    first_case = sorted(folder.iterdir())[0].name.rsplit("_", 1)[0]
    for file in folder.glob(f"{first_case}_*"):  # patient "1 0" (a space) in one case's names
        file.rename(folder / file.name.replace(folder.name, "1 0", 1))
    argv = ["preprocess", "--layout", "picai", "--images", str(root / "images"), "--out",
            str(tmp_path / "store"), "--unlabelled", "negative"]  # fmt: skip
    line = _user_error(capsys, argv)
    bad = first_case.replace(folder.name, "1 0", 1)
    assert line.startswith(f"focalnet preprocess: error: PI-CAI image file {folder}/{bad}_")
    assert f"case id {bad!r} contains ' '" in line and not (tmp_path / "store").exists()
    assert main([*argv, "--skip-bad-cases"]) == 0
    assert len(open_store(tmp_path / "store").cases) == 1
    with (tmp_path / "store" / "errors.csv").open() as f:
        (error,) = list(csv.DictReader(f))
    assert error["case"] == bad and error["file"].startswith(f"{folder}/{bad}_")


def test_store_with_unsafe_case_id_is_refused(manifest_rows, tmp_path, capsys):
    manifest = _write(tmp_path / "cases.csv", manifest_rows)
    store = tmp_path / "store"
    assert main(_preprocess(manifest, store)) == 0
    table = json.loads((store / "cases.json").read_text())
    table["cases"][0]["case_id"] = "../../elsewhere"  # a store written before ids were checked
    (store / "cases.json").write_text(json.dumps(table))
    line = _user_error(capsys, ["folds", "--store", str(store), "--num-folds", "2"])
    assert line.startswith(f"focalnet folds: error: store {store / 'cases.json'}: case id ")
    assert "'../../elsewhere' starts with '.'" in line


def test_predictions_are_never_written_under_an_unsafe_name(tmp_path):
    from focalnet_jax.evaluation.predictions import write_case

    arrays = {
        "scores": np.zeros((1, 4, 4, 5), np.float32),
        "lesions": np.zeros((1, 4, 4), np.int32),
    }
    with pytest.raises(
        UserError, match=f"predictions folder {tmp_path}/out: case id '../x' starts"
    ):
        write_case(tmp_path / "out", "../x", **arrays, lesion_classes=[], spacing=(1, 1),
                   patient_id="p")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


# --- a store made with other settings -------------------------------------------------------------


def test_other_settings_need_overwrite(manifest_rows, tmp_path, capsys, caplog):
    manifest = _write(tmp_path / "cases.csv", manifest_rows)
    store = tmp_path / "store"
    assert main(_preprocess(manifest, store)) == 0
    before = (store / "cases.json").read_bytes()
    line = _user_error(capsys, _preprocess(manifest, store, "--interpolator", "linear"))
    assert line == (
        f"focalnet preprocess: error: store {store} exists, made with other settings "
        "(preprocess.interpolator: existing 'bspline', new 'linear'); pass --overwrite to "
        "replace it"
    )
    assert (store / "cases.json").read_bytes() == before
    _only(tmp_path, "cases.csv", "store")
    line = _user_error(capsys, _preprocess(manifest, store, "--slices", "annotated"))
    assert "slices: existing 'all', new 'annotated'" in line
    # Same settings: replaced without asking (as before); other settings with --overwrite.
    assert main(_preprocess(manifest, store)) == 0
    assert main(_preprocess(manifest, store, "--interpolator", "linear", "--overwrite")) == 0
    assert read_settings(store)["preprocess"]["interpolator"] == "linear"
    _only(tmp_path, "cases.csv", "store")


# --- leftovers of killed runs ---------------------------------------------------------------------


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_dead_writers_are_removed_live_ones_kept(manifest_rows, tmp_path, caplog):
    """Removed: a folder of this pid space (host name, boot, PID namespace) whose pid ended.
    Left, each named in a log line: a live writer's, one from another host, one from a container
    with this host name but its own PID namespace (its pid means nothing here), and folders that
    do not name their writer's space."""
    manifest = _write(tmp_path / "cases.csv", manifest_rows)
    host, space = socket.gethostname(), pid_space()
    other = f"{(int(space, 16) + 1) % 2**32:08x}"
    dead = tmp_path / f".store.tmp-{_dead_pid()}@{host}-{space}-0123abcd"
    live = tmp_path / f".store.tmp-{os.getpid()}@{host}-{space}-00000000"
    elsewhere = tmp_path / f".store.tmp-{_dead_pid()}@not-{host}-{other}-11111111"
    container = tmp_path / f".store.tmp-{_dead_pid()}@{host}-{other}-33333333"
    unnamed_space = tmp_path / f".store.tmp-{_dead_pid()}@{host}-44444444"
    legacy = tmp_path / ".store.tmp-k2j3h4g5"
    other_store = tmp_path / f".other.tmp-{_dead_pid()}@{host}-{space}-22222222"
    left = (live, elsewhere, container, unnamed_space, legacy)
    for folder in (dead, *left, other_store):
        folder.mkdir()
        (folder / "images.npy").write_bytes(b"\0" * 256)
    with caplog.at_level(logging.WARNING, logger="focalnet_jax.data"):
        assert main(_preprocess(manifest, tmp_path / "store")) == 0
    _only(tmp_path, "cases.csv", "store", other_store.name, *(folder.name for folder in left))
    messages = [r.getMessage() for r in caplog.records]
    removed = [m for m in messages if m.startswith("removed")]
    pid = dead.name.split("-")[1].split("@")[0]
    assert removed == [f"removed {dead}, left by preprocess pid {pid} that ended"]
    leaving = sorted(m.split(":")[0] for m in messages if m.startswith("leaving"))
    assert leaving == sorted(f"leaving {folder}" for folder in left)
    assert f"written by preprocess pid {container.name.split('-')[1].split('@')[0]} on {host}" in (
        "".join(messages)
    )


def test_a_second_preprocess_into_one_store_meanwhile_is_refused(manifest_rows, tmp_path, capsys):
    """Two runs into one --out both finished, each saying "wrote N cases", and the later one
    replaced the other's store without a word."""
    manifest = _write(tmp_path / "cases.csv", manifest_rows)
    with writer_lock(tmp_path / "store", "preprocess"):
        line = _user_error(capsys, _preprocess(manifest, tmp_path / "store"))
    assert line == (
        f"focalnet preprocess: error: {tmp_path / 'store'} is being written by another focalnet "
        f"preprocess (pid {os.getpid()} on {socket.gethostname()}); wait for it to end"
    )
    _only(tmp_path, "cases.csv")


def test_leftovers_named_before_the_pid_space_say_who_left_them_and_how_to_remove_them(
    tmp_path, caplog
):
    # `.<store>.tmp-<pid>@<host>-<token>` (the naming before the pid space) names a pid that may be
    # another container's with this host name, or an earlier boot's: kept, even with that pid
    # ended here. The line said only "does not name its writer; remove it by hand".
    host, pid = socket.gethostname(), _dead_pid()
    store = tmp_path / "my store"
    old = tmp_path / f".my store.tmp-{pid}@{host}-0123abcd"
    aside = tmp_path / f".my store.tmp-{pid}@{host}-4567cdef.old"
    legacy = tmp_path / ".my store.tmp-k2j3h4g5"
    for folder in (old, aside, legacy):
        folder.mkdir()
    with caplog.at_level(logging.WARNING, logger="focalnet_jax.data"):
        assert remove_dead_leftovers(store) == []
    lines = [r.getMessage() for r in caplog.records]
    tail = f"once no preprocess run writes {store} (on any host or container), "
    assert lines == [
        f"leaving {old}: left by preprocess pid {pid} on {host}, named as before the pid's "
        f"container and boot were recorded, so whether it still runs cannot be checked; {tail}"
        f"remove it: rm -r {shlex.quote(str(old))}",
        f"leaving {aside}: left by preprocess pid {pid} on {host}, named as before the pid's "
        f"container and boot were recorded, so whether it still runs cannot be checked; {tail}"
        f"it may be an earlier {store} that run moved aside: move it elsewhere to keep it, else "
        f"remove it: rm -r {shlex.quote(str(aside))}",
        f"leaving {legacy}: a leftover that does not name its writer; {tail}remove it: rm -r "
        f"{shlex.quote(str(legacy))}",
    ]
    for line, folder in zip(lines, (old, aside, legacy), strict=True):  # the command works
        subprocess.run(line.rpartition(": ")[2], shell=True, check=True, cwd=tmp_path / "..")
        assert not folder.exists()


def test_a_writer_folder_whose_pid_was_reused_is_removed_and_its_store_restored(tmp_path):
    """A writer folder names its process by pid and start time. A live process under that pid
    that started at another time reuses the pid: the writer has ended, its folder is removed and
    a store it moved aside is moved back. Before, a reused pid kept the folder for as long as the
    new process ran. The same pid with its own start time is a live writer: kept."""
    store = tmp_path / "store"
    live = writer_folder(store)
    assert live.name.startswith(f".store.tmp-{os.getpid()}.{process_start(os.getpid())}@")
    start = process_start(os.getpid())
    reused = live.with_name(
        live.name.replace(f"-{os.getpid()}.{start}@", f"-{os.getpid()}.{start - 1}@")
    )
    for folder in (live, reused):
        folder.mkdir()
    assert remove_dead_leftovers(store) == [reused]
    assert live.is_dir() and not reused.exists()
    aside = reused.with_name(reused.name + ".old")
    aside.mkdir()
    (aside / "cases.json").write_text("{}")
    assert restore_moved_aside(store) == aside
    assert (store / "cases.json").read_text() == "{}"


def test_writer_folders_of_a_store_named_with_glob_characters_are_found(tmp_path):
    """`store[1]`'s folders were looked for with the pattern `.store[1].tmp-*`, which matches
    `.store1.tmp-*`: a dead writer's folder of `store[1]` was never removed nor its moved-aside
    store restored, and `store1`'s folders were taken for its own."""
    host, space, pid = socket.gethostname(), pid_space(), _dead_pid()
    store, neighbour = tmp_path / "store[1]", tmp_path / "store1"
    dead = tmp_path / f".store[1].tmp-{pid}@{host}-{space}-0123abcd"
    other = tmp_path / f".store1.tmp-{pid}@{host}-{space}-4567cdef"
    for folder in (dead, dead.with_name(dead.name + ".old"), other):
        folder.mkdir()
    assert restore_moved_aside(store) == dead.with_name(dead.name + ".old")
    assert store.is_dir()
    assert remove_dead_leftovers(store) == [dead]
    assert other.is_dir() and not neighbour.exists()


def test_a_store_moved_aside_by_a_killed_commit_is_restored(manifest_rows, tmp_path, capsys):
    """A commit killed between its two renames leaves the old store as `<folder>.old` and the
    finished new one in its folder, `store` missing. The next run moves the old store back
    before checking its settings (so other settings still need --overwrite), and removes the
    rest."""
    manifest = _write(tmp_path / "cases.csv", manifest_rows)
    store = tmp_path / "store"
    assert main(_preprocess(manifest, store)) == 0
    before = (store / "cases.json").read_bytes()
    folder = tmp_path / f".store.tmp-{_dead_pid()}@{socket.gethostname()}-{pid_space()}-89abcdef"
    shutil.copytree(store, folder)  # the new store, finished
    os.replace(store, folder.with_name(folder.name + ".old"))
    line = _user_error(capsys, _preprocess(manifest, store, "--interpolator", "linear"))
    assert "exists, made with other settings" in line
    assert (store / "cases.json").read_bytes() == before
    _only(tmp_path, "cases.csv", "store", folder.name)
    # With the store in place, a dead writer's `.old` is a leftover like any other.
    os.replace(folder, folder.with_name(folder.name + ".old"))
    assert main(_preprocess(manifest, store)) == 0
    _only(tmp_path, "cases.csv", "store")


def test_a_store_moved_aside_is_named_where_the_store_is_read(manifest_rows, tmp_path):
    """Until the next preprocess moves it back, a store moved aside by a commit killed between
    its two renames was read as "store … does not exist", the folder that holds it not named.
    The line names it and a command that moves it back."""
    manifest = _write(tmp_path / "cases.csv", manifest_rows)
    store = tmp_path / "store"
    assert main(_preprocess(manifest, store)) == 0
    folder = tmp_path / f".store.tmp-{_dead_pid()}@{socket.gethostname()}-{pid_space()}-89abcdef"
    os.replace(store, folder.with_name(folder.name + ".old"))
    with pytest.raises(FileNotFoundError) as refused:
        open_store(store)
    line = str(refused.value)
    assert line.startswith(f"store {store} does not exist; its earlier version was moved aside")
    assert f"{folder.name}.old" in line
    subprocess.run(line.rpartition(": ")[2], shell=True, check=True)
    assert open_store(store).case_ids
    # A store given by a link is replaced where the link points: looked for there.
    (tmp_path / "stores").mkdir()
    os.replace(store, tmp_path / "stores" / "v1")
    (tmp_path / "link").symlink_to(tmp_path / "stores" / "v1")
    aside = tmp_path / "stores" / f".v1{folder.name[len('.store') :]}.old"
    os.replace(tmp_path / "stores" / "v1", aside)
    with pytest.raises(FileNotFoundError, match=f"moved aside to {aside} by a"):
        open_store(tmp_path / "link")


KILLED_WRITER = """
import os, signal, sys
from focalnet_jax.data.store import StoreWriter
from focalnet_jax.data.store_settings import store_settings
writer = StoreWriter(sys.argv[1], ("t2w", "adc"), store_settings(None, ("t2w", "adc")))
print(writer.tmp.name, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writer_leftover_is_removed_by_the_next_run(manifest_rows, tmp_path):
    manifest = _write(tmp_path / "cases.csv", manifest_rows)
    store = tmp_path / "store"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(store)], capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL
    leftover = tmp_path / killed.stdout.strip()
    assert leftover.name.startswith(".store.tmp-") and leftover.is_dir()
    result = subprocess.run(
        [sys.executable, "-m", "focalnet_jax.cli", *_preprocess(manifest, store)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert f"removed {leftover}, left by preprocess pid" in result.stderr
    _only(tmp_path, "cases.csv", "store")


NAMESPACE_WRITER = """
import os, sys, time
from focalnet_jax.data.store import StoreWriter
from focalnet_jax.data.store_settings import store_settings
writer = StoreWriter(sys.argv[1], ("t2w", "adc"), store_settings(None, ("t2w", "adc")))
print(writer.tmp.name, flush=True)
while not os.path.exists(sys.argv[2]):  # writing, until the test is done
    time.sleep(0.05)
"""


def test_a_live_writer_in_another_pid_namespace_keeps_its_folder(manifest_rows, tmp_path):
    """A writer running in a PID namespace of its own (a container with this host name) under a
    pid that no process has here: its folder is a live run's, left and named, not removed."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a PID namespace needs root and util-linux's unshare")
    manifest = _write(tmp_path / "cases.csv", manifest_rows)
    store, done = tmp_path / "store", tmp_path / "done"
    pid = _dead_pid()  # ended here: the writer's pid in its namespace is free in this one
    writer_cmd = " ".join(shlex.quote(a) for a in (sys.executable, "-c", NAMESPACE_WRITER))
    script = f"echo {pid - 1} > /proc/sys/kernel/ns_last_pid; {writer_cmd} {store} {done} & wait"
    unshare = ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script]
    writer = subprocess.Popen(unshare, stdout=subprocess.PIPE, text=True)
    try:
        name = writer.stdout.readline().strip()
        assert name.startswith(f".store.tmp-{pid}."), name
        assert f"@{socket.gethostname()}-" in name, name
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        result = subprocess.run(
            [sys.executable, "-m", "focalnet_jax.cli", *_preprocess(manifest, store)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        assert (tmp_path / name).is_dir()
        notice = f"leaving {tmp_path / name}: written by preprocess pid {pid} on "
        assert notice in result.stderr
    finally:
        done.touch()
        writer.wait(timeout=30)
    assert open_store(store).case_ids == sorted(row["case_id"] for row in manifest_rows)
