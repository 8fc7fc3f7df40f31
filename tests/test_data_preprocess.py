"""preprocess_case: the real ProstateX exam from DICOM, registration by world coordinates."""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from focalnet_jax.data import intensity, preprocess_case
from focalnet_jax.data.image_writing import write_image
from focalnet_jax.data.io import CaseError, read_image
from focalnet_jax.data.synth import Lesion, SynthConfig, synth_case

FINDING = (25.7457, 31.8707, -38.511)  # ProstateX-0000 finding 1, LPS mm, GS 4+3 (README)


def _series(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _finding_label(t2w: sitk.Image) -> sitk.Image:
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
    t2w = _series(prostatex_case_dir / "t2w")
    path = tmp_path_factory.mktemp("prostatex") / "ProstateX-0000.nii.gz"
    write_image(_finding_label(t2w), path)
    components = {name: prostatex_case_dir / name for name in ("t2w", "adc", "hbv")}
    case = preprocess_case(
        components, path, config={"interpolator": "linear"}, case_id="ProstateX-0000"
    )
    return t2w, case


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
    adc = _series(prostatex_case_dir / "adc")
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


@pytest.fixture(scope="module")
def small_case(tmp_path_factory):
    """A small synthetic case without lesions, written to disk: (folder, SynthCase)."""
    folder = tmp_path_factory.mktemp("small")
    sc = synth_case(3, SynthConfig.small(), lesions=[])
    for name in ("t2w", "adc"):
        write_image(sc.images[name], folder / f"{name}.mha")
    write_image(sc.mask, folder / "mask.nii.gz")
    return folder, sc


def _label_with(sc, values_and_offsets, folder, name="label.nii.gz"):
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


def test_picai_label_values_map_to_classes(small_case):
    folder, sc = small_case
    label = _label_with(sc, zip([2, 3, 4, 5, 1], OFFSETS, strict=True), folder)
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


def test_t2w_and_adc_scaling(small_case):
    folder, sc = small_case
    case = preprocess_case(
        {"t2w": folder / "t2w.mha", "adc": folder / "adc.mha"}, mask=folder / "mask.nii.gz"
    )
    assert case.center_source == "mask"
    scale = case.t2w_reference
    raw = sitk.GetArrayFromImage(sc.images["t2w"]).astype(np.float64)
    assert scale["air"] == pytest.approx(np.percentile(raw, 1.0))
    adc = case.images[..., 1]
    assert adc.min() >= 0.0 and adc.max() <= 1.0
    # T2w channel = (raw - air) / (bladder - air), unclipped, sampled at the crop pixels.
    s, r, c = 3, 64, 64
    index = sc.images["t2w"].TransformPhysicalPointToContinuousIndex(case.pixel_to_world(s, r, c))
    raw_value = ndimage.map_coordinates(raw, [[index[2]], [index[1]], [index[0]]], order=3)[0]
    expected = (raw_value - scale["air"]) / (scale["bladder"] - scale["air"])
    assert case.images[s, r, c, 0] == pytest.approx(expected, rel=0.05)


def test_bladder_phantom_maps_to_one_and_fallback_is_logged(tmp_path, caplog):
    rng = np.random.default_rng(0)
    volume = rng.normal(200, 10, size=(10, 200, 200)).clip(0)  # 1 x 1 x 3 mm, tissue
    volume[:, :10] = 0.0  # air
    zz, yy, xx = np.indices(volume.shape)
    ball = ((xx - 100) ** 2 + (yy - 70) ** 2 + ((zz - 6) * 3) ** 2) <= 22**2  # anterior of centre
    volume[ball] = rng.normal(900, 20, size=ball.sum())
    image = sitk.GetImageFromArray(volume.astype(np.float32))
    image.SetSpacing((1.0, 1.0, 3.0))
    write_image(image, tmp_path / "t2w.mha")
    case = preprocess_case({"t2w": tmp_path / "t2w.mha"})
    assert case.t2w_reference["source"] == "bladder"
    assert case.t2w_reference["air"] == 0.0
    assert case.t2w_reference["bladder"] == pytest.approx(np.median(volume[ball]), abs=5.0)
    s, r, c = case.world_to_pixel(100.0, 70.0, 18.0)
    assert case.images[int(round(s)), int(round(r)), int(round(c)), 0] == pytest.approx(
        1.0, abs=0.1
    )
    # Heterogeneous tissue, no bladder: the 99.5th percentile, with a warning naming the case.
    volume = np.abs(rng.normal(200, 80, size=volume.shape))
    image = sitk.GetImageFromArray(volume.astype(np.float32))
    image.SetSpacing((1.0, 1.0, 3.0))
    write_image(image, tmp_path / "t2w.mha")
    with caplog.at_level("WARNING"):
        case = preprocess_case({"t2w": tmp_path / "t2w.mha"}, case_id="no-bladder")
    assert case.t2w_reference["source"] == "fallback"
    assert case.t2w_reference["bladder"] == pytest.approx(
        np.percentile(volume.astype(np.float32), 99.5)
    )
    assert "no-bladder" in caplog.text and "no bladder found" in caplog.text


def test_default_case_finds_bladder_and_scales_urine_to_one(tmp_path):
    sc = synth_case(12)
    assert sc.coil  # an endorectal-coil case: a bright bias lobe around the rectum
    t2w = sc.images["t2w"]
    write_image(t2w, tmp_path / "t2w.mha")
    case = preprocess_case({"t2w": tmp_path / "t2w.mha"}, center=sc.prostate_center)
    assert case.t2w_reference["source"] == "bladder" and case.center_source == "given"
    # The voxels found lie inside the generated bladder ellipsoid.
    raw = sitk.GetArrayFromImage(t2w).astype(np.float32)
    i, j, _ = t2w.TransformPhysicalPointToContinuousIndex(sc.prostate_center)
    found = intensity.find_bladder(raw, (3.0, 0.5, 0.5), (j, i))
    (cx, cy, cz), (rx, ry, rz) = sc.bladder
    zz, yy, xx = np.nonzero(found)
    x0, y0, z0 = t2w.GetOrigin()
    d = ((x0 + 0.5 * xx - cx) / rx) ** 2 + ((y0 + 0.5 * yy - cy) / ry) ** 2
    d += ((z0 + 3.0 * zz - cz) / rz) ** 2
    assert len(zz) > 10000 and np.mean(d <= 1.0) > 0.98
    assert case.t2w_reference["bladder"] == pytest.approx(np.median(raw[found]))
    # Urine in the crop sits near 1 after scaling.
    point = (cx, cy, z0 + 3.0 * (t2w.GetSize()[2] - 2))
    s, r, c = case.world_to_pixel(*point)
    assert 0 <= r < 128 and 0 <= c < 128
    assert case.images[int(round(s)), int(round(r)), int(round(c)), 0] == pytest.approx(
        1.0, abs=0.15
    )


def test_bladder_reference_does_not_depend_on_how_the_t2w_is_stored():
    """The search box was cut by truncating voxel bounds and subsampled from its first row: the
    same exam stored mirrored, or with its crop centre a rounding error either side of a whole
    voxel, gave another bladder reference (565 against 537 for one synthetic case)."""
    sc = synth_case(12)
    t2w = sc.images["t2w"]
    raw = sitk.GetArrayFromImage(t2w).astype(np.float32)
    _, ny, nx = raw.shape
    i, j, _ = t2w.TransformPhysicalPointToContinuousIndex(sc.prostate_center)
    for row, column in [(j, i), (round(j) - 1e-6, i), (round(j) + 1e-6, round(i) + 0.5)]:
        stored = {
            "as is": (raw, (row, column), 1.0),
            "mirrored": (raw[:, ::-1, ::-1], (ny - 1 - row, nx - 1 - column), -1.0),
            "left-right": (raw[:, :, ::-1], (row, nx - 1 - column), 1.0),
        }
        found = {
            name: intensity.find_bladder(
                np.ascontiguousarray(volume), (3.0, 0.5, 0.5), center, anterior_sign=sign
            )
            for name, (volume, center, sign) in stored.items()
        }
        assert found["as is"].sum() > 10000
        np.testing.assert_array_equal(found["mirrored"][:, ::-1, ::-1], found["as is"])
        np.testing.assert_array_equal(found["left-right"][:, :, ::-1], found["as is"])
    near = [intensity.find_bladder(raw, (3.0, 0.5, 0.5), (round(j) + d, i)) for d in (-1e-6, 1e-6)]
    np.testing.assert_array_equal(*near)


@pytest.mark.real_data
def test_bladder_reference_does_not_depend_on_the_t2ws_pixel_shape(prostatex_case_dir):
    """The search grid took one step for both axes (the finer one's) and its 3 mm opening was
    round in samples, sized by the columns' spacing: ProstateX-0000's T2w resampled to 0.5 x 1.0
    mm pixels gave the reference 571.5 and 17.2 mL of bladder, 1.9 % and 16 % off its own
    0.5 x 0.5 mm pixels' 561.0 and 20.4 mL."""
    t2w = _series(prostatex_case_dir / "t2w")
    direction = np.asarray(t2w.GetDirection()).reshape(3, 3)
    found = {}
    for sx, sy in ((0.5, 0.5), (0.5, 1.0), (1.0, 0.5)):
        grid = sitk.Image([round(192 / sx), round(192 / sy), t2w.GetSize()[2]], sitk.sitkFloat32)
        grid.SetSpacing((sx, sy, t2w.GetSpacing()[2]))
        grid.SetDirection(t2w.GetDirection())  # the same field of view, pixel centres inside it
        grid.SetOrigin(
            np.asarray(t2w.GetOrigin()) + direction @ [(sx - 0.5) / 2, (sy - 0.5) / 2, 0]
        )
        image = sitk.Resample(t2w, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        raw = sitk.GetArrayFromImage(image)
        spacing = (t2w.GetSpacing()[2], sy, sx)
        mask = intensity.find_bladder(raw, spacing)
        found[sx, sy] = (float(np.median(raw[mask])), mask.sum() * sx * sy * spacing[0] / 1000)
    reference, millilitres = found[0.5, 0.5]
    assert reference == pytest.approx(561.0, abs=1.0) and millilitres == pytest.approx(
        20.4, abs=0.3
    )
    for shape in ((0.5, 1.0), (1.0, 0.5)):
        assert found[shape][0] == pytest.approx(reference, rel=0.003), found
        assert found[shape][1] == pytest.approx(millilitres, rel=0.03), found


def test_bladder_search_grid_stays_within_the_volume():
    """A first sample a rounding tolerance below row 0 (centre 5.9998, step 3) was read at row
    -1 through row 0's neighbour: the volume's last row (0.2 from a last row of 1000)."""
    volume = np.zeros((1, 8, 3), np.float32)
    volume[0, :7] = np.arange(7)[:, None]
    volume[0, 7] = 1000.0
    positions, first = intensity._axis_grid(5.9998, 10.0, 10.0, 3, 8)
    assert first == -2 and positions[0] == 0.0
    sampled = intensity._sample_axis(volume, positions, 1)[0, :, 0]
    np.testing.assert_allclose(sampled, [0.0, 2.9998, 5.9998], atol=1e-5)


def test_adc_range_maps_its_low_end_to_0_and_its_high_end_to_1():
    """A configured `adc_range` with a low end above 0: values clipped to it, then scaled over
    its width (the default low end 0 cannot tell `/ (high - low)` from `/ high`)."""
    adc = np.array([0.0, 500.0, 1500.0, 2500.0, 4000.0], np.float32)
    normalised = intensity.normalise_adc(adc, 500.0, 2500.0)
    np.testing.assert_allclose(normalised, [0.0, 0.0, 0.5, 1.0, 1.0])
    assert normalised.dtype == np.float32


def test_percentile_scaling_leaves_zero_fill_out():
    """An HBV exported zero-padded to a larger grid was scaled by percentiles of the padding too
    (8.1..101 became 0..81): the same exam stored otherwise."""
    hbv = np.random.default_rng(0).gamma(4.0, 10.0, size=(4, 20, 30)).astype(np.float32) + 1
    padded = np.zeros((4, 50, 60), np.float32)
    padded[:, 10:30, 15:45] = hbv
    lo, hi = intensity.percentile_range(hbv)
    assert (lo, hi) == pytest.approx(np.percentile(hbv, [1, 99]))
    assert intensity.percentile_range(padded) == (lo, hi)
    assert intensity.percentile_range(np.zeros((2, 2, 2))) == (0.0, 1e-6)  # refused as blank


@pytest.mark.parametrize(
    "problem, reason",
    [
        ("component_outside", "adc does not overlap the T2w field of view"),
        ("label_outside", "label does not overlap the T2w field of view"),
        ("bladder_outside", "bladder mask does not overlap the T2w field of view"),
        ("label_values", "outside the allowed set"),
        ("lesion_outside_crop", "lost by resampling onto the crop (label value 3 centred at"),
        ("lesion_outside_crop", "mm: outside the 80 mm crop)"),
        # The label reaches beyond the T2w's slices: the reason said "outside the 80 mm crop or
        # thinner than a crop pixel" of a lesion inside the crop and 10 mm wide.
        ("lesion_beyond_slices", "1 of 2 lesions lost by resampling onto the crop (label value 5"),
        ("lesion_beyond_slices", "mm: beyond the T2w's slices)"),
        ("lesion_between_slices", "mm: between the crop's sample points: between two T2w slices"),
    ],
)
def test_bad_case_raises_naming_case_file_reason(small_case, tmp_path, problem, reason):
    folder, sc = small_case
    components = {"t2w": str(folder / "t2w.mha"), "adc": str(folder / "adc.mha")}
    label, bladder = None, None
    if problem == "bladder_outside":  # it was called "empty" once resampled
        image = sitk.Image(sc.mask)
        image.SetOrigin(tuple(o + 500.0 for o in image.GetOrigin()))
        bladder = bad = str(tmp_path / "bladder.nii.gz")
        write_image(image, bladder)
    elif problem == "component_outside":
        adc = sitk.Image(sc.images["adc"])
        adc.SetOrigin(tuple(o + 500.0 for o in adc.GetOrigin()))
        components["adc"] = str(tmp_path / "adc.mha")
        write_image(adc, components["adc"])
        bad = components["adc"]
    else:
        label = _label_with(sc, [(2, OFFSETS[0])], tmp_path)
        image = sitk.ReadImage(str(label))
        if problem == "label_outside":
            image.SetOrigin(tuple(o - 800.0 for o in image.GetOrigin()))
        elif problem == "label_values":
            image = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) * 4)  # 2 -> 8
            image.CopyInformation(sitk.ReadImage(str(label)))
        elif problem == "lesion_outside_crop":  # in the corner of the 96 mm T2w, not the crop
            array = np.zeros_like(sitk.GetArrayFromImage(image))
            array[2, 1:4, 1:4] = 3
            replaced = sitk.GetImageFromArray(array)
            replaced.CopyInformation(image)
            image = replaced
        else:  # the label's slices at half the T2w's spacing, two slices past its last
            spacing = image.GetSpacing()
            array = np.zeros((2 * image.GetSize()[2] + 2, *image.GetSize()[1::-1]), np.uint8)
            array[2 * 2, 40:56, 40:56] = 2  # on a T2w slice
            lesion = -1 if problem == "lesion_beyond_slices" else 2 * 2 + 1  # between two
            array[lesion, 40:56, 40:56] = 5
            replaced = sitk.GetImageFromArray(array)
            replaced.SetSpacing((*spacing[:2], spacing[2] / 2))
            replaced.SetOrigin(image.GetOrigin())
            replaced.SetDirection(image.GetDirection())
            image = replaced
        write_image(image, label)
        bad = str(label)
    with pytest.raises(CaseError) as info:
        preprocess_case(
            components, label, case_id="case-7", mask=folder / "mask.nii.gz", bladder_mask=bladder
        )
    assert info.value.case == "case-7" and info.value.file == bad
    assert reason in info.value.reason and "case-7" in str(info.value) and bad in str(info.value)


