"""`focalnet predict`'s outputs in world space, on a small synthetic exam with an oblique, flipped
T2w grid: hand-made scores (a Gaussian around a known LPS point) go through the real preprocessing
and output writer, and each file is read back as a viewer would."""

from __future__ import annotations

import contextlib
import csv
import io

import numpy as np
import pytest
import SimpleITK as sitk

from focalnet_jax.data import preprocess_case
from focalnet_jax.data.image_writing import write_image
from focalnet_jax.data.io import read_image
from focalnet_jax.evaluation import figures
from focalnet_jax.evaluation.predict import write_exam_outputs

PEAK = np.array([3.0, -4.0, 2.0])  # LPS mm, the centre of the highest Gaussian (0.9)
SECOND = PEAK + np.array([-14.0, 9.0, -6.0])  # a lower one (0.6), 5 T2w slices up
SIGMA_MM = 4.0


def _rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _t2w_grid() -> sitk.Image:
    """96 x 100 mm, 14 slices of 3 mm, rotated 20 degrees about z and 15 about x, stored with
    its rows flipped (direction column 2 negated, a left-handed grid); PEAK on slice 6, between
    voxel centres."""
    direction = _rotation(2, 20.0) @ _rotation(0, 15.0) @ np.diag([1.0, -1.0, 1.0])
    image = sitk.Image(200, 180, 14, sitk.sitkFloat32)
    image.SetSpacing((0.48, 0.55, 3.0))
    image.SetDirection(tuple(direction.ravel()))
    at_peak = np.asarray(image.TransformContinuousIndexToPhysicalPoint((99.3, 89.8, 6.0)))
    image.SetOrigin(tuple(PEAK - at_peak))
    return image


def _gaussian(world) -> np.ndarray:
    """The lesion score at LPS points `[..., 3]` (mm): two Gaussians, 0.9 at PEAK, 0.6 at SECOND."""
    world = np.asarray(world)
    return sum(
        height * np.exp(-np.sum((world - centre) ** 2, -1) / (2 * SIGMA_MM**2))
        for height, centre in ((0.9, PEAK), (0.6, SECOND))
    )


def _exam_outputs(root, t2w: sitk.Image):
    """(preprocessed case, scores) of an exam on the grid `t2w` whose ADC slab misses the T2w's
    first 2 and last 2 slices, so T2w slices 2..11 are predicted; outputs in `root/out`."""
    rng = np.random.default_rng(0)
    t2w_values = rng.uniform(100.0, 500.0, t2w.GetSize()[::-1]).astype(np.float32)
    image = sitk.GetImageFromArray(t2w_values)
    image.CopyInformation(t2w)
    write_image(image, root / "t2w.mha")
    # An ADC slab of T2w slices 2..10 shifted 1.5 mm along the slice normal: within the
    # one-voxel coverage margin of T2w slices 2..11, clear of slices 1 and 12.
    adc = image[:, :, 2:11] * 3.0 + 300.0  # ADC-like units
    normal = np.reshape(t2w.GetDirection(), (3, 3))[:, 2]
    adc.SetOrigin(tuple(np.asarray(adc.GetOrigin()) + 1.5 * normal))
    write_image(adc, root / "adc.mha")
    case = preprocess_case(
        {"t2w": root / "t2w.mha", "adc": root / "adc.mha"},
        center=tuple(PEAK),
        slices="covered",
        config={"interpolator": "linear"},
    )
    s, r, c = np.meshgrid(*(np.arange(n) for n in case.images.shape[:3]), indexing="ij")
    blob = _gaussian(np.stack(case.pixel_to_world(s, r, c), -1)).astype(np.float32)
    scores = blob[..., None] * np.array([1.0, 0.8, 0.5, 0.2, 0.1], np.float32)
    write_exam_outputs(case, scores, root / "out", threshold=0.3)
    return case, scores


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """(T2w grid, preprocessed case, output folder, scores) of `_exam_outputs`."""
    root = tmp_path_factory.mktemp("exam")
    t2w = _t2w_grid()
    case, scores = _exam_outputs(root, t2w)
    return t2w, case, root / "out", scores


