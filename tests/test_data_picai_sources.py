"""PI-CAI as distributed: five image folders, expert labels filled in by AI-derived ones, and the
marksheet's csPCa flag guarding cases that have no label file."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from focalnet_jax.cli import main
from focalnet_jax.data.gland_labels import LabelledCase, check_gland_labels
from focalnet_jax.data.io import CaseError, read_label
from focalnet_jax.data.layouts import LayoutError, discover_picai, read_manifest
from focalnet_jax.data.picai_sources import find_file, label_scheme, marksheet_cspca
from focalnet_jax.data.store import open_store

MARKSHEET = [
    "patient_id,study_id,lesion_GS,lesion_ISUP,case_ISUP,case_csPCa",
    '10000,1000000,"4+3,3+4","3,2",3,YES',
    "10001,1000001,0+0,0,0,NO",
    "10002,1000002,N/A,N/A,0,NO",
    '10003,1000003,"3+4,4+3,N/A","2,3,N/A",3,YES',
    "10003,1000004,4+4,4,4,YES",
]


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _replica(root, fold_of=None):
    """PI-CAI file names (empty files: discovery reads names only): patient 10003 has two
    studies; 10002 lies in fold 3's folder; `_cor`/`_sag` beside every T2w; expert labels for
    10000 and 10003_1000003, AI labels for 10000, 10001 and 10003_1000004."""
    fold_of = fold_of or {"10000": 0, "10001": 0, "10002": 3, "10003": 0}
    for case in ("10000_1000000", "10001_1000001", "10002_1000002", "10003_1000003",
                 "10003_1000004"):  # fmt: skip
        patient = case.split("_")[0]
        folder = root / f"picai_public_images_fold{fold_of[patient]}" / patient
        for name in ("t2w", "adc", "hbv", "cor", "sag"):
            _touch(folder / f"{case}_{name}.mha")
    human = root / "human_expert" / "resampled"
    ai = root / "AI" / "Bosma22a"
    for case in ("10000_1000000", "10003_1000003"):
        _touch(human / f"{case}.nii.gz")
    for case in ("10000_1000000", "10001_1000001", "10003_1000004"):
        _touch(ai / f"{case}.nii.gz")
    (root / "marksheet.csv").write_text("\n".join(MARKSHEET) + "\n")
    return human, ai


def test_images_of_several_fold_folders_are_one_dataset(tmp_path):
    """The five archive folders were no dataset: their parent found 'no cases', and only one
    folder could be given."""
    _replica(tmp_path)
    folds = [tmp_path / "picai_public_images_fold0", tmp_path / "picai_public_images_fold3"]
    by_list = discover_picai(folds, unlabelled="negative")
    by_parent = discover_picai(tmp_path, unlabelled="negative")
    ids = ["10000_1000000", "10001_1000001", "10002_1000002", "10003_1000003", "10003_1000004"]
    for cases in (by_list, by_parent):
        assert [c.case_id for c in cases] == ids
        assert [c.patient_id for c in cases] == ["10000", "10001", "10002", "10003", "10003"]
    assert by_list[2].components["t2w"] == str(folds[1] / "10002" / "10002_1000002_t2w.mha")


def test_a_study_in_two_fold_folders_is_an_error_naming_both(tmp_path):
    _replica(tmp_path)
    copy = tmp_path / "picai_public_images_fold4" / "10001" / "10001_1000001_t2w.mha"
    _touch(copy)
    with pytest.raises(LayoutError, match=r"case '10001_1000001': files in two patient folders"):
        discover_picai(tmp_path, unlabelled="negative")


@pytest.mark.parametrize(
    ("files", "kind", "name", "first"),
    [
        (("Pat1/Pat1_s1", "Pat1/pat1_s2"), "patient", "pat1", "Pat1"),
        (("Pat1/Pat1_s1", "pat1/pat1_s1"), "patient", "pat1", "Pat1"),
        (("P3/P3_S1", "P3/P3_s1"), "case", "P3_s1", "P3_S1"),
    ],
)
def test_ids_differing_in_letter_case_alone_are_refused(tmp_path, files, kind, name, first):
    """Two studies of one patient folder written `Pat1_...` and `pat1_...` were two patients,
    whose folds could put one study in training and the other in validation (the manifest
    refuses such ids); on macOS and Windows such names are one file."""
    for stem in files:
        for component in ("t2w", "adc"):
            _touch(tmp_path / "images" / f"{stem}_{component}.mha")
    with pytest.raises(LayoutError) as refused:
        discover_picai(tmp_path / "images", unlabelled="negative")
    message = str(refused.value)
    assert message.startswith(f"{kind} {name!r} (") and f") is {first!r} (" in message
    assert message.endswith(f") in another letter case; name each {kind}'s files the same way")


def test_first_labels_folder_holding_a_case_wins(tmp_path):
    """Expert labels, then AI-derived ones (PI-CAI's semi-supervised setting): one --labels only."""
    human, ai = _replica(tmp_path)
    cases = discover_picai(tmp_path, [human, ai], unlabelled="negative")
    labels = {c.case_id: c.label for c in cases}
    assert labels == {
        "10000_1000000": str(human / "10000_1000000.nii.gz"),  # in both: the expert's
        "10001_1000001": str(ai / "10001_1000001.nii.gz"),
        "10002_1000002": None,  # in neither: lesion-free, as asked
        "10003_1000003": str(human / "10003_1000003.nii.gz"),
        "10003_1000004": str(ai / "10003_1000004.nii.gz"),
    }
    swapped = {c.case_id: c.label for c in discover_picai(tmp_path, [ai, human], unlabelled="skip")}
    assert swapped["10000_1000000"] == str(ai / "10000_1000000.nii.gz")
    assert "10002_1000002" not in swapped
    # A case in neither names both folders and the names looked for (it said `<case>.nii.gz`).
    reason = (
        "label missing: looked for 10002_1000002 with suffix .nii.gz, .nii, .mha, .nrrd or .dcm "
        f"in this folder and {ai}"
    )
    with pytest.raises(CaseError) as info:
        discover_picai(tmp_path, [human, ai])
    assert str(info.value) == f"case '10002_1000002', file '{human}': {reason}"
    refused = []
    assert len(discover_picai(tmp_path, [human, ai], errors=refused)) == 4
    assert refused == [("10002_1000002", str(human), reason)]
    # With one folder the case's error came from preprocessing: "file not found" for
    # `10001_1000001.nii.gz`, one of the four names accepted.
    with pytest.raises(CaseError) as info:
        discover_picai(tmp_path, human)
    assert str(info.value) == (
        f"case '10001_1000001', file '{human}': label missing: looked for 10001_1000001 with "
        "suffix .nii.gz, .nii, .mha, .nrrd or .dcm in this folder"
    )


def test_a_missing_component_file_names_the_component_and_the_names_looked_for(tmp_path):
    """An exam stored as NIfTI without its ADC was reported as "file not found" for
    `10001_1000001_adc.nii.gz`, a name guessed from the exam's other files."""
    human, ai = _replica(tmp_path)
    folder = tmp_path / "picai_public_images_fold0" / "10001"
    for name in ("t2w", "hbv"):
        (folder / f"10001_1000001_{name}.mha").rename(folder / f"10001_1000001_{name}.nii.gz")
    (folder / "10001_1000001_adc.mha").unlink()
    reason = (
        "adc image missing: looked for 10001_1000001_adc with suffix .mha, .mhd, .nii, .nii.gz "
        "or .nrrd in this folder"
    )
    with pytest.raises(CaseError) as info:
        discover_picai(tmp_path, [human, ai], unlabelled="negative")
    assert str(info.value) == f"case '10001_1000001', file '{folder}': {reason}"
    refused = []
    cases = discover_picai(tmp_path, [human, ai], unlabelled="negative", errors=refused)
    assert refused == [("10001_1000001", str(folder), reason)]
    assert "10001_1000001" not in [c.case_id for c in cases] and len(cases) == 4
    # A case left out for want of a label is not refused for a missing component.
    kept = discover_picai(tmp_path, human, unlabelled="skip")
    assert [c.case_id for c in kept] == ["10000_1000000", "10003_1000003"]


def test_marksheet_csPCa_case_without_label_is_not_stored_lesion_free(tmp_path):
    """`--unlabelled negative` stored 10003_1000004 (case_csPCa YES, ISUP 4) as background when
    only the expert labels were given."""
    human, ai = _replica(tmp_path)
    sheet = tmp_path / "marksheet.csv"
    with pytest.raises(CaseError) as info:
        discover_picai(tmp_path, human, unlabelled="negative", marksheet=sheet)
    message = str(info.value)
    assert "\n" not in message  # 10001_1000001 and 10002_1000002 (NO, no label) pass
    assert message.startswith(f"case '10003_1000004', file '{sheet}': the marksheet says csPCa")
    assert "--unlabelled skip" in message
    refused = []
    cases = discover_picai(tmp_path, human, unlabelled="negative", marksheet=sheet, errors=refused)
    # Listed with the marksheet as its file (it was the case's first image, unrelated).
    assert [r[:2] for r in refused] == [("10003_1000004", str(sheet))]
    assert "says csPCa (case_csPCa 'YES') but no label file is in" in refused[0][2]
    assert [c.case_id for c in cases] == [
        "10000_1000000", "10001_1000001", "10002_1000002", "10003_1000003"
    ]  # fmt: skip
    assert cases[0].meta["lesion_GS"] == "4+3,3+4" and cases[2].meta["lesion_ISUP"] == "N/A"
    filled = discover_picai(tmp_path, [human, ai], unlabelled="negative", marksheet=sheet)
    assert len(filled) == 5


def test_marksheet_cspca_reads_the_flag_then_the_case_isup():
    assert marksheet_cspca({"case_csPCa": "YES", "case_ISUP": "0"}) is True
    assert marksheet_cspca({"case_csPCa": "no", "case_ISUP": "3"}) is False
    assert marksheet_cspca({"case_ISUP": "2"}) is True
    assert marksheet_cspca({"case_ISUP": "1"}) is False  # GS 3+3 is not clinically significant
    assert marksheet_cspca({"case_ISUP": "N/A"}) is None and marksheet_cspca({}) is None
    # A spreadsheet's `2.0` said neither: --unlabelled negative stored the csPCa case lesion-free.
    assert marksheet_cspca({"case_ISUP": "2.0"}) is True
    assert marksheet_cspca({"case_ISUP": "1.0"}) is False
    assert (
        marksheet_cspca({"case_ISUP": "2.5"}) is None
        and marksheet_cspca({"case_ISUP": "nan"}) is None
    )


def test_marksheet_cspca_reads_the_lesions_where_the_case_columns_are_missing():
    """The marksheet as picai_labels first published it has `lesion_GS` alone (no case_ISUP,
    no case_csPCa): every row said neither, and a csPCa case without a label file was stored
    lesion-free by --unlabelled negative without a word."""
    assert marksheet_cspca({"lesion_GS": "3+4,4+4"}) is True
    assert marksheet_cspca({"lesion_GS": "4+4,N/A"}) is True  # one csPCa lesion tells
    assert marksheet_cspca({"lesion_GS": "3+3,0+0"}) is False  # every lesion below ISUP 2
    assert marksheet_cspca({"lesion_GS": "0+0,N/A"}) is None  # a lesion without histopathology
    assert (
        marksheet_cspca({"lesion_GS": "N/A"}) is None and marksheet_cspca({"lesion_GS": ""}) is None
    )
    assert marksheet_cspca({"lesion_GS": "3+4,x"}) is None  # not a score: tells nothing
    assert marksheet_cspca({"lesion_ISUP": "1,2"}) is True
    assert marksheet_cspca({"lesion_ISUP": "0,1"}) is False
    # The case's columns come first, then lesion_ISUP, then lesion_GS.
    assert marksheet_cspca({"case_ISUP": "1", "lesion_GS": "4+4"}) is False
    assert marksheet_cspca({"case_ISUP": "N/A", "lesion_ISUP": "0", "lesion_GS": "4+4"}) is False


def test_an_old_marksheet_refuses_an_unlabelled_cspca_case_and_warns_where_it_cannot_tell(
    tmp_path, caplog
):
    human, _ = _replica(tmp_path)
    sheet = tmp_path / "old_marksheet.csv"
    rows = [
        ",patient_id,study_id,lesion_GS",
        '0,10000,1000000,"4+3,3+4"',
        "1,10001,1000001,0+0",
        "2,10002,1000002,N/A",
        '3,10003,1000003,"3+4,N/A"',
        '4,10003,1000004,"3+4,4+4"',
    ]
    sheet.write_text("\n".join(rows) + "\n")
    with pytest.raises(CaseError) as info:
        discover_picai(tmp_path, human, unlabelled="negative", marksheet=sheet)
    assert str(info.value).startswith(
        f"case '10003_1000004', file '{sheet}': the marksheet says csPCa (lesion_GS '3+4,4+4') "
        "but no label file is in"
    )
    sheet.write_text("patient_id,study_id,psa\n" + "".join(
        f"{case.replace('_', ',')},5\n" for case in
        ("10000_1000000", "10001_1000001", "10002_1000002", "10003_1000003", "10003_1000004")
    ))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="focalnet_jax.data.picai_sources"):
        assert len(discover_picai(tmp_path, human, unlabelled="negative", marksheet=sheet)) == 5
    assert f"marksheet {sheet}: no row says whether its case holds csPCa" in caplog.text


