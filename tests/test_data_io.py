"""Readers: DICOM folder, .mha, .nii(.gz), .nrrd through SimpleITK, and bad files."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import SimpleITK as sitk

from focalnet_jax.data.image_writing import write_image
from focalnet_jax.data.io import CaseError, read_image, xyz, zyx


def _volume(shape_zyx=(4, 6, 5)):
    array = np.arange(np.prod(shape_zyx), dtype=np.float32).reshape(shape_zyx)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.7, 3.0))
    image.SetOrigin((-10.0, 20.0, 5.5))
    return array, image


def test_axis_order_helper():
    assert xyz((3.0, 0.7, 0.5)) == (0.5, 0.7, 3.0)
    assert zyx(xyz((1, 2, 3))) == (1, 2, 3)
    _, image = _volume()
    assert xyz(sitk.GetArrayViewFromImage(image).shape) == image.GetSize()


@pytest.mark.parametrize("suffix", [".mha", ".nii.gz", ".nii", ".nrrd"])
def test_image_files_round_trip(tmp_path, suffix):
    array, image = _volume()
    write_image(image, tmp_path / f"x{suffix}")
    back = read_image(tmp_path / f"x{suffix}")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    np.testing.assert_allclose(back.GetSpacing(), (0.5, 0.7, 3.0), atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), (-10.0, 20.0, 5.5), atol=1e-5)
    assert back.GetPixelID() == sitk.sitkFloat32


@pytest.mark.real_data
def test_dicom_series_folder(prostatex_case_dir):
    image = read_image(prostatex_case_dir / "t2w")
    assert image.GetSize() == (384, 384, 19)
    np.testing.assert_allclose(image.GetSpacing(), (0.5, 0.5, 3.0), atol=1e-6)


def _expect(path, reason, case="c1"):
    with pytest.raises(CaseError) as info:
        read_image(path, case=case)
    assert info.value.case == case and info.value.file == str(path)
    assert reason in info.value.reason
    assert case in str(info.value) and str(path) in str(info.value)


def test_missing_file(tmp_path):
    _expect(tmp_path / "absent_t2w.mha", "file not found")


def test_an_unreadable_file_is_named_as_unreadable_not_as_another_format(tmp_path, monkeypatch):
    """A NIfTI file the user may not read (permission denied) was "not recognized as a NIFTI
    file" (ITK's words): the user looked for a damaged file. (As root no mode denies reading:
    the denial is the one `open` gives a user without read permission.)"""
    import errno
    import pathlib

    _, image = _volume((6, 16, 16))
    write_image(image, tmp_path / "mask.nii.gz")
    real_open = pathlib.Path.open

    def denied(path, *args, **kwargs):
        if path == tmp_path / "mask.nii.gz":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", denied)
    with pytest.raises(CaseError) as refused:
        read_image(tmp_path / "mask.nii.gz", case="c1")
    assert str(refused.value).endswith(
        f"'{tmp_path / 'mask.nii.gz'}': cannot be read (Permission denied)"
    )


def test_truncated_file(tmp_path):
    _, image = _volume((6, 64, 64))
    write_image(image, tmp_path / "x.nii.gz")
    data = (tmp_path / "x.nii.gz").read_bytes()
    (tmp_path / "x.nii.gz").write_bytes(data[: len(data) // 2])
    _expect(tmp_path / "x.nii.gz", "unreadable or truncated")
    (tmp_path / "junk.mha").write_bytes(b"not an image at all")
    _expect(tmp_path / "junk.mha", "unreadable or truncated")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("sform", [True, False])
def test_nifti_of_voxel_size_0_is_refused_not_read_as_1_mm(tmp_path, capfd, suffix, sform):
    """ITK read a NIfTI whose pixdim gives a voxel size of 0 with 1 mm voxels, without a word
    (with an sform of 3 mm slices, too: it judged the sform's scales unexpected)."""
    import gzip
    import struct

    _, image = _volume()
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
    _expect(tmp_path / f"z0{suffix}", "NIfTI header gives voxel size z 0 (pixdim)")
    assert capfd.readouterr().err == ""  # refused before ITK complains about the sform
    write_image(image, tmp_path / f"ok{suffix}")
    assert read_image(tmp_path / f"ok{suffix}").GetSpacing()[2] == pytest.approx(3.0)


@pytest.mark.parametrize(
    "matrix, found",
    [
        ("2 0 0 0 1 0 0 0 1", "lengths 2, 1, 1 and cosines up to 0 "),
        ("1 0 0 0.2 1 0 0 0 1", "lengths 1, 1.02, 1 and cosines up to 0.196 "),
    ],
)
def test_direction_matrix_that_is_no_rotation_is_refused(tmp_path, matrix, found):
    """A MetaImage whose TransformMatrix holds a voxel size or a shear was read as it stands: the
    crop, 0.625 mm pixels on paper, spanned 1.25 mm pixels (160 mm) along the scaled axis."""
    _, image = _volume()
    write_image(image, tmp_path / "x.mha")
    text = (tmp_path / "x.mha").read_bytes()
    bad = text.replace(
        b"TransformMatrix = 1 0 0 0 1 0 0 0 1", f"TransformMatrix = {matrix}".encode()
    )
    assert bad != text
    (tmp_path / "bad.mha").write_bytes(bad)
    direction = sitk.ReadImage(str(tmp_path / "bad.mha")).GetDirection()  # ITK reads it so
    assert sorted(direction) == sorted(float(v) for v in matrix.split())
    _expect(tmp_path / "bad.mha", f"direction matrix is no rotation: its axes have {found}")
    rotated = sitk.Image(image)  # an oblique axial series (18 degrees, as ProstateX-0000) is kept
    c, s = np.cos(np.radians(18.0)), np.sin(np.radians(18.0))
    rotated.SetDirection((1.0, 0.0, 0.0, 0.0, c, -s, 0.0, s, c))
    write_image(rotated, tmp_path / "oblique.mha")
    assert read_image(tmp_path / "oblique.mha").GetDirection() == pytest.approx(
        rotated.GetDirection()
    )
    # Cosines rounded to 3 decimals, as some DICOM writers store them: a rotation still, though
    # their Gram matrix is 1.5e-3 off the identity here.
    rounded = np.round(np.reshape(rotated.GetDirection(), (3, 3)) @ _rotation_z(0.759), 3)
    assert np.abs(rounded.T @ rounded - np.eye(3)).max() > 1e-3
    rotated.SetDirection(tuple(rounded.ravel()))
    write_image(rotated, tmp_path / "rounded.mha")
    read_image(tmp_path / "rounded.mha")


def test_a_direction_that_is_a_rotation_to_rounding_is_read_as_the_nearest_rotation(tmp_path):
    """The polar factor of rotation @ (I + symmetric shear) is the rotation itself: read so, as a
    series' DICOM cosines are made orthonormal; a rotation is kept to the bit."""
    _, image = _volume()
    rotation = np.reshape(_rotation_z(0.3), (3, 3)) @ np.diag([1.0, -1.0, 1.0])  # a reflection
    shear = np.array([[0.0, 2e-3, -1e-3], [2e-3, 0.0, 3e-3], [-1e-3, 3e-3, 0.0]])
    image.SetDirection(tuple((rotation @ (np.eye(3) + shear)).ravel()))
    write_image(image, tmp_path / "sheared.mha")
    direction = read_image(tmp_path / "sheared.mha").GetDirection()
    np.testing.assert_allclose(direction, rotation.ravel(), atol=1e-12)
    image.SetDirection(tuple(rotation.ravel()))
    for name in ("rotated.mha", "rotated.nii.gz"):  # NIfTI's float32 matrix: 2e-8 off, kept
        write_image(image, tmp_path / name)
        written = sitk.ReadImage(str(tmp_path / name)).GetDirection()
        assert read_image(tmp_path / name).GetDirection() == written


def _rotation_z(radians: float) -> np.ndarray:
    c, s = np.cos(radians), np.sin(radians)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def test_2d_image(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.float32)), str(tmp_path / "x.mha"))
    _expect(tmp_path / "x.mha", "expected a 3D image")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize(("name", "dtype"), [("x.mha", np.float32), ("x.nii", np.float32),
                                             ("x.nii.gz", np.float64)])  # fmt: skip