def _reordered(image: sitk.Image, order: str) -> sitk.Image:
    """The same voxels stored y-flipped (as dcm2niix writes an axial series), x- and y-flipped,
    or transposed."""
    if order == "flip_y":
        return sitk.Flip(image, [False, True, False])
    if order == "flip_xy":  # as RAS tools store it
        return sitk.Flip(image, [True, True, False])
    return sitk.PermuteAxes(image, [1, 0, 2])


@pytest.mark.real_data
@pytest.mark.parametrize("order", ["flip_y", "flip_xy", "transpose"])
def test_real_exam_stored_flipped_or_transposed_gives_the_same_crop(
    real_exam, prostatex_case_dir, tmp_path, order
):
    # dcm2niix stores an axial series with rows from posterior to anterior: SimpleITK reads the
    # NIfTI with direction (1, -1, 1) on the diagonal. Same exam, so the same (not upside-down)
    # crop, lesion and world mapping as from the DICOM series, and the same bladder reference
    # (it was 506 instead of 563 for the transposed T2w).
    _, case = real_exam
    dicom_t2w = _series(prostatex_case_dir / "t2w")
    t2w = _reordered(dicom_t2w, order)
    assert t2w.GetDirection() != dicom_t2w.GetDirection()
    write_image(t2w, tmp_path / "t2w.nii.gz")
    write_image(_reordered(_finding_label(dicom_t2w), order), tmp_path / "label.nii.gz")
    components = {"t2w": tmp_path / "t2w.nii.gz", "adc": prostatex_case_dir / "adc"}
    other = preprocess_case(
        components, tmp_path / "label.nii.gz", config={"interpolator": "linear"}, case_id="flip"
    )
    assert other.t2w_reference["bladder"] == case.t2w_reference["bladder"]
    np.testing.assert_allclose(other.images, case.images[..., :2], atol=2e-3)
    np.testing.assert_array_equal(other.classes, case.classes)
    np.testing.assert_allclose(
        other.world_to_pixel(*FINDING), case.world_to_pixel(*FINDING), atol=1e-4
    )


