"""What the tests of images refused when read share: `expect` (reading a file as case 'c1' is
refused with a reason) and the `mixed_folder` fixture, the ProstateX T2w and ADC series in one
folder (a test module takes it as `mixed_folder = image_refusals.mixed_folder`)."""

from __future__ import annotations

import shutil

import pytest

from focalnet_jax.data.io import CaseError, read_image


def expect(path, reason, **kwargs):
    with pytest.raises(CaseError) as info:
        read_image(path, case="c1", **kwargs)
    assert info.value.case == "c1" and reason in info.value.reason, info.value.reason
    return info.value


@pytest.fixture
def mixed_folder(prostatex_case_dir, tmp_path):
    """The T2w and the ADC series of the ProstateX exam in one folder."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("t2w", "adc"):
        for file in (prostatex_case_dir / name).iterdir():
            shutil.copy(file, folder / f"{name}_{file.name}")
    return folder
