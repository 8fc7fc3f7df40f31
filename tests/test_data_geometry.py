"""Crop geometry: the resampling grid and the pixel <-> world maps agree, oblique or not."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from focalnet_jax.data.geometry import CropGeometry


def _oblique_t2w():
    t2w = sitk.Image(384, 384, 19, sitk.sitkFloat32)
    t2w.SetSpacing((0.5, 0.5, 3.0))
    t2w.SetOrigin((-57.7, -82.4, -27.1))
    angle = np.deg2rad(18.5)  # tilted about x, as ProstateX-0000
    rotation = np.array(
        [[1, 0, 0], [0, np.cos(angle), np.sin(angle)], [0, -np.sin(angle), np.cos(angle)]]
    )
    t2w.SetDirection(tuple(rotation.ravel()))
    return t2w


def test_reference_grid_equals_pixel_to_world():
    t2w = _oblique_t2w()
    centre = t2w.TransformContinuousIndexToPhysicalPoint((200.3, 170.8, 9.0))
    geometry = CropGeometry.centred(t2w, centre)
    reference = geometry.reference_image(19)
    for s, row, col in [(0, 0, 0), (9, 63.5, 63.5), (18, 127, 5), (4, 31.25, 100.5)]:
        expected = reference.TransformContinuousIndexToPhysicalPoint((col, row, s))
        np.testing.assert_allclose(geometry.pixel_to_world(s, row, col), expected, atol=1e-9)
        voxel = t2w.TransformPhysicalPointToContinuousIndex(expected)  # crop pixel -> T2w voxel
        np.testing.assert_allclose(geometry.pixel_to_t2w_index(s, row, col), voxel, atol=1e-9)
    # The crop centre is the requested point's projection: pixel (63.5, 63.5) on its slice.
    np.testing.assert_allclose(geometry.world_to_pixel(*centre), (9.0, 63.5, 63.5), atol=1e-9)
    # 80 mm across: first to last pixel centre is 127 * 0.625 mm.
    a = np.asarray(geometry.pixel_to_world(3, 10, 0))
    b = np.asarray(geometry.pixel_to_world(3, 10, 127))
    assert np.linalg.norm(b - a) == pytest.approx(127 * 0.625)


def test_kept_slices_map_through_slice_index():
    t2w = _oblique_t2w()
    geometry = CropGeometry.centred(t2w, t2w.TransformContinuousIndexToPhysicalPoint((192, 192, 5)))
    kept = geometry.with_slices([3, 4, 7])
    full = geometry.pixel_to_world(7, 20, 30)
    np.testing.assert_allclose(kept.pixel_to_world(2, 20, 30), full, atol=1e-9)
    np.testing.assert_allclose(kept.world_to_pixel(*full), (2, 20, 30), atol=1e-9)
    # Between kept slices 4 and 7, T2w slice 5.5 is half-way: s = 1.5.
    assert kept.world_to_pixel(*geometry.pixel_to_world(5.5, 0, 0))[0] == pytest.approx(1.5)
    # Vectorised: arrays in, arrays out.
    x, y, z = kept.pixel_to_world(np.array([0, 1, 2]), np.array([0, 5, 9]), np.array([1, 2, 3]))
    s, row, col = kept.world_to_pixel(x, y, z)
    np.testing.assert_allclose(
        np.stack([s, row, col]), [[0, 1, 2], [0, 5, 9], [1, 2, 3]], atol=1e-9
    )
    assert CropGeometry.from_dict(kept.to_dict()) == kept
    with pytest.raises(ValueError, match="no slices"):
        geometry.with_slices([]).world_to_pixel(*full)


def test_positions_beyond_the_kept_slices_continue_one_t2w_slice_per_slice():
    """Kept T2w slices 2, 3 and 5: crop slice -1 is T2w slice 1 and crop slice 3 is T2w slice 6
    (slope 1 outside the kept ones), without a jump at either end."""
    t2w = sitk.Image(16, 16, 10, sitk.sitkFloat32)
    centre = t2w.TransformContinuousIndexToPhysicalPoint((7.5, 7.5, 4.0))
    geometry = CropGeometry.centred(t2w, centre, crop_mm=8, size=8, slice_index=[2, 3, 5])
    k = geometry.pixel_to_t2w_index(np.array([-1.0, 0.0, 2.0, 3.0, 4.5]), 0.0, 0.0)[:, 2]
    np.testing.assert_allclose(k, [1.0, 2.0, 5.0, 6.0, 7.5])


def test_geometry_records_the_whole_t2w_grid():
    t2w = _oblique_t2w()
    geometry = CropGeometry.centred(t2w, t2w.TransformContinuousIndexToPhysicalPoint((192, 192, 5)))
    grid = CropGeometry.from_dict(geometry.to_dict()).t2w_reference_image()
    assert grid.GetSize() == t2w.GetSize()
    np.testing.assert_allclose(grid.GetOrigin(), t2w.GetOrigin(), atol=1e-12)
    np.testing.assert_allclose(grid.GetSpacing(), t2w.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(grid.GetDirection(), t2w.GetDirection(), atol=1e-12)
    # Stores written before the size was recorded still open; only this map needs it.
    old = {k: v for k, v in geometry.to_dict().items() if k != "t2w_size"}
    assert CropGeometry.from_dict(old).t2w_size is None
    with pytest.raises(ValueError, match="T2w grid size"):
        CropGeometry.from_dict(old).t2w_reference_image()


def _flipped(t2w: sitk.Image, flip_x: bool, flip_y: bool, transpose: bool) -> sitk.Image:
    """The same voxels in world space, stored in another order (as a converter might write them)."""
    image = sitk.Flip(t2w, [flip_x, flip_y, False])
    if transpose:
        image = sitk.PermuteAxes(image, [1, 0, 2])
    return image


@pytest.mark.parametrize(
    "flip_x, flip_y, transpose",
    [
        (False, True, False),
        (True, False, False),
        (True, True, False),
        (False, False, True),
        (True, False, True),
    ],  # fmt: skip
)
def test_flipped_or_transposed_t2w_gives_the_same_crop_grid(flip_x, flip_y, transpose):
    # A T2w whose voxels are stored flipped (a dcm2niix NIfTI reads as direction diag(1, -1, 1))
    # or transposed is the same exam: its crop must show the same world points at each pixel,
    # not a mirrored or upside-down image.
    t2w = _oblique_t2w()
    centre = t2w.TransformContinuousIndexToPhysicalPoint((200.3, 170.8, 9.0))
    expected = CropGeometry.centred(t2w, centre)
    other = _flipped(t2w, flip_x, flip_y, transpose)
    assert other.GetDirection() != t2w.GetDirection()
    geometry = CropGeometry.centred(other, centre)
    reference = geometry.reference_image(19)
    for s, row, col in [(0, 0, 0), (9, 63.5, 63.5), (18, 127, 5), (4, 31.25, 100.5)]:
        world = expected.pixel_to_world(s, row, col)
        np.testing.assert_allclose(geometry.pixel_to_world(s, row, col), world, atol=1e-9)
        np.testing.assert_allclose(
            reference.TransformContinuousIndexToPhysicalPoint((col, row, s)), world, atol=1e-9
        )
        np.testing.assert_allclose(geometry.world_to_pixel(*world), (s, row, col), atol=1e-9)
        voxel = other.TransformPhysicalPointToContinuousIndex(world)
        np.testing.assert_allclose(geometry.pixel_to_t2w_index(s, row, col), voxel, atol=1e-9)
    assert CropGeometry.from_dict(geometry.to_dict()) == geometry
    # Geometries recorded before the axes were: identity axes, as they were made.
    old = {k: v for k, v in expected.to_dict().items() if k != "in_plane_axes"}
    assert CropGeometry.from_dict(old) == expected
