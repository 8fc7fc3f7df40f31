"""Patient-level, class-stratified, seeded cross-validation folds."""

from __future__ import annotations

import os
import re
from types import SimpleNamespace
from unittest.mock import ANY

import numpy as np
import pytest

from focalnet_jax.data.folds import assign_folds, fold_table, split_cases, write_fold_files
from focalnet_jax.errors import UserError


def _patients(n=103, seed=1):
    rng = np.random.default_rng(seed)
    ids = [f"p{i:03d}" for i in range(n)]
    classes = rng.choice(6, size=n, p=[0.3, 0.2, 0.2, 0.15, 0.1, 0.05])
    return ids, dict(zip(ids, classes.tolist(), strict=True))


def test_every_patient_in_one_fold_and_sizes_balanced():
    ids, classes = _patients()
    folds = assign_folds(ids, classes, num_folds=5, seed=0)
    assert set(folds) == set(ids) and set(folds.values()) == set(range(5))
    sizes = np.bincount(list(folds.values()))
    assert sizes.max() - sizes.min() <= 1


def test_classes_spread_across_folds():
    ids, classes = _patients()
    folds = assign_folds(ids, classes, num_folds=5, seed=0)
    for cls in range(6):
        members = [folds[p] for p in ids if classes[p] == cls]
        counts = np.bincount(members, minlength=5)
        assert counts.max() - counts.min() <= 2, (cls, counts)
        if len(members) >= 5:
            assert counts.min() >= 1


def test_seeded_and_order_independent():
    ids, classes = _patients()
    a = assign_folds(ids, classes, 5, seed=3)
    b = assign_folds(list(reversed(ids)), classes, 5, seed=3)
    assert a == b
    assert a != assign_folds(ids, classes, 5, seed=4)


def test_split_cases_keeps_studies_of_a_patient_together():
    # 40 patients, some with two studies; the highest class over a patient's studies counts.
    cases = []
    for i in range(40):
        cases.append({"case_id": f"p{i}_a", "patient_id": f"p{i}", "max_class": i % 6})
        if i % 3 == 0:
            cases.append({"case_id": f"p{i}_b", "patient_id": f"p{i}", "max_class": 5})
    max_class = {}
    for r in cases:
        max_class[r["patient_id"]] = max(max_class.get(r["patient_id"], 0), r["max_class"])
    store = SimpleNamespace(cases=cases, patient_max_class=lambda: max_class)
    seen = set()
    for fold in range(5):
        train, val = split_cases(store, fold, num_folds=5, seed=0)
        assert sorted(train + val) == sorted(r["case_id"] for r in cases)
        train_patients = {c.split("_")[0] for c in train}
        val_patients = {c.split("_")[0] for c in val}
        assert not train_patients & val_patients
        assert not seen & val_patients
        seen |= val_patients
    assert len(seen) == 40


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_folds"):
        assign_folds(["a", "b"], [0, 1], num_folds=1)
    with pytest.raises(ValueError, match="cannot fill"):
        assign_folds(["a", "b"], [0, 1], num_folds=5)
    with pytest.raises(ValueError, match="no highest class"):
        assign_folds(["a", "b"], {"a": 1}, num_folds=2)


@pytest.mark.parametrize("num_folds", [5, 1, 0, -1])
def test_folds_a_store_cannot_make_are_a_user_error_naming_it(num_folds):
    max_class = {"p0": 0, "p1": 2, "p2": 1}
    cases = [{"case_id": f"{p}_1", "patient_id": p} for p in max_class]
    store = SimpleNamespace(path="stores/tiny", cases=cases, patient_max_class=lambda: max_class)
    folds = "1 fold" if num_folds == 1 else f"{num_folds} folds"
    message = (
        f"store stores/tiny: 3 patients cannot be split into {folds}; choose 2 <= num_folds <= 3"
    )
    for call in (lambda: split_cases(store, 0, num_folds), lambda: fold_table(store, num_folds)):
        with pytest.raises(UserError) as raised:
            call()
        assert str(raised.value) == message


