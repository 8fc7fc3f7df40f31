"""PI-CAI image folders: the five fold folders read as one dataset; studies in two folders, ids
differing in letter case or holding '_', stray, nested or dangling folders and missing files are
refused naming them; hidden and other files of a case are left alone."""

from __future__ import annotations

import pytest
from picai_replica import replica, touch

from focalnet_jax.data.io import CaseError
from focalnet_jax.data.layouts import LayoutError, discover_picai
from focalnet_jax.data.picai_sources import find_file


def test_images_of_several_fold_folders_are_one_dataset(tmp_path):
    """The five archive folders were no dataset: their parent found 'no cases', and only one
    folder could be given."""
    replica(tmp_path)
    folds = [tmp_path / "picai_public_images_fold0", tmp_path / "picai_public_images_fold3"]
    by_list = discover_picai(folds, unlabelled="negative")
    by_parent = discover_picai(tmp_path, unlabelled="negative")
    ids = ["10000_1000000", "10001_1000001", "10002_1000002", "10003_1000003", "10003_1000004"]
    for cases in (by_list, by_parent):
        assert [c.case_id for c in cases] == ids
        assert [c.patient_id for c in cases] == ["10000", "10001", "10002", "10003", "10003"]
    assert by_list[2].components["t2w"] == str(folds[1] / "10002" / "10002_1000002_t2w.mha")


def test_a_study_in_two_fold_folders_is_an_error_naming_both(tmp_path):
    replica(tmp_path)
    copy = tmp_path / "picai_public_images_fold4" / "10001" / "10001_1000001_t2w.mha"
    touch(copy)
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
            touch(tmp_path / "images" / f"{stem}_{component}.mha")
    with pytest.raises(LayoutError) as refused:
        discover_picai(tmp_path / "images", unlabelled="negative")
    message = str(refused.value)
    assert message.startswith(f"{kind} {name!r} (") and f") is {first!r} (" in message
    assert message.endswith(f") in another letter case; name each {kind}'s files the same way")


def test_a_missing_component_file_names_the_component_and_the_names_looked_for(tmp_path):
    """An exam stored as NIfTI without its ADC was reported as "file not found" for
    `10001_1000001_adc.nii.gz`, a name guessed from the exam's other files."""
    human, ai = replica(tmp_path)
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


def test_a_patient_folder_beside_the_fold_folders_is_an_error(tmp_path):
    """One patient folder left beside the five fold folders made their parent a single image
    folder: the fold folders were read as patient folders without images and their cases left
    out without a word (here 4 of 5 studies)."""
    replica(tmp_path)
    stray = tmp_path / "10009"
    for name in ("t2w", "adc"):
        touch(stray / f"10009_1000009_{name}.mha")
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
    replica(tmp_path, fold_of={"10000": 0, "10001": 1, "10002": 1, "10003": 0})
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
    replica(tmp_path)
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
    replica(tmp_path)
    for name in ("t2w", "adc"):
        touch(tmp_path / ".Trash" / "f9" / "10009" / f"10009_1000009_{name}.mha")
    touch(tmp_path / "nnUNet_raw" / "Task1" / "imagesTr" / "10009_1000009_0000.nii.gz")
    cases = discover_picai(tmp_path, unlabelled="negative")
    assert len(cases) == 5 and "10009_1000009" not in [c.case_id for c in cases]


def test_hidden_files_in_a_patient_folder_are_ignored(tmp_path):
    """macOS writes `._<name>` beside each file it copies to an exFAT or network drive: the run
    was refused, blaming an underscore in the ids."""
    replica(tmp_path)
    folder = tmp_path / "picai_public_images_fold0" / "10000"
    (folder / "._10000_1000000_t2w.mha").write_bytes(b"\x00\x05\x16\x07junk")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    cases = discover_picai(tmp_path, unlabelled="negative")
    assert cases[0].case_id == "10000_1000000" and len(cases) == 5
    assert cases[0].components["t2w"] == str(folder / "10000_1000000_t2w.mha")


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
        touch(tmp_path / name)
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
        touch(images / "10000" / f"10000_1000000_{name}.mha")
        touch(images / patient / f"{patient}_{study}_{name}.mha")
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
        touch(folder / f"10000_1000000_{name}.mha")
    touch(folder / "10000_1000000.nii.gz")
    cases = discover_picai(tmp_path / "images", unlabelled="negative")
    assert [(c.case_id, sorted(c.components)) for c in cases] == [("10000_1000000", ["adc", "t2w"])]
    # A second study whose id holds '_', beside one read: refused, not left out.
    touch(folder / "10000_1000000_b_t2w.mha")
    with pytest.raises(LayoutError, match="10000_1000000_b_t2w.mha is of no case"):
        discover_picai(tmp_path / "images", unlabelled="negative")
