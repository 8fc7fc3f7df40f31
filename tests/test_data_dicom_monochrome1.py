"""MONOCHROME1 DICOM images (focalnet_jax/data/dicom_monochrome1.py) read with their own values:
the real ProstateX ADC series, its PhotometricInterpretation alone set to MONOCHROME1, reads as
the original, in classic and enhanced files; slices of other bit depths, signs and rescale values
read as pydicom's modality LUT gives them."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from focalnet_jax.data.dicom import list_series, read_series


def _adc_slices(prostatex_case_dir: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in sorted((prostatex_case_dir / "adc").iterdir())]


def _saved(slices: list[pydicom.Dataset], folder: Path) -> Path:
    folder.mkdir()
    for k, dataset in enumerate(slices):
        dataset.save_as(folder / f"{k:03d}.dcm")
    return folder


def test_monochrome1_adc_series_reads_as_its_monochrome2_original(prostatex_case_dir, tmp_path):
    original = sitk.GetArrayFromImage(read_series(prostatex_case_dir / "adc"))
    slices = _adc_slices(prostatex_case_dir)
    for dataset in slices:
        dataset.PhotometricInterpretation = "MONOCHROME1"
    image = read_series(_saved(slices, tmp_path / "adc"))
    # ITK alone reads 4095 - v (12 bits stored): the ADC inverted, 830..4095 instead of 0..3265.
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), original)
    assert original.max() == 3265.0


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS:UserWarning")  # 'monochrome1'
def test_slices_of_other_encodings_read_as_their_stored_values_rescaled(
    prostatex_case_dir, tmp_path
):
    """Slice k: signed or unsigned, 8, 12 or 16 bits (8 allocated and BitsStored left out:
    GDCM takes BitsAllocated), a rescale of its own, MONOCHROME1 or 2 ('monochrome1', which GDCM
    does not invert, is read as stored too); each read as the values written, rescaled."""
    slices = _adc_slices(prostatex_case_dir)[:8]
    encodings = [  # (signed, bits stored (None: left out), slope, intercept, interpretation)
        (False, 12, 1.0, 0.0, "MONOCHROME1"),
        (False, 16, 0.25, 100.0, "MONOCHROME1"),
        (True, 16, 0.5, -3.0, "MONOCHROME1"),
        (True, 16, 2.0, 10.0, "MONOCHROME2"),
        (False, 12, 2.0, 10.0, "MONOCHROME1"),
        (False, 16, 1.0, 0.0, "MONOCHROME2"),
        (False, None, 1.0, 0.0, "MONOCHROME1"),
        (False, 12, 1.0, 0.0, "monochrome1"),
    ]
    expected = {}
    for k, (dataset, encoding) in enumerate(zip(slices, encodings, strict=True)):
        signed, bits, slope, intercept, photometric = encoding
        values = dataset.pixel_array.astype(np.int32) - (1500 if signed else 0)
        if bits is None:  # 8 bits allocated, BitsStored absent
            values = values // 16
            dataset.PixelData = values.astype(np.uint8).tobytes()
            dataset.BitsAllocated, dataset.HighBit = 8, 7
            del dataset.BitsStored
        else:
            dataset.PixelData = values.astype(np.int16 if signed else np.uint16).tobytes()
            dataset.BitsStored, dataset.HighBit = bits, bits - 1
        dataset.PixelRepresentation = int(signed)
        dataset.RescaleSlope, dataset.RescaleIntercept = slope, intercept
        dataset.PhotometricInterpretation = photometric
        expected[f"{k:03d}.dcm"] = values * slope + intercept
    folder = _saved(slices, tmp_path / "mixed")
    read_order = [Path(f).name for f in list_series(folder)[0].files]  # along the slice normal
    image = sitk.GetArrayFromImage(read_series(folder))
    np.testing.assert_allclose(image, np.stack([expected[f] for f in read_order]), rtol=1e-6)


def test_monochrome1_enhanced_adc_reads_as_the_classic_series(prostatex_case_dir, tmp_path):
    highdicom = pytest.importorskip("highdicom")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # its patient name has one component
        enhanced = highdicom.legacy.LegacyConvertedEnhancedMRImage(
            _adc_slices(prostatex_case_dir),
            series_instance_uid=pydicom.uid.generate_uid(),
            series_number=100,
            sop_instance_uid=pydicom.uid.generate_uid(),
            instance_number=1,
        )
    enhanced.PhotometricInterpretation = "MONOCHROME1"
    (tmp_path / "adc").mkdir()
    enhanced.save_as(tmp_path / "adc" / "adc.dcm")
    classic = read_series(prostatex_case_dir / "adc")
    frames = read_series(tmp_path / "adc")
    on_classic = sitk.Resample(frames, classic, sitk.Transform(), sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(on_classic), sitk.GetArrayFromImage(classic)
    )


@pytest.mark.parametrize("compressed", [False, True])
def test_signed_monochrome1_of_fewer_bits_stored_is_refused_saying_why(
    prostatex_case_dir, tmp_path, compressed
):
    """GDCM reads no signed MONOCHROME1 pixels of 12 bits stored in 16: the refusal was its raw
    check, and for a compressed copy advised converting to uncompressed, which fails the same."""
    from focalnet_jax.data.dicom_stack import SeriesError

    slices = _adc_slices(prostatex_case_dir)
    for dataset in slices:
        values = dataset.pixel_array.astype(np.int16) - 2000
        dataset.PixelData = values.tobytes()
        dataset.PixelRepresentation, dataset.PhotometricInterpretation = 1, "MONOCHROME1"
        dataset.RescaleSlope, dataset.RescaleIntercept = 1, 2000
        if compressed:
            dataset.compress(pydicom.uid.RLELossless)
    folder = _saved(slices, tmp_path / "adc")
    with pytest.raises(SeriesError) as refused:
        read_series(folder)
    message = str(refused.value)
    first = Path(list_series(folder)[0].files[0])  # the first along the slice normal
    assert message.startswith(f"{first}: pixel data cannot be read (")
    assert message.endswith(
        "): GDCM does not read signed MONOCHROME1 pixels of BitsStored 12 < BitsAllocated 16: "
        "export the series as MONOCHROME2, or with BitsStored 16"
    )