def test_label_folders_that_read_value_1_differently_are_refused(tmp_path):
    human, ai = _replica(tmp_path)
    assert label_scheme([human, ai]) == "picai"
    (ai / "dataset.json").write_text(json.dumps({"label_values": "isup"}))
    with pytest.raises(LayoutError, match=r"read label value 1 differently"):
        label_scheme([human, ai])


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
    _replica(tmp_path)
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


def test_a_labels_folder_that_gives_no_case_its_label_is_refused(tmp_path):
    """With the expert labels' folder given one level too high (`human_expert/`, whose files lie
    in `resampled/`), or after the AI-derived labels (which cover every PI-CAI case), each case
    took its AI label: every grade unknown, and nothing said so."""
    human, ai = _replica(tmp_path)
    _touch(ai / "10003_1000003.nii.gz")  # the AI labels cover every case, as PI-CAI's do
    with pytest.raises(LayoutError) as raised:
        discover_picai(tmp_path, [human.parent, ai])
    assert str(raised.value) == (
        f"--labels {human.parent} holds no label file (.nii.gz, .nii, .mha, .nrrd, .dcm); its "
        "subfolder(s) resampled do: give one"
    )
    with pytest.raises(LayoutError) as raised:
        discover_picai(tmp_path, [ai, human], unlabelled="negative")
    assert str(raised.value) == (
        f"--labels {human} can give no case its label: the earlier --labels {ai} holds a label "
        "file of each of its 2 cases too; give the folders in order of preference (the expert "
        "annotations before the AI-derived ones), or leave this one out"
    )
    # In order, each folder gives some case its label (10002 has none: lesion-free).
    cases = discover_picai(tmp_path, [human, ai], unlabelled="negative")
    taken = {c.case_id: c.label and Path(c.label).parent for c in cases}
    assert taken == {"10000_1000000": human, "10001_1000001": ai, "10002_1000002": None,
                     "10003_1000003": human, "10003_1000004": ai}  # fmt: skip
    # In order, the AI-derived folder is kept even where the expert one labels every case of
    # the images given (here patient 10000 alone): it gives the other cases theirs.
    only = tmp_path / "only_10000"
    shutil.copytree(tmp_path / "picai_public_images_fold0" / "10000", only / "10000")
    assert [c.label for c in discover_picai(only, [human, ai])] == [
        str(human / "10000_1000000.nii.gz")
    ]


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


