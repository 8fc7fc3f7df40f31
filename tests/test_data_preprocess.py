"""preprocess_case: the real ProstateX exam from DICOM, registration by world coordinates, and
label values read as lesion classes and instances."""

from __future__ import annotations

import numpy as np
import preprocess_cases
import pytest
import SimpleITK as sitk
from preprocess_cases import FINDING, OFFSETS, label_with, read_series
from scipy import ndimage

from focalnet_jax.data import preprocess_case
from focalnet_jax.data.image_writing import write_image
from focalnet_jax.data.synth import Lesion, SynthConfig, synth_case

real_exam = preprocess_cases.real_exam  # a module-scoped fixture
small_case = preprocess_cases.small_case  # a module-scoped fixture


@pytest.mark.real_data
def test_real_exam_shape_and_intensity(real_exam):
    t2w, case = real_exam
    assert case.images.shape == (19, 128, 128, 3) and case.images.dtype == np.float32
    assert case.classes.shape == (19, 128, 128) and case.classes.dtype == np.int32
    np.testing.assert_array_equal(case.slice_index, np.arange(19))
    assert case.spacing == (0.625, 0.625)
    assert case.t2w_reference["source"] == "bladder"
    centre = case.images[5:14, 44:84, 44:84]  # central 25 mm of the mid-gland slices
    # Gland bright in T2w (air -> 0, bladder -> 1), ADC channel non-blank and in range.
    assert 0.2 < np.median(centre[..., 0]) < 1.0
    assert np.mean(centre[..., 1] > 0.1) > 0.95 and 0.2 < np.median(centre[..., 1]) < 0.8
    assert case.images[..., 1].max() <= 1.0 and case.images[..., 1].min() >= 0.0


@pytest.mark.real_data
def test_real_exam_finding_lands_at_independently_computed_pixel(real_exam):
    t2w, case = real_exam
    # Independent: T2w continuous index of the finding; the crop is 80 mm / 128 px centred on the
    # T2w volume centre (no mask, no centre given) in the T2w slice plane.
    i, j, k = t2w.TransformPhysicalPointToContinuousIndex(FINDING)
    sx, sy, _ = t2w.GetSpacing()
    cx, cy = (t2w.GetSize()[0] - 1) / 2, (t2w.GetSize()[1] - 1) / 2
    col = ((i - cx) * sx) / 0.625 + 63.5
    row = ((j - cy) * sy) / 0.625 + 63.5
    s, r, c = case.world_to_pixel(*FINDING)
    np.testing.assert_allclose((s, r, c), (k, row, col), atol=1e-6)
    assert 0 <= r < 128 and 0 <= c < 128 and abs(k - 8.5) < 0.05
    # The drawn lesion is at that pixel, with its class, on both slices.
    for sl in (8, 9):
        assert case.classes[sl, int(round(r)), int(round(c))] == 3
    np.testing.assert_array_equal(case.lesion_classes, [3])
    assert case.index_lesion == 1


@pytest.mark.real_data
def test_real_exam_world_pixel_round_trip_and_adc_on_grid(real_exam, prostatex_case_dir):
    _, case = real_exam
    rng = np.random.default_rng(0)
    points = np.asarray(FINDING) + rng.uniform(-20, 20, size=(20, 3))
    for p in points:
        back = case.pixel_to_world(*case.world_to_pixel(*p))
        assert np.linalg.norm(np.asarray(back) - p) < 0.5
    # ADC channel value at a crop pixel == ADC sampled (trilinear) at that pixel's world point.
    adc = read_series(prostatex_case_dir / "adc")
    array = sitk.GetArrayFromImage(adc).astype(np.float64)
    for s, r, c in [(8, 89, 44), (5, 64, 64), (12, 40, 90), (9, 100, 70)]:
        index = adc.TransformPhysicalPointToContinuousIndex(case.pixel_to_world(s, r, c))
        expected = ndimage.map_coordinates(array, [[index[2]], [index[1]], [index[0]]], order=1)
        assert case.images[s, r, c, 1] == pytest.approx(
            np.clip(expected[0], 0, 3000) / 3000, abs=2e-3
        )


