"""DICOM folders that used to be read wrongly without a word are refused, naming case, file and
reason: a folder of several series (or of series folders), a missing or repeated slice, several
b-values; and the ProstateX-0000 slice positions docs/data.md quotes, measured."""

from __future__ import annotations

import shutil

import image_refusals
import numpy as np
import pytest
import SimpleITK as sitk
from image_refusals import expect

from focalnet_jax.data import preprocess_case
from focalnet_jax.data.io import CaseError, read_image

mixed_folder = image_refusals.mixed_folder  # a fixture


T2W_UID = "1.3.6.1.4.1.14519.5.2.1.7311.5101.160028252338004527274326500702"
ADC_UID = "1.3.6.1.4.1.14519.5.2.1.7311.5101.339319789559896104041345048780"


@pytest.mark.real_data
def test_folder_of_two_series_is_refused_and_either_can_be_chosen(mixed_folder):
    error = expect(mixed_folder, "folder holds 2 DICOM series")
    assert error.file == str(mixed_folder)
    assert f"{T2W_UID} ('t2_tse_tra', 19 files)" in error.reason
    assert f"{ADC_UID} ('ep2d_diff_tra_DYNDIST_ADC', 19 files)" in error.reason
    assert read_image(mixed_folder, series="t2_tse_tra").GetSize() == (384, 384, 19)
    assert read_image(mixed_folder, series=ADC_UID).GetSize() == (84, 128, 19)
    expect(mixed_folder, "series 'b800' matches no series", series="b800")


@pytest.mark.real_data
def test_two_components_of_one_folder_need_two_series(mixed_folder):
    components = {"t2w": mixed_folder, "adc": mixed_folder}
    case = preprocess_case(components, series={"t2w": T2W_UID, "adc": ADC_UID}, case_id="c1")
    assert case.images.shape == (19, 128, 128, 2)
    with pytest.raises(CaseError) as info:  # the ADC series also as a DCE (no ImageType rule)
        preprocess_case(
            {**components, "dce": mixed_folder},
            series={"t2w": T2W_UID, "adc": ADC_UID, "dce": "ep2d_diff_tra_DYNDIST_ADC"},
            case_id="c1",
        )
    assert info.value.reason == "adc and dce are the same image (same grid and voxels)"
    with pytest.raises(CaseError) as info:
        preprocess_case(components, series={"t2w": T2W_UID, "adc": T2W_UID}, case_id="c1")
    assert info.value.reason.startswith("series 't2_tse_tra' has ImageType 'ORIGINAL")
    with pytest.raises(CaseError) as info:
        preprocess_case(
            {"t2w": mixed_folder, "dce": mixed_folder},
            series={"t2w": T2W_UID, "dce": T2W_UID},
            case_id="c1",
        )
    assert info.value.reason == "t2w and dce are the same series"


@pytest.mark.real_data
def test_series_with_a_missing_slice_is_refused_naming_the_gap(prostatex_case_dir, tmp_path):
    folder = tmp_path / "adc"
    shutil.copytree(prostatex_case_dir / "adc", folder)
    (folder / "1-07.dcm").unlink()  # instance 7: its neighbours lie 2 x 3 mm apart
    error = expect(folder, "missing slice or uneven spacing")
    assert "(6.00 mm, median spacing 3.00 mm, tolerance 0.03 mm)" in error.reason
    assert "1-08.dcm (instance 8) and 1-06.dcm (instance 6)" in error.reason
    assert "1 irregular step(s) of 17" in error.reason


@pytest.mark.real_data
def test_series_with_a_repeated_slice_is_refused(prostatex_case_dir, tmp_path):
    folder = tmp_path / "adc"
    shutil.copytree(prostatex_case_dir / "adc", folder)
    shutil.copy(folder / "1-07.dcm", folder / "1-07-copy.dcm")
    error = expect(folder, "the same image (SOPInstanceUID) as 1-07")
    assert error.file in (str(folder / "1-07.dcm"), str(folder / "1-07-copy.dcm"))
    assert error.reason.endswith("1 file(s) of 20 copy another file of the series (exported "
                                 "twice?); remove the copies")  # fmt: skip