def test_unlabelled_skip_names_the_cases_it_leaves_out(tmp_path, caplog):
    """`--unlabelled skip` left cases out without a word: with only the expert labels, three of
    five PI-CAI cases (every csPCa case labelled by AI alone) were missing from the store, and the
    closing line counted the rest."""
    human, _ = _replica(tmp_path)
    with caplog.at_level(logging.WARNING, logger="focalnet_jax.data.layouts"):
        kept = discover_picai(tmp_path, human, unlabelled="skip")
    assert len(kept) == 2
    assert (
        f"--unlabelled skip: left out 3 case(s) (no label file in {human}): 10001_1000001, "
        "10002_1000002, 10003_1000004"
    ) in caplog.text
    caplog.clear()
    manifest = tmp_path / "cases.csv"
    manifest.write_text(
        "case_id,patient_id,t2w,adc,label\na,p,t.mha,a.mha,\nb,q,t.mha,a.mha,l.nii\n"
    )
    with caplog.at_level(logging.WARNING, logger="focalnet_jax.data.layouts"):
        assert [c.case_id for c in read_manifest(manifest, unlabelled="skip")] == ["b"]
    assert f"--unlabelled skip: left out 1 case(s) (no label in manifest {manifest}): a" in (
        caplog.text
    )


def test_a_patient_folder_beside_the_fold_folders_is_an_error(tmp_path):
    """One patient folder left beside the five fold folders made their parent a single image
    folder: the fold folders were read as patient folders without images and their cases left
    out without a word (here 4 of 5 studies)."""
    _replica(tmp_path)
    stray = tmp_path / "10009"
    for name in ("t2w", "adc"):
        _touch(stray / f"10009_1000009_{name}.mha")
    with pytest.raises(LayoutError) as info:
        discover_picai(tmp_path, unlabelled="negative")
    assert str(info.value) == (
        f"images folder {tmp_path} holds patient folders (e.g. 10009) and folders of patient "
        "folders (e.g. picai_public_images_fold0); give each image folder with its own --images"
    )


