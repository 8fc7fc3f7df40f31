"""A DWI series of several b-values read as `hbv` (focalnet_jax/data/dicom_bvalues.py): the real
ProstateX high-b series (Siemens, b = 1000 s/mm^2) written into one series with a b = 50 copy of
each slice reads as the original series, whichever tag carries the b-values (standard, Siemens, GE,
Philips), and preprocesses to the same case; as another component, without b-values, with one
b-value, or with several images of the highest b-value at a position, it is refused in one line."""

from __future__ import annotations

import copy
import logging
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from focalnet_jax.data import dicom_bvalues
from focalnet_jax.data.dicom import SeriesError, SeveralVolumesError, read_series
from focalnet_jax.data.io import CaseError, read_image
from focalnet_jax.data.preprocess import preprocess_case

pytestmark = pytest.mark.real_data
_SIEMENS = (0x0019, "SIEMENS MR HEADER")


def _set_b(dataset: pydicom.Dataset, vendor: str, b: float) -> None:
    """Carry b-value `b` in the tag of `vendor`, and in no other."""
    for tag in [t for t in dataset.keys() if t.group == 0x0019]:  # the original's Siemens block
        del dataset[tag]
    if vendor == "standard":
        dataset.add_new((0x0018, 0x9087), "FD", float(b))
    elif vendor == "siemens":
        dataset.private_block(*_SIEMENS, create=True).add_new(0x0C, "IS", str(int(b)))
    elif vendor == "ge":  # the 1e9 a multi-b scan adds; raw bytes, as in an implicit-VR file
        text = f"{1_000_000_000 + int(b)}\\8\\0\\0".encode()
        dataset.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x39, "UN", text)
    elif vendor == "philips":  # FL, raw bytes
        block = dataset.private_block(0x2001, "Philips Imaging DD 001", create=True)
        block.add_new(0x03, "UN", struct.pack("<f", b))


def _write_dwi(source: Path, folder: Path, b_values: dict[str, float | None], vendor: str):
    """`folder`: one series holding, for each (name, b) of `b_values`, a copy of every slice of
    `source`: the original pixels for the highest b, else the original's + 100 (k + 1) for copy
    k (b None: no b-value tag). Instance numbers run through the copies in their order, as a
    scanner numbers its b-values one after another."""
    folder.mkdir()
    series_uid = pydicom.uid.generate_uid()
    files = sorted(source.iterdir())
    highest = max((b for b in b_values.values() if b is not None), default=None)
    for k, (name, b) in enumerate(b_values.items()):
        for i, file in enumerate(files):
            dataset = pydicom.dcmread(file)
            dataset.SeriesInstanceUID = series_uid
            dataset.SOPInstanceUID = pydicom.uid.generate_uid()
            dataset.InstanceNumber = k * len(files) + i + 1
            pixels = dataset.pixel_array.astype(np.int32) + (0 if b == highest else 100 * (k + 1))
            dataset.PixelData = pixels.astype(dataset.pixel_array.dtype).tobytes()
            _set_b(dataset, vendor if b is not None else "none", b)
            dataset.save_as(folder / f"{name}_{file.name}")
    return folder