def test_nan_inf_voxels(tmp_path, bad, name, dtype):
    # ITK reads a NIfTI file's NaN and Inf voxels as 0: such an image passed as a clean one.
    array, image = _volume()
    array = array.astype(dtype)
    array[1, 2, 3] = bad
    image = sitk.GetImageFromArray(array)
    write_image(image, tmp_path / name)
    _expect(tmp_path / name, "NaN or Inf")
    array[1, 2, 3] = 0
    write_image(sitk.GetImageFromArray(array), tmp_path / name)
    assert read_image(tmp_path / name).GetSize() == image.GetSize()


def test_the_checks_of_a_float_nii_gz_decompress_it_once(tmp_path, monkeypatch):
    # The size check and the NaN count each decompressed the whole file after ITK read it.
    import gzip

    from focalnet_jax.data import nifti_header

    array, _ = _volume()
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


@pytest.mark.parametrize("size", ["", "ElementSpacing = 0.5 0.6 3\n", "ElementSize = 0.5 0.6 3\n"])
def test_a_metaimage_without_a_voxel_size_is_refused(tmp_path, size):
    # ITK read it with 1 mm voxels without a word: every size, distance and crop in mm wrong.
    head = f"ObjectType = Image\nNDims = 3\nOffset = 1 2 3\n{size}DimSize = 2 3 4\n"
    head += "ElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    path = tmp_path / "x.mha"
    path.write_bytes(head.encode() + bytes(48))
    if size:
        assert read_image(path).GetSpacing() == (0.5, 0.6, 3.0)
        return
    assert sitk.ReadImage(str(path)).GetSpacing() == (1.0, 1.0, 1.0)
    _expect(path, "MetaImage header gives no voxel size (no ElementSpacing or ElementSize field)")