def test_crop_centre_outside_the_t2w_is_refused_naming_mask_or_t2w(small_case, tmp_path):
    # A mask on another patient's grid, or a centre 60 mm above the slab, used to surface as
    # "t2w covers 0.0 % of the crop" or a lost lesion (naming the wrong file), or not at all.
    folder, sc = small_case
    components = {"t2w": str(folder / "t2w.mha"), "adc": str(folder / "adc.mha")}
    mask = sitk.ReadImage(str(folder / "mask.nii.gz"))
    mask.SetOrigin(tuple(o + 300.0 for o in mask.GetOrigin()))
    write_image(mask, tmp_path / "far.nii.gz")
    with pytest.raises(CaseError, match="prostate mask centroid .* outside the T2w") as info:
        preprocess_case(components, case_id="c1", mask=tmp_path / "far.nii.gz")
    assert info.value.file == str(tmp_path / "far.nii.gz")
    top = sc.images["t2w"].TransformContinuousIndexToPhysicalPoint((47.5, 47.5, 5.5))
    above = (top[0], top[1], top[2] + 60.0)
    with pytest.raises(CaseError, match="given crop centre .* outside the T2w") as info:
        preprocess_case(components, case_id="c1", center=above)
    assert info.value.file == components["t2w"]
    inside = (top[0], top[1], top[2] - 1.0)  # within the last slice's thickness
    assert preprocess_case(components, case_id="c1", center=inside).center == inside


