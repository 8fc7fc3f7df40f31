"""`focalnet preprocess --layout picai` end to end: repeated --images and --labels recorded
absolute, cases all refused listed in `<out>.errors.csv` (removed by a later store), suffixes in
upper case read as the lower case ones."""

from __future__ import annotations

import csv
import logging
import shutil

import numpy as np
import pytest
from picai_replica import replica

from focalnet_jax.cli import main
from focalnet_jax.data.io import CaseError, read_label
from focalnet_jax.data.store import open_store


def test_preprocess_cli_takes_repeated_images_and_labels(tmp_path, caplog, monkeypatch):
    """End to end on synthetic cases split into two image folders and two label folders, given
    as paths relative to the working folder: the store records them absolute (they were recorded
    as typed, meaningless from any other folder)."""
    data = tmp_path / "synth"
    assert main(["synth", "--out", str(data), "--cases", "3", "--seed", "3", "--small"]) == 0
    patients = sorted(p.name for p in (data / "images").iterdir())
    first, second = tmp_path / "fold0", tmp_path / "fold1"
    shutil.copytree(data / "images" / patients[0], first / patients[0])
    for patient in patients[1:]:
        shutil.copytree(data / "images" / patient, second / patient)
    labels = sorted((data / "labels").glob("*.nii.gz"))
    expert, ai = tmp_path / "expert", tmp_path / "ai"
    for folder, files in ((expert, labels[:1]), (ai, labels)):
        folder.mkdir()
        shutil.copy(data / "labels" / "dataset.json", folder)
        for file in files:
            shutil.copy(file, folder)
    rows = (data / "marksheet.csv").read_text().splitlines()  # patient_id,study_id,case_ISUP
    patient, study, isup = rows[1].split(",")
    rows[1] = f"{patient},{study},{0 if int(isup) >= 2 else 3}"  # contradicts its label
    (tmp_path / "marksheet.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "store"
    monkeypatch.chdir(tmp_path)
    args = ["preprocess", "--layout", "picai", "--images", "fold0", "--images", "fold1"]
    args += ["--labels", "expert", "--labels", "ai", "--out", str(out)]
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--marksheet", str(tmp_path / "marksheet.csv")]) == 0
    warned = [r.getMessage() for r in caplog.records if "contradicts the marksheet" in r.message]
    flag = "no csPCa" if int(isup) >= 2 else "csPCa"
    assert len(warned) == 1 and "1 stored case(s) " in warned[0]
    assert f"{patient}_{study} (marksheet: {flag}, label max class {isup})" in warned[0]
    store = open_store(out)
    used = {r["case_id"]: r["files"]["label"] for r in store.cases}
    assert len(used) == len(labels) == 3
    assert used[labels[0].name[: -len(".nii.gz")]] == str(expert / labels[0].name)
    assert all(used[f.name[: -len(".nii.gz")]] == str(ai / f.name) for f in labels[1:])
    t2w = {r["case_id"]: r["files"]["t2w"] for r in store.cases}[f"{patient}_{study}"]
    assert t2w == str(
        (first if patient == patients[0] else second) / patient / f"{patient}_{study}_t2w.mha"
    )


def test_cases_all_refused_while_found_are_listed_beside_the_store(tmp_path, capfd):
    """With --skip-bad-cases and every case refused before preprocessing (here: no label file
    in the labels folder), the error named the first alone and the others were listed nowhere;
    a run whose cases all failed in preprocessing lists them in `<out>.errors.csv`, and so does
    this one now."""
    replica(tmp_path)
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "20000_2000000.nii.gz").write_bytes(b"")  # another case's: none of these has one
    out = tmp_path / "store"
    argv = ["preprocess", "--layout", "picai", "--images", str(tmp_path), "--labels", str(labels),
            "--out", str(out), "--skip-bad-cases"]  # fmt: skip
    capfd.readouterr()
    with pytest.raises(SystemExit) as raised:
        main(argv)
    err = capfd.readouterr().err.strip().splitlines()
    assert raised.value.code == 2 and len(err) == 1, err
    assert err[0].endswith(
        f"5 refused, listed in {out}.errors.csv, first: case '10000_1000000', file '{labels}': "
        "label missing: looked for 10000_1000000 with suffix .nii.gz, .nii, .mha, .nrrd or .dcm in "
        "this folder"
    )
    with (tmp_path / "store.errors.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["case", "file", "reason"]
    assert [r[0] for r in rows[1:]] == [
        "10000_1000000", "10001_1000001", "10002_1000002", "10003_1000003", "10003_1000004"
    ]  # fmt: skip
    assert all(r[1] == str(tmp_path / "labels") and "label missing" in r[2] for r in rows[1:])
    assert not out.exists()


def test_a_store_written_removes_the_errors_listed_beside_it_by_a_failed_run(tmp_path):
    """`<out>.errors.csv` of a run that stored no case was left beside the store a later run
    wrote, as if it listed that run's bad cases."""
    data = tmp_path / "synth"
    assert main(["synth", "--out", str(data), "--cases", "2", "--seed", "5", "--small"]) == 0
    (tmp_path / "no_labels").mkdir()
    (tmp_path / "no_labels" / "20000_2000000.nii.gz").write_bytes(b"")  # no label of these cases
    out = tmp_path / "store"
    argv = ["preprocess", "--layout", "picai", "--images", str(data / "images"), "--out", str(out)]
    with pytest.raises(SystemExit):
        main([*argv, "--labels", str(tmp_path / "no_labels"), "--skip-bad-cases"])
    assert (tmp_path / "store.errors.csv").is_file() and not out.exists()
    assert main([*argv, "--labels", str(data / "labels")]) == 0
    assert len(open_store(out).case_ids) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_labels", "store", "synth"]


def test_suffixes_in_upper_case_preprocess_as_the_lower_case_ones(tmp_path):
    """`10000_1000000_t2w.MHA` was found as a case, then called missing (ITK reads no `.MHA`);
    labels as `.NII.GZ` were named as belonging to no case. A mixed-case NIfTI suffix, which ITK
    refuses, is named with the reason."""
    data = tmp_path / "synth"
    assert main(["synth", "--out", str(data), "--cases", "2", "--seed", "5", "--small"]) == 0
    upper = tmp_path / "upper"
    shutil.copytree(data, upper)
    for file in [*(upper / "images").rglob("*.mha"), *(upper / "labels").glob("*.nii.gz")]:
        stem, _, suffix = file.name.partition(".")
        file.rename(file.with_name(f"{stem}.{suffix.upper()}"))
    stores = {}
    for name in ("synth", "upper"):
        root = tmp_path / name
        args = ["preprocess", "--layout", "picai", "--images", str(root / "images")]
        args += ["--labels", str(root / "labels"), "--out", str(tmp_path / f"{name}.store")]
        assert main(args) == 0
        stores[name] = open_store(tmp_path / f"{name}.store")
    assert (
        stores["upper"].case_ids == stores["synth"].case_ids and len(stores["synth"].case_ids) == 2
    )
    np.testing.assert_array_equal(stores["upper"].images, stores["synth"].images)
    np.testing.assert_array_equal(stores["upper"].classes, stores["synth"].classes)
    label = next((upper / "labels").glob("*.NII.GZ"))
    mixed = label.with_name(label.name.replace(".NII.GZ", ".Nii.gz"))
    label.rename(mixed)
    with pytest.raises(CaseError, match=r"NIfTI suffix '\.Nii\.gz' in mixed letter case"):
        read_label(mixed, case="c", label_values="picai")
