"""What the image-reader tests share: a small float volume with its spacing and origin
(`volume`) and the check that a read is refused naming the case, the file and the reason
(`expect`)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from focalnet_jax.data.io import CaseError, read_image


def volume(shape_zyx=(4, 6, 5)):
    array = np.arange(np.prod(shape_zyx), dtype=np.float32).reshape(shape_zyx)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.7, 3.0))
    image.SetOrigin((-10.0, 20.0, 5.5))
    return array, image


def expect(path, reason, case="c1"):
    with pytest.raises(CaseError) as info:
        read_image(path, case=case)
    assert info.value.case == case and info.value.file == str(path)
    assert reason in info.value.reason
    assert case in str(info.value) and str(path) in str(info.value)
