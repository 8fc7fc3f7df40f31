"""PI-CAI label folders: expert labels filled in by AI-derived ones, the first folder holding a
case's label wins; folders that give no case a label or read value 1 otherwise are refused, cases
left out or label files of no case named, whole-gland masks given as labels refused or named."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from picai_replica import replica, touch

from focalnet_jax.cli import main
from focalnet_jax.data.gland_labels import LabelledCase, check_gland_labels
from focalnet_jax.data.io import CaseError
from focalnet_jax.data.layouts import LayoutError, discover_picai, read_manifest
from focalnet_jax.data.picai_sources import label_scheme


def test_first_labels_folder_holding_a_case_wins(tmp_path):
    """Expert labels, then AI-derived ones (PI-CAI's semi-supervised setting): one --labels only."""
    human, ai = replica(tmp_path)
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


def test_label_folders_that_read_value_1_differently_are_refused(tmp_path):
    human, ai = replica(tmp_path)
    assert label_scheme([human, ai]) == "picai"
    (ai / "dataset.json").write_text(json.dumps({"label_values": "isup"}))
    with pytest.raises(LayoutError, match=r"read label value 1 differently"):
        label_scheme([human, ai])


def test_a_labels_folder_that_gives_no_case_its_label_is_refused(tmp_path):
    """With the expert labels' folder given one level too high (`human_expert/`, whose files lie
    in `resampled/`), or after the AI-derived labels (which cover every PI-CAI case), each case
    took its AI label: every grade unknown, and nothing said so."""
    human, ai = replica(tmp_path)
    touch(ai / "10003_1000003.nii.gz")  # the AI labels cover every case, as PI-CAI's do
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


def test_unlabelled_skip_names_the_cases_it_leaves_out(tmp_path, caplog):
    """`--unlabelled skip` left cases out without a word: with only the expert labels, three of
    five PI-CAI cases (every csPCa case labelled by AI alone) were missing from the store, and the
    closing line counted the rest."""
    human, _ = replica(tmp_path)
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


def test_label_files_of_no_given_case_are_named(tmp_path, caplog):
    """Leaving one of PI-CAI's five image folders out dropped its labelled cases without a word
    (about 300 a fold): the label files of no case found are named, one warning per folder."""
    human, ai = replica(tmp_path)
    fold0 = tmp_path / "picai_public_images_fold0"  # 10002_1000002 lies in fold 3's folder
    (human / "dataset.json").write_text("{}")  # not a label file
    touch(human / "10002_1000002.nii.gz")
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