def test_a_t2w_direction_that_is_a_rotation_to_rounding_places_the_maps_as_read(tmp_path):
    """A T2w file whose direction is a rotation only to rounding (its axes 0.4 degrees off right
    angles, within the reader's 1e-2) was placed by that matrix, while the maps, written as
    NIfTI, got one that ITK's writer made orthogonal: up to 1.2 mm apart on a 384-pixel ProstateX
    T2w, detections.csv's voxels those of the T2w file, not of the maps. The grid is read as its
    nearest rotation (here the rotation sheared: a symmetric shear keeps it), which the maps
    carry."""
    t2w = _t2w_grid()
    rotation = np.reshape(t2w.GetDirection(), (3, 3))
    shear = np.eye(3)
    shear[0, 1] = shear[1, 0] = np.sin(np.radians(0.2))
    t2w.SetDirection(tuple((rotation @ shear).ravel()))
    _exam_outputs(tmp_path, t2w)
    written = sitk.ReadImage(str(tmp_path / "t2w.mha"))  # ITK reads the sheared matrix
    assert np.abs(np.subtract(written.GetDirection(), rotation.ravel())).max() > 1e-3
    read = read_image(tmp_path / "t2w.mha")
    np.testing.assert_allclose(read.GetDirection(), rotation.ravel(), atol=1e-12)
    maps = {n: sitk.ReadImage(str(tmp_path / "out" / f"{n}.nii.gz")) for n in ("cspca_score",
            "detection_map")}  # fmt: skip
    for image in maps.values():
        np.testing.assert_allclose(image.GetDirection(), rotation.ravel(), atol=1e-6)
        np.testing.assert_allclose(image.GetOrigin(), read.GetOrigin(), atol=1e-4)
    with (tmp_path / "out" / "detections.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows
    for row in rows:
        world = tuple(float(row[k]) for k in ("x_lps_mm", "y_lps_mm", "z_lps_mm"))
        voxel = tuple(int(row[k]) for k in ("t2w_i", "t2w_j", "t2w_k"))
        assert maps["cspca_score"].TransformPhysicalPointToIndex(world) == voxel


def test_maps_lie_on_the_t2w_grid_and_hold_0_outside_the_predicted_crop(outputs):
    t2w, case, out, _ = outputs
    assert case.slice_index.tolist() == list(range(2, 12))
    size = np.array(t2w.GetSize())
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    index = np.stack([i, j, k], -1).reshape(-1, 3).astype(np.float64)
    direction = np.reshape(t2w.GetDirection(), (3, 3))
    world = np.asarray(t2w.GetOrigin()) + (index * t2w.GetSpacing()) @ direction.T
    _, row, col = case.world_to_pixel(*world.T)
    inside = (np.abs(row - 63.5) <= 64) & (np.abs(col - 63.5) <= 64)  # the crop's pixel faces
    inside &= np.isin(index[:, 2], case.slice_index)
    for name in ("lesion_score", "cspca_score", "detection_map"):
        image = sitk.ReadImage(str(out / f"{name}.nii.gz"))
        assert image.GetSize() == t2w.GetSize()
        np.testing.assert_allclose(image.GetSpacing(), t2w.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(image.GetOrigin(), t2w.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), t2w.GetDirection(), atol=1e-6)
        values = sitk.GetArrayFromImage(image).reshape(-1)
        # Exactly 0 outside the crop and on the slices not predicted (T2w slices 1 and 12 next to
        # predicted ones used to hold up to 1e-17, leaked by the linear interpolation).
        assert not values[~inside].any(), name
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "lesion_score.nii.gz")))
    # Linear interpolation between 0.625 mm crop pixels: within 6e-3 (5.2e-3 measured).
    expected = _gaussian(world[inside])
    assert np.abs(lesion.reshape(-1)[inside] - expected).max() < 6e-3
    peak = t2w.TransformPhysicalPointToIndex(tuple(PEAK))
    assert np.unravel_index(np.argmax(lesion), lesion.shape) == peak[::-1]