@pytest.mark.parametrize("num_folds", [5, 2])
@pytest.mark.parametrize("patients", [1, 0])
def test_a_store_of_fewer_than_two_patients_says_cross_validation_needs_two(patients, num_folds):
    # One patient said "1 patients cannot be split into 5 folds; choose 2 <= num_folds <= 1".
    max_class = {f"p{i}": 0 for i in range(patients)}
    cases = [{"case_id": f"{p}_1", "patient_id": p} for p in max_class]
    store = SimpleNamespace(path="stores/one", cases=cases, patient_max_class=lambda: max_class)
    held = "1 patient" if patients == 1 else "0 patients"
    for call in (lambda: split_cases(store, 0, num_folds), lambda: fold_table(store, num_folds)):
        with pytest.raises(UserError) as raised:
            call()
        assert str(raised.value) == (
            f"store stores/one holds {held}: cross-validation (num_folds {num_folds}) needs at "
            "least 2 patients"
        )


def test_fold_files_are_replaced_together_or_not_at_all(tmp_path, monkeypatch):
    """A write failing at fold 2 left fold-0/1.json of the new split beside fold-2..4.json of the
    old one; now the previous files stay whole."""
    import json

    from focalnet_jax.data import folds as folds_lib

    max_class = {f"p{i}": i % 3 for i in range(10)}
    cases = [{"case_id": f"{p}_1", "patient_id": p} for p in max_class]
    store = SimpleNamespace(path="s", cases=cases, patient_max_class=lambda: max_class)
    old = folds_lib.write_fold_files(store, tmp_path, num_folds=5, seed=0)
    before = [path.read_text() for path in old]
    real = folds_lib.split_cases

    def failing(store, fold, num_folds, seed):
        if fold == 2:
            raise OSError("disk full")
        return real(store, fold, num_folds, seed)

    monkeypatch.setattr(folds_lib, "split_cases", failing)
    with pytest.raises(OSError, match="disk full"):
        folds_lib.write_fold_files(store, tmp_path, num_folds=5, seed=1)
    assert [path.read_text() for path in old] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"fold-{k}.json" for k in range(5)]
    assert json.loads(before[0])["val"]  # a real split was kept
    # A write failing at fold 3 (its temporary file cannot be written) left fold-0..2.json of the
    # new split beside fold-3/4.json of the old one.
    monkeypatch.setattr(folds_lib, "split_cases", real)
    blocked = tmp_path / f".fold-3.json.tmp-{os.getpid()}"
    blocked.mkdir()
    with pytest.raises(IsADirectoryError):
        folds_lib.write_fold_files(store, tmp_path, num_folds=5, seed=1)
    blocked.rmdir()
    assert [path.read_text() for path in old] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"fold-{k}.json" for k in range(5)]
    # A stop between the renames (a kill, a failing rename) leaves files of two splits: refused
    # when read, naming two of them (some cases were validated twice, some never).
    renames = iter(range(10))
    real_replace = os.replace

    def replace(src, dst):
        if next(renames) == 2:
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        folds_lib.write_fold_files(store, tmp_path, num_folds=5, seed=1)
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(UserError) as refused:
        folds_lib.read_given_split(tmp_path, 0, 5)
    assert str(refused.value) == (
        f"split folder {tmp_path}: fold-0.json and fold-3.json are folds of two different splits "
        "(a `focalnet folds` stopped while replacing them?); write the folds again with "
        "`focalnet folds --out`"
    )
    folds_lib.write_fold_files(store, tmp_path, num_folds=5, seed=1)
    assert folds_lib.read_given_split(tmp_path, 0, 5) == folds_lib.split_cases(store, 0, 5, 1)


def _picai_store():
    """Patient 10003 has two studies; 10009 was refused by --skip-bad-cases (not stored)."""
    ids = ["10000_1000000", "10001_1000001", "10002_1000002", "10003_1000003", "10003_1000004"]
    cases = [{"case_id": c, "patient_id": c.split("_")[0]} for c in ids]
    return SimpleNamespace(path="stores/picai", cases=cases)


