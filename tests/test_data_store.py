"""The preprocessed store: memory-mapped arrays, case table, fingerprint and format version, and
the errors.csv of its bad cases."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from store_cases import SETTINGS, case

from focalnet_jax.data.preprocess_config import PreprocessConfig
from focalnet_jax.data.store import DuplicateCase, StoreWriter, bad_cases_note, open_store
from focalnet_jax.data.store_settings import StaleStoreError, fingerprint, store_settings


def test_write_and_open_memory_mapped(tmp_path):
    cases = [case("a", 3, lesion_class=4, seed=1), case("b", 2, seed=2)]
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
        writer.add(case("a", 3, lesion_class=4, seed=1), patient_id="p1")
        copy = dataclasses.replace(case("a", 3, lesion_class=4, seed=1), case_id="a-again")
        with pytest.raises(DuplicateCase, match="^case 'a-again': its preprocessed data are those "
                           r"of case 'a' byte for byte: the same exam under two ids\? \(in "
                           "cross-validation one copy would be validated"):  # fmt: skip
            writer.add(copy, patient_id="p2")
        with pytest.raises(DuplicateCase, match=r"two ids\? \(it would count twice\); list it"):
            writer.add(copy, patient_id="p1")  # one patient's: in one fold, counted twice
        with pytest.raises(DuplicateCase, match="^case 'a': the case id is stored already"):
            writer.add(case("a", 2, seed=2), patient_id="p1")
        writer.add(case("b", 2, seed=2), patient_id="p3")
        writer.commit()
    store = open_store(tmp_path / "s", expected_settings=SETTINGS)
    assert store.case_ids == ["a", "b"] and store.images.shape[0] == 5
    np.testing.assert_array_equal(store.images[3:], case("b", 2, seed=2).images)


def test_stale_fingerprint_detected(tmp_path):
    with StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(case("a", 1), patient_id="p")
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
        writer.add(case("a", 1), patient_id="p")
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
            writer.add(case("a", 1), patient_id="p")
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
        case("b", 1, seed=1).geometry, t2w_direction=(1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
    )
    with StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(case("a", 1), patient_id="p")
        writer.add(dataclasses.replace(case("b", 1, seed=1), geometry=flipped), patient_id="q")
        writer.commit()
    assert open_store(tmp_path / "s").geometry("b").in_plane_axes == (1, 0, 0, 1)
    table = json.loads((tmp_path / "s" / "cases.json").read_text())
    for record in table["cases"]:
        del record["geometry"]["in_plane_axes"]
    (tmp_path / "s" / "cases.json").write_text(json.dumps(table))
    with pytest.raises(StaleStoreError, match=r"1 case\(s\) \(b\) have a T2w stored flipped"):
        open_store(tmp_path / "s")
    with StoreWriter(tmp_path / "one", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(case("a", 1), patient_id="p")
        writer.commit()
    table = json.loads((tmp_path / "one" / "cases.json").read_text())
    del table["cases"][0]["geometry"]["in_plane_axes"]
    (tmp_path / "one" / "cases.json").write_text(json.dumps(table))
    assert open_store(tmp_path / "one").case_ids == ["a"]


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
