"""A store is written whole or not at all: a failed, stopped or full-disk write leaves nothing and
keeps the old store; folders holding other files are never replaced; a link to a store is kept."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from store_cases import SETTINGS, case

from focalnet_jax.data.preprocess_config import PreprocessConfig
from focalnet_jax.data.store import StoreWriter, open_store
from focalnet_jax.data.store_settings import StaleStoreError, store_settings


def test_store_with_a_corrupt_table_is_replaced_only_with_overwrite(tmp_path):
    """It could not be replaced at all: every write read its settings first and stopped."""
    with StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(case("a", 1), patient_id="p")
        writer.commit()
    (tmp_path / "s" / "cases.json").write_text('{"settings": {')  # truncated
    with pytest.raises(StaleStoreError) as refused:
        StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS)
    table = tmp_path / "s" / "cases.json"
    assert str(refused.value).startswith(f"{table}: not a readable store table (JSONDecodeError(")
    assert str(refused.value).endswith("; pass --overwrite to replace it")
    with StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS, overwrite=True) as writer:
        writer.add(case("b", 2), patient_id="p")
        writer.commit()
    assert open_store(tmp_path / "s").case_ids == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


@pytest.mark.parametrize("table", ['{"cases": ["a"]}', "[1, 2]", "null", '{"settings": null}'])
def test_a_folder_with_an_unreadable_table_and_other_files_is_never_replaced(tmp_path, table):
    """Offered to be replaced with --overwrite, a folder holding files of no store (notes, other
    data) beside a `cases.json` it could not read was deleted whole; tables of a list or null
    were a traceback."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "cases.json").write_text(table)
    (folder / "notes.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(
            FileExistsError, match=r"data exists and is not a preprocessed store \("
        ):
            StoreWriter(folder, ("t2w", "adc"), SETTINGS, overwrite=overwrite)
    assert sorted(p.name for p in folder.iterdir()) == ["cases.json", "notes.txt"]
    (folder / "notes.txt").unlink()  # cases.json alone: no store file to call it a store by
    with pytest.raises(FileExistsError, match="not a preprocessed store"):
        StoreWriter(folder, ("t2w", "adc"), SETTINGS, overwrite=True)


def test_failure_leaves_nothing_and_keeps_old_store(tmp_path):
    with StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(case("old", 1), patient_id="p")
        writer.commit()
    with pytest.raises(RuntimeError), StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS) as w:
        w.add(case("new", 2), patient_id="p")
        raise RuntimeError("case 3 failed")
    assert open_store(tmp_path / "s").case_ids == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    # A finished rewrite replaces the old store.
    with StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(case("new", 2), patient_id="p")
        writer.commit()
    assert open_store(tmp_path / "s").case_ids == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a preprocessed store"):
        StoreWriter(tmp_path / "data", ("t2w",), SETTINGS)