@pytest.mark.parametrize("spacing", ["0.5 -0.6 3", "0.5 0.6 -3", "0 0.6 3"])
@pytest.mark.parametrize("field", ["ElementSpacing", "ElementSize"])
def test_a_metaimage_voxel_size_that_is_not_positive_is_refused(tmp_path, field, spacing):
    """ITK mirrors the axis of a negative ElementSpacing without a word: the crop centre moved 51
    mm and two slices were predicted (a negative NIfTI pixdim was refused)."""
    head = f"ObjectType = Image\nNDims = 3\nOffset = 1 2 3\n{field} = {spacing}\n"
    head += "DimSize = 2 3 4\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    path = tmp_path / "x.mha"
    path.write_bytes(head.encode() + bytes(48))
    _expect(path, f"MetaImage header field {field} = {spacing!r} gives a voxel size that is not "
            "positive")  # fmt: skip


def test_empty_dicom_folder_and_unknown_suffix(tmp_path):
    (tmp_path / "series").mkdir()
    _expect(tmp_path / "series", "no DICOM series")
    (tmp_path / "x.png").write_bytes(b"")
    _expect(tmp_path / "x.png", "unknown image format")


@pytest.mark.parametrize("compressed", [False, True])
def test_metaimage_header_with_missing_or_short_data_file(tmp_path, capfd, compressed):
    # A `.mhd` header and its `.raw`/`.zraw` data file: a missing or short data file was reported
    # as "File cannot be read: x.mhd", with ITK's own lines on stderr.
    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    sitk.WriteImage(image, str(tmp_path / "x.mhd"), useCompression=compressed)
    data = tmp_path / ("x.zraw" if compressed else "x.raw")
    assert read_image(tmp_path / "x.mhd").GetSize() == (6, 5, 4)
    full = data.read_bytes()
    data.write_bytes(full[: len(full) // 2])
    capfd.readouterr()
    kind = "compressed data" if compressed else "image data"
    expected = int(_header(tmp_path / "x.mhd").get("CompressedDataSize", 240))
    with pytest.raises(CaseError, match=rf"{len(full) // 2} bytes of {kind} in {data.name}, "
                                        rf"header promises {expected}\)"):  # fmt: skip
        read_image(tmp_path / "x.mhd", case="c")
    data.unlink()
    with pytest.raises(CaseError, match=f"data file {data} named by the header not found"):
        read_image(tmp_path / "x.mhd", case="c")
    assert capfd.readouterr().err == ""


def _header(path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in lines)}


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


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_complex_voxels_are_refused_in_one_line(tmp_path, suffix):
    """A complex image (an ADC saved from a complex reconstruction) passed the channel check and
    ended preprocess, also with --skip-bad-cases, in SimpleITK's RuntimeError from the cast."""
    _, image = _volume()
    path = tmp_path / f"adc{suffix}"
    sitk.WriteImage(sitk.RealAndImaginaryToComplex(image, image * 0.5), str(path))
    _expect(path, "expected real voxels, got complex of 32-bit float")


def _nifti_header(tmp_path, *, qform_code: int, sform_code: int) -> bytearray:
    """The bytes of `_volume()` written as .nii, with the given placement codes."""
    _, image = _volume()
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
    _expect(tmp_path / "mirrored.nii", "NIfTI header gives voxel size x -0.5 (pixdim), which ")


def test_an_sform_whose_voxel_size_is_not_pixdims_is_refused(tmp_path, capfd):
    """The sform alone (qform_code 0) places the voxels for nibabel and FSL with its column
    lengths as the voxel size; ITK took pixdim's: 4 mm slices read as 3 mm, printing its
    "unexpected scales in sform" warning twice."""
    data = _nifti_header(tmp_path, qform_code=0, sform_code=1)
    data[320:324] = struct.pack("<f", 4.0)  # srow_z[2]: 4 mm slices
    (tmp_path / "z4.nii").write_bytes(bytes(data))
    capfd.readouterr()
    _expect(
        tmp_path / "z4.nii",
        "NIfTI header gives voxel size 0.5 x 0.7 x 4 mm in its sform (code 1) and 0.5 x 0.7 x 3 mm "
        "in pixdim, and readers differ in which they take",
    )
    assert capfd.readouterr().err == ""
    data[320:324] = struct.pack("<f", 3.0)  # the same voxel size: read
    (tmp_path / "z3.nii").write_bytes(bytes(data))
    assert read_image(tmp_path / "z3.nii").GetSpacing() == pytest.approx((0.5, 0.7, 3.0))


@pytest.mark.parametrize(
    ("field", "value"),
    [("Offset", "-10, 20, 5.5"), ("Offset", "-10 20"), ("Offset", "nan 20 5.5"),
     ("Offset", "1_0 20 5.5"), ("ElementSpacing", "0.5 0.7"),
     ("TransformMatrix", "1 0 0 0 1 0 0 0 inf")],
)  # fmt: skip
def test_a_metaimage_geometry_field_itk_cannot_parse_is_refused(tmp_path, field, value):
    """MetaIO read the numbers it could and 0 for the rest: `Offset = -10, 20, 5.5` placed the
    image at (-10, 0, 0), 20 mm from where its header meant, without a word."""
    _, image = _volume()
    write_image(image, tmp_path / "ok.mha")
    lines = (tmp_path / "ok.mha").read_bytes().split(b"\n")
    edited = [f"{field} = {value}".encode() if line.startswith(field.encode()) else line
              for line in lines]  # fmt: skip
    assert edited != lines
    (tmp_path / "bad.mha").write_bytes(b"\n".join(edited))
    _expect(tmp_path / "bad.mha", f"MetaImage header field {field} = {value!r} is not ")
    assert read_image(tmp_path / "ok.mha").GetOrigin() == pytest.approx((-10.0, 20.0, 5.5))
    # More numbers than NDims: ITK reads the first ones, as is this reader.
    extra = [b"Offset = -10 20 5.5 0" if line.startswith(b"Offset") else line for line in lines]
    (tmp_path / "extra.mha").write_bytes(b"\n".join(extra))
    assert read_image(tmp_path / "extra.mha").GetOrigin() == pytest.approx((-10.0, 20.0, 5.5))


@pytest.mark.parametrize(("start", "name"), [(268, "qform"), (292, "sform")])
def test_a_nifti_placement_holding_nan_is_refused(tmp_path, start, name):
    """ITK read a NaN qoffset_x (or srow) as 0: the image placed elsewhere, without a word."""
    data = _nifti_header(tmp_path, qform_code=1, sform_code=1)
    data[start : start + 4] = struct.pack("<f", float("nan"))  # qoffset_x / srow_x[3]
    (tmp_path / "nan.nii").write_bytes(bytes(data))
    _expect(tmp_path / "nan.nii", f"NIfTI header's {name} (")


def _int16_volume() -> tuple[np.ndarray, sitk.Image]:
    array = np.random.default_rng(0).integers(1, 1000, (6, 8, 10)).astype(np.int16)
    return array, sitk.GetImageFromArray(array)


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


def _without(path, field: str) -> None:
    """`path`'s MetaImage header without its line `field = ...`."""
    data = path.read_bytes()
    start = data.index(field.encode())
    path.write_bytes(data[:start] + data[data.index(b"\n", start) + 1 :])


@pytest.mark.parametrize("name", ["x", "my scan é"])
def test_a_compressed_metaimage_without_its_size_or_short_is_refused(tmp_path, capfd, name):
    """Without `CompressedDataSize` the compressed data went unchecked: ITK read a stream cut in
    half (or a whole one it could not size) as other voxels, printing only on stderr. A data
    file named with a space (a file, for MetaIO, as long as it holds no %) went unchecked too."""
    array, image = _int16_volume()
    sitk.WriteImage(image, str(tmp_path / f"{name}.mhd"), useCompression=True)
    _without(tmp_path / f"{name}.mhd", "CompressedDataSize")
    back = read_image(tmp_path / f"{name}.mhd")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    full = (tmp_path / f"{name}.zraw").read_bytes()
    (tmp_path / f"{name}.zraw").write_bytes(full[: len(full) // 2])
    capfd.readouterr()
    with pytest.raises(CaseError, match=rf"compressed data in {name}\.zraw inflate to \d+ bytes, "
                                        r"header promises 960\)$"):  # fmt: skip
        read_image(tmp_path / f"{name}.mhd", case="c")
    assert capfd.readouterr().err == ""


def test_a_compressed_metaimage_of_a_gzip_stream_without_its_size_is_read(tmp_path):
    """MetaIO inflates a gzip stream as well as a zlib one."""
    import gzip

    array, image = _int16_volume()
    sitk.WriteImage(image, str(tmp_path / "x.mhd"), useCompression=True)
    _without(tmp_path / "x.mhd", "CompressedDataSize")
    (tmp_path / "x.zraw").write_bytes(gzip.compress(array.tobytes()))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(tmp_path / "x.mhd")), array)


def test_a_compressed_flag_written_in_lower_case_is_read_as_metaio_reads_it(tmp_path):
    """`CompressedData = true` (MetaIO takes T, t or 1) was refused as 783 bytes of image data
    where 960 were promised."""
    array, image = _int16_volume()
    sitk.WriteImage(image, str(tmp_path / "x.mha"), useCompression=True)
    data = (tmp_path / "x.mha").read_bytes()
    (tmp_path / "x.mha").write_bytes(
        data.replace(b"CompressedData = True", b"CompressedData = true")
    )
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(tmp_path / "x.mha")), array)


