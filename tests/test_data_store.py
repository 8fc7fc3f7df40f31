"""The preprocessed store: memory-mapped arrays, case table, fingerprint, atomic writes."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from focalnet_jax.data.geometry import CropGeometry
from focalnet_jax.data.preprocess import PreprocessedCase
from focalnet_jax.data.preprocess_config import PreprocessConfig
from focalnet_jax.data.store import DuplicateCase, StoreWriter, bad_cases_note, open_store
from focalnet_jax.data.store_settings import StaleStoreError, fingerprint, store_settings


def _case(case_id, num_slices, size=8, lesion_class=0, seed=0):
    rng = np.random.default_rng(seed)
    shape = (num_slices, size, size)
    classes = np.zeros(shape, np.int32)
    lesions = np.zeros(shape, np.int32)
    if lesion_class:
        classes[0, 2:4, 2:4] = lesion_class
        lesions[0, 2:4, 2:4] = 1
    geometry = CropGeometry(
        t2w_origin=(-10.0, 5.0, 2.0),
        t2w_spacing=(0.5, 0.5, 3.0),
        t2w_direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),
        corner_index=(100.0 + seed, 90.0),
        spacing=0.625,
        size=size,
        slice_index=tuple(range(2, 2 + num_slices)),
    )
    return PreprocessedCase(
        case_id=case_id,
        components=("t2w", "adc"),
        images=rng.random((*shape, 2), dtype=np.float32),
        classes=classes,
        grade_known=np.ones(shape, np.uint8),
        lesions=lesions,
        lesion_classes=np.array([lesion_class] if lesion_class else [], np.int32),
        lesion_grade_known=np.array([True] if lesion_class else [], bool),
        index_lesion=1 if lesion_class else 0,
        slice_index=np.arange(2, 2 + num_slices, dtype=np.int32),
        annotated=(lesions > 0).any((1, 2)),
        spacing=(0.625, 0.625),
        geometry=geometry,
        center=(0.0, 0.0, 0.0),
        center_source="mask",
    )


SETTINGS = store_settings(PreprocessConfig(), ("t2w", "adc"), "all")


def test_write_and_open_memory_mapped(tmp_path):
    cases = [_case("a", 3, lesion_class=4, seed=1), _case("b", 2, seed=2)]
    with StoreWriter(tmp_path / "store", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(cases[0], patient_id="p1")
        writer.add(cases[1], patient_id="p2")
        writer.commit()
    store = open_store(tmp_path / "store", expected_settings=SETTINGS)
    assert isinstance(store.images, np.memmap) and store.images.shape == (5, 8, 8, 2)
    assert store.images.dtype == np.float32 and store.classes.dtype == np.uint8
    assert store.lesions.dtype == np.int32 and store.annotated.dtype == bool
    np.testing.assert_array_equal(store.images[3:5], cases[1].images)
    np.testing.assert_array_equal(store.classes[0], cases[0].classes[0])
    np.testing.assert_array_equal(store.annotated, [True, False, False, False, False])
    np.testing.assert_array_equal(store.slice_index, [2, 3, 4, 2, 3])
    assert store.case_slices("b") == slice(3, 5)
    record = store.case("a")
    assert record["lesion_classes"] == [4] and record["index_lesion"] == 1
    assert record["patient_id"] == "p1" and record["spacing"] == [0.625, 0.625]
    assert store.patient_max_class() == {"p1": 4, "p2": 0}
    # Crop pixel -> world through the stored geometry: x = -10 + 0.5 * (i0 + col * 1.25).
    x, y, z = store.pixel_to_world("b", 1, 4, 2)
    assert (x, y, z) == pytest.approx(
        (-10 + 0.5 * (102 + 2 * 1.25), 5 + 0.5 * (90 + 4 * 1.25), 2 + 9)
    )
    assert store.world_to_pixel("b", x, y, z) == pytest.approx((1, 4, 2))
    assert not list(tmp_path.glob(".store.tmp-*"))


def test_a_case_stored_twice_is_refused_and_nothing_of_it_written(tmp_path):
    """One exam under two ids (its data byte for byte) would sit in two folds: a model would be
    validated on the exam it trained on. The same id twice left a store `open_store` refused."""
    with StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(_case("a", 3, lesion_class=4, seed=1), patient_id="p1")
        copy = dataclasses.replace(_case("a", 3, lesion_class=4, seed=1), case_id="a-again")
        with pytest.raises(DuplicateCase, match="^case 'a-again': its preprocessed data are those "
                           r"of case 'a' byte for byte: the same exam under two ids\? \(in "
                           "cross-validation one copy would be validated"):  # fmt: skip
            writer.add(copy, patient_id="p2")
        with pytest.raises(DuplicateCase, match=r"two ids\? \(it would count twice\); list it"):
            writer.add(copy, patient_id="p1")  # one patient's: in one fold, counted twice
        with pytest.raises(DuplicateCase, match="^case 'a': the case id is stored already"):
            writer.add(_case("a", 2, seed=2), patient_id="p1")
        writer.add(_case("b", 2, seed=2), patient_id="p3")
        writer.commit()
    store = open_store(tmp_path / "s", expected_settings=SETTINGS)
    assert store.case_ids == ["a", "b"] and store.images.shape[0] == 5
    np.testing.assert_array_equal(store.images[3:], _case("b", 2, seed=2).images)


def test_stale_fingerprint_detected(tmp_path):
    with StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(_case("a", 1), patient_id="p")
        writer.commit()
    other = store_settings(PreprocessConfig(adc_range=(0.0, 2500.0)), ("t2w", "adc"), "all")
    assert fingerprint(other) != fingerprint(SETTINGS)
    with pytest.raises(StaleStoreError, match="preprocess"):
        open_store(tmp_path / "s", expected_settings=other)
    open_store(tmp_path / "s")  # without expectations it opens


def test_settings_given_as_ints_are_the_same_settings(tmp_path):
    """`crop_mm=80` hashed as 80, the default as 80.0: the store was refused as stale, naming
    no differing setting ("made with other settings ()")."""
    with StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(_case("a", 1), patient_id="p")
        writer.commit()
    as_ints = {"crop_mm": 80, "adc_range": [0, 3000], "t2w_air_percentile": 1}
    same = store_settings(as_ints, ("t2w", "adc"), "all")
    assert fingerprint(same) == fingerprint(SETTINGS)
    assert open_store(tmp_path / "s", expected_settings=same).case_ids == ["a"]
    table = json.loads((tmp_path / "s" / "cases.json").read_text())
    table["settings"]["preprocess"]["crop_mm"] = 80  # a store written with an int, as it wrote it
    table["fingerprint"] = fingerprint(table["settings"])
    recorded = json.loads((tmp_path / "s" / "fingerprint.json").read_text())
    (tmp_path / "s" / "fingerprint.json").write_text(
        json.dumps({**recorded, "settings": table["settings"], "fingerprint": table["fingerprint"]})
    )
    (tmp_path / "s" / "cases.json").write_text(json.dumps(table))
    assert open_store(tmp_path / "s", expected_settings=SETTINGS).case_ids == ["a"]


def test_store_of_an_older_format_version_is_refused(tmp_path):
    # Version 1 stored 0 where a component missed a crop edge; version 2 found another bladder
    # reference for an exam stored mirrored; version 3 another for a T2w of unequal pixel sizes.
    for version in (1, 2, 3):
        old = {**SETTINGS, "version": version}
        with StoreWriter(tmp_path / f"s{version}", ("t2w", "adc"), old) as writer:
            writer.add(_case("a", 1), patient_id="p")
            writer.commit()
        with pytest.raises(StaleStoreError) as refused:
            open_store(tmp_path / f"s{version}")
        assert str(refused.value) == (
            f"store {tmp_path / f's{version}'} has format version {version}; this code reads "
            "version 4 (4: the T2w's bladder reference does not depend on the shape of its "
            "pixels (a T2w of unequal in-plane pixel sizes is searched ~1 mm along both axes, its "
            "3 mm opening round in mm)); run `focalnet preprocess` again"
        )


def test_case_cropped_upside_down_by_an_older_version_is_refused(tmp_path):
    # Before the crop's in-plane axes were recorded, a T2w stored y-flipped (dcm2niix NIfTI) was
    # cropped upside down; such records (no in_plane_axes, flipped direction) are refused, others
    # (identity axes either way) still open.
    flipped = dataclasses.replace(
        _case("b", 1, seed=1).geometry, t2w_direction=(1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
    )
    with StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(_case("a", 1), patient_id="p")
        writer.add(dataclasses.replace(_case("b", 1, seed=1), geometry=flipped), patient_id="q")
        writer.commit()
    assert open_store(tmp_path / "s").geometry("b").in_plane_axes == (1, 0, 0, 1)
    table = json.loads((tmp_path / "s" / "cases.json").read_text())
    for record in table["cases"]:
        del record["geometry"]["in_plane_axes"]
    (tmp_path / "s" / "cases.json").write_text(json.dumps(table))
    with pytest.raises(StaleStoreError, match=r"1 case\(s\) \(b\) have a T2w stored flipped"):
        open_store(tmp_path / "s")
    with StoreWriter(tmp_path / "one", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(_case("a", 1), patient_id="p")
        writer.commit()
    table = json.loads((tmp_path / "one" / "cases.json").read_text())
    del table["cases"][0]["geometry"]["in_plane_axes"]
    (tmp_path / "one" / "cases.json").write_text(json.dumps(table))
    assert open_store(tmp_path / "one").case_ids == ["a"]


def test_missing_store_and_corrupt_table_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"store .*nowhere does not exist"):
        open_store(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"is not a preprocessed store \(no cases.json\)"):
        open_store(tmp_path / "empty")
    with StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(_case("a", 1), patient_id="p")
        writer.commit()
    (tmp_path / "s" / "cases.json").write_text('{"settings": {')  # truncated
    with pytest.raises(StaleStoreError, match=r"s/cases.json: not valid JSON"):
        open_store(tmp_path / "s")


def test_store_with_a_corrupt_table_is_replaced_only_with_overwrite(tmp_path):
    """It could not be replaced at all: every write read its settings first and stopped."""
    with StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(_case("a", 1), patient_id="p")
        writer.commit()
    (tmp_path / "s" / "cases.json").write_text('{"settings": {')  # truncated
    with pytest.raises(StaleStoreError) as refused:
        StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS)
    table = tmp_path / "s" / "cases.json"
    assert str(refused.value).startswith(f"{table}: not a readable store table (JSONDecodeError(")
    assert str(refused.value).endswith("; pass --overwrite to replace it")
    with StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS, overwrite=True) as writer:
        writer.add(_case("b", 2), patient_id="p")
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
        writer.add(_case("old", 1), patient_id="p")
        writer.commit()
    with pytest.raises(RuntimeError), StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS) as w:
        w.add(_case("new", 2), patient_id="p")
        raise RuntimeError("case 3 failed")
    assert open_store(tmp_path / "s").case_ids == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    # A finished rewrite replaces the old store.
    with StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(_case("new", 2), patient_id="p")
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
        writer.add(_case("a", 1), patient_id="p")
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
        first.add(_case("a", 2), patient_id="p")
        with StoreWriter(store, ("t2w", "adc"), other) as second:
            second.add(_case("b", 1), patient_id="q")
            second.commit()
        with pytest.raises(StaleStoreError) as refused:
            first.commit()
    assert str(refused.value).startswith(
        f"store {store} exists, meanwhile made with other settings (preprocess.adc_range: "
    )
    assert open_store(store).case_ids == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # the refused run's folder too
    with StoreWriter(store, ("t2w", "adc"), other) as first:  # overtaken by an --overwrite
        first.add(_case("a", 2), patient_id="p")
        with StoreWriter(store, ("t2w", "adc"), SETTINGS, overwrite=True) as second:
            second.add(_case("b", 1), patient_id="q")
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
        writer.add(_case("a", 2), patient_id="p")
        writer.commit(errors_file=True)
    files = {p.name for p in (tmp_path / "s").iterdir()}
    arrays = ("images", "classes", "grade_known", "lesions", "annotated", "slice_index")
    tables = {"cases.json", "fingerprint.json", "errors.csv"}
    assert files == {f"{name}.npy" for name in arrays} | tables
    folder = writer.tmp
    assert {Path(p).name for p in synced if Path(p).parent == folder} == files
    assert str(folder) in synced  # its entries too, before it became `s`


def test_bad_cases_note_counts_in_words():
    bad = ("case", "file", "reason")
    assert bad_cases_note([]) == ""
    assert bad_cases_note([bad]) == "; 1 bad case in errors.csv"
    assert bad_cases_note([bad, bad]) == "; 2 bad cases in errors.csv"


def test_errors_csv_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """`<store>.errors.csv` (every case failed) was opened for writing in place: a write failing
    part way left it truncated; now the previous file stays."""
    import csv

    from focalnet_jax.data.store import write_errors

    path = tmp_path / "store.errors.csv"
    write_errors(path, [("c1", "c1_t2w.mha", "file not found")])
    before = path.read_text()

    class FailingWriter:
        def __init__(self, f):
            self.f = f

        def writerow(self, row):
            self.f.write(",".join(row) + "\n")

        def writerows(self, rows):
            raise OSError("disk full")

    monkeypatch.setattr(csv, "writer", FailingWriter)
    with pytest.raises(OSError, match="disk full"):
        write_errors(path, [("c2", "c2_adc.mha", "unreadable")])
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_errors_csv_holds_a_file_name_that_is_no_utf8_as_its_bytes(tmp_path):
    """A MetaImage naming a data file by latin-1 bytes (`\\xe9missing.raw`), absent: the bad case's
    reason holds the name as Python decodes file names, and writing errors.csv ended in a
    UnicodeEncodeError traceback under --skip-bad-cases."""
    from focalnet_jax.data.io import CaseError, read_image
    from focalnet_jax.data.store import write_errors

    header = tmp_path / "b_t2w.mhd"
    header.write_bytes(
        b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\n"
        b"ElementSpacing = 1 1 1\nOffset = 0 0 0\nElementDataFile = \xe9missing.raw\n"
    )
    with pytest.raises(CaseError) as raised:
        read_image(header, case="b")
    assert raised.value.reason.endswith("named by the header not found)")
    write_errors(tmp_path / "errors.csv", [("b", str(header), raised.value.reason)])
    written = (tmp_path / "errors.csv").read_bytes()
    assert b"\xe9missing.raw named by the header not found" in written


def test_a_table_that_does_not_fit_the_arrays_is_refused(tmp_path):
    """A `cases.json` of another store over these arrays opened without a word: case 'b' got
    rows 3..5 of a 3-row store, an empty case, and a case listed twice hid the other record."""
    with StoreWriter(tmp_path / "two", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(_case("a", 3, lesion_class=4), patient_id="p1")
        writer.add(_case("b", 2), patient_id="p2")
        writer.commit()
    with StoreWriter(tmp_path / "one", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(_case("a", 3, lesion_class=4), patient_id="p1")
        writer.commit()
    table = json.loads((tmp_path / "two" / "cases.json").read_text())
    (tmp_path / "one" / "cases.json").write_text(json.dumps(table))
    with pytest.raises(StaleStoreError, match=r"case 'b' has slices 3..5, not one exam's slices "):
        open_store(tmp_path / "one")
    table["cases"] = table["cases"][:1] * 2  # 'a' twice
    (tmp_path / "two" / "cases.json").write_text(json.dumps(table))
    with pytest.raises(StaleStoreError, match=r"case 'a' is listed twice"):
        open_store(tmp_path / "two")
    table["cases"][1] = {**table["cases"][1], "case_id": "b"}  # 'b' re-reads rows 0..3
    (tmp_path / "two" / "cases.json").write_text(json.dumps(table))
    with pytest.raises(StaleStoreError, match=r"case 'b' has slices 0..3, expected to start at 3;"):
        open_store(tmp_path / "two")
    table["cases"][1] = {**table["cases"][1], "start": 3, "stop": 3}  # 'b' holds no slice
    (tmp_path / "two" / "cases.json").write_text(json.dumps(table))
    with pytest.raises(StaleStoreError, match=r"case 'b' has no slice \(a lesion-free case of"):
        open_store(tmp_path / "two")
    with (
        StoreWriter(tmp_path / "three", ("t2w", "adc"), SETTINGS) as writer,
        pytest.raises(ValueError, match="case c: no slice to store"),
    ):
        writer.add(_case("c", 0), patient_id="p3")


def _edited(store: Path, edit) -> str:
    """The refusal of `store` once `edit(table)` changed its cases.json (restored after)."""
    path = store / "cases.json"
    before = path.read_text()
    table = json.loads(before)
    edit(table)
    path.write_text(json.dumps(table))
    try:
        with pytest.raises(StaleStoreError) as refused:
            open_store(store)
    finally:
        path.write_text(before)
    return str(refused.value)


def test_a_table_edited_or_copied_from_another_store_is_refused(tmp_path):
    """Each edit opened without a word: a case boundary moved one row (case b read case a's
    last slice), the last case dropped (its rows belonged to no case), the settings changed
    (a store of other settings passed `expected_settings`), the components reversed (the T2w
    channel read as ADC), a geometry without its origin (a KeyError at its first use)."""
    with StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(_case("a", 3, lesion_class=4), patient_id="p1")
        writer.add(_case("b", 2, seed=1), patient_id="p2")
        writer.commit()
    store = tmp_path / "s"

    def moved(table):
        table["cases"][0]["stop"] -= 1
        table["cases"][1]["start"] -= 1

    assert "case 'b' has slices 2..5, not one exam's slices in order" in _edited(store, moved)
    dropped = _edited(store, lambda table: table["cases"].pop())
    assert "the cases end at slice 3, the arrays hold 5" in dropped
    edits = {
        "its fingerprint is not that of its settings": lambda table: table["settings"][
            "preprocess"
        ].update(interpolator="linear"),
        "its components ['adc', 't2w'] are not its settings' components": lambda table: table[
            "components"
        ].reverse(),
        "has a geometry that cannot be read (KeyError: 't2w_origin')": lambda table: table["cases"][
            0
        ]["geometry"].pop("t2w_origin"),
    }
    for reason, edit in edits.items():
        assert reason in _edited(store, edit)
    (store / "fingerprint.json").write_text("{}")  # another store's, or damaged
    assert "fingerprint.json, written with it, names another" in _edited(store, lambda t: None)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"geometry": None}, "case record 0 ('a') has geometry None, expected dict"),
        ({"case_id": 5}, "case record 0 has case_id 5, expected a string"),
        ({"start": "0"}, "case record 0 ('a') has start '0', expected int"),
        ({"max_class": True}, "case record 0 ('a') has max_class True, expected int"),
        ({"geometry": {}}, "case record 0 ('a') has geometry.t2w_direction None, expected 9"),
        (
            {"geometry": {"t2w_direction": ["x"] * 9}},
            "case record 0 ('a') has geometry.t2w_direction ['x', ",
        ),
    ],
)
def test_a_malformed_case_record_is_refused_naming_it(tmp_path, change, message):
    """Before, a record without geometry, with an int case id or null geometry ended in a
    KeyError or TypeError traceback from `open_store` (`focalnet folds`, training)."""
    with StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(_case("a", 1), patient_id="p")
        writer.commit()
    table_path = tmp_path / "s" / "cases.json"
    table = json.loads(table_path.read_text())
    table["cases"][0].update(change)
    table_path.write_text(json.dumps(table))
    with pytest.raises(StaleStoreError) as refused:
        open_store(tmp_path / "s")
    assert str(refused.value).startswith(f"{table_path}: {message}")
    assert str(refused.value).endswith("; run `focalnet preprocess` again")


def test_arrays_that_do_not_fit_the_table_are_refused(tmp_path):
    """A table of three components over arrays of two opened without a word (reading 'hbv'
    failed mid-training), and an integer annotated.npy [1, 0, 0] made `case_rows` index rows
    1, 0, 0 instead of masking row 0."""
    with StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(_case("a", 3, lesion_class=4), patient_id="p1")
        writer.commit()
    table_file = tmp_path / "s" / "cases.json"
    table = json.loads(table_file.read_text())
    table_file.write_text(json.dumps({**table, "components": ["t2w", "adc", "hbv"]}))
    with pytest.raises(StaleStoreError) as raised:
        open_store(tmp_path / "s")
    assert str(raised.value) == (
        f"{tmp_path / 's' / 'images.npy'}: float32 [3, 8, 8, 2], expected float32 [3, 8, 8, 3] "
        "(cases.json lists 3 components); the arrays do not fit the table, run `focalnet "
        "preprocess` again"
    )
    table_file.write_text(json.dumps(table))
    annotated = np.load(tmp_path / "s" / "annotated.npy")
    np.save(tmp_path / "s" / "annotated.npy", annotated.astype(np.int64))
    with pytest.raises(StaleStoreError, match=r"annotated.npy: int64 \[3\], expected bool \[3\]"):
        open_store(tmp_path / "s")
    np.save(tmp_path / "s" / "annotated.npy", annotated)
    np.save(tmp_path / "s" / "classes.npy", np.zeros((3, 8, 7), np.uint8))
    with pytest.raises(StaleStoreError, match=r"classes.npy: uint8 \[3, 8, 7\], expected uint8"):
        open_store(tmp_path / "s")


def test_a_store_behind_a_symbolic_link_is_replaced_and_the_link_kept(tmp_path, monkeypatch):
    """`--out` a link to a store on another disk: the link itself became the new store, the
    store it points to stayed old (and was trained on later), a dangling `.old` link was left
    beside; `--out .` inside a store raised ValueError (a path without a name)."""
    with StoreWriter(tmp_path / "disk" / "store", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(_case("old", 1), patient_id="p")
        writer.commit()
    (tmp_path / "stores").mkdir()
    link = tmp_path / "stores" / "picai"
    link.symlink_to(tmp_path / "disk" / "store")
    with StoreWriter(link, ("t2w", "adc"), SETTINGS) as writer:
        writer.add(_case("new", 1), patient_id="p")
        writer.commit()
    assert link.is_symlink() and [p.name for p in (tmp_path / "stores").iterdir()] == ["picai"]
    assert open_store(tmp_path / "disk" / "store").case_ids == ["new"]
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["store"]
    monkeypatch.chdir(tmp_path / "disk" / "store")
    with StoreWriter(".", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(_case("newer", 1), patient_id="p")
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
            writer.add(_case("a", 1), patient_id="p")
            writer._files["images"].close()
            writer._files["images"] = open("/dev/full", "wb")  # noqa: SIM115 (closed by abort)
            writer.add(_case("b", 1, seed=1), patient_id="p")
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
        writer.add(_case("a", 1), patient_id="p")
        writer.commit()
    removing = store_module.remove_replaced

    def interrupted(old, path):
        os.kill(os.getpid(), signal.SIGINT)  # deferred until the removal is done
        removing(old, path)

    monkeypatch.setattr(store_module, "remove_replaced", interrupted)
    other = {**SETTINGS, "slices": "annotated"}
    with StoreWriter(tmp_path / "s", ("t2w", "adc"), other, overwrite=True) as writer:
        writer.add(_case("a", 1), patient_id="p")
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
        w.add(_case("a", 1), patient_id="p")
        w.commit(errors_file=True)
    assert raised.value.filename == str(tmp_path / "s" / "errors.csv")
    assert list(tmp_path.iterdir()) == []