def test_a_fold_folder_unpacked_into_a_folder_of_its_name_is_an_error(tmp_path):
    """A fold archive unpacked into a folder of its own name (`fold1/fold1/<patient>`), beside
    the other fold folders: the inner folder was read as a patient folder without images and
    fold 1's cases left out without a word."""
    _replica(tmp_path, fold_of={"10000": 0, "10001": 1, "10002": 1, "10003": 0})
    fold1 = tmp_path / "picai_public_images_fold1"
    fold1.rename(tmp_path / "unpacked")
    fold1.mkdir()
    (tmp_path / "unpacked").rename(fold1 / "picai_public_images_fold1")
    with pytest.raises(LayoutError) as info:
        discover_picai(tmp_path, unlabelled="negative")
    assert str(info.value) == (
        f"images folder {fold1} holds folders of patient folders (e.g. picai_public_images_fold1)"
        "; give each image folder with its own --images"
    )


@pytest.mark.parametrize("level", ["fold", "patient"])
def test_a_link_to_a_folder_that_is_not_there_is_an_error(tmp_path, level):
    """A fold folder (or a patient folder) linked from a drive that is not mounted was left out
    without a word; an editor's hidden lock link beside it stays ignored."""
    _replica(tmp_path)
    images = tmp_path / "picai_public_images_fold0" if level == "patient" else tmp_path
    (images / "gone").symlink_to("/nonexistent/folder")
    (images / ".#notes.txt").symlink_to("root@host.1234:1700000000")
    (images / "a.txt").symlink_to("/nonexistent/a.txt")  # a file's link (listed first): left alone
    if level == "patient":  # a patient id holding a dot, listed before "gone"
        (images / "10001.5").symlink_to("/nonexistent/folder")
    with pytest.raises(LayoutError) as info:
        discover_picai(tmp_path, unlabelled="negative")
    link = images / ("10001.5" if level == "patient" else "gone")
    assert str(info.value) == f"{link} is a link to /nonexistent/folder, which does not exist"