@pytest.mark.parametrize("what", ["label", "prostate mask"])
def test_label_or_mask_saved_without_geometry_is_refused(small_case, tmp_path, what):
    # GetImageFromArray without CopyInformation (or a NIfTI written with an identity affine): the
    # T2w's voxel counts at origin 0 with 1 mm voxels. Resampled through that geometry, a lesion
    # was lost ("outside the 80 mm crop") or moved silently.
    folder, sc = small_case
    components = {"t2w": str(folder / "t2w.mha"), "adc": str(folder / "adc.mha")}
    source = _label_with(sc, [(3, OFFSETS[4])], tmp_path) if what == "label" else None
    source = source or folder / "mask.nii.gz"
    bare = sitk.GetImageFromArray(sitk.GetArrayFromImage(sitk.ReadImage(str(source))))
    write_image(bare, tmp_path / "bare.nii.gz")
    files = {"label": None, "mask": folder / "mask.nii.gz"}
    files["label" if what == "label" else "mask"] = tmp_path / "bare.nii.gz"
    refused = f"{what} has the T2w's 96 x 96 x 6 voxels but the default origin .0, 0, 0. and "
    refused += r"spacing \(1 mm voxels\) where the T2w's differs"  # its direction is the identity
    with pytest.raises(CaseError, match=refused):
        preprocess_case(components, files["label"], mask=files["mask"], case_id="c2")
    # With its header the same array is fine.
    bare.CopyInformation(sc.images["t2w"])
    write_image(bare, tmp_path / "bare.nii.gz")
    preprocess_case(components, files["label"], mask=files["mask"], case_id="c2")


@pytest.mark.real_data
@pytest.mark.parametrize(
    "copied, lost",
    [
        (("Origin", "Spacing"), "direction (identity)"),
        (("Spacing", "Direction"), "origin (0, 0, 0)"),
    ],
)
def test_a_label_with_part_of_the_t2w_header_is_refused(
    real_exam, prostatex_case_dir, tmp_path, copied, lost
):
    """The T2w is oblique (18 degrees): a label given only part of its header was resampled
    through the rest, its lesion moved by centimetres to other slices without a word, or lost
    with a message blaming the crop."""
    t2w, _ = real_exam
    whole = _finding_label(t2w)
    part = sitk.GetImageFromArray(sitk.GetArrayFromImage(whole))
    for field in copied:
        getattr(part, f"Set{field}")(getattr(t2w, f"Get{field}")())
    path = tmp_path / "label.nii.gz"
    write_image(part, path)
    components = {name: prostatex_case_dir / name for name in ("t2w", "adc")}
    with pytest.raises(CaseError) as refused:
        preprocess_case(components, path, case_id="ProstateX-0000")
    assert refused.value.file == str(path)
    assert str(refused.value).endswith(
        f"label has the T2w's 384 x 384 x 19 voxels but the default {lost} where the T2w's "
        "differs: saved without (all of) the image header? Copy the T2w's origin, spacing and "
        "direction into it (SimpleITK CopyInformation)"
    )


def test_a_label_on_the_t2w_grid_up_to_float_noise_is_kept(small_case, tmp_path):
    """A T2w whose direction is the identity but for 1e-6 (float noise in a converted header) and
    a label with the exact identity: one grid (within `io`'s 1e-4), not a lost direction."""
    folder, sc = small_case
    t2w = sitk.ReadImage(str(folder / "t2w.mha"))
    t2w.SetDirection((1.0, -1e-6, 0.0, 1e-6, 1.0, 0.0, 0.0, 0.0, 1.0))
    write_image(t2w, tmp_path / "t2w.mha")
    label = sitk.ReadImage(str(_label_with(sc, [(3, OFFSETS[4])], tmp_path)))
    assert label.GetDirection() == tuple(np.eye(3).ravel())
    components = {"t2w": tmp_path / "t2w.mha", "adc": folder / "adc.mha"}
    case = preprocess_case(components, tmp_path / "label.nii.gz", case_id="c3")
    assert list(case.lesion_classes) == [3]


