"""DICOM slices that used to be read wrongly without a word are refused or read right: a sheared
stack, rescale slopes varying per slice, a transfer syntax no codec decodes, a malformed position,
no PixelSpacing, a slice whose spacing or frame of reference differs from the others'."""

from __future__ import annotations

import locale
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from image_refusals import expect

from focalnet_jax.data.io import read_image


def _write_series(
    folder, shift_x_mm: float, slices: int = 6, spacing: float = 3.0, values=None, tags=None
) -> None:
    """`slices` 16 x 16 axial DICOM slices `spacing` mm apart, slice k shifted by k * shift_x_mm
    along x; `values`: int16 [slices, 16, 16] stored pixel values; `tags`: more tags of each."""
    folder.mkdir()
    shape = (slices, 16, 16)
    values = (np.arange(np.prod(shape)) % 97).reshape(shape) if values is None else values
    volume = sitk.GetImageFromArray(np.asarray(values, "i2"))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    ctype = locale.setlocale(locale.LC_CTYPE)  # GDCM's writer sets the C locale: restored below
    try:
        for k in range(slices):
            image = volume[:, :, k]
            slice_tags = {"0008|0060": "MR", "0020|000d": "1.2.826.0.1.3680043.2.1125.1.43",
                    "0020|000e": "1.2.826.0.1.3680043.2.1125.1.42",
                    "0020|0037": "1\\0\\0\\0\\1\\0",
                    "0020|0032": f"{shift_x_mm * k:.6f}\\0\\{spacing * k:.6f}",
                    "0020|0013": str(k + 1), **(tags or {})}  # fmt: skip
            for tag, value in slice_tags.items():
                image.SetMetaData(tag, value)
            writer.SetFileName(str(folder / f"{k}.dcm"))
            writer.Execute(image)
    finally:
        locale.setlocale(locale.LC_CTYPE, ctype)


def test_sheared_dicom_stack_is_refused(tmp_path):
    # Slice positions moving 2 mm along x per slice: ITK read it as a straight stack with a
    # 3.61 mm z spacing, every slice but the first misplaced.
    _write_series(tmp_path / "straight", 0.0)
    assert read_image(tmp_path / "straight").GetSpacing()[2] == pytest.approx(3.0)
    _write_series(tmp_path / "sheared", 2.0)
    error = expect(tmp_path / "sheared", "slice positions move within the slice plane by up to")
    assert "10.00 mm (5.dcm against 0.dcm; tolerance 0.04 mm): a sheared stack" in error.reason
    assert error.file == str(tmp_path / "sheared")


def test_long_thin_stack_with_rounded_cosines_is_not_sheared(tmp_path):
    # 60 slices 1 mm apart drifting 0.0005 mm per mm (direction cosines rounded to 4 decimals):
    # 0.03 mm over the stack, over the 0.01 mm spacing tolerance; it was refused as sheared.
    _write_series(tmp_path / "thin", 0.0005, slices=60, spacing=1.0)
    assert read_image(tmp_path / "thin").GetSize() == (16, 16, 60)
    _write_series(tmp_path / "tilted", 0.02, slices=60, spacing=1.0)  # a 1.1 degree tilt
    expect(tmp_path / "tilted", "slice positions move within the slice plane by up to 1.18 mm")


def _set_rescale_slope(file, slope: bytes) -> None:
    """Overwrite RescaleSlope (0028,1053), written as '1 ' in implicit VR, with 2-byte `slope`."""
    element = b"\x28\x00\x53\x10\x02\x00\x00\x00"
    data = file.read_bytes()
    assert data.count(element + b"1 ") == 1
    file.write_bytes(data.replace(element + b"1 ", element + slope))


def test_rescale_slope_varying_per_slice_is_applied_per_slice(tmp_path):
    # Slopes that vary per slice (as some scanners write them): ITK chose the pixel type of the
    # first slice (slope 1: int16), so stored 20000 x slope 2 wrapped to -25536 and 97 x 0.5
    # was truncated to 48.
    values = np.stack([np.full((16, 16), v) for v in (20000, 20000, 97, 20000, 97, 20000)])
    _write_series(tmp_path / "s", 0.0, values=values, tags={"0028|1053": "1", "0028|1052": "0"})
    for k, slope in ((3, b"2 "), (4, b".5")):
        _set_rescale_slope(tmp_path / "s" / f"{k}.dcm", slope)
    volume = sitk.GetArrayFromImage(read_image(tmp_path / "s"))
    np.testing.assert_array_equal(volume[:, 0, 0], [20000, 20000, 97, 40000, 48.5, 20000])
    assert np.ptp(volume, axis=(1, 2)).max() == 0