def test_folders_beside_the_fold_folders_that_hold_no_patient_folders_are_left_alone(tmp_path):
    """A hidden folder (a trash folder holding a deleted fold) or an nnU-Net folder beside the
    fold folders was refused as a fold folder holding folders of patient folders."""
    _replica(tmp_path)
    for name in ("t2w", "adc"):
        _touch(tmp_path / ".Trash" / "f9" / "10009" / f"10009_1000009_{name}.mha")
    _touch(tmp_path / "nnUNet_raw" / "Task1" / "imagesTr" / "10009_1000009_0000.nii.gz")
    cases = discover_picai(tmp_path, unlabelled="negative")
    assert len(cases) == 5 and "10009_1000009" not in [c.case_id for c in cases]


def test_hidden_files_in_a_patient_folder_are_ignored(tmp_path):
    """macOS writes `._<name>` beside each file it copies to an exFAT or network drive: the run
    was refused, blaming an underscore in the ids."""
    _replica(tmp_path)
    folder = tmp_path / "picai_public_images_fold0" / "10000"
    (folder / "._10000_1000000_t2w.mha").write_bytes(b"\x00\x05\x16\x07junk")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    cases = discover_picai(tmp_path, unlabelled="negative")
    assert cases[0].case_id == "10000_1000000" and len(cases) == 5
    assert cases[0].components["t2w"] == str(folder / "10000_1000000_t2w.mha")