def test_shifted_coarse_adc_lesion_lands_on_label_pixel(tmp_path):
    cfg = SynthConfig.small(dwi_shift_mm=1.7)
    probe = synth_case(7, cfg, lesions=[])
    p = np.asarray(probe.prostate_center)
    centre = tuple(p + [8.0, 7.0, 0.0])  # posterior-left peripheral zone
    lesion = Lesion(
        center=centre, radii=(6.0, 5.0, 5.0), angle=0.3, cls=4, visible_in="both", zone="pz"
    )
    sc = synth_case(7, cfg, lesions=[lesion])
    t2w, adc = sc.images["t2w"], sc.images["adc"]
    assert adc.GetSpacing()[0] == 2 * t2w.GetSpacing()[0]
    offset = np.asarray(adc.TransformPhysicalPointToContinuousIndex(t2w.GetOrigin()))
    assert np.all(np.abs(offset - np.round(offset)) > 0.05)  # grids not aligned
    for name, image in [("t2w", t2w), ("adc", adc), ("label", sc.label), ("mask", sc.mask)]:
        write_image(image, tmp_path / f"{name}.mha")
    case = preprocess_case(
        {"t2w": tmp_path / "t2w.mha", "adc": tmp_path / "adc.mha"},
        tmp_path / "label.mha",
        mask=tmp_path / "mask.mha",
        config={"interpolator": "linear"},
    )
    s, r, c = case.world_to_pixel(*centre)
    s = int(round(s))
    assert case.classes[s, int(round(r)), int(round(c))] == 4
    window = (slice(int(r) - 15, int(r) + 16), slice(int(c) - 15, int(c) + 16))
    dark = case.images[s][window][..., 1] < (750 + 1300) / 2 / 3000
    label_rc = np.argwhere(case.classes[s][window] == 4).mean(0)
    blobs, _ = ndimage.label(dark)  # the dark ADC blob under the lesion centre (fat is dark too)
    adc_rc = np.argwhere(blobs == blobs[15, 15]).mean(0)
    assert blobs[15, 15] > 0
    np.testing.assert_allclose(adc_rc, label_rc, atol=1.0)  # pixels (0.625 mm)
    np.testing.assert_allclose(label_rc, (r - int(r) + 15, c - int(c) + 15), atol=1.0)


def test_picai_label_values_map_to_classes(small_case):
    folder, sc = small_case
    label = label_with(sc, zip([2, 3, 4, 5, 1], OFFSETS, strict=True), folder)
    components = {"t2w": folder / "t2w.mha", "adc": folder / "adc.mha"}
    case = preprocess_case(components, label, mask=folder / "mask.nii.gz", slices="annotated")
    assert len(case.lesion_classes) == 5
    for value, offset in zip([2, 3, 4, 5, 1], OFFSETS, strict=True):
        s, r, c = case.world_to_pixel(*(np.asarray(sc.prostate_center) + offset))
        instance = case.lesions[int(round(s)), int(round(r)), int(round(c))]
        on = case.lesions == instance
        assert instance > 0 and case.lesion_classes[instance - 1] == max(value, 2)
        assert np.all(case.classes[on] == max(value, 2))
        assert case.lesion_grade_known[instance - 1] == (value != 1)
        assert np.all(case.grade_known[on] == (value != 1))
        if value == 5:
            assert case.index_lesion == instance
    assert np.all(case.grade_known[case.lesions == 0] == 1)
    assert case.annotated.all() and len(case.slice_index) < 6
    # 'isup' values (synthetic data): 1 is GS 3+3.
    isup = preprocess_case(components, label, config={"label_values": "isup"})
    assert sorted(isup.lesion_classes) == [1, 2, 3, 4, 5]
    assert isup.grade_known.all()


def test_index_lesion_ties_broken_by_diameter(small_case, tmp_path):
    folder, sc = small_case
    t2w = sc.images["t2w"]
    label = np.zeros(sitk.GetArrayViewFromImage(t2w).shape, np.uint8)
    label[2:4, 40:44, 30:34] = 3  # 4 mm
    label[2:4, 40:50, 60:66] = 3  # 10 x 6 mm: larger diameter
    image = sitk.GetImageFromArray(label)
    image.CopyInformation(t2w)
    write_image(image, tmp_path / "l.nii.gz")
    case = preprocess_case({"t2w": folder / "t2w.mha"}, tmp_path / "l.nii.gz")
    assert list(case.lesion_classes) == [3, 3] and case.index_lesion == 2


def test_touching_lesions_of_two_grades_stay_two_lesions(small_case, tmp_path):
    """A GS 8 lesion (value 4) touching a larger GS 3+4 one (value 2) was merged with it into
    one lesion of the majority value: its voxels were stored as class 2 and the case had no GS 8
    lesion. Each keeps its voxels' class now, and the GS 8 one is the index lesion."""
    folder, sc = small_case
    t2w = sc.images["t2w"]
    label = np.zeros(sitk.GetArrayViewFromImage(t2w).shape, np.uint8)
    label[2:4, 40:50, 40:52] = 2  # 10 x 12 voxels
    label[2:4, 42:46, 52:56] = 4  # 4 x 4 voxels, sharing a face with the value-2 block
    image = sitk.GetImageFromArray(label)
    image.CopyInformation(t2w)
    write_image(image, tmp_path / "l.nii.gz")
    case = preprocess_case({"t2w": folder / "t2w.mha"}, tmp_path / "l.nii.gz")
    assert list(case.lesion_classes) == [2, 4]
    for instance, value in ((1, 2), (2, 4)):
        on = case.lesions == instance
        assert on.sum() > 0 and np.all(case.classes[on] == value)
    assert case.index_lesion == 2
    assert np.array_equal(case.classes > 0, case.lesions > 0)
