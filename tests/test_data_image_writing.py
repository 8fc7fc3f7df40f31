"""Images written with SimpleITK read back as written, or the write is an error naming the file:
ITK's NIfTI writer left a short `.nii.gz` that read back as zeros, reporting it only on stderr."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import SimpleITK as sitk
from file_size_limit import file_size_limit

from focalnet_jax.data.image_writing import write_image
from focalnet_jax.errors import is_user_error


@pytest.mark.parametrize("name", ["scores.nii.gz", "scores.nii", "scores.mha"])
def test_a_write_cut_short_is_an_error_naming_the_file(tmp_path, name):
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.random((20, 64, 64), dtype=np.float32))  # 320 KiB
    path = tmp_path / name
    with file_size_limit(64 * 1024), pytest.raises(OSError) as raised:
        write_image(image, path)
    assert (raised.value.errno, raised.value.filename) == (errno.EFBIG, str(path))
    assert is_user_error(raised.value)
    assert write_image(image, path) == path  # with room: written whole
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(path))), sitk.GetArrayFromImage(image)
    )


def test_a_write_of_zeros_cut_short_is_an_error_though_it_reads_back_as_written(tmp_path):
    """A label without lesions (all zeros): ITK reads a short `.nii.gz` padded with zeros, so the
    read-back found nothing and the short file stayed (refused as truncated when read later)."""
    image = sitk.Image(384, 384, 19, sitk.sitkUInt8)
    path = tmp_path / "label.nii.gz"
    with file_size_limit(2048), pytest.raises(OSError) as raised:
        write_image(image, path)
    assert (raised.value.errno, raised.value.filename) == (errno.EFBIG, str(path))