def _write_ds_configs(folder, folds):
    """picai_baseline's `ds-config-{train,valid}-fold-<k>.json` of (train, val) id lists."""
    import json

    folder.mkdir(exist_ok=True)
    for k, (train, val) in enumerate(folds):
        for name, ids in (("train", train), ("valid", val)):
            text = json.dumps({"subject_list": ids}, indent=4)
            (folder / f"ds-config-{name}-fold-{k}.json").write_text(text)


GIVEN = [
    (["10000_1000000", "10003_1000003", "10003_1000004"], ["10001_1000001", "10002_1000002"]),
    (["10001_1000001", "10002_1000002", "10009_1000010"], ["10000_1000000", "10003_1000003",
                                                           "10003_1000004"]),
]  # fmt: skip


def test_given_picai_baseline_splits_are_read_in_all_three_formats(tmp_path, caplog):
    """The official PI-CAI folds could not be given: folds were always seeded from the store."""
    import json

    store = _picai_store()
    _write_ds_configs(tmp_path / "picai", GIVEN)
    nnunet = tmp_path / "splits.json"
    nnunet.write_text(json.dumps([{"train": t, "val": v} for t, v in GIVEN]))
    ours = tmp_path / "ours"
    ours.mkdir()
    for k, (t, v) in enumerate(GIVEN):
        (ours / f"fold-{k}.json").write_text(json.dumps({"train": t, "val": v}))
    for splits in (tmp_path / "picai", nnunet, ours):
        assert split_cases(store, 0, 2, splits=splits) == GIVEN[0]
        caplog.clear()
        train, val = split_cases(store, 1, 2, seed=7, splits=str(splits))
        assert train == ["10001_1000001", "10002_1000002"] and val == GIVEN[1][1]
        assert "1 listed case(s) not in store stores/picai (first: 10009_1000010)" in caplog.text
    with pytest.raises(UserError, match=r"splits.json: 2 folds, data.num_folds is 5"):
        split_cases(store, 0, 5, splits=nnunet)


def test_given_splits_that_part_a_patient_or_repeat_a_case_are_refused(tmp_path):
    store = _picai_store()
    parted = [(["10000_1000000", "10003_1000003"], ["10001_1000001", "10003_1000004"])] * 2
    _write_ds_configs(tmp_path / "parted", parted)
    with pytest.raises(UserError) as info:
        split_cases(store, 0, 2, splits=tmp_path / "parted")
    assert str(info.value) == (
        f"split {tmp_path / 'parted'} fold 0: patient 10003 has case 10003_1000003 in train and "
        "10003_1000004 in val; a patient's studies must stay in one fold"
    )
    twice = [(["10000_1000000", "10001_1000001"], ["10001_1000001"])] * 2
    _write_ds_configs(tmp_path / "twice", twice)
    with pytest.raises(UserError, match=r"case 10001_1000001 is in both train and val"):
        split_cases(store, 1, 2, splits=tmp_path / "twice")
    with pytest.raises(UserError, match=r"ds-config-valid-fold-2.json does not exist"):
        (tmp_path / "twice" / "ds-config-train-fold-2.json").write_text('{"subject_list": []}')
        split_cases(store, 2, 3, splits=tmp_path / "twice")
    (tmp_path / "bad.json").write_text('{"train": []}')
    with pytest.raises(UserError, match=r"bad.json: no list of folds, data.num_folds is 2"):
        split_cases(store, 0, 2, splits=tmp_path / "bad.json")