def test_detections_csv_gives_lps_points_that_land_on_their_voxel(outputs):
    t2w, case, out, _ = outputs
    with (out / "detections.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    # The header names the frame: NIfTI readers (nibabel) use RAS, ITK and DICOM LPS.
    assert reader.fieldnames[1:4] == ["x_lps_mm", "y_lps_mm", "z_lps_mm"]
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "lesion_score.nii.gz")))
    cspca = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "cspca_score.nii.gz")))
    assert rows
    for row in rows:
        world = tuple(float(row[k]) for k in ("x_lps_mm", "y_lps_mm", "z_lps_mm"))
        voxel = tuple(int(row[k]) for k in ("t2w_i", "t2w_j", "t2w_k"))
        assert t2w.TransformPhysicalPointToIndex(world) == voxel
        # The CSV gives the crop pixel's scores; the maps hold their linear interpolation at the
        # centre of the voxel holding the point: equal to 6e-3 here (4.4e-3 measured).
        i, j, k = voxel
        assert abs(float(row["lesion_score"]) - lesion[k, j, i]) < 6e-3
        assert abs(float(row["p_gs_ge_3+4"]) - cspca[k, j, i]) < 6e-3
    best = np.array([float(rows[0][k]) for k in ("x_lps_mm", "y_lps_mm", "z_lps_mm")])
    # The best detection is a crop pixel next to PEAK (the crop centre, a corner of 4 pixels):
    # half a pixel diagonal from it, in the CSV to 1e-4 mm per coordinate.
    assert abs(np.linalg.norm(best - PEAK) - 0.625 * np.sqrt(0.5)) < 2e-4
    assert rows[0]["t2w_k"] == str(t2w.TransformPhysicalPointToIndex(tuple(PEAK))[2])


def test_detection_map_is_a_picai_detection_map_of_the_cspca_score(outputs):
    with contextlib.redirect_stdout(io.StringIO()):
        from picai_eval.analysis_utils import parse_detection_map
    t2w, _, out, _ = outputs
    detection = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "detection_map.nii.gz")))
    cspca = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "cspca_score.nii.gz")))
    confidences, blobs = parse_detection_map(detection)  # raises on a softmax-like map
    # One candidate per Gaussian (26-connected, as picai_eval labels them), each holding one
    # value, the peak csPCa score on it; 0 elsewhere.
    assert len(confidences) == 2 and not detection[blobs == 0].any()
    labels = [
        blobs[tuple(t2w.TransformPhysicalPointToIndex(tuple(c))[::-1])] for c in (PEAK, SECOND)
    ]
    assert sorted(labels) == [1, 2]
    for label in labels:
        blob = blobs == label
        assert np.unique(detection[blob]).tolist() == [cspca[blob].max()]
        assert confidences[label - 1] == pytest.approx(float(cspca[blob].max()))
    assert max(confidences.values()) == pytest.approx(float(cspca.max()))


@pytest.mark.parametrize("flip_x, transpose", [(False, False), (True, False), (True, True)])
def test_flip_tta_mirrors_the_crop_left_right_in_patient_space(flip_x, transpose):
    # An axial series tilted 18.5 degrees about LPS x (as ProstateX-0000), stored as DICOM orders
    # it, with x flipped (a left-handed grid) or transposed: mirroring the crop along
    # ensemble.LEFT_RIGHT_AXIS moves each pixel's world point to its mirror image about the
    # sagittal plane through the crop centre (x -> 2 x_centre - x; y, z unchanged).
    from focalnet_jax.data.geometry import CropGeometry
    from focalnet_jax.evaluation.ensemble import LEFT_RIGHT_AXIS

    t2w = sitk.Image(160, 150, 6, sitk.sitkFloat32)
    t2w.SetSpacing((0.6, 0.65, 3.0))
    t2w.SetDirection(tuple(_rotation(0, 18.5).ravel()))
    t2w.SetOrigin((-47.0, -40.0, -9.0))
    stored = sitk.Flip(t2w, [flip_x, False, False])
    if transpose:
        stored = sitk.PermuteAxes(stored, [1, 0, 2])
    centre = t2w.TransformContinuousIndexToPhysicalPoint((81.3, 70.6, 2.0))
    geometry = CropGeometry.centred(stored, centre)
    s, r, c = np.meshgrid(np.arange(6), np.arange(128), np.arange(128), indexing="ij")
    world = np.stack(geometry.pixel_to_world(s, r, c), -1)  # [S, H, W, 3], as images [N, H, W, C]
    flipped = np.flip(world, LEFT_RIGHT_AXIS)
    mirrored = world * np.array([-1.0, 1.0, 1.0]) + np.array([2 * centre[0], 0.0, 0.0])
    np.testing.assert_allclose(flipped, mirrored, atol=1e-9)


