"""A series or image given as a component it is not is refused in one line naming the case, the
file and the reason: one series given as two components (by a copied folder, or chosen by UID and
by description), one image copied into two files, an anatomical (T2w) series as ADC or high-b,
and a low-b series as high-b (docs/data.md, "What is refused and why")."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from focalnet_jax.data import preprocess_case
from focalnet_jax.data.io import CaseError, check_distinct, read_image


def _edited_copy(source, folder, edit):
    """A copy of the series `source` in `folder`, `edit(dataset)` applied to each file, as a
    series of its own (new Series and SOP Instance UIDs)."""
    folder.mkdir()
    series_uid = pydicom.uid.generate_uid()
    for file in sorted(source.iterdir()):
        dataset = pydicom.dcmread(file)
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = pydicom.uid.generate_uid()
        edit(dataset)
        dataset.save_as(folder / file.name)
    return folder


def _siemens_b(b):
    def edit(dataset):
        dataset.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0C, "IS", str(b))

    return edit


@pytest.mark.real_data
def test_a_copied_folder_given_as_a_second_component_is_the_same_series(
    prostatex_case_dir, tmp_path
):
    copy = tmp_path / "adc_copy"
    shutil.copytree(prostatex_case_dir / "adc", copy)  # same files, same SeriesInstanceUID
    components = {"t2w": prostatex_case_dir / "t2w", "adc": prostatex_case_dir / "adc", "dce": copy}
    with pytest.raises(CaseError) as info:
        preprocess_case(components, case_id="c3")
    assert (info.value.case, info.value.file) == ("c3", str(copy))
    assert info.value.reason == "adc and dce are the same image (same grid and voxels)"


def test_images_derived_from_one_series_share_its_uid_and_pass(tmp_path):
    # An ADC map and a computed high-b image of one DWI series, converted to .mha with the
    # series' tags (as PI-CAI's conversion copies them), carry one SeriesInstanceUID.
    rng = np.random.default_rng(1)
    paths = {}
    for name, scale in (("t2w", 600.0), ("adc", 3000.0), ("hbv", 50.0)):
        image = sitk.GetImageFromArray(rng.uniform(0, scale, (6, 32, 32)).astype(np.float32))
        image.SetSpacing((3.0, 3.0, 3.0))
        if name != "t2w":
            image.SetMetaData("0020|000e", "1.2.3.4.5")
        paths[name] = tmp_path / f"{name}.mha"
        sitk.WriteImage(image, str(paths[name]))
    images = {name: read_image(path, case="c8") for name, path in paths.items()}
    check_distinct(paths, {}, "c8", images)  # no error: the voxels differ


def test_one_image_copied_into_two_files_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.uniform(500, 3000, (6, 32, 32)).astype(np.float32))
    image.SetSpacing((2.0, 2.0, 3.0))
    sitk.WriteImage(image, str(tmp_path / "t2w.mha"))
    sitk.WriteImage(image, str(tmp_path / "adc.nii.gz"))  # another file and format, same voxels
    components = {"t2w": tmp_path / "t2w.mha", "adc": tmp_path / "adc.nii.gz"}
    with pytest.raises(CaseError) as info:
        preprocess_case(components, case_id="c4")
    assert info.value.file == str(tmp_path / "adc.nii.gz")
    assert info.value.reason == "t2w and adc are the same image (same grid and voxels)"


@pytest.mark.real_data
@pytest.mark.parametrize("component", ["adc", "hbv"])
def test_a_t2w_series_given_as_adc_or_hbv_is_refused(prostatex_case_dir, tmp_path, component):
    # Its 99th percentile (638) passes as an ADC map, and its ImageType (ORIGINAL\PRIMARY\M\NORM)
    # names no other component: it used to be stored as the ADC or high-b image.
    t2w = _edited_copy(prostatex_case_dir / "t2w", tmp_path / "t2w_copy", lambda d: None)
    with pytest.raises(CaseError) as info:
        read_image(t2w, case="c5", component=component)
    assert info.value.file == str(t2w) and "\n" not in str(info.value)
    assert info.value.reason == (
        "series 't2_tse_tra' has ImageType 'ORIGINAL\\PRIMARY\\M\\NORM\\DIS2D' (an original "
        f"magnitude image, no diffusion marker) and gives no b-value above 0: it is no "
        f"{component} series (a T2w?); a diffusion series whose b-value tags were removed can be "
        "given as an .mha or .nii.gz file"
    )

    # The T2w folder itself given as the ADC too: its ImageType says more than "same folder".
    folder = prostatex_case_dir / "t2w"
    with pytest.raises(CaseError, match=r"it is no adc series \(a T2w\?\)"):
        preprocess_case({"t2w": folder, "adc": folder}, case_id="c5")


@pytest.mark.real_data
def test_an_original_magnitude_series_with_a_b_value_reads_as_hbv(prostatex_case_dir, tmp_path):
    # A Philips DWI is ImageType ORIGINAL\PRIMARY\M_SE\M\SE, like its T2w: its b-value tells.
    def philips_dwi(dataset):
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"]
        for tag in [t for t in dataset.keys() if t.group == 0x0019]:
            del dataset[tag]
        dataset.add_new((0x0018, 0x9087), "FD", 1000.0)

    dwi = _edited_copy(prostatex_case_dir / "hbv", tmp_path / "dwi", philips_dwi)
    read = sitk.GetArrayFromImage(read_image(dwi, case="c6", component="hbv"))
    original = sitk.GetArrayFromImage(read_image(prostatex_case_dir / "hbv"))
    np.testing.assert_array_equal(read, original)
    without_b = _edited_copy(
        dwi, tmp_path / "no_b", lambda d: d.__delitem__(pydicom.tag.Tag(0x0018, 0x9087))
    )
    with pytest.raises(CaseError, match="gives no b-value above 0: it is no hbv series"):
        read_image(without_b, case="c6", component="hbv")


@pytest.mark.real_data
def test_a_t2w_whose_philips_b_factor_is_0_is_no_adc(prostatex_case_dir, tmp_path):
    # Philips writes Diffusion_B_Factor (2001,xx03) = 0 in non-diffusion series too.
    def philips_t2w(dataset):
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"]
        block = dataset.private_block(0x2001, "Philips Imaging DD 001", create=True)
        block.add_new(0x03, "FL", 0.0)

    t2w = _edited_copy(prostatex_case_dir / "t2w", tmp_path / "t2w", philips_t2w)
    with pytest.raises(CaseError, match="gives no b-value above 0: it is no adc series"):
        read_image(t2w, case="c9", component="adc")


@pytest.mark.real_data
@pytest.mark.parametrize("b", [0, 50, 399])
def test_a_low_b_series_given_as_hbv_is_refused(prostatex_case_dir, tmp_path, b):
    low = _edited_copy(prostatex_case_dir / "hbv", tmp_path / "low", _siemens_b(b))
    with pytest.raises(CaseError) as info:
        read_image(low, case="c7", component="hbv")
    assert info.value.file == str(low)
    assert f"its highest b-value is {b} s/mm^2, under 400: no high-b image" in info.value.reason
    at_floor = _edited_copy(prostatex_case_dir / "hbv", tmp_path / "at_floor", _siemens_b(400))
    assert read_image(at_floor, case="c7", component="hbv").GetSize() == (84, 128, 19)