def test_fold_table_of_given_splits_counts_their_validation_cases(tmp_path):
    """`focalnet folds --splits` prints the given folds, so the official split can be checked
    against the store before training."""
    store = _picai_store()
    for i, record in enumerate(store.cases):
        record["start"], record["stop"] = 6 * i, 6 * i + 6
    store.annotated = np.zeros(30, bool)
    store.annotated[[0, 1, 7, 20, 25, 29]] = True  # lesion slices of cases 0, 0, 1, 3, 4, 4
    max_class = {"10000": 5, "10001": 0, "10002": 0, "10003": 4}
    store.patient_max_class = lambda: max_class
    _write_ds_configs(tmp_path / "picai", GIVEN)
    rows = fold_table(store, 2, splits=tmp_path / "picai")
    counts = [(r["patients"], r["cases"], r["slices"], r["annotated"]) for r in rows]
    assert counts == [(2, 2, 12, 1), (2, 3, 18, 5)]
    assert rows[0]["patients_per_max_class"] == [2, 0, 0, 0, 0, 0]
    assert rows[1]["patients_per_max_class"] == [0, 0, 0, 0, 1, 1]
    assert rows[1]["case_ids"] == GIVEN[1][1]


@pytest.mark.parametrize("num_folds", [1, 0, -1])
def test_given_splits_with_fewer_than_two_folds_are_refused(tmp_path, num_folds):
    """`focalnet folds --splits X --num-folds 0` printed an empty table and exited 0."""
    store = _picai_store()
    store.patient_max_class = lambda: {"10000": 5, "10001": 0, "10002": 0, "10003": 4}
    _write_ds_configs(tmp_path / "picai", GIVEN)
    message = f"split {tmp_path / 'picai'}: num_folds={num_folds}; cross-validation needs 2 or more"
    for call in (
        lambda: fold_table(store, num_folds, splits=tmp_path / "picai"),
        lambda: split_cases(store, 0, num_folds, splits=tmp_path / "picai"),
    ):
        with pytest.raises(UserError) as raised:
            call()
        assert str(raised.value) == message


def test_fold_table_counts_a_case_validated_in_two_folds_in_each_and_warns(tmp_path, caplog):
    """Split files that validate a case in two folds were tabled with the case in the last of
    them only: here fold 0 showed no validation case (it validates two) and nothing was said."""
    store = _picai_store()
    for i, record in enumerate(store.cases):
        record["start"], record["stop"] = 6 * i, 6 * i + 6
    store.annotated = np.zeros(30, bool)
    store.patient_max_class = lambda: {"10000": 5, "10001": 0, "10002": 0, "10003": 4}
    _write_ds_configs(tmp_path / "twice", [GIVEN[0], GIVEN[0]])
    rows = fold_table(store, 2, splits=tmp_path / "twice")
    assert [(r["patients"], r["cases"], r["slices"]) for r in rows] == [(2, 2, 12)] * 2
    assert rows[0]["case_ids"] == rows[1]["case_ids"] == GIVEN[0][1]
    assert (
        f"split {tmp_path / 'twice'}: 2 store case(s) in the validation of more than one fold "
        "(first: 10001_1000001, folds 0, 1); 3 in the validation of none (first: 10000_1000000, "
        "10003_1000003, 10003_1000004)"
    ) in caplog.text
    caplog.clear()
    _write_ds_configs(tmp_path / "picai", GIVEN)  # each case validated once: no such warning
    fold_table(store, 2, splits=tmp_path / "picai")
    assert "validation of more than one fold" not in caplog.text


