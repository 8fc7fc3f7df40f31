"""Crop geometry: the 80 x 80 mm axial crop of the T2w volume and its maps to LPS world coordinates.

The crop lies in the T2w slice plane (same slice positions as the T2w series) and is displayed the
same way whatever order the T2w voxels are stored in: crop columns run along the T2w in-plane axis
nearest LPS +x (patient left), rows along the other one, pointed to the posterior half-space (+y),
as in an axial DICOM series. A T2w stored flipped (e.g. a NIfTI from dcm2niix: direction
diag(1, -1, 1)) or transposed therefore gives the same crop as the DICOM series it came from. Its
128 x 128 pixel centres are placed symmetrically around the prostate centre, so crop pixel
(row, col) of crop slice s is the T2w continuous voxel index

    (i, j) = (i0, j0) + diag(spacing / t2w_spacing_xy) @ A @ (col, row)
    k = slice_index[s]

with A the signed permutation `in_plane_axes` (identity for an axial series stored as DICOM
orders it), (i0, j0) the index of crop pixel (0, 0), and world = origin + D @ (t2w_spacing * index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class CropGeometry:
    """Geometry of one case's crop. All vectors in SimpleITK (x, y, z) order, mm, LPS.

    Attributes:
      t2w_origin, t2w_spacing, t2w_direction: the T2w series grid (direction row-major 3x3).
      t2w_size: T2w voxels along (x, y, z); None in stores written before it was recorded.
      corner_index: T2w continuous index (i0, j0) of crop pixel (row 0, col 0).
      spacing: crop pixel size (mm), equal along rows and columns.
      size: crop pixels per side.
      slice_index: T2w slice k of each crop slice s.
      in_plane_axes: row-major 2x2 signed permutation A: T2w index steps (i, j) per crop
        (column, row) step, in crop pixels (identity in stores written before it was recorded).
    """

    t2w_origin: tuple[float, float, float]
    t2w_spacing: tuple[float, float, float]
    t2w_direction: tuple[float, ...]
    corner_index: tuple[float, float]
    spacing: float
    size: int
    slice_index: tuple[int, ...]
    t2w_size: tuple[int, int, int] | None = None
    in_plane_axes: tuple[int, int, int, int] = (1, 0, 0, 1)

    @classmethod
    def centred(
        cls,
        t2w: sitk.Image,
        center_xyz,
        *,
        crop_mm: float = 80.0,
        size: int = 128,
        slice_index=None,
    ) -> CropGeometry:
        """The `crop_mm` square crop around the LPS point `center_xyz`, over all T2w slices."""
        spacing = crop_mm / size
        ci, cj, _ = t2w.TransformPhysicalPointToContinuousIndex(tuple(float(c) for c in center_xyz))
        axes = display_axes(t2w.GetDirection())
        steps = np.diag(spacing / np.asarray(t2w.GetSpacing()[:2])) @ np.reshape(axes, (2, 2))
        corner = np.array([ci, cj]) - steps @ np.full(2, (size - 1) / 2)
        if slice_index is None:
            slice_index = range(t2w.GetSize()[2])
        return cls(
            t2w_origin=tuple(float(v) for v in t2w.GetOrigin()),
            t2w_spacing=tuple(float(v) for v in t2w.GetSpacing()),
            t2w_direction=tuple(float(v) for v in t2w.GetDirection()),
            corner_index=(float(corner[0]), float(corner[1])),
            spacing=float(spacing),
            size=int(size),
            slice_index=tuple(int(k) for k in slice_index),
            t2w_size=tuple(int(v) for v in t2w.GetSize()),
            in_plane_axes=axes,
        )

    def with_slices(self, slice_index) -> CropGeometry:
        """The same crop restricted to the given T2w slices."""
        fields = {**self.to_dict(), "slice_index": tuple(int(k) for k in slice_index)}
        return CropGeometry.from_dict(fields)

    # --- reference grid for SimpleITK resampling ------------------------------------------------

    def reference_image(self, num_slices: int) -> sitk.Image:
        """An empty image on the crop grid over T2w slices 0..num_slices-1 (for `sitk.Resample`)."""
        origin = self._world(np.array([[self.corner_index[0], self.corner_index[1], 0.0]]))[0]
        axes = np.eye(3)
        axes[:2, :2] = np.reshape(self.in_plane_axes, (2, 2))
        direction = np.reshape(self.t2w_direction, (3, 3)) @ axes  # crop (col, row, slice) axes
        reference = sitk.Image(self.size, self.size, int(num_slices), sitk.sitkFloat32)
        reference.SetOrigin(tuple(float(v) for v in origin))
        reference.SetSpacing((self.spacing, self.spacing, self.t2w_spacing[2]))
        reference.SetDirection(tuple(float(v) for v in direction.ravel()))
        return reference

    def t2w_reference_image(self) -> sitk.Image:
        """An empty image on the whole T2w series grid (for resampling crop maps back to it)."""
        if self.t2w_size is None:
            raise ValueError("this crop geometry does not record the T2w grid size")
        reference = sitk.Image(*self.t2w_size, sitk.sitkFloat32)
        reference.SetOrigin(self.t2w_origin)
        reference.SetSpacing(self.t2w_spacing)
        reference.SetDirection(self.t2w_direction)
        return reference

    # --- maps -------------------------------------------------------------------------------------

    def _world(self, index: np.ndarray) -> np.ndarray:
        direction = np.asarray(self.t2w_direction).reshape(3, 3)
        return np.asarray(self.t2w_origin) + (index * np.asarray(self.t2w_spacing)) @ direction.T

    def _index(self, world: np.ndarray) -> np.ndarray:
        direction = np.asarray(self.t2w_direction).reshape(3, 3)
        return np.linalg.solve(direction, (world - np.asarray(self.t2w_origin)).T).T / np.asarray(
            self.t2w_spacing
        )

    def _slices(self) -> np.ndarray:
        if not self.slice_index:
            raise ValueError(
                "the crop keeps no slices (slices='annotated' on a case without lesions)"
            )
        return np.asarray(self.slice_index, dtype=np.float64)

    def _k_of_s(self, s):
        ks = self._slices()
        s = np.asarray(s, dtype=np.float64)
        if len(ks) == 1:
            return ks[0] + s
        # Linear inside the kept slices, slope 1 (T2w slices) beyond them.
        inside = np.interp(s, np.arange(len(ks)), ks)
        return np.where(
            s < 0, ks[0] + s, np.where(s > len(ks) - 1, ks[-1] + s - (len(ks) - 1), inside)
        )

    def _s_of_k(self, k):
        ks = self._slices()
        k = np.asarray(k, dtype=np.float64)
        if len(ks) == 1:
            return k - ks[0]
        inside = np.interp(k, ks, np.arange(len(ks)))
        return np.where(
            k < ks[0], k - ks[0], np.where(k > ks[-1], len(ks) - 1 + k - ks[-1], inside)
        )

    def _steps(self) -> np.ndarray:
        """[2, 2]: T2w index steps (i, j) per crop (column, row) step."""
        scale = self.spacing / np.asarray(self.t2w_spacing[:2])
        return np.diag(scale) @ np.reshape(self.in_plane_axes, (2, 2)).astype(np.float64)

    def pixel_to_t2w_index(self, s, row, col) -> np.ndarray:
        """Crop (s, row, col) -> T2w continuous index (i, j, k), SimpleITK order, [..., 3]."""
        col, row = np.broadcast_arrays(np.asarray(col, np.float64), np.asarray(row, np.float64))
        ij = np.asarray(self.corner_index[:2]) + np.stack([col, row], axis=-1) @ self._steps().T
        k = self._k_of_s(s)
        return np.stack(np.broadcast_arrays(ij[..., 0], ij[..., 1], k), axis=-1)

    def pixel_to_world(self, s, row, col):
        """Crop pixel (s, row, col) (floats allowed) -> LPS world point (x, y, z) in mm."""
        world = self._world(self.pixel_to_t2w_index(s, row, col).reshape(-1, 3))
        world = world.reshape(
            np.broadcast(np.asarray(s), np.asarray(row), np.asarray(col)).shape + (3,)
        )
        if world.ndim == 1:
            return tuple(float(v) for v in world)
        return world[..., 0], world[..., 1], world[..., 2]

    def world_to_pixel(self, x, y, z):
        """LPS point (x, y, z) mm -> crop (s, row, col), floats; s indexes the kept slices."""
        world = np.stack(np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (x, y, z))), -1)
        index = self._index(world.reshape(-1, 3)).reshape(world.shape)
        offset = index[..., :2] - np.asarray(self.corner_index[:2])
        col_row = offset @ np.linalg.inv(self._steps()).T
        col, row = col_row[..., 0], col_row[..., 1]
        s = self._s_of_k(index[..., 2])
        if world.ndim == 1:
            return float(s), float(row), float(col)
        return s, row, col

    # --- serialisation ----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "t2w_origin": list(self.t2w_origin),
            "t2w_spacing": list(self.t2w_spacing),
            "t2w_direction": list(self.t2w_direction),
            "corner_index": list(self.corner_index),
            "spacing": self.spacing,
            "size": self.size,
            "slice_index": list(self.slice_index),
            "t2w_size": None if self.t2w_size is None else list(self.t2w_size),
            "in_plane_axes": list(self.in_plane_axes),
        }

    @classmethod
    def from_dict(cls, d: dict) -> CropGeometry:
        return cls(
            t2w_origin=tuple(float(v) for v in d["t2w_origin"]),
            t2w_spacing=tuple(float(v) for v in d["t2w_spacing"]),
            t2w_direction=tuple(float(v) for v in d["t2w_direction"]),
            corner_index=tuple(float(v) for v in d["corner_index"]),
            spacing=float(d["spacing"]),
            size=int(d["size"]),
            slice_index=tuple(int(k) for k in d["slice_index"]),
            t2w_size=None if d.get("t2w_size") is None else tuple(int(v) for v in d["t2w_size"]),
            in_plane_axes=tuple(int(v) for v in d.get("in_plane_axes", (1, 0, 0, 1))),
        )


def display_axes(direction) -> tuple[int, int, int, int]:
    """Row-major 2x2 signed permutation A taking crop (column, row) steps to T2w index (i, j)
    steps: columns along the in-plane T2w axis nearest LPS +x, rows along the other, each pointed
    to the positive LPS half-space (+x left, +y posterior) it leans to. `direction`: the T2w
    direction cosines, row-major 3x3 (SimpleITK order)."""
    d = np.reshape(np.asarray(direction, np.float64), (3, 3))[:, :2]  # world of T2w axes i, j
    col_axis = int(np.argmax(np.abs(d[0])))
    row_axis = 1 - col_axis
    axes = np.zeros((2, 2), np.int64)
    axes[col_axis, 0] = 1 if d[0, col_axis] >= 0 else -1
    axes[row_axis, 1] = 1 if d[1, row_axis] >= 0 else -1
    return tuple(int(v) for v in axes.ravel())


MAX_AXIAL_TILT_DEGREES = 45.0  # an axial series tilted further is nearer coronal or sagittal


def not_axial(direction) -> str | None:
    """Why a T2w with these direction cosines (row-major 3x3, SimpleITK order) is no axial series,
    or None: its slice normal (the third voxel axis) must lie within `MAX_AXIAL_TILT_DEGREES` of
    the head-foot (LPS z) axis, since the crop lies in the T2w slice plane and the models are
    trained on axial slices (oblique axial series, e.g. ProstateX's 18 degrees, are kept)."""
    normal = np.reshape(np.asarray(direction, np.float64), (3, 3))[:, 2]
    normal = normal / np.linalg.norm(normal)
    tilt = float(np.degrees(np.arccos(min(1.0, abs(normal[2])))))
    if tilt <= MAX_AXIAL_TILT_DEGREES:
        return None
    return (
        f"T2w is not an axial series: slice normal ({normal[0]:.2f}, {normal[1]:.2f}, "
        f"{normal[2]:.2f}) LPS, {tilt:.0f} degrees from the head-foot axis (a coronal or "
        f"sagittal series?); the crop lies in the T2w slice plane and the models see axial slices"
    )
