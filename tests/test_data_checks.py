"""Image contents that used to be read wrongly without a word are refused, naming case, file and
reason: a truncated .mha, an ADC map in other units or none, a DICOM series of another component
(ImageType); and the ProstateX-0000 percentiles docs/data.md quotes, measured."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from image_refusals import expect

from focalnet_jax.data.intensity import adc_unit_problem
from focalnet_jax.data.io import CaseError, read_image


@pytest.mark.real_data
def test_prostatex_99th_percentiles_are_the_values_docs_quote(prostatex_case_dir):
    adc = sitk.GetArrayFromImage(read_image(prostatex_case_dir / "adc"))
    assert np.percentile(adc[adc != 0], 99) == 2919.0  # docs/data.md, ADC units
    assert adc_unit_problem(adc) is None
    # The T2w's values pass as an ADC map too (docs/data.md: why ImageType is checked).
    t2w = sitk.GetArrayFromImage(read_image(prostatex_case_dir / "t2w"))
    assert np.percentile(t2w[t2w != 0], 99) == 638.0 and adc_unit_problem(t2w) is None
    hbv = sitk.GetArrayFromImage(read_image(prostatex_case_dir / "hbv"))
    assert np.percentile(hbv[hbv != 0], 99) == 55.0 and "not an ADC map" in adc_unit_problem(hbv)


@pytest.mark.parametrize("compressed", [False, True])
def test_truncated_mha_says_how_much_is_missing(tmp_path, compressed):
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((6, 64, 64), np.float32))
    path = tmp_path / "x.mha"
    sitk.WriteImage(image, str(path), useCompression=compressed)
    data = path.read_bytes()
    offset = data.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    path.write_bytes(data[: len(data) // 3])
    kept = len(data) // 3 - offset
    promised = len(data) - offset if compressed else 6 * 64 * 64 * 4
    kind = "compressed data" if compressed else "image data"
    error = expect(path, f"unreadable or truncated image ({kept} bytes of {kind}, header promises")
    assert f"promises {promised})" in error.reason and "No such file" not in error.reason


def test_adc_unit_is_judged_by_a_high_percentile():
    adc = np.random.default_rng(0).uniform(500, 3000, (4, 32, 32))
    adc[:, :8] = 0  # background
    assert adc_unit_problem(adc) is None
    assert "looks like 1e-3 mm^2/s" in adc_unit_problem(adc / 1e3)
    problem = adc_unit_problem(adc / 1e6)
    assert "looks like mm^2/s" in problem and "percentile of non-zero voxels 0.00297" in problem
    assert adc_unit_problem(np.zeros((2, 4, 4))) == "ADC map is zero everywhere"


def test_adc_map_in_no_unit_is_not_called_rescalable():
    # A 99th percentile of 55 is neither 1e-3 mm^2/s (about 3: 55e-3 mm^2/s is 18x free water)
    # nor 1e-6 mm^2/s (about 3000): a DWI given as ADC. It used to be called "1e-3 mm^2/s:
    # rescale it", and a DWI x 1000 then passed as an ADC map.
    adc = np.random.default_rng(0).uniform(500, 3000, (4, 32, 32))
    dwi = adc / 3000 * 55
    problem = adc_unit_problem(dwi)
    assert "not an ADC map in 1e-6, 1e-3 or 1 mm^2/s" in problem and "rescale" not in problem
    assert f"non-zero voxels {np.percentile(dwi, 99):.4g};" in problem and "DWI" in problem
    assert "looks like 1e-3 mm^2/s" in adc_unit_problem(adc / 3000 * 9)


@pytest.mark.real_data
def test_high_b_image_given_as_adc_is_refused_as_no_adc_map(prostatex_case_dir, tmp_path):
    from focalnet_jax.data import preprocess_case

    hbv = str(tmp_path / "hbv.mha")  # an image file: no DICOM ImageType to tell what it is
    sitk.WriteImage(read_image(prostatex_case_dir / "hbv"), hbv)
    with pytest.raises(CaseError) as info:
        preprocess_case({"t2w": str(prostatex_case_dir / "t2w"), "adc": hbv}, case_id="px")
    assert info.value.file == hbv and "not an ADC map" in info.value.reason


@pytest.mark.real_data
@pytest.mark.parametrize(
    "given, folders, wrong, image_type",
    [
        ("t2w", ("adc", "t2w"), "adc", "DERIVED\\PRIMARY\\DIFFUSION\\ADC\\DIS2D"),  # swapped
        ("adc", ("t2w", "hbv"), "hbv", "DERIVED\\PRIMARY\\DIFFUSION\\TRACEW\\DIS2D"),
        ("hbv", ("t2w", "adc", "adc"), "adc", "DERIVED\\PRIMARY\\DIFFUSION\\ADC\\DIS2D"),
    ],
)
def test_dicom_series_of_another_component_is_refused_by_its_image_type(
    prostatex_case_dir, given, folders, wrong, image_type
):
    # The ADC folder given as T2w (and T2w as ADC: its 99th percentile, 638, passes the unit
    # check) was predicted on without a word; so was the ADC map given as HBV.
    from focalnet_jax.data import preprocess_case

    components = {
        name: str(prostatex_case_dir / folder)
        for name, folder in zip(("t2w", "adc", "hbv"), folders, strict=False)
    }
    with pytest.raises(CaseError) as info:
        preprocess_case(components, case_id="px")
    assert info.value.file == str(prostatex_case_dir / wrong)
    assert f"ImageType '{image_type}'" in info.value.reason
    assert f"it is no {given} series" in info.value.reason