def test_split_files_name_what_read_given_split_reads(tmp_path, monkeypatch):
    """One list of split files for training (`read_given_split`) and a study's digest of them:
    a file is itself (`~` expanded); a folder, per fold, picai_baseline's pair where either is
    there, else `fold-<k>.json`, and for every fold only files of those names."""
    import json

    from focalnet_jax.data.folds import read_given_split, split_files

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "splits.json").write_text(json.dumps([{"train": ["a"], "val": ["b"]}] * 2))
    assert split_files(tmp_path / "splits.json") == [tmp_path / "splits.json"]
    assert split_files("~/splits.json", fold=1) == [tmp_path / "splits.json"]
    assert read_given_split("~/splits.json", 1, 2) == (["a"], ["b"])

    folder = tmp_path / "mixed"
    _write_ds_configs(folder, GIVEN[:1])  # fold 0: picai_baseline's pair
    for k in (0, 1, 10):
        (folder / f"fold-{k}.json").write_text(json.dumps({"train": ["a"], "val": [f"v{k}"]}))
    for stray in ("fold-01.json", "fold-a.json", "fold-1.json.bak", "splits.json", "notes.txt"):
        (folder / stray).write_text("{}")
    pair = [folder / "ds-config-train-fold-0.json", folder / "ds-config-valid-fold-0.json"]
    assert split_files(folder, 0) == pair
    assert split_files(folder, 1) == [folder / "fold-1.json"]
    assert split_files(folder, 2) == [folder / "fold-2.json"]  # missing: named, not skipped
    names = ["ds-config-train-fold-0.json", "ds-config-valid-fold-0.json", "fold-0.json",
             "fold-1.json", "fold-10.json"]  # fmt: skip
    assert split_files(folder) == [folder / name for name in names]
    # Both kinds in one folder: two splits, read fold by fold one kind or the other.
    with pytest.raises(
        UserError,
        match=r"^split folder .*mixed: holds both picai_baseline split files "
        r"\(ds-config-train-fold-0.json\) and fold files \(fold-0.json\); keep one kind$",
    ):
        read_given_split(folder, 1, 11)
    for name in names[:2]:
        (folder / name).unlink()
    # Fewer folds than the folder holds: its folds 2..10 would never be validated.
    with pytest.raises(
        UserError, match=r"^split folder .*mixed: holds fold 10, data.num_folds is 2$"
    ):
        read_given_split(folder, 0, 2)
    assert read_given_split(folder, 10, 11) == (["a"], ["v10"])
    with pytest.raises(UserError, match=r"split file .*mixed/fold-2.json does not exist"):
        read_given_split(folder, 2, 11)
    # One file of picai_baseline's pair is there: the other is read, and named missing.
    picai = tmp_path / "picai"
    _write_ds_configs(picai, GIVEN[:1])
    assert read_given_split(picai, 0, 1) == GIVEN[0]
    (picai / "ds-config-valid-fold-0.json").unlink()
    assert split_files(picai, 0) == [picai / p.name for p in pair]
    with pytest.raises(UserError, match=r"ds-config-valid-fold-0.json does not exist"):
        read_given_split(picai, 0, 11)


def _ten_patient_store():
    max_class = {f"p{i}": i % 3 for i in range(10)}
    cases = [{"case_id": f"{p}_1", "patient_id": p} for p in max_class]
    return SimpleNamespace(path="s", cases=cases, patient_max_class=lambda: max_class)