def _assert_same_image(read: sitk.Image, want: sitk.Image) -> None:
    assert read.GetSize() == want.GetSize()
    np.testing.assert_allclose(read.GetOrigin(), want.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(read.GetSpacing(), want.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(read.GetDirection(), want.GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(want))


@pytest.fixture(scope="module")
def original(prostatex_case_dir) -> sitk.Image:
    return read_series(prostatex_case_dir / "hbv")


@pytest.mark.parametrize("vendor", ["standard", "siemens", "ge", "philips"])
def test_hbv_is_the_highest_b_value_whichever_tag_gives_it(
    prostatex_case_dir, original, tmp_path, vendor, caplog
):
    # The b = 1000 copies (the original pixels) come second in instance order, the b = 50 ones
    # (+100) first; the b = 800 ones (+300), between them in value, last.
    b_values = {"b50": 50.0, "b1000": 1000.0, "b800": 800.0}
    dwi = _write_dwi(prostatex_case_dir / "hbv", tmp_path / "dwi", b_values, vendor)
    with caplog.at_level(logging.WARNING):
        read = read_image(dwi, case="c", component="hbv")
    _assert_same_image(read, original)
    assert f"series {pydicom.dcmread(next(dwi.iterdir())).SeriesInstanceUID} holds b-values " in (
        caplog.text
    )
    assert "50, 800, 1000; hbv read from the 19 images of b = 1000 s/mm^2\n" in caplog.text


def test_files_without_the_part10_header_are_read_as_gdcm_reads_them(
    prostatex_case_dir, original, tmp_path
):
    """Slices without the 128-byte preamble and file meta (older exports; GDCM reads them):
    their b-values are read too, not refused by pydicom with a traceback."""
    dwi = _write_dwi(prostatex_case_dir / "hbv", tmp_path / "dwi", {"a": 50, "b": 1000}, "siemens")
    for file in dwi.iterdir():
        dataset = pydicom.dcmread(file)
        dataset.preamble = None
        del dataset.file_meta
        dataset.save_as(file, implicit_vr=False, little_endian=True)
    assert b"DICM" not in next(dwi.iterdir()).read_bytes()[:200]
    _assert_same_image(read_image(dwi, case="c", component="hbv"), original)


def test_other_components_and_no_component_still_refuse_several_volumes(
    prostatex_case_dir, tmp_path
):
    dwi = _write_dwi(prostatex_case_dir / "hbv", tmp_path / "dwi", {"a": 50, "b": 1000}, "siemens")
    with pytest.raises(SeveralVolumesError, match="holds 2 images .38 files.: several volumes"):
        read_series(dwi)
    with pytest.raises(CaseError, match="ImageType .* it is no adc series"):
        read_image(dwi, case="c", component="adc")  # a trace-weighted series


@pytest.mark.parametrize(
    ("b_values", "expected"),
    [
        ({"a": 1000, "b": None}, r"b_1-\d+\.dcm \(19 of 38\) gives no b-value"),
        ({"a": 1000, "b": 1000}, "every image has b = 1000 s/mm.2"),
    ],
    ids=["one_volume_without_b", "one_b_value"],
)
def test_b_values_that_cannot_choose_a_volume_are_refused(
    prostatex_case_dir, tmp_path, b_values, expected
):
    dwi = _write_dwi(prostatex_case_dir / "hbv", tmp_path / "dwi", b_values, "siemens")
    with pytest.raises(CaseError) as caught:
        read_image(dwi, case="c7", component="hbv")
    message = str(caught.value)
    assert message.startswith(f"case 'c7', file '{dwi}': each of the 19 slice positions holds 2")
    assert "; as hbv: " in message
    assert len(message.splitlines()) == 1
    assert re.search(expected, message), message


def test_two_volumes_of_the_highest_b_value_are_refused_naming_it(prostatex_case_dir, tmp_path):
    b_values = {"low": 50, "x": 1400, "y": 1400}  # e.g. two directions of b = 1400, no trace
    dwi = _write_dwi(prostatex_case_dir / "hbv", tmp_path / "dwi", b_values, "standard")
    with pytest.raises(SeriesError, match="^.*: the 38 images of b = 1400 s/mm.2: each of the 19 "):
        read_series(dwi, component="hbv")


def _mark_directions(dwi: Path, directions: dict[str, str]) -> None:
    """Give the files of each copy (name prefix) a Philips `Diffusion_Direction` (I: isotropic),
    an ImageType without TRACEW and, but for I, pixels + 500 (as Philips stores a b-value's
    directional images beside their trace)."""
    for file in dwi.iterdir():
        direction = directions.get(file.name.split("_")[0])
        if direction is None:
            continue
        dataset = pydicom.dcmread(file)
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "M", "DIFFUSION"]
        block = dataset.private_block(0x2001, "Philips Imaging DD 001", create=True)
        block.add_new(0x04, "CS", direction)
        if direction != "I":
            dataset.PixelData = (
                (dataset.pixel_array + 500).astype(dataset.pixel_array.dtype).tobytes()
            )
        dataset.save_as(file)


def test_isotropic_images_of_the_highest_b_value_are_taken_over_directional_ones(
    prostatex_case_dir, original, tmp_path, caplog
):
    b_values = {"b0": 0.0, "x": 1000.0, "y": 1000.0, "iso": 1000.0}
    dwi = _write_dwi(prostatex_case_dir / "hbv", tmp_path / "dwi", b_values, "philips")
    _mark_directions(dwi, {"x": "P", "y": "S", "iso": "I"})
    with caplog.at_level(logging.WARNING):
        read = read_image(dwi, case="c", component="hbv")
    _assert_same_image(read, original)
    assert "hbv read from the 19 isotropic images of b = 1000 s/mm^2 (38 directional" in caplog.text
    _mark_directions(dwi, {"iso": "R"})  # no image marked isotropic: which one is unknown
    with pytest.raises(CaseError, match="the 57 images of b = 1000 s/mm.2: each of the 19 slice"):
        read_image(dwi, case="c", component="hbv")


def test_b_value_tags_read_as_numbers(tmp_path):
    """Each vendor's element, as written by an explicit-VR file or as raw bytes."""
    dataset = pydicom.Dataset()
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    dataset.SOPClassUID = pydicom.uid.MRImageStorage
    dataset.SOPInstanceUID = pydicom.uid.generate_uid()
    path = tmp_path / "slice.dcm"
    for vendor, b in {
        "standard": 1400.0,
        "siemens": 800.0,
        "ge": 1500.0,
        "philips": 2000.0,
    }.items():
        edited = copy.deepcopy(dataset)
        edited.add_new((0x0019, 0x0010), "LO", "SIEMENS MR HEADER")  # a block to delete
        _set_b(edited, vendor, b)
        edited.save_as(path, enforce_file_format=True)
        assert dicom_bvalues.b_value(pydicom.dcmread(path)) == b, vendor
    plain = copy.deepcopy(dataset)
    plain.add_new((0x0043, 0x0010), "LO", "ANOTHER CREATOR")  # (0043,1039) of another block
    plain.add_new((0x0043, 0x1039), "IS", "1000")
    plain.save_as(path, enforce_file_format=True)
    assert dicom_bvalues.b_value(pydicom.dcmread(path)) is None
    assert dicom_bvalues._number("0\\8\\0\\0", "ge") == 0.0  # GE b = 0 of a single-b scan
    upper = copy.deepcopy(dataset)  # an older Philips file's creator, in capitals
    upper.private_block(0x2001, "PHILIPS IMAGING DD 001", create=True).add_new(0x03, "FL", 1500.0)
    assert dicom_bvalues.b_value(upper) == 1500.0
    unreadable = copy.deepcopy(dataset)  # a standard tag that is no number: the next tag tells
    with warnings.catch_warnings():  # pydicom warns of bytes in an FD tag: a malformed file
        warnings.simplefilter("ignore", UserWarning)
        unreadable.add_new((0x0018, 0x9087), "UN", b"n/a")
    _set_b(unreadable, "siemens", 800.0)
    assert dicom_bvalues.b_value(unreadable) == 800.0
    unreadable[0x0018, 0x9087] = pydicom.DataElement(0x00189087, "FD", [])  # no value at all
    assert dicom_bvalues.b_value(unreadable) == 800.0


def test_multi_b_series_preprocesses_to_the_case_of_its_high_b_series(prostatex_case_dir, tmp_path):
    dwi = _write_dwi(prostatex_case_dir / "hbv", tmp_path / "dwi", {"a": 50, "b": 1000}, "siemens")
    paths = {"t2w": prostatex_case_dir / "t2w", "adc": prostatex_case_dir / "adc"}
    alone = preprocess_case({**paths, "hbv": prostatex_case_dir / "hbv"}, case_id="c")
    mixed = preprocess_case({**paths, "hbv": dwi}, case_id="c")
    assert mixed.components == ("t2w", "adc", "hbv")
    np.testing.assert_array_equal(mixed.images, alone.images)
    np.testing.assert_array_equal(mixed.slice_index, alone.slice_index)