def test_label_files_of_no_given_case_are_named(tmp_path, caplog):
    """Leaving one of PI-CAI's five image folders out dropped its labelled cases without a word
    (about 300 a fold): the label files of no case found are named, one warning per folder."""
    human, ai = _replica(tmp_path)
    fold0 = tmp_path / "picai_public_images_fold0"  # 10002_1000002 lies in fold 3's folder
    (human / "dataset.json").write_text("{}")  # not a label file
    _touch(human / "10002_1000002.nii.gz")
    with caplog.at_level(logging.WARNING, logger="focalnet_jax.data.layouts"):
        cases = discover_picai(fold0, [human, ai], unlabelled="negative")
    assert "10002_1000002" not in [c.case_id for c in cases]
    warned = [r.getMessage() for r in caplog.records if "belong to no case" in r.getMessage()]
    assert warned == [
        f"1 label file(s) in {human} belong to no case of the image folder(s) (their images not "
        "given?): 10002_1000002"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="focalnet_jax.data.layouts"):
        discover_picai(tmp_path, [human, ai], unlabelled="negative")  # every folder: all match
    assert "belong to no case" not in caplog.text


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


def _gland_masks_as_labels(data, folder):
    """A label folder holding `data`'s whole-gland masks under the label names."""
    folder.mkdir()
    shutil.copy(data / "labels" / "dataset.json", folder)
    for mask in (data / "masks").glob("*.nii.gz"):
        shutil.copy(mask, folder)
    return folder


def test_gland_masks_given_as_labels_are_refused_or_named(tmp_path, capfd, caplog):
    """PI-CAI's labels come with whole-gland masks beside them, both 0/1 maps: given as
    --labels, the masks were stored as one gland-sized csPCa lesion per case. With the cases'
    masks such a run is refused (median Dice 1.00); without masks the median lesion volume
    (about 24 mL here; the real labels' lesions are under 1 mL) is named in a warning."""
    data = tmp_path / "synth"
    assert main(["synth", "--out", str(data), "--cases", "3", "--seed", "2", "--small"]) == 0
    glands = _gland_masks_as_labels(data, tmp_path / "glands")
    argv = ["preprocess", "--layout", "picai", "--images", str(data / "images")]
    capfd.readouterr()
    with pytest.raises(SystemExit) as raised:
        main([*argv, "--labels", str(glands), "--masks", str(data / "masks"),
              "--out", str(tmp_path / "s1")])  # fmt: skip
    assert raised.value.code == 2 and not (tmp_path / "s1").exists()
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        f"focalnet preprocess: error: store {tmp_path / 's1'}: the lesion labels of 3 of 3 "
        "labelled cases match their prostate masks (median Dice 1.00; 10000_1000000: 1.00, "
        "10001_1000001: 1.00, 10002_1000002: 1.00): whole-gland masks given as --labels? "
        "Nothing was written"
    )
    with caplog.at_level(logging.WARNING):
        assert main([*argv, "--labels", str(glands), "--out", str(tmp_path / "s2")]) == 0
        assert main([*argv, "--labels", str(data / "labels"), "--masks", str(data / "masks"),
                     "--out", str(tmp_path / "s3")]) == 0  # fmt: skip
    warned = [r.getMessage() for r in caplog.records if "whole-gland masks" in r.message]
    assert len(warned) == 1, warned
    median = float(warned[0].split("median volume of ")[1].split(" mL")[0])
    assert warned[0].startswith("the lesions of 3 labelled cases without a prostate mask")
    assert 20 <= median <= 30


def test_a_lesion_filling_its_gland_is_named_not_refused(caplog):
    """One case cannot tell a gland mask from a tumour filling 87 % of its gland (Dice 0.93):
    it is named in a warning among cases whose labels are lesions; fewer than 3 labelled cases
    with masks are never refused."""
    cases = [LabelledCase("big", 30.0, 0.93), LabelledCase("a", 0.8, 0.05)]
    cases += [LabelledCase("b", 1.2, 0.08), LabelledCase("c", 0.4, None)]
    with caplog.at_level(logging.WARNING):
        check_gland_labels(cases, "store")
        check_gland_labels([LabelledCase(c, 25.0, 0.99) for c in ("x", "y")], "store")
    assert caplog.messages == [
        "the lesion labels of 1 case(s) match their prostate masks (Dice >= 0.9: big: 0.93): "
        "lesions filling the gland, or whole-gland masks given as labels?",
        "the lesion labels of 2 case(s) match their prostate masks (Dice >= 0.9: x: 0.99, y: "
        "0.99): lesions filling the gland, or whole-gland masks given as labels?",
    ]