@pytest.mark.real_data
def test_series_exported_twice_into_one_folder_is_not_called_several_volumes(
    prostatex_case_dir, tmp_path
):
    # Every position held two images, so it was refused as "several volumes in one series
    # (b-values, echoes or time points?)".
    folder = tmp_path / "adc"
    shutil.copytree(prostatex_case_dir / "adc", folder)
    for file in list(folder.iterdir()):
        shutil.copy(file, folder / f"copy-{file.name}")
    expect(folder, "19 file(s) of 38 copy another file of the series")


def _copy_as_another_image(source, target) -> None:
    """Copy a DICOM file with another SOPInstanceUID (its last digit changed), as another image
    at the same position (another b-value) has."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(source))
    reader.ReadImageInformation()
    uid = reader.GetMetaData("0008|0018").strip("\0 ").encode()
    other = uid[:-1] + (b"1" if uid[-1:] != b"1" else b"2")
    target.write_bytes(source.read_bytes().replace(uid, other))


@pytest.mark.real_data
def test_series_of_several_b_values_is_refused_as_several_volumes(prostatex_case_dir, tmp_path):
    # A DWI series holding two b-values: every position twice. It was reported as one repeated
    # slice with "median spacing 0.00 mm".
    folder = tmp_path / "dwi"
    folder.mkdir()
    for file in (prostatex_case_dir / "hbv").iterdir():
        shutil.copy(file, folder / f"b50_{file.name}")
        _copy_as_another_image(file, folder / f"b800_{file.name}")
    error = expect(folder, "each of the 19 slice positions holds 2 images (38 files)")
    assert "several volumes in one series (b-values" in error.reason
    assert error.file == str(folder) and "median spacing" not in error.reason


def _slice_positions(folder):
    """[n, 3] ImagePositionPatient and the 6 direction cosines of a DICOM series, from its
    headers (SimpleITK, independently of focalnet_jax.data.dicom)."""
    positions, cosines = [], set()
    for file in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)):
        reader = sitk.ImageFileReader()
        reader.SetFileName(file)
        reader.ReadImageInformation()
        positions.append([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
        cosines.add(tuple(float(v) for v in reader.GetMetaData("0020|0037").split("\\")))
    assert len(cosines) == 1
    return np.array(positions), np.array(cosines.pop()).reshape(2, 3)


@pytest.mark.real_data
@pytest.mark.parametrize("component", ["t2w", "adc", "hbv"])
def test_prostatex_slice_positions_are_regular_to_the_bounds_docs_quote(
    prostatex_case_dir, component
):
    # docs/data.md quotes these bounds for ProstateX-0000, 4 to 5 orders of magnitude below the
    # tolerances of the stack check (0.03 mm; 0.03 mm + 0.001 mm per mm in the plane).
    positions, cosines = _slice_positions(prostatex_case_dir / component)
    along = np.sort(positions @ np.cross(cosines[0], cosines[1]))
    steps = np.diff(along)
    assert len(steps) == 18 and abs(np.median(steps) - 3.0) < 1e-6
    assert np.abs(steps - np.median(steps)).max() < 4e-7  # 3.5e-7 mm measured
    in_plane = positions @ cosines.T
    assert np.abs(in_plane - in_plane[0]).max() < 4e-6  # 3.1e-6 mm measured


@pytest.mark.real_data
def test_exam_folder_given_for_a_series_names_its_series_folders(prostatex_case_dir):
    # DICOM exports nest patient/study/series folders; the exam folder given as T2w said only
    # "folder holds no DICOM series".
    error = expect(prostatex_case_dir, "folder holds no DICOM series; it holds folders ")
    assert error.reason.endswith("adc, hbv, t2w: give one series' folder")
