"""A store that is missing, or whose table or arrays are damaged, edited or another store's, is
refused naming the file and what does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from store_cases import SETTINGS, case

from focalnet_jax.data.store import StoreWriter, open_store
from focalnet_jax.data.store_settings import StaleStoreError


def test_missing_store_and_corrupt_table_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"store .*nowhere does not exist"):
        open_store(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"is not a preprocessed store \(no cases.json\)"):
        open_store(tmp_path / "empty")
    with StoreWriter(tmp_path / "s", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(case("a", 1), patient_id="p")
        writer.commit()
    (tmp_path / "s" / "cases.json").write_text('{"settings": {')  # truncated
    with pytest.raises(StaleStoreError, match=r"s/cases.json: not valid JSON"):
        open_store(tmp_path / "s")


def test_a_table_that_does_not_fit_the_arrays_is_refused(tmp_path):
    """A `cases.json` of another store over these arrays opened without a word: case 'b' got
    rows 3..5 of a 3-row store, an empty case, and a case listed twice hid the other record."""
    with StoreWriter(tmp_path / "two", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(case("a", 3, lesion_class=4), patient_id="p1")
        writer.add(case("b", 2), patient_id="p2")
        writer.commit()
    with StoreWriter(tmp_path / "one", ("t2w", "adc"), SETTINGS) as writer:
        writer.add(case("a", 3, lesion_class=4), patient_id="p1")
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
        writer.add(case("c", 0), patient_id="p3")


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
        writer.add(case("a", 3, lesion_class=4), patient_id="p1")
        writer.add(case("b", 2, seed=1), patient_id="p2")
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
        writer.add(case("a", 1), patient_id="p")
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
        writer.add(case("a", 3, lesion_class=4), patient_id="p1")
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