@pytest.mark.parametrize(
    "names, found",
    [
        (["c.MHA"], "c.MHA"),
        (["c.Mha"], "c.Mha"),
        (["c.nii.gz", "c.MHA"], None),  # two files: lower case found first silently won
        (["c.NII.GZ", "c.mha"], None),
        (["c.nii.gz", "c.mhd"], None),
        (["c.txt", "c_t2w.mha", "c.nii.gz"], "c.nii.gz"),
    ],
)
def test_a_file_is_found_in_any_letter_case_and_two_are_refused(tmp_path, names, found):
    for name in names:
        _touch(tmp_path / name)
    if found is None:
        with pytest.raises(CaseError, match=r"case 'c', file '.*': two files for c: "):
            find_file(tmp_path, "c", (".nii.gz", ".mha", ".mhd"), "c")
    else:
        assert find_file(tmp_path, "c", (".nii.gz", ".mha", ".mhd"), "c") == tmp_path / found


@pytest.mark.parametrize(
    ("patient", "study"),
    [("P_1", "1000001"), ("10001", "1000001_b")],  # an underscore in the patient or study id
)
def test_an_id_holding_an_underscore_is_refused_not_left_out(tmp_path, patient, study):
    """Files named `P_1_1000001_t2w.mha` in patient folder `P_1` did not fit the PI-CAI name:
    the case was left out of the store, without a word where no label named it."""
    images = tmp_path / "images"
    for name in ("t2w", "adc", "hbv"):
        _touch(images / "10000" / f"10000_1000000_{name}.mha")
        _touch(images / patient / f"{patient}_{study}_{name}.mha")
    with pytest.raises(LayoutError) as refused:
        discover_picai(images, unlabelled="negative")
    assert str(refused.value) == (
        f"image file {images / patient / f'{patient}_{study}_adc.mha'} is of no case: not named "
        "<patient>_<study>_<component>.<suffix> (PI-CAI layout: patient and study ids may not "
        "hold '_')"
    )


def test_other_files_of_a_case_read_in_its_patient_folder_are_left_alone(tmp_path):
    """A derived image or a gland mask kept beside a case's images is no case of its own: it
    neither stops the reading nor is read."""
    folder = tmp_path / "images" / "10000"
    for name in ("t2w", "adc", "hbv", "t2w_n4corrected"):
        _touch(folder / f"10000_1000000_{name}.mha")
    _touch(folder / "10000_1000000.nii.gz")
    cases = discover_picai(tmp_path / "images", unlabelled="negative")
    assert [(c.case_id, sorted(c.components)) for c in cases] == [("10000_1000000", ["adc", "t2w"])]
    # A second study whose id holds '_', beside one read: refused, not left out.
    _touch(folder / "10000_1000000_b_t2w.mha")
    with pytest.raises(LayoutError, match="10000_1000000_b_t2w.mha is of no case"):
        discover_picai(tmp_path / "images", unlabelled="negative")


def test_a_marksheet_row_repeated_with_its_ids_as_floats_is_one_row(tmp_path):
    """`10000.0` is the id `10000` (a spreadsheet's float column): a row repeated so was refused
    as "with other values"."""
    from focalnet_jax.data.picai_sources import read_marksheet

    sheet = tmp_path / "marksheet.csv"
    sheet.write_text("patient_id,study_id,case_csPCa\n10000,1000000,YES\n10000.0,1000000.0,YES\n")
    assert read_marksheet(sheet) == {
        "10000_1000000": {"patient_id": "10000", "study_id": "1000000", "case_csPCa": "YES"}
    }


def test_a_control_character_in_a_marksheet_cell_is_refused(tmp_path):
    """Every cell of a marksheet is kept in the store: `YES\x01` read as no csPCa flag, and a
    csPCa case without a label was no longer refused."""
    from focalnet_jax.data.picai_sources import read_marksheet

    sheet = tmp_path / "marksheet.csv"
    sheet.write_text("patient_id,study_id,case_csPCa\n10000,1000000,YES\x01\n")
    with pytest.raises(LayoutError) as refused:
        read_marksheet(sheet)
    assert str(refused.value) == (
        f"marksheet {sheet}, line 2, column 'case_csPCa': cell holds control character U+0001; "
        "remove it"
    )