def test_a_slice_list_short_of_files_or_bytes_is_refused(tmp_path):
    """`ElementDataFile = LIST` naming fewer slice files than DimSize needs: ITK read the missing
    slice from memory it never filled, without a word."""
    array, _ = _int16_volume()
    for k, plane in enumerate(array):
        (tmp_path / f"s{k}.raw").write_bytes(plane.tobytes())
    head = ("ObjectType = Image\nNDims = 3\nDimSize = 10 8 6\nElementType = MET_SHORT\n"
            "ElementSpacing = 1 1 1\nOffset = 0 0 0\nElementDataFile = LIST 2D\n")  # fmt: skip
    (tmp_path / "x.mhd").write_text(head + "".join(f"s{k}.raw\n" for k in range(6)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(tmp_path / "x.mhd")), array)
    (tmp_path / "x.mhd").write_text(head + "".join(f"s{k}.raw\n" for k in range(5)))
    with pytest.raises(CaseError, match=r"\(ElementDataFile LIST names 5 files, DimSize needs "
                                        r"6\)$"):  # fmt: skip
        read_image(tmp_path / "x.mhd", case="c")
    (tmp_path / "x.mhd").write_text(head + "".join(f"s{k}.raw\n" for k in range(6)))
    (tmp_path / "s5.raw").write_bytes(array[5].tobytes()[:100])
    with pytest.raises(CaseError, match=r"\(900 bytes of image data in the LIST's files, header "
                                        r"promises 960\)$"):  # fmt: skip
        read_image(tmp_path / "x.mhd", case="c")