def test_a_store_holding_other_files_is_never_replaced(tmp_path):
    """Preprocessing again with the same settings replaced the store folder whole and deleted
    what else it held (`focalnet folds --out STORE/folds`, a workdir, notes) without a word."""
    store = tmp_path / "s"
    with StoreWriter(store, ("t2w", "adc"), SETTINGS) as writer:
        writer.add(case("a", 1), patient_id="p")
        writer.commit()
    (store / "folds").mkdir()
    (store / "folds" / "fold-0.json").write_text("{}")
    (store / "notes.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError) as refused:
            StoreWriter(store, ("t2w", "adc"), SETTINGS, overwrite=overwrite)
        assert str(refused.value) == (
            f"store {store} holds files that are not the store's (folds, notes.txt): replacing "
            "the store would delete them; move them out of it first"
        )
    assert (store / "folds" / "fold-0.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_a_store_of_other_settings_committed_meanwhile_is_not_replaced(tmp_path):
    """Two runs into one new --out: the settings were checked only when each started, so the
    later commit replaced the earlier run's store of other settings without --overwrite."""
    store = tmp_path / "s"
    other = store_settings(PreprocessConfig(adc_range=(0.0, 2500.0)), ("t2w", "adc"), "all")
    with StoreWriter(store, ("t2w", "adc"), SETTINGS) as first:
        first.add(case("a", 2), patient_id="p")
        with StoreWriter(store, ("t2w", "adc"), other) as second:
            second.add(case("b", 1), patient_id="q")
            second.commit()
        with pytest.raises(StaleStoreError) as refused:
            first.commit()
    assert str(refused.value).startswith(
        f"store {store} exists, meanwhile made with other settings (preprocess.adc_range: "
    )
    assert open_store(store).case_ids == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # the refused run's folder too
    with StoreWriter(store, ("t2w", "adc"), other) as first:  # overtaken by an --overwrite
        first.add(case("a", 2), patient_id="p")
        with StoreWriter(store, ("t2w", "adc"), SETTINGS, overwrite=True) as second:
            second.add(case("b", 1), patient_id="q")
            second.commit()
        with pytest.raises(StaleStoreError, match="meanwhile made with other settings"):
            first.commit()
    assert open_store(store, expected_settings=SETTINGS).case_ids == ["b"]


def test_a_store_reaches_the_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """The arrays and tables were never synced before the rename (and the old store's removal):
    after a crash, zero-filled arrays of the right size would have opened as a store."""
    synced, fsync = [], os.fsync

    def spy(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        return fsync(descriptor)

    monkeypatch.setattr(os, "fsync", spy)
    with StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(case("a", 2), patient_id="p")
        writer.commit(errors_file=True)
    files = {p.name for p in (tmp_path / "s").iterdir()}
    arrays = ("images", "classes", "grade_known", "lesions", "annotated", "slice_index")
    tables = {"cases.json", "fingerprint.json", "errors.csv"}
    assert files == {f"{name}.npy" for name in arrays} | tables
    folder = writer.tmp
    assert {Path(p).name for p in synced if Path(p).parent == folder} == files
    assert str(folder) in synced  # its entries too, before it became `s`


def test_a_store_behind_a_symbolic_link_is_replaced_and_the_link_kept(tmp_path, monkeypatch):
    """`--out` a link to a store on another disk: the link itself became the new store, the
    store it points to stayed old (and was trained on later), a dangling `.old` link was left
    beside; `--out .` inside a store raised ValueError (a path without a name)."""
    with StoreWriter(tmp_path / "disk" / "store", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(case("old", 1), patient_id="p")
        writer.commit()
    (tmp_path / "stores").mkdir()
    link = tmp_path / "stores" / "picai"
    link.symlink_to(tmp_path / "disk" / "store")
    with StoreWriter(link, ("t2w", "adc"), SETTINGS) as writer:
        writer.add(case("new", 1), patient_id="p")
        writer.commit()
    assert link.is_symlink() and [p.name for p in (tmp_path / "stores").iterdir()] == ["picai"]
    assert open_store(tmp_path / "disk" / "store").case_ids == ["new"]
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["store"]
    monkeypatch.chdir(tmp_path / "disk" / "store")
    with StoreWriter(".", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(case("newer", 1), patient_id="p")
        writer.commit()
    assert open_store(tmp_path / "disk" / "store").case_ids == ["newer"]


def test_a_full_disk_names_the_store_and_leaves_nothing(tmp_path):
    """A write on a full disk (`/dev/full`: ENOSPC on flush) names no file; its one-line error
    now names the store, and the temporary store is removed although each close fails again (it
    stopped `abort` before its `rmtree`, leaving the half-written store to fill the disk)."""
    from focalnet_jax.errors import is_user_error, naming_the_disk

    out = tmp_path / "s"
    with pytest.raises(OSError) as raised:
        with naming_the_disk(out), StoreWriter(out, ("t2w", "adc"), SETTINGS) as writer:
            writer.add(case("a", 1), patient_id="p")
            writer._files["images"].close()
            writer._files["images"] = open("/dev/full", "wb")  # noqa: SIM115 (closed by abort)
            writer.add(case("b", 1, seed=1), patient_id="p")
            writer._files["images"].flush()
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(out)
    assert is_user_error(raised.value)
    assert str(raised.value) == f"[Errno 28] No space left on device: '{out}'"
    assert list(tmp_path.iterdir()) == []
    # Without a path it stays an internal error (its traceback shows where).
    assert not is_user_error(OSError(errno.ENOSPC, "No space left on device"))


def test_a_writer_stopped_removes_the_folders_it_made_above_the_store(tmp_path):
    # A run stopped by a bad case or Ctrl-C left `deep/a/b/` behind, empty.
    with (
        pytest.raises(RuntimeError),
        StoreWriter(tmp_path / "deep/a/b/s", ("t2w", "adc"), SETTINGS),
    ):
        raise RuntimeError("a bad case")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()  # a folder that was there before stays
    with pytest.raises(RuntimeError), StoreWriter(tmp_path / "kept/x/s", ("t2w", "adc"), SETTINGS):
        raise RuntimeError("a bad case")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any(
        (tmp_path / "kept").iterdir()
    )


def test_a_stop_once_the_store_is_swapped_in_says_it_was_written(tmp_path, monkeypatch):
    """Ctrl-C while the earlier store was removed (seconds, for a large one) said 'interrupted by
    Ctrl-C' over a store already replaced, and left the earlier one aside."""
    import signal

    from focalnet_jax.data import store as store_module
    from focalnet_jax.errors import Interrupted

    with StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(case("a", 1), patient_id="p")
        writer.commit()
    removing = store_module.remove_replaced

    def interrupted(old, path):
        os.kill(os.getpid(), signal.SIGINT)  # deferred until the removal is done
        removing(old, path)

    monkeypatch.setattr(store_module, "remove_replaced", interrupted)
    other = {**SETTINGS, "slices": "annotated"}
    with StoreWriter(tmp_path / "s", ("t2w", "adc"), other, overwrite=True) as writer:
        writer.add(case("a", 1), patient_id="p")
        with pytest.raises(Interrupted) as stopped:
            writer.commit()
    assert str(stopped.value) == f"interrupted by Ctrl-C once store {tmp_path / 's'} was written"
    assert open_store(tmp_path / "s").settings["slices"] == "annotated"
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # the earlier store removed


def test_a_full_disk_at_the_commit_names_the_store_not_its_temporary_folder(tmp_path, monkeypatch):
    from focalnet_jax.data import store as store_module

    def full(path, errors):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(store_module, "write_errors", full)
    with (
        pytest.raises(OSError) as raised,
        StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS) as w,
    ):
        w.add(case("a", 1), patient_id="p")
        w.commit(errors_file=True)
    assert raised.value.filename == str(tmp_path / "s" / "errors.csv")
    assert list(tmp_path.iterdir()) == []
