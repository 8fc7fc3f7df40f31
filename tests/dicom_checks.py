"""Helpers of the `focalnet predict --dicom` tests: hand-made scores of the real ProstateX exam
(Gaussians at known LPS points), an edited copy of its T2w series, and dicom3tools' IOD checker."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

FINDING = np.array([25.7457, 31.8707, -38.511])  # LPS mm, GS 4+3 (shared/data/prostatex/README.md)
OTHER = FINDING + np.array([-22.0, 4.0, 3.0])  # a lower blob beside it


def _gaussians(world) -> np.ndarray:
    """Lesion score at LPS points `[..., 3]`: 0.9 at FINDING, 0.6 at OTHER (sigma 5 mm)."""
    world = np.asarray(world)
    return sum(
        h * np.exp(-np.sum((world - c) ** 2, -1) / (2 * 5.0**2))
        for h, c in ((0.9, FINDING), (0.6, OTHER))
    )


def hand_made_scores(case) -> np.ndarray:
    """[S, H, W, 5] hand-made scores of `case`: the Gaussians, P(class >= 2) 0.8 of them."""
    s, r, c = np.meshgrid(*(np.arange(n) for n in case.images.shape[:3]), indexing="ij")
    blob = _gaussians(np.stack(case.pixel_to_world(s, r, c), -1)).astype(np.float32)
    return blob[..., None] * np.array([1.0, 0.8, 0.5, 0.2, 0.1], np.float32)


def validator_errors(path, iod: str) -> list[str]:
    """The `Error` lines of dicom3tools' `dciodvfy` on `path`, once it named `iod` as the file's
    IOD; skips where dciodvfy is absent, fails there under FOCALNET_REQUIRE_DICOM_VALIDATOR=1."""
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        reason = "dciodvfy (Debian's dicom3tools) not installed: .ci/install_dicom_validator.sh"
        if os.environ.get("FOCALNET_REQUIRE_DICOM_VALIDATOR", "") not in ("", "0"):
            pytest.fail(reason + " (FOCALNET_REQUIRE_DICOM_VALIDATOR=1)")
        pytest.skip(reason)
    done = subprocess.run(
        [dciodvfy, "-new", str(path)], capture_output=True, text=True, timeout=120
    )
    lines = (done.stdout + done.stderr).splitlines()
    assert iod in lines, lines  # the IOD it checked the file against
    return [line for line in lines if line.startswith("Error")]


def t2w_copy(exam, folder, edit) -> list[str]:
    """The exam's T2w series copied into `folder`, `edit(k, header)` applied to each file's
    header (k: its index in the series' order); the files in that order."""
    folder.mkdir()
    files = []
    for k, f in enumerate(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(exam["t2w"])):
        header = pydicom.dcmread(f)
        edit(k, header)
        header.save_as(folder / os.path.basename(f))
        files.append(str(folder / os.path.basename(f)))
    return files
