"""Whole or absent: atomic JSON files and output folders (data/atomic_files.py), and the writers
built on them (metrics.json, <case>.npz)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from focalnet_jax.data.atomic_files import files_moved_in, replaced_folder, write_json_atomic
from focalnet_jax.evaluation.predictions import read_case, write_case
from focalnet_jax.evaluation.report import write_json


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


def test_a_failed_replaced_folder_removes_the_parents_it_created(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), replaced_folder(tmp_path / "kept/new/deeper/out") as tmp:
        (tmp / "x.txt").write_text("x")
        raise RuntimeError("killed")
    assert os.listdir(tmp_path) == ["kept"] and os.listdir(tmp_path / "kept") == []


def test_files_moved_in_keep_the_folders_other_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user")
    (out / "a.txt").write_text("a0")
    with pytest.raises(RuntimeError), files_moved_in(out) as tmp:
        (tmp / "a.txt").write_text("a1")
        raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "a0" and sorted(os.listdir(tmp_path)) == ["out"]
    with files_moved_in(out) as tmp:
        (tmp / "a.txt").write_text("a1")
        (tmp / "b.txt").write_text("b1")
    assert sorted(os.listdir(out)) == ["a.txt", "b.txt", "mine.txt"]
    assert (out / "a.txt").read_text() == "a1" and sorted(os.listdir(tmp_path)) == ["out"]


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