def _compress_in_name_only(file, syntax: str = "1.2.840.10008.1.2.4.90") -> None:
    """Give a part-10 file (explicit VR little endian) transfer syntax `syntax` and encapsulated
    pixel data that no codec decodes: a JPEG 2000 codestream start, then zeros."""
    data = bytearray(file.read_bytes())
    at = data.find(b"\x02\x00\x10\x00UI")
    length = int.from_bytes(data[at + 6 : at + 8], "little")
    value = syntax.encode() + b"\0" * (len(syntax) % 2)
    data[at + 6 : at + 8 + length] = len(value).to_bytes(2, "little") + value
    group = data.find(b"\x02\x00\x00\x00UL")  # meta group length, after the new value's size
    size = int.from_bytes(data[group + 8 : group + 12], "little") + len(value) - length
    data[group + 8 : group + 12] = size.to_bytes(4, "little")
    pixels = data.rfind(b"\xe0\x7f\x10\x00OW\x00\x00")
    fragment = b"\xff\x4f\xff\x51" + bytes(60)
    item = b"\xfe\xff\x00\xe0"
    data[pixels:] = (
        b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff" + item + bytes(4)
        + item + len(fragment).to_bytes(4, "little") + fragment + b"\xfe\xff\xdd\xe0" + bytes(4)
    )  # fmt: skip
    file.write_bytes(bytes(data))


@pytest.mark.real_data
def test_slice_in_a_transfer_syntax_no_codec_decodes_is_named(prostatex_case_dir, tmp_path):
    # It was "file '<folder>': unreadable or truncated image (ITK ERROR: GDCMImageIO(0x55..):
    # Failed to change to Implicit Transfer Syntax)": neither the file nor the compression.
    folder = tmp_path / "adc"
    shutil.copytree(prostatex_case_dir / "adc", folder)
    broken = sorted(folder.iterdir())[9]
    _compress_in_name_only(broken)
    error = expect(folder, "pixel data in transfer syntax 1.2.840.10008.1.2.4.90 (1 of 19 files)")
    assert error.file == str(broken)
    assert "cannot be decoded (" in error.reason and "GDCMImageIO(0x" not in error.reason
    assert error.reason.endswith(
        "; convert the series to uncompressed DICOM (e.g. gdcmconv --raw); printed on stderr "
        "during the read: Invalid marker size (x6)"
    )


@pytest.mark.parametrize(
    "position, shown", [(b"0\\x\\3 ", "'0\\\\x\\\\3'"), (b"0\\3   ", "'0\\\\3'")]
)
def test_malformed_slice_position_is_one_line(tmp_path, position, shown):
    # A position that is no number, or has 2 values, ended in a ValueError traceback.
    _write_series(tmp_path / "s", 0.0)
    file = tmp_path / "s" / "1.dcm"
    data = file.read_bytes()
    assert data.count(b"0\\0\\3 ") == 1  # as GDCM writes (0, 0, 3.000000)
    file.write_bytes(data.replace(b"0\\0\\3 ", position))
    error = expect(tmp_path / "s", f"DICOM tag (0020,0032) {shown} is not 3 numbers")
    assert error.file == str(file)


def test_slices_without_pixel_spacing_are_refused(tmp_path):
    # Without PixelSpacing (0028,0030) ITK took 1 mm pixels without a word.
    _write_series(tmp_path / "s", 0.0)
    for file in (tmp_path / "s").iterdir():
        data = file.read_bytes()
        assert data.count(b"\x28\x00\x30\x00") == 1  # implicit VR little endian, as GDCM writes
        file.write_bytes(data.replace(b"\x28\x00\x30\x00", b"\x28\x00\x31\x00"))  # another tag
    error = expect(tmp_path / "s", "DICOM file lacks PixelSpacing (0028,0030)")
    assert error.file.endswith(".dcm")


@pytest.mark.parametrize(
    "tag, value, reason",
    [
        ("PixelSpacing", [1.1, 1.1], "PixelSpacing (0028,0030) '1.1\\\\1.1' differs from 0.dcm's"),
        (
            "FrameOfReferenceUID",
            "1.2.826.0.1.3680043.2.1125.1.77",
            "FrameOfReferenceUID (0020,0052) '1.2.826.0.1.3680043.2.1125.1.77' differs from 0.dcm",
        ),
    ],
)
def test_a_slice_unlike_the_others_is_refused_naming_it(tmp_path, tag, value, reason):
    # ITK reads the pixel spacing and the frame of reference of a stack from one slice: a slice
    # with other values was read at the first's (an ADC misregistered by up to 0.92 of its range
    # when the slice sorted first had the odd PixelSpacing).
    import pydicom

    _write_series(tmp_path / "s", 0.0, tags={"0020|0052": "1.2.826.0.1.3680043.2.1125.1.44"})
    file = tmp_path / "s" / "3.dcm"
    header = pydicom.dcmread(file)
    setattr(header, tag, value)
    header.save_as(file)
    error = expect(tmp_path / "s", reason)
    assert error.file == str(file)
