"""Readers: DICOM folder, .mha, .nii(.gz), .nrrd through SimpleITK, and bad files of any format:
missing, unreadable, truncated, 2D, of NaN, Inf or complex voxels, or placed by no rotation."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from image_reads import expect, volume

from focalnet_jax.data.image_writing import write_image
from focalnet_jax.data.io import CaseError, read_image, xyz, zyx


def test_axis_order_helper():
    assert xyz((3.0, 0.7, 0.5)) == (0.5, 0.7, 3.0)
    assert zyx(xyz((1, 2, 3))) == (1, 2, 3)
    _, image = volume()
    assert xyz(sitk.GetArrayViewFromImage(image).shape) == image.GetSize()


@pytest.mark.parametrize("suffix", [".mha", ".nii.gz", ".nii", ".nrrd"])
def test_image_files_round_trip(tmp_path, suffix):
    array, image = volume()
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


def test_missing_file(tmp_path):
    expect(tmp_path / "absent_t2w.mha", "file not found")


def test_an_unreadable_file_is_named_as_unreadable_not_as_another_format(tmp_path, monkeypatch):
    """A NIfTI file the user may not read (permission denied) was "not recognized as a NIFTI
    file" (ITK's words): the user looked for a damaged file. (As root no mode denies reading:
    the denial is the one `open` gives a user without read permission.)"""
    import errno
    import pathlib

    _, image = volume((6, 16, 16))
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
    _, image = volume((6, 64, 64))
    write_image(image, tmp_path / "x.nii.gz")
    data = (tmp_path / "x.nii.gz").read_bytes()
    (tmp_path / "x.nii.gz").write_bytes(data[: len(data) // 2])
    expect(tmp_path / "x.nii.gz", "unreadable or truncated")
    (tmp_path / "junk.mha").write_bytes(b"not an image at all")
    expect(tmp_path / "junk.mha", "unreadable or truncated")


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
    _, image = volume()
    write_image(image, tmp_path / "x.mha")
    text = (tmp_path / "x.mha").read_bytes()
    bad = text.replace(
        b"TransformMatrix = 1 0 0 0 1 0 0 0 1", f"TransformMatrix = {matrix}".encode()
    )
    assert bad != text
    (tmp_path / "bad.mha").write_bytes(bad)
    direction = sitk.ReadImage(str(tmp_path / "bad.mha")).GetDirection()  # ITK reads it so
    assert sorted(direction) == sorted(float(v) for v in matrix.split())
    expect(tmp_path / "bad.mha", f"direction matrix is no rotation: its axes have {found}")
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
    _, image = volume()
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
    expect(tmp_path / "x.mha", "expected a 3D image")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize(("name", "dtype"), [("x.mha", np.float32), ("x.nii", np.float32),
                                             ("x.nii.gz", np.float64)])  # fmt: skip
def test_nan_inf_voxels(tmp_path, bad, name, dtype):
    # ITK reads a NIfTI file's NaN and Inf voxels as 0: such an image passed as a clean one.
    array, image = volume()
    array = array.astype(dtype)
    array[1, 2, 3] = bad
    image = sitk.GetImageFromArray(array)
    write_image(image, tmp_path / name)
    expect(tmp_path / name, "NaN or Inf")
    array[1, 2, 3] = 0
    write_image(sitk.GetImageFromArray(array), tmp_path / name)
    assert read_image(tmp_path / name).GetSize() == image.GetSize()


def test_empty_dicom_folder_and_unknown_suffix(tmp_path):
    (tmp_path / "series").mkdir()
    expect(tmp_path / "series", "no DICOM series")
    (tmp_path / "x.png").write_bytes(b"")
    expect(tmp_path / "x.png", "unknown image format")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_complex_voxels_are_refused_in_one_line(tmp_path, suffix):
    """A complex image (an ADC saved from a complex reconstruction) passed the channel check and
    ended preprocess, also with --skip-bad-cases, in SimpleITK's RuntimeError from the cast."""
    _, image = volume()
    path = tmp_path / f"adc{suffix}"
    sitk.WriteImage(sitk.RealAndImaginaryToComplex(image, image * 0.5), str(path))
    expect(path, "expected real voxels, got complex of 32-bit float")
