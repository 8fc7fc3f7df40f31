"""Lesion localisation points (paper section II-E2; docs/evaluation.md): 2D local maxima of the
lesion score `s1 = P(class >= 1)` on each slice, one point per flat maximum."""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from focalnet_jax.errors import UserError

RADIUS_MM = 5.0
MIN_SCORE = 1e-3
MAX_RADIUS_MM = 1000.0  # far past any crop; a window of 1e19 mm overflowed to no window at all


def check_detection_settings(radius_mm, min_score, names=("radius_mm", "min_score")) -> None:
    """A `UserError` (naming the setting as `names` say: the flags of the command line) unless
    0 < radius_mm <= MAX_RADIUS_MM and 0 <= min_score < 1 (a detection's s1 must exceed it)."""
    if not 0 < radius_mm <= MAX_RADIUS_MM:
        raise UserError(
            f"{names[0]} {radius_mm}: expected a positive distance in mm, at most {MAX_RADIUS_MM:g}"
        )
    if not 0 <= min_score < 1:
        raise UserError(f"{names[1]} {min_score}: expected a probability in [0, 1)")


_HALF_TOL = 1e-4  # pixels


@dataclasses.dataclass(frozen=True)
class Detections:
    """Localisation points of one case, ordered by decreasing s1 (ties: slice, row, column).

    `slice`, `row`, `col`: int32 `[D]` pixel indices; `scores`: float32 `[D, 5]`, P(class >= k) at
    the point (column 0 is the detection score s1); `reach_mm`: float32 `[D]`, the in-plane
    distance from the point to the farthest pixel of its flat maximum (None where not measured).
    """

    slice: np.ndarray
    row: np.ndarray
    col: np.ndarray
    scores: np.ndarray
    reach_mm: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.slice.size)


def window_radius(spacing, radius_mm: float = RADIUS_MM) -> tuple[int, int]:
    """Half-widths (rows, columns) in pixels: round(radius_mm / spacing), halves rounded up."""
    spacing = np.asarray(spacing, np.float64)
    # A half within float32 rounding of the spacing (predictions files store float32: 80 mm /
    # 120 pixels reads 0.6666667, 5 mm of it 7.4999997 pixels) still rounds up.
    radius = np.floor(radius_mm / spacing + 0.5 + _HALF_TOL).astype(int)
    return int(radius[0]), int(radius[1])


def local_maxima(
    scores: np.ndarray, spacing, *, radius_mm: float = RADIUS_MM, min_score: float = MIN_SCORE
) -> Detections:
    """2D local maxima of `scores[..., 0]` on every slice, one detection per flat maximum.

    A pixel is a window maximum when it equals the maximum of the (2r+1) x (2r+1) window around it
    (`r = window_radius(spacing, radius_mm)`, zero padding outside the image) and its score is above
    `min_score`. Window maxima that touch (8-connectivity, never across slices) form one flat
    maximum and give one detection, at the group's pixel nearest its centroid (distance in pixels;
    ties: lowest row, then lowest column), with the scores at that pixel.

    Args:
      scores: float `[S, H, W, 5]` P(class >= k).
      spacing: in-plane pixel spacing (rows, columns) in mm.
    Returns:
      `Detections` sorted by decreasing s1.
    Raises:
      UserError where `radius_mm` rounds to a window of one pixel along rows or columns.
    """
    s1 = np.asarray(scores[..., 0])
    r_row, r_col = window_radius(spacing, radius_mm)
    if min(r_row, r_col) == 0:  # every pixel above min_score would be a maximum
        raise UserError(
            f"radius_mm {radius_mm:g} is under half a pixel (spacing {float(spacing[0]):g} x "
            f"{float(spacing[1]):g} mm): a local maximum's window would be that pixel alone"
        )
    window_max = ndimage.maximum_filter(
        s1, size=(1, 2 * r_row + 1, 2 * r_col + 1), mode="constant", cval=0.0
    )
    z, y, x, reach = flat_maximum_points((s1 == window_max) & (s1 > min_score), spacing)
    point_scores = np.asarray(scores[z, y, x], np.float32).reshape(-1, scores.shape[-1])
    order = np.lexsort((x, y, z, -point_scores[:, 0]))
    return Detections(
        slice=z[order].astype(np.int32),
        row=y[order].astype(np.int32),
        col=x[order].astype(np.int32),
        scores=point_scores[order],
        reach_mm=reach[order].astype(np.float32),
    )


def flat_maximum_points(maxima: np.ndarray, spacing=(1.0, 1.0)):
    """One point per 8-connected group of True pixels of each slice of bool `[S, H, W]`: the
    group's pixel nearest its centroid (ties: lowest row, then lowest column).

    Returns int64 `(slice, row, col)` `[G]`, one entry per group in label order, and float64
    `reach` `[G]`: the distance from each point to the farthest pixel of its group, in the units
    of `spacing` (rows, columns).
    """
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = True  # 8-connected within a slice, never across slices
    labels, _ = ndimage.label(maxima, structure=in_plane)
    z, y, x = np.nonzero(labels)
    group = labels[z, y, x] - 1
    count = np.bincount(group)
    sum_y, sum_x = np.bincount(group, weights=y), np.bincount(group, weights=x)
    # count^2 x squared distance to the centroid: exact integers, so equal distances tie exactly.
    n = count[group]
    dy = n * y - sum_y[group].astype(np.int64)
    dx = n * x - sum_x[group].astype(np.int64)
    order = np.lexsort((x, y, dy**2 + dx**2, group))
    first = order[np.flatnonzero(np.diff(group[order], prepend=-1))]
    # first[g]: group g's point (groups are 0..G-1, each sorted to its own run).
    squared = ((y - y[first][group]) * spacing[0]) ** 2 + ((x - x[first][group]) * spacing[1]) ** 2
    reach = np.zeros(first.size)
    np.maximum.at(reach, group, squared)
    return z[first], y[first], x[first], np.sqrt(reach)
