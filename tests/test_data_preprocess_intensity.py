"""preprocess_case's intensities: the T2w scaled from air to the bladder (found, or the 99.5th
percentile), whatever the exam's storage or pixel shape; the ADC over its range; percentiles
without zero fill."""

from __future__ import annotations

import numpy as np
import preprocess_cases
import pytest
import SimpleITK as sitk
from preprocess_cases import read_series
from scipy import ndimage

from focalnet_jax.data import intensity, preprocess_case
from focalnet_jax.data.image_writing import write_image
from focalnet_jax.data.synth import synth_case

small_case = preprocess_cases.small_case  # a module-scoped fixture


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
    t2w = read_series(prostatex_case_dir / "t2w")
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
