"""NIfTI headers checked before ITK reads them: voxel sizes of 0, negative or unlike the sform's,
placements that disagree or hold NaN, datatypes and sizes ITK misreads, and no word on stderr."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import SimpleITK as sitk
from image_reads import expect, volume

from focalnet_jax.data.image_writing import write_image
from focalnet_jax.data.io import CaseError, read_image


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("sform", [True, False])
def test_nifti_of_voxel_size_0_is_refused_not_read_as_1_mm(tmp_path, capfd, suffix, sform):
    """ITK read a NIfTI whose pixdim gives a voxel size of 0 with 1 mm voxels, without a word
    (with an sform of 3 mm slices, too: it judged the sform's scales unexpected)."""
    import gzip
    import struct

    _, image = volume()
    write_image(image, tmp_path / "x.nii")
    header = bytearray((tmp_path / "x.nii").read_bytes())
    header[76 + 12 : 76 + 16] = struct.pack("<f", 0.0)  # pixdim[3]: z voxel size
    if not sform:
        header[254:256] = struct.pack("<h", 0)  # sform_code 0: the qform alone
    data = bytes(header) if suffix == ".nii" else gzip.compress(bytes(header))
    (tmp_path / f"z0{suffix}").write_bytes(data)
    if not sform:
        spacing = sitk.ReadImage(str(tmp_path / f"z0{suffix}")).GetSpacing()
        np.testing.assert_allclose(spacing, (0.5, 0.7, 1.0), rtol=1e-6)  # ITK: 1 mm slices
    capfd.readouterr()
    expect(tmp_path / f"z0{suffix}", "NIfTI header gives voxel size z 0 (pixdim)")
    assert capfd.readouterr().err == ""  # refused before ITK complains about the sform
    write_image(image, tmp_path / f"ok{suffix}")
    assert read_image(tmp_path / f"ok{suffix}").GetSpacing()[2] == pytest.approx(3.0)


def test_the_checks_of_a_float_nii_gz_decompress_it_once(tmp_path, monkeypatch):
    # The size check and the NaN count each decompressed the whole file after ITK read it.
    import gzip

    from focalnet_jax.data import nifti_header

    array, _ = volume()
    write_image(sitk.GetImageFromArray(array), tmp_path / "x.nii.gz")
    opened = []
    real_open = gzip.open
    monkeypatch.setattr(gzip, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    assert nifti_header.data_problem(tmp_path / "x.nii.gz") is None
    assert len(opened) == 1
    array[0, 0, 0] = np.nan
    write_image(sitk.GetImageFromArray(array), tmp_path / "x.nii.gz")
    assert nifti_header.data_problem(tmp_path / "x.nii.gz") == "image holds NaN or Inf voxels"
    gzip_bytes = (tmp_path / "x.nii.gz").read_bytes()
    (tmp_path / "x.nii.gz").write_bytes(gzip_bytes[: len(gzip_bytes) // 2])
    assert nifti_header.data_problem(tmp_path / "x.nii.gz").startswith(
        "unreadable or truncated image (compressed stream ends early"
    )


def test_a_nifti_datatype_of_no_nifti_code_is_refused_before_itk_prints(tmp_path, capfd):
    path = tmp_path / "bad_datatype.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 4), np.float32)), str(path))
    data = bytearray(path.read_bytes())
    data[70:72] = (999).to_bytes(2, "little")  # NIfTI-1 `datatype`: no such code
    path.write_bytes(bytes(data))
    with pytest.raises(CaseError) as info:
        read_image(path, case="c1")
    assert info.value.reason == "NIfTI header gives datatype 999, which is no NIfTI-1 data type"
    assert capfd.readouterr().err == ""  # ITK's "bad datatype" line is not printed


@pytest.mark.parametrize("sform_code", [1, 2, 4])
def test_a_nifti_whose_qform_and_sform_disagree_is_refused(tmp_path, sform_code):
    # A registered NIfTI (sform_code 2) whose qform stayed at the scanner's position: ITK took the
    # qform's origin (nibabel and FSL the sform's), 20 mm from where the registration put it.
    image = sitk.GetImageFromArray(np.ones((5, 6, 7), np.float32))
    image.SetSpacing((0.5, 0.7, 3.0))
    image.SetOrigin((10.0, -20.0, 30.0))
    c, s = np.cos(0.3), np.sin(0.3)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    path = tmp_path / "adc.nii"
    sitk.WriteImage(image, str(path))  # qform and sform both code 1, equal to float precision
    assert read_image(path).GetOrigin() == pytest.approx((10.0, -20.0, 30.0))
    data = bytearray(path.read_bytes())
    data[254:256] = struct.pack("<h", sform_code)
    srow_x_offset = struct.unpack("<f", data[292:296])[0]  # RAS x = -LPS x = -10
    data[292:296] = struct.pack("<f", srow_x_offset + 20.0)
    path.write_bytes(bytes(data))
    with pytest.raises(CaseError) as info:
        read_image(path, case="c1")
    assert info.value.reason.startswith(
        "NIfTI header places the image twice, differently (origins 20 mm apart): qform (code 1) "
        f"at RAS (-10.00, 20.00, 30.00) mm, sform (code {sform_code}) at RAS (10.00, 20.00, 30.00)"
    )
    data[252:254] = struct.pack("<h", 0)  # the sform alone places it: taken
    path.write_bytes(bytes(data))
    assert read_image(path).GetOrigin() == pytest.approx((-10.0, -20.0, 30.0))


def _nifti_header(tmp_path, *, qform_code: int, sform_code: int) -> bytearray:
    """The bytes of `volume()` written as .nii, with the given placement codes."""
    _, image = volume()
    write_image(image, tmp_path / "base.nii")
    data = bytearray((tmp_path / "base.nii").read_bytes())
    data[252:256] = struct.pack("<2h", qform_code, sform_code)
    return data


def test_a_negative_nifti_voxel_size_is_refused(tmp_path):
    """ITK mirrored the axis of a negative pixdim (nifti1_io reads it as 1 mm, nibabel refuses the
    file): an ADC read mirrored left-right, resampled so onto the T2w, without a word."""
    data = _nifti_header(tmp_path, qform_code=1, sform_code=0)
    data[80:84] = struct.pack("<f", -0.5)  # pixdim[1]
    (tmp_path / "mirrored.nii").write_bytes(bytes(data))
    expect(tmp_path / "mirrored.nii", "NIfTI header gives voxel size x -0.5 (pixdim), which ")


def test_an_sform_whose_voxel_size_is_not_pixdims_is_refused(tmp_path, capfd):
    """The sform alone (qform_code 0) places the voxels for nibabel and FSL with its column
    lengths as the voxel size; ITK took pixdim's: 4 mm slices read as 3 mm, printing its
    "unexpected scales in sform" warning twice."""
    data = _nifti_header(tmp_path, qform_code=0, sform_code=1)
    data[320:324] = struct.pack("<f", 4.0)  # srow_z[2]: 4 mm slices
    (tmp_path / "z4.nii").write_bytes(bytes(data))
    capfd.readouterr()
    expect(
        tmp_path / "z4.nii",
        "NIfTI header gives voxel size 0.5 x 0.7 x 4 mm in its sform (code 1) and 0.5 x 0.7 x 3 mm "
        "in pixdim, and readers differ in which they take",
    )
    assert capfd.readouterr().err == ""
    data[320:324] = struct.pack("<f", 3.0)  # the same voxel size: read
    (tmp_path / "z3.nii").write_bytes(bytes(data))
    assert read_image(tmp_path / "z3.nii").GetSpacing() == pytest.approx((0.5, 0.7, 3.0))


@pytest.mark.parametrize(("start", "name"), [(268, "qform"), (292, "sform")])
def test_a_nifti_placement_holding_nan_is_refused(tmp_path, start, name):
    """ITK read a NaN qoffset_x (or srow) as 0: the image placed elsewhere, without a word."""
    data = _nifti_header(tmp_path, qform_code=1, sform_code=1)
    data[start : start + 4] = struct.pack("<f", float("nan"))  # qoffset_x / srow_x[3]
    (tmp_path / "nan.nii").write_bytes(bytes(data))
    expect(tmp_path / "nan.nii", f"NIfTI header's {name} (")


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_a_short_nifti_whose_bitpix_is_wrong_is_refused_as_truncated(tmp_path, dtype):
    """ITK sizes a NIfTI's voxels by its datatype, not its bitpix: with bitpix 0 a short file was
    taken (ITK padded it with zeros), or, of float voxels, ended in numpy's traceback."""
    array = np.random.default_rng(0).random((6, 8, 10)).astype(dtype) + 1
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "i.nii"))
    data = bytearray((tmp_path / "i.nii").read_bytes())
    data[72:74] = struct.pack("<h", 0)
    (tmp_path / "t.nii").write_bytes(bytes(data[:-600]))
    with pytest.raises(CaseError, match=rf"\({len(data) - 600} bytes of image data, header "
                                        rf"promises {len(data)}\)$"):  # fmt: skip
        read_image(tmp_path / "t.nii", case="c")


def test_an_uncompressed_nifti_named_nii_gz_is_read_as_itk_reads_it(tmp_path):
    """ITK reads a `.nii.gz` saved without compression (zlib's gzopen passes such a file through);
    the header checks took it for a broken gzip stream and refused it. Cut short, it is still
    refused as such."""
    array, image = volume()
    sitk.WriteImage(image, str(tmp_path / "x.nii"))
    data = (tmp_path / "x.nii").read_bytes()
    (tmp_path / "plain.nii.gz").write_bytes(data)
    back = read_image(tmp_path / "plain.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    np.testing.assert_allclose(back.GetSpacing(), (0.5, 0.7, 3.0), atol=1e-6)
    (tmp_path / "short.nii.gz").write_bytes(data[:-40])
    expect(tmp_path / "short.nii.gz", f"({len(data) - 40} bytes of image data, header promises")