@pytest.mark.parametrize("case", ["long long", "header size"])
def test_a_short_metaimage_of_64_bit_voxels_or_a_header_size_names_what_is_missing(tmp_path, case):
    """MET_LONG_LONG voxels (unsized) and a data file's `HeaderSize` (not counted): a short file
    was refused with ITK's stale errno, 'Reason: Success'."""
    array, image = _int16_volume()
    if case == "long long":
        sitk.WriteImage(sitk.Cast(image, sitk.sitkInt64), str(tmp_path / "x.mhd"))
        assert _header(tmp_path / "x.mhd")["ElementType"] == "MET_LONG_LONG"
        (tmp_path / "x.raw").write_bytes(array.astype(np.int64).tobytes()[:-400])
        message = r"\(3440 bytes of image data in x\.raw, header promises 3840\)$"
    else:
        sitk.WriteImage(image, str(tmp_path / "x.mhd"))
        text = (tmp_path / "x.mhd").read_text()
        (tmp_path / "x.mhd").write_text(
            text.replace("ElementDataFile", "HeaderSize = 100\nElementDataFile")
        )
        (tmp_path / "x.raw").write_bytes(bytes(100) + array.tobytes()[:-150])
        message = r"\(810 bytes of image data in x\.raw, header promises 960\)$"
    with pytest.raises(CaseError, match=message):
        read_image(tmp_path / "x.mhd", case="c")


def test_an_uncompressed_nifti_named_nii_gz_is_read_as_itk_reads_it(tmp_path):
    """ITK reads a `.nii.gz` saved without compression (zlib's gzopen passes such a file through);
    the header checks took it for a broken gzip stream and refused it. Cut short, it is still
    refused as such."""
    array, image = _volume()
    sitk.WriteImage(image, str(tmp_path / "x.nii"))
    data = (tmp_path / "x.nii").read_bytes()
    (tmp_path / "plain.nii.gz").write_bytes(data)
    back = read_image(tmp_path / "plain.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    np.testing.assert_allclose(back.GetSpacing(), (0.5, 0.7, 3.0), atol=1e-6)
    (tmp_path / "short.nii.gz").write_bytes(data[:-40])
    _expect(tmp_path / "short.nii.gz", f"({len(data) - 40} bytes of image data, header promises")
