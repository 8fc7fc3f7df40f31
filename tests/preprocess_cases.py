"""What the preprocess_case tests share: the real ProstateX-0000 exam with a disc drawn around its
finding (`FINDING`, `read_series`, `finding_label`), a small synthetic case and labels drawn on it
(`label_with`, `OFFSETS`), and the module-scoped `real_exam` and `small_case` fixtures (a test
module takes them as `small_case = preprocess_cases.small_case`)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from focalnet_jax.data import preprocess_case
from focalnet_jax.data.image_writing import write_image
from focalnet_jax.data.synth import SynthConfig, synth_case

FINDING = (25.7457, 31.8707, -38.511)  # ProstateX-0000 finding 1, LPS mm, GS 4+3 (README)


def read_series(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def finding_label(t2w: sitk.Image) -> sitk.Image:
    """A 5 mm disc of class 3 around the finding on its two nearest T2w slices."""
    i, j, k = t2w.TransformPhysicalPointToContinuousIndex(FINDING)
    label = np.zeros(sitk.GetArrayViewFromImage(t2w).shape, np.uint8)
    sx, sy, _ = t2w.GetSpacing()
    yy, xx = np.mgrid[: label.shape[1], : label.shape[2]]
    disc = ((xx - i) * sx) ** 2 + ((yy - j) * sy) ** 2 <= 5.0**2
    label[int(np.floor(k))][disc] = 3
    label[int(np.floor(k)) + 1][disc] = 3
    image = sitk.GetImageFromArray(label)
    image.CopyInformation(t2w)
    return image


@pytest.fixture(scope="module")
def real_exam(prostatex_case_dir, tmp_path_factory):
    """The exam with a 5 mm disc of class 3 around the finding on its two nearest T2w slices."""
    t2w = read_series(prostatex_case_dir / "t2w")
    path = tmp_path_factory.mktemp("prostatex") / "ProstateX-0000.nii.gz"
    write_image(finding_label(t2w), path)
    components = {name: prostatex_case_dir / name for name in ("t2w", "adc", "hbv")}
    case = preprocess_case(
        components, path, config={"interpolator": "linear"}, case_id="ProstateX-0000"
    )
    return t2w, case


@pytest.fixture(scope="module")
def small_case(tmp_path_factory):
    """A small synthetic case without lesions, written to disk: (folder, SynthCase)."""
    folder = tmp_path_factory.mktemp("small")
    sc = synth_case(3, SynthConfig.small(), lesions=[])
    for name in ("t2w", "adc"):
        write_image(sc.images[name], folder / f"{name}.mha")
    write_image(sc.mask, folder / "mask.nii.gz")
    return folder, sc


def label_with(sc, values_and_offsets, folder, name="label.nii.gz"):
    """T2w-grid label: a 4 mm ball of each value at each offset (mm) from the gland centre."""
    t2w = sc.images["t2w"]
    label = np.zeros(sitk.GetArrayViewFromImage(t2w).shape, np.uint8)
    zz, yy, xx = np.indices(label.shape)
    for value, offset in values_and_offsets:
        point = np.asarray(sc.prostate_center) + offset
        i, j, k = t2w.TransformPhysicalPointToContinuousIndex(tuple(point))
        sx, sy, sz = t2w.GetSpacing()
        ball = ((xx - i) * sx) ** 2 + ((yy - j) * sy) ** 2 + ((zz - k) * sz) ** 2 <= 4.0**2
        label[ball] = value
    image = sitk.GetImageFromArray(label)
    image.CopyInformation(t2w)
    write_image(image, folder / name)
    return folder / name


OFFSETS = [(-16, 8, 0), (-6, 12, 0), (6, 12, 0), (16, 8, 0), (0, -4, 0)]