def test_fewer_fold_files_written_over_more_remove_the_later_ones(tmp_path, caplog):
    """`folds --num-folds 5 --out F` and then `--num-folds 3 --out F` left fold-3/4.json of the
    first split beside fold-0..2.json of the second: training with num_folds=5 validated cases
    twice, with num_folds=3 it was refused as 'holds fold 4'."""
    import json

    from focalnet_jax.data.folds import write_fold_files

    store = _ten_patient_store()
    write_fold_files(store, tmp_path, num_folds=5, seed=0)
    (tmp_path / "notes.txt").write_text("kept")
    caplog.clear()
    paths = write_fold_files(store, tmp_path, num_folds=3, seed=1)
    assert paths == [tmp_path / f"fold-{k}.json" for k in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [*(p.name for p in paths), "notes.txt"]
    assert f"{tmp_path}: removed fold-3.json, fold-4.json, of an earlier split" in caplog.text
    for k, path in enumerate(paths):
        train, val = split_cases(store, k, 3, seed=1)
        assert json.loads(path.read_text()) == {"train": train, "val": val, "split": ANY}
        assert split_cases(store, k, 3, splits=tmp_path) == (train, val)
    with pytest.raises(UserError, match=r"fold-3.json does not exist"):
        split_cases(store, 3, 5, splits=tmp_path)
    caplog.clear()
    write_fold_files(store, tmp_path, num_folds=3, seed=2)  # as many folds: nothing to remove
    assert "removed" not in caplog.text


def test_fold_files_are_not_written_where_picai_baseline_split_files_would_be_read(tmp_path):
    """`focalnet folds --out F` into a folder holding `ds-config-*` files wrote fold-<k>.json
    beside them and said so; training with `data.splits=F` then read the older files."""
    _write_ds_configs(tmp_path, GIVEN)
    with pytest.raises(
        UserError,
        match=r"^--out .* holds ds-config-train-fold-0.json, a picai_baseline split file, ",
    ):
        write_fold_files(_ten_patient_store(), tmp_path, num_folds=2)
    assert not list(tmp_path.glob("fold-*.json"))


def test_given_folds_that_validate_a_case_twice_are_refused_for_training(tmp_path, caplog):
    """Fold files of two splits side by side in a folder (a 3-fold split written over a 5-fold
    one before the later files were removed) were read for training without a word, a case
    validated in two folds; `focalnet folds --splits` still prints them, with its warning."""
    import json
    import shutil

    from focalnet_jax.data.folds import write_fold_files

    store = _ten_patient_store()
    mixed, newer = tmp_path / "mixed", tmp_path / "newer"
    write_fold_files(store, mixed, num_folds=5, seed=0)
    for path in write_fold_files(store, newer, num_folds=3, seed=1):
        shutil.copy(path, mixed / path.name)
    for path in mixed.iterdir():  # as written by hand (with their ids, refused as two splits)
        entry = json.loads(path.read_text())
        path.write_text(json.dumps({"train": entry["train"], "val": entry["val"]}))
    val = [set(json.loads((mixed / f"fold-{k}.json").read_text())["val"]) for k in range(5)]
    for fold in (0, 4):
        with pytest.raises(UserError) as raised:
            split_cases(store, fold, 5, splits=mixed)
        message = str(raised.value)
        found = re.fullmatch(
            rf"split {re.escape(str(mixed))}: folds (\d) and (\d) both validate case (p\d_1) "
            r"\((\d+) store cases? validated in more than one fold\); each case must be "
            r"validated in one fold only",
            message,
        )
        assert found, message
        j, k, case, count = int(found[1]), int(found[2]), found[3], int(found[4])
        assert j < k and case in val[j] & val[k]
        assert count == sum(
            sum(c in v for v in val) > 1 for c in (r["case_id"] for r in store.cases)
        )
    for i, record in enumerate(store.cases):
        record["start"], record["stop"] = i, i + 1
    store.annotated = np.zeros(10, bool)
    rows = fold_table(store, 5, splits=mixed)  # printed, with a warning
    assert [set(row["case_ids"]) for row in rows] == val
    assert "in the validation of more than one fold" in caplog.text
    # One split file may validate a case in several folds (repeated or Monte-Carlo splits).
    table = [
        {"train": ["p1_1", "p2_1"], "val": ["p0_1"]},
        {"train": ["p1_1"], "val": ["p0_1", "p2_1"]},
    ]
    (tmp_path / "splits.json").write_text(json.dumps(table))
    assert split_cases(store, 0, 2, splits=tmp_path / "splits.json") == (["p1_1", "p2_1"], ["p0_1"])
    assert split_cases(store, 1, 2, splits=tmp_path / "splits.json") == (["p1_1"], ["p0_1", "p2_1"])


def test_a_fold_file_without_a_split_id_beside_files_with_one_is_named(tmp_path):
    """One fold file of an earlier version (or rewritten by a script) beside files that carry
    their split's id: refused as of another split, saying it has no id."""
    import json

    from focalnet_jax.data.folds import read_given_split

    (tmp_path / "fold-0.json").write_text(json.dumps({"train": ["b"], "val": ["a"], "split": "x"}))
    (tmp_path / "fold-1.json").write_text(json.dumps({"train": ["a"], "val": ["b"]}))
    with pytest.raises(UserError, match="fold-0.json and fold-1.json are folds of two different "
                       r"splits \(the second has no split id\)"):  # fmt: skip
        read_given_split(tmp_path, 0, 2)
    (tmp_path / "fold-0.json").write_text(json.dumps({"train": ["b"], "val": ["a"]}))
    assert read_given_split(tmp_path, 0, 2) == (["b"], ["a"])