def _without_orientation(image: sitk.Image, path):
    """`image` written as a NIfTI whose header places it nowhere (qform_code and sform_code 0,
    as an array saved without an affine); ITK reads it at origin 0, identity direction."""
    write_image(image, path)
    data = bytearray(path.read_bytes())
    assert struct.unpack("<i", data[:4])[0] == 348 and struct.unpack("<2h", data[252:256]) != (0, 0)
    data[252:256] = struct.pack("<2h", 0, 0)
    path.write_bytes(data)
    return path


def test_components_without_orientation_on_other_grids_are_refused(small_case, tmp_path):
    # T2w (1 mm voxels) and ADC (2 mm) saved without orientation were both read with their first
    # voxel at origin 0 and resampled onto each other there, off by the difference of their real
    # origins (here about 1 mm; 38 mm for an ADC of 256 mm beside a T2w of 180 mm), without a word.
    folder, sc = small_case
    t2w, adc = sc.images["t2w"], sc.images["adc"]
    components = {
        "t2w": _without_orientation(t2w, tmp_path / "t2w.nii"),
        "adc": _without_orientation(adc, tmp_path / "adc.nii"),
    }
    assert sitk.ReadImage(str(components["adc"])).GetOrigin() == (0.0, 0.0, 0.0)
    with pytest.raises(CaseError) as info:
        preprocess_case(components, mask=folder / "mask.nii.gz", case_id="c4")
    assert info.value.file == str(components["t2w"])
    assert info.value.reason.startswith(
        "t2w is a NIfTI without orientation (qform_code and sform_code 0): read at origin 0, not "
        "where the scanner put it, and adc lies on another grid"
    )
    # Given with its header, the ADC is still refused beside the T2w read at origin 0.
    components["adc"] = folder / "adc.mha"
    with pytest.raises(CaseError, match="t2w is a NIfTI without orientation"):
        preprocess_case(components, case_id="c4")
    # On one grid (the ADC resampled onto the T2w's) the voxels correspond: kept.
    on_t2w = sitk.Resample(adc, t2w, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    components["adc"] = _without_orientation(on_t2w, tmp_path / "adc_on_t2w.nii")
    assert preprocess_case(components, case_id="c4").images.shape[-1] == 2


@pytest.mark.parametrize("what", ["label", "prostate mask", "bladder mask"])
def test_label_or_mask_without_orientation_off_the_t2w_grid_is_refused(small_case, tmp_path, what):
    # A label or mask with the T2w's voxels and spacing, saved without orientation, was read at
    # origin 0 and resampled onto the crop from there: refused for another reason (a lesion
    # "lost by resampling", a mask centroid "outside the T2w"), or, near origin 0, taken moved.
    folder, sc = small_case
    components = {"t2w": folder / "t2w.mha", "adc": folder / "adc.mha"}
    source = _label_with(sc, [(3, OFFSETS[4])], tmp_path) if what == "label" else None
    image = sitk.ReadImage(str(source or folder / "mask.nii.gz"))
    unplaced = _without_orientation(image, tmp_path / "unplaced.nii")
    files = {"label": None, "prostate mask": folder / "mask.nii.gz", "bladder mask": None}
    files[what] = unplaced
    run = dict(mask=files["prostate mask"], bladder_mask=files["bladder mask"], case_id="c7")
    with pytest.raises(CaseError) as info:
        preprocess_case(components, files["label"], **run)
    assert info.value.file == str(unplaced)
    assert info.value.reason.startswith(
        f"{what} is a NIfTI without orientation (qform_code and sform_code 0): read at origin 0, "
        "not where the scanner put it, and the T2w lies on another grid"
    )
    # Beside a T2w (and an ADC on its grid) saved without orientation too, voxels correspond.
    on_t2w = sitk.Resample(sc.images["adc"], sc.images["t2w"], sitk.Transform(), sitk.sitkLinear)
    components = {
        "t2w": _without_orientation(sc.images["t2w"], tmp_path / "t2w.nii"),
        "adc": _without_orientation(on_t2w, tmp_path / "adc.nii"),
    }
    if what == "prostate mask":
        run["mask"] = unplaced
    else:
        run["mask"] = _without_orientation(sc.mask, tmp_path / "mask.nii")
    assert preprocess_case(components, files["label"], **run).images.shape[-1] == 2


def _without_position(image: sitk.Image, path):
    """`image` written as an NRRD or MetaImage whose header gives no position (`space` fields
    dropped, `spacings` kept; no `Offset`), as pynrrd's `nrrd.write(path, array)` or a
    hand-written header: ITK reads it at origin 0."""
    write_image(image, path)
    head, data = path.read_bytes().split(b"\n\n", 1) if path.suffix == ".nrrd" else (None, None)
    if head is not None:
        lines = [line for line in head.decode().splitlines() if not line.startswith("space")]
        lines.append("spacings: " + " ".join(f"{s:g}" for s in image.GetSpacing()))
        path.write_bytes("\n".join(lines).encode() + b"\n\n" + data)
    else:
        text = path.read_bytes()
        start = text.index(b"Offset = ")
        path.write_bytes(text[:start] + text[text.index(b"\n", start) + 1 :])
    assert sitk.ReadImage(str(path)).GetOrigin() == (0.0, 0.0, 0.0)
    return path


@pytest.mark.parametrize("suffix, how", [
    (".nrrd", "an NRRD without position (no finite `space origin`, or `axis mins` and "
              "`spacings`)"),
    (".mha", "a MetaImage without position (no Offset, Origin or Position field)"),
])  # fmt: skip
def test_nrrd_or_metaimage_without_position_is_refused(small_case, tmp_path, suffix, how):
    """A bare NRRD (pynrrd's default) or a MetaImage without Offset was read at origin 0 and
    resampled from there: an ADC beside the T2w, or a label with the T2w's voxels, lay 20 mm and
    more from where it was, without a word (only NIfTI files were checked)."""
    folder, sc = small_case
    t2w = folder / "t2w.mha"
    adc = _without_position(sc.images["adc"], tmp_path / f"adc{suffix}")
    with pytest.raises(CaseError) as info:
        preprocess_case({"t2w": t2w, "adc": adc}, mask=folder / "mask.nii.gz", case_id="c8")
    assert info.value.file == str(adc)
    assert info.value.reason.startswith(f"adc is {how}: read at origin 0")
    label = _without_position(
        sitk.ReadImage(str(_label_with(sc, [(3, OFFSETS[4])], tmp_path))),
        tmp_path / f"label{suffix}",
    )
    components = {"t2w": t2w, "adc": folder / "adc.mha"}
    with pytest.raises(CaseError) as info:
        preprocess_case(components, label, mask=folder / "mask.nii.gz", case_id="c8")
    assert info.value.file == str(label)
    assert info.value.reason.startswith(f"label is {how}: read at origin 0")


def test_nrrd_placed_as_itk_reads_it_is_not_unplaced(tmp_path):
    """teem (ITK's NRRD reader) matches field names in any case and without spaces, and takes
    the origin from `axis mins` too: such files were refused as unplaced."""
    from focalnet_jax.data import nrrd_header

    head = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
    placed = {
        "Space Origin: (10,20,30)": (10.0, 20.0, 30.0),
        "spaceorigin: (10,20,30)": (10.0, 20.0, 30.0),
        "space origin: (10,20,30)": (10.0, 20.0, 30.0),
        "spacings: 1 1 2\naxis mins: 10 20 30": (10.5, 20.5, 31.0),
        "spacings: 1 1 2": None,
        # Fields ITK takes no origin from: it read these at origin 0.
        "space origin: (nan,nan,nan)": None,
        "space origin: none": None,
        "spacings: 1 1 2\naxis mins: nan nan nan": None,
        "spacings: 1 nan 2\naxis mins: 10 20 30": None,
        "axis mins: 10 20 30": None,
    }
    for field, origin in placed.items():
        path = tmp_path / "a.nrrd"
        if "axis" in field or "spacings" in field:
            path.write_bytes((head + field + "\n\n").encode() + bytes(8))
        else:
            space = "space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,2)\n"
            path.write_bytes((head + space + field + "\n\n").encode() + bytes(8))
        read = sitk.ReadImage(str(path)).GetOrigin()
        assert read == pytest.approx(origin or (0.0, 0.0, 0.0)), field
        assert nrrd_header.unplaced(path) == (origin is None), field
    # No voxel size: ITK reads 1 mm voxels (beside `axis maxs` too, though it takes an origin).
    space = "space: left-posterior-superior\nspace origin: (10,20,30)\n"
    for field, missing in [
        ("axis mins: 10 20 30\naxis maxs: 12 22 34\n", "`spacings`; `axis mins` and `axis maxs` "
                                                       "give only an extent"),
        ("axis mins: 10 20 30\n", "`spacings`"),
        ("", "`spacings`"),  # pynrrd's `nrrd.write(path, array)`
        (space, "`space directions`"),
    ]:  # fmt: skip
        path.write_bytes((head + field + "\n").encode() + bytes(8))
        assert sitk.ReadImage(str(path)).GetSpacing() == (1.0, 1.0, 1.0)
        with pytest.raises(CaseError, match=rf"NRRD header gives no voxel size \(no {missing}\): "
                                            r"ITK reads its voxels as 1 mm whatever"):  # fmt: skip
            read_image(path, case="c")
    # A NaN in one axis min: ITK places that axis at NaN; refused when read.
    path.write_bytes((head + "spacings: 1 1 2\naxis mins: 10 nan 30\n\n").encode() + bytes(8))
    assert nrrd_header.unplaced(path)
    with pytest.raises(CaseError, match=r"placement holds NaN or Inf \(origin \(10\.5, nan, "
                                        r"31\), spacing \(1, 1, 2\)\)$"):  # fmt: skip
        read_image(path, case="c")


def test_blank_hbv_is_refused(small_case, tmp_path):
    # A constant HBV (a blank export) was stored as 0 everywhere, the value of normal tissue,
    # while a constant T2w or an all-zero ADC map is refused.
    folder, sc = small_case
    write_image(sc.images["hbv"] * 0 + 7.0, tmp_path / "hbv.mha")
    components = {"t2w": folder / "t2w.mha", "adc": folder / "adc.mha", "hbv": tmp_path / "hbv.mha"}
    with pytest.raises(CaseError, match=r"hbv is constant between its percentiles 1 and 99 \(7\)"):
        preprocess_case(components, case_id="c3")
    write_image(sc.images["hbv"], tmp_path / "hbv.mha")
    assert preprocess_case(components, case_id="c3").images.shape[-1] == 3


@pytest.mark.parametrize("suffix", [".mha", ".nii.gz"])
@pytest.mark.parametrize(
    "what, keyword",
    [("label", "label"), ("prostate mask", "mask"), ("bladder mask", "bladder_mask")],
)
def test_a_single_slice_label_or_mask_is_refused(small_case, tmp_path, what, keyword, suffix):
    # One slice of a label exported alone was resampled without a word: a lesion on T2w slices
    # 2..4 (242 crop pixels) was stored on slice 3 only (129 pixels), the other two slices as
    # background. A one-slice gland mask moved the crop centre to its slice (z 1.7 -> 3.0 mm); a
    # one-slice bladder mask was refused as "not on the T2w grid", which did not say why.
    folder, sc = small_case
    components = {"t2w": folder / "t2w.mha", "adc": folder / "adc.mha"}
    args = {"label": _label_with(sc, [(3, (0, -4, 0))], tmp_path), "mask": folder / "mask.nii.gz"}
    whole = preprocess_case(components, **args, case_id="c4")
    assert np.flatnonzero(whole.annotated).tolist() == [2, 3, 4]
    source = args["label"] if what == "label" else args["mask"]
    one = tmp_path / f"one{suffix}"
    write_image(sitk.ReadImage(str(source))[:, :, 3:4], one)  # T2w slice 3, its geometry kept
    assert sitk.ReadImage(str(one)).GetSize() == (96, 96, 1)
    with pytest.raises(CaseError) as info:
        preprocess_case(components, **{**args, keyword: one}, case_id="c4")
    assert str(info.value) == (
        f"case 'c4', file '{one}': {what} has a single slice (96 x 96 x 1 voxels) where the T2w "
        "has 6: a broken or partial export (the other T2w slices would read as empty); save the "
        f"{what} over the whole T2w volume"
    )


def test_an_image_given_as_a_mask_is_refused_and_label_maps_are_kept(small_case, tmp_path):
    # Any image was taken as the prostate mask (its voxels > 0 averaged): the T2w given as the
    # mask centred the crop on the centroid of the whole slab without a word.
    folder, sc = small_case
    components = {"t2w": folder / "t2w.mha", "adc": folder / "adc.mha"}
    gland = sitk.GetArrayFromImage(sc.mask)
    assert sorted(np.unique(gland)) == [0, 1]
    zonal = gland.astype(np.uint8) * 2  # 0 outside, 2 transition zone, 1 peripheral (z above 3)
    zonal[3:][gland[3:] > 0] = 1
    image = sitk.GetImageFromArray(zonal)
    image.CopyInformation(sc.mask)
    write_image(image, tmp_path / "zonal.nii.gz")
    centre = preprocess_case(components, mask=folder / "mask.nii.gz", case_id="c5").center
    zonal_centre = preprocess_case(components, mask=tmp_path / "zonal.nii.gz", case_id="c5").center
    np.testing.assert_allclose(zonal_centre, centre)  # every label counts as gland
    t2w = sitk.GetArrayFromImage(sc.images["t2w"])
    values = np.unique(t2w)
    assert len(values) > 1000 and values[0] >= 0 and values[-1] > 255
    probability = sitk.Cast(sc.mask, sitk.sitkFloat32) * 0.5  # 0 / 0.5
    write_image(probability, tmp_path / "half.nii.gz")
    negative = sitk.Cast(sc.mask, sitk.sitkInt16) - 1  # -1 / 0
    write_image(negative, tmp_path / "negative.nii.gz")
    shutil.copy(folder / "t2w.mha", tmp_path / "t2w_copy.mha")  # the file itself: "same file"
    for keyword, what, path, found in [
        ("mask", "prostate mask", tmp_path / "t2w_copy.mha",
         f"{len(values)} distinct values (min {float(values[0])}, max {float(values[-1])})"),
        ("bladder_mask", "bladder mask", folder / "t2w.mha",
         f"{len(values)} distinct values (min {float(values[0])}, max {float(values[-1])})"),
        ("mask", "prostate mask", tmp_path / "half.nii.gz",
         "2 distinct values (min 0.0, max 0.5), not all integers"),
        ("mask", "prostate mask", tmp_path / "negative.nii.gz",
         "2 distinct values (min -1.0, max 0.0)"),
    ]:  # fmt: skip
        with pytest.raises(CaseError) as info:
            preprocess_case(components, **{keyword: path}, case_id="c5")
        assert str(info.value) == (
            f"case 'c5', file '{path}': {what} holds {found}: an image, not a label map (at most 8 "
            "integer labels in 0..255, 0 the background)"
        )
    with pytest.raises(CaseError, match="t2w and prostate mask are the same file"):
        preprocess_case(components, mask=folder / "t2w.mha", case_id="c5")


def test_an_empty_bladder_mask_or_one_on_air_is_refused(small_case, tmp_path):
    # An all-zero bladder mask was ignored without a word: the bladder was searched for instead
    # (the T2w reference's source 'bladder' or 'fallback', not 'mask').
    folder, sc = small_case
    components = {"t2w": folder / "t2w.mha", "adc": folder / "adc.mha"}
    write_image(sitk.Cast(sc.mask, sitk.sitkUInt8) * 0, tmp_path / "empty.nii.gz")
    with pytest.raises(CaseError) as info:
        preprocess_case(components, bladder_mask=tmp_path / "empty.nii.gz", case_id="c6")
    assert (
        str(info.value) == f"case 'c6', file '{tmp_path / 'empty.nii.gz'}': bladder mask is empty"
    )
    bladder = np.zeros(sitk.GetArrayViewFromImage(sc.mask).shape, np.uint8)
    bladder[:, 5:25, 30:60] = 1
    image = sitk.GetImageFromArray(bladder)
    image.CopyInformation(sc.mask)
    write_image(image, tmp_path / "bladder.nii.gz")
    case = preprocess_case(components, bladder_mask=tmp_path / "bladder.nii.gz", case_id="c6")
    t2w = sitk.GetArrayFromImage(sc.images["t2w"])
    assert case.t2w_reference["source"] == "mask"
    assert case.t2w_reference["bladder"] == float(np.median(t2w[bladder > 0]))
    # A mask on air (not above the 1st percentile) normalised the T2w inverted, without a word.
    air = float(np.percentile(t2w, 1.0))
    image = sitk.GetImageFromArray((t2w <= air).astype(np.uint8))
    image.CopyInformation(sc.mask)
    write_image(image, tmp_path / "on_air.nii.gz")
    with pytest.raises(CaseError) as info:
        preprocess_case(components, bladder_mask=tmp_path / "on_air.nii.gz", case_id="c6")
    median = float(np.median(t2w[t2w <= air]))
    assert str(info.value) == (
        f"case 'c6', file '{tmp_path / 'on_air.nii.gz'}': bladder mask: its median T2w "
        f"{median:g} is not above air {air:g} (percentile 1 of the T2w); does the mask cover the "
        "bladder?"
    )


def test_a_bladder_mask_stored_in_another_orientation_marks_the_same_voxels(small_case, tmp_path):
    # The bladder mask was taken voxel for voxel on the T2w grid whatever its geometry (only its
    # shape was checked): the same region stored flipped in x and y (as RAS tools store it)
    # marked the mirrored voxels, and the T2w upper reference fell from 542 to 234.
    folder, sc = small_case
    components = {"t2w": folder / "t2w.mha", "adc": folder / "adc.mha"}
    bladder = np.zeros(sitk.GetArrayViewFromImage(sc.mask).shape, np.uint8)
    bladder[:, 5:25, 30:60] = 1
    image = sitk.GetImageFromArray(bladder)
    image.CopyInformation(sc.mask)
    write_image(image, tmp_path / "bladder.nii.gz")
    write_image(sitk.Flip(image, [True, True, False]), tmp_path / "flipped.nii.gz")
    t2w = sitk.GetArrayFromImage(sc.images["t2w"])
    for name in ("bladder.nii.gz", "flipped.nii.gz"):
        case = preprocess_case(components, bladder_mask=tmp_path / name, case_id="c7")
        assert case.t2w_reference["bladder"] == float(np.median(t2w[bladder > 0]))
    # Without its header (origin 0, 1 mm voxels) it would be taken through that geometry.
    write_image(sitk.GetImageFromArray(bladder), tmp_path / "bare.nii.gz")
    with pytest.raises(
        CaseError, match="bladder mask has the T2w's 96 x 96 x 6 voxels but the default origin"
    ):
        preprocess_case(components, bladder_mask=tmp_path / "bare.nii.gz", case_id="c7")


def test_a_lesion_wholly_outside_the_gland_mask_is_named_in_a_warning(small_case, tmp_path, caplog):
    # A lesion sharing no voxel with the gland mask (a label or mask of another exam, or one
    # stored mirrored) was stored without a word; it is still stored, and now named.
    folder, sc = small_case
    components = {"t2w": folder / "t2w.mha", "adc": folder / "adc.mha"}
    mask = folder / "mask.nii.gz"
    inside = _label_with(sc, [(3, (0, -4, 0))], tmp_path, "inside.nii.gz")
    assert preprocess_case(components, inside, mask=mask, case_id="c8").lesion_classes.tolist() == [
        3
    ]
    assert "outside the prostate mask" not in caplog.text
    both = _label_with(sc, [(3, (0, -4, 0)), (4, (-30, -30, 0))], tmp_path, "both.nii.gz")
    case = preprocess_case(components, both, mask=mask, case_id="c8")
    outside = int(case.lesions[case.classes == 4][0])
    assert sorted(case.lesion_classes.tolist()) == [3, 4]
    assert (
        f"case c8: 1 of 2 lesions of label {both} (instances [{outside}]) lie wholly outside the "
        f"prostate mask {mask}: a label or mask of another exam, or one stored mirrored?"
    ) in caplog.text


def test_one_file_given_as_two_components_is_refused(small_case, tmp_path):
    # A manifest column pasted twice: the T2w given as the ADC map too passed the ADC unit check
    # (its values reach a few hundred) and was stored as a second channel without a word.
    folder, _ = small_case
    (tmp_path / "link.mha").symlink_to(folder / "t2w.mha")
    for adc in (folder / "t2w.mha", tmp_path / "link.mha"):
        with pytest.raises(CaseError) as info:
            preprocess_case({"t2w": folder / "t2w.mha", "adc": adc}, case_id="c9")
        assert str(info.value) == (f"case 'c9', file '{adc}': t2w and adc are the same file")
    components = {"t2w": folder / "t2w.mha", "adc": folder / "adc.mha", "hbv": folder / "adc.mha"}
    with pytest.raises(CaseError, match="adc and hbv are the same file"):
        preprocess_case(components, case_id="c9")


def test_components_not_led_by_t2w_are_refused(small_case):
    # The first component is the reference grid and is normalised as T2w: given ADC first, the
    # ADC map was cropped on its own grid and scaled by "air" and "bladder", the T2w by its
    # percentiles, without a word.
    folder, _ = small_case
    with pytest.raises(CaseError) as info:
        preprocess_case({"adc": folder / "adc.mha", "t2w": folder / "t2w.mha"}, case_id="c9")
    assert str(info.value) == (
        f"case 'c9', file '{folder / 'adc.mha'}': components 'adc,t2w': expected t2w first (the "
        "reference grid), "
        "e.g. {'t2w': ..., 'adc': ...}"
    )


def test_a_label_given_as_the_gland_mask_too_is_refused(small_case, tmp_path):
    # `--masks` pointed at the labels folder (or a manifest's label path pasted as its
    # prostate_mask): the crop was centred on the lesions' centroid, not the gland's, without a
    # word (a lesion-free case's empty label was refused as an empty mask).
    folder, sc = small_case
    components = {"t2w": folder / "t2w.mha", "adc": folder / "adc.mha"}
    label = _label_with(sc, [(3, (-16, 8, 0))], tmp_path)
    with pytest.raises(CaseError) as info:
        preprocess_case(components, label, mask=label, case_id="c10")
    assert (
        str(info.value) == f"case 'c10', file '{label}': label and prostate mask are the same file"
    )
    gland = preprocess_case(components, label, mask=folder / "mask.nii.gz", case_id="c10")
    assert gland.center_source == "mask"
    # The label file given as a component too (pasted into its manifest column): stored as a
    # model input where it passed the intensity checks.
    with pytest.raises(CaseError) as info:
        preprocess_case({**components, "hbv": label}, label, case_id="c10")
    assert str(info.value) == f"case 'c10', file '{label}': hbv and label are the same file"