def test_overlay_names_its_slices_by_t2w_index_and_position(outputs, tmp_path, monkeypatch):
    # DICOM viewers number images by InstanceNumber, which on ProstateX-0000 runs opposite to the
    # T2w index k (k = 0 is image 19): a bare "T2w slice 8" sent a reader to image 8, k = 11,
    # 9 mm away. Each panel names k (0-based, as t2w_k) and the z of its crop centre.
    t2w, case, _, scores = outputs
    panels = []
    draw = figures.overlay_figure

    def recorded(path, drawn):
        panels.extend(drawn)
        return draw(path, drawn)

    monkeypatch.setattr(figures, "overlay_figure", recorded)
    write_exam_outputs(case, scores, tmp_path, threshold=0.3)
    with (tmp_path / "detections.csv").open() as f:
        rows = list(csv.DictReader(f))
    k = int(rows[0]["t2w_k"])
    i, j, _ = t2w.TransformPhysicalPointToContinuousIndex(tuple(PEAK))  # the crop centre
    z = t2w.TransformContinuousIndexToPhysicalPoint((i, j, float(k)))[2]
    assert panels[0].title == f"{case.case_id}\nT2w k={k} (0-based), centre z={z:.1f} mm"
    s = int(rows[0]["crop_slice"])
    np.testing.assert_array_equal(panels[0].t2w, np.clip(case.images[s, ..., 0], 0, 1))


@pytest.mark.parametrize("size, centre", [(127, 63.0), (200, 63.0 - 5e-5)])
def test_a_detection_on_the_crop_edge_is_listed_at_the_t2w_edge_voxel(tmp_path, size, centre):
    """Coverage admits a crop whose edge pixels lie on the T2w's outer voxel face (half a voxel
    past its outermost centres, and 1e-4 of rounding): ITK's rounding listed a detection there
    at T2w index `size` or -1, voxels no map holds."""
    from types import SimpleNamespace

    from focalnet_jax.data import coverage
    from focalnet_jax.data.geometry import CropGeometry
    from focalnet_jax.evaluation.localization import Detections
    from focalnet_jax.evaluation.predict import write_detections

    t2w = sitk.Image(size, size, 3, sitk.sitkFloat32)
    t2w.SetSpacing((0.625, 0.625, 3.0))
    geometry = CropGeometry.centred(
        t2w, t2w.TransformContinuousIndexToPhysicalPoint((centre, centre, 1.0))
    )
    assert coverage.covered(t2w, geometry.reference_image(3), [0, 1, 2], 0.5).all()
    edge = 0 if size == 200 else 127  # the crop row and column on the T2w's face
    detections = Detections(
        np.array([1], np.int32), np.array([edge], np.int32), np.array([edge], np.int32),
        np.full((1, 5), 0.5, np.float32),
    )  # fmt: skip
    case = SimpleNamespace(pixel_to_world=lambda s, r, c: geometry.pixel_to_world(s, r, c))
    write_detections(tmp_path / "d.csv", case, detections, np.array([True]), t2w)
    with (tmp_path / "d.csv").open() as f:
        (row,) = csv.DictReader(f)
    expected = "0" if size == 200 else str(size - 1)
    assert (row["t2w_i"], row["t2w_j"], row["t2w_k"]) == (expected, expected, "1")
