"""Intensity normalisation (paper section II-D2; docs/data.md, step 4).

- T2w: linear so that air -> 0 and bladder -> 1, kept unclipped (training moves the upper
  threshold).
  Air is a low percentile of the volume; the bladder is the median of the largest bright,
  homogeneous connected component anterior to the prostate (`find_bladder`); where none is found a
  high percentile is used instead and the fallback is logged.
- ADC: clipped to fixed, patient-independent thresholds (default 0..3000 x 1e-6 mm^2/s), scaled
  to [0, 1].
- Any other component: per-case percentiles of its non-zero voxels (default 1st -> 0, 99th -> 1),
  unclipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class T2wReference:
    """T2w reference intensities (raw scanner units): x -> (x - air) / (bladder - air)."""

    air: float
    bladder: float
    source: str  # 'bladder' (found), 'mask' (given bladder mask) or 'fallback' (high percentile)


class BladderMaskError(ValueError):
    """A given bladder mask whose T2w is not brighter than air (it covers something else)."""


def _disk(radius_y: int, radius_x: int | None = None) -> np.ndarray:
    """bool [1, 2 ry + 1, 2 rx + 1]: the in-plane ellipse of radii `radius_y`, `radius_x`
    (samples; a disk where they are equal), the same radius in mm along both axes where each is
    a length in mm over that axis' sample spacing."""
    radius_x = radius_y if radius_x is None else radius_x
    yy, xx = np.mgrid[-radius_y : radius_y + 1, -radius_x : radius_x + 1]
    return ((yy * radius_x) ** 2 + (xx * radius_y) ** 2 <= (radius_y * radius_x) ** 2)[None]


_SNAP = 1e-4  # voxels: a position this close to a whole voxel is that voxel (float noise)


def _axis_grid(center: float, before: float, after: float, step: int, n: int):
    """Sample positions (voxel units, ascending) `center + k * step` for the integers k that lie
    in [center - before, center + after] (voxels) and in the volume [0, n - 1], and the first
    k. Whole multiples of `step` from the centre, so the same voxels are sampled however the axis
    is stored (mirrored: `n - 1 - center`, `before` and `after` swapped)."""
    low, high = max(center - before, 0.0), min(center + after, n - 1.0)
    first = int(np.ceil((low - center) / step - _SNAP))
    last = int(np.floor((high - center) / step + _SNAP))
    positions = center + step * np.arange(first, last + 1, dtype=np.float64)
    whole = np.round(positions)
    positions = np.where(np.abs(positions - whole) < _SNAP, whole, positions)
    return np.clip(positions, 0.0, n - 1.0), first  # within the volume, not a row -1 (the last)


def _sample_axis(volume: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """`volume` linearly interpolated at `positions` (voxel units, within the axis) along `axis`,
    float32; exact at whole positions."""
    below = np.floor(positions).astype(int)
    above = np.minimum(below + 1, volume.shape[axis] - 1)
    shape = [1] * volume.ndim
    shape[axis] = len(positions)
    weight = (positions - below).reshape(shape).astype(np.float32)
    lower, upper = (np.take(volume, i, axis=axis).astype(np.float32) for i in (below, above))
    return lower + weight * (upper - lower)


def _cells(center: float, step: int, first: int, count: int, n: int):
    """Full-grid voxel indices along one axis and the grid sample (0-based) whose cell holds
    each: the nearest sample, a tie going away from the centre (mirror-symmetric)."""
    offset = np.round((np.arange(n) - center) / step, 6)
    k = (np.sign(offset) * np.floor(np.abs(offset) + 0.5)).astype(int) - first
    keep = (k >= 0) & (k < count)
    return np.nonzero(keep)[0], k[keep]


def _search_grid(shape_zyx, spacing_zyx, center_yx, anterior_sign: float):
    """The ~1 mm sampling grid of the bladder search box (60 mm anterior to 5 mm posterior of
    `center_yx`, +-50 mm left-right, within the volume): ((row positions, first k), (column
    positions, first k)) from `_axis_grid`, and the steps (voxels) along rows and columns, each
    ~1 mm of its own axis (a T2w of unequal in-plane pixels is sampled alike along both)."""
    _, sy, sx = (float(s) for s in spacing_zyx)
    _, ny, nx = shape_zyx
    cy, cx = ((ny - 1) / 2, (nx - 1) / 2) if center_yx is None else center_yx
    steps = (max(1, int(round(1.0 / sy))), max(1, int(round(1.0 / sx))))
    before, after = (60 / sy, 5 / sy) if anterior_sign > 0 else (5 / sy, 60 / sy)
    rows = _axis_grid(float(cy), before, after, steps[0], ny)
    columns = _axis_grid(float(cx), 50 / sx, 50 / sx, steps[1], nx)
    return (float(cy), float(cx)), rows, columns, steps


def _homogeneous(values: np.ndarray, inside: np.ndarray, max_cv: float) -> bool:
    """Whether the core of a candidate (`inside`, bool, eroded by a 1-voxel disk) is urine-like:
    coefficient of variation of its raw `values` (same shape) <= `max_cv`."""
    # The core only: the smoothed threshold lets tissue-valued edge voxels in.
    core = values[ndimage.binary_erosion(inside, _disk(1))]
    return bool(core.size and core.std() <= max_cv * core.mean())


def _bladder_in_box(box: np.ndarray, voxel_mm, *, fractions, max_cv, min_volume_ml, opening_mm):
    """(bounding slices, bool mask within them) of the bladder in `box` (z, y, x; raw T2w on a
    ~1 mm grid of `voxel_mm` (z, y, x) spacing), or None; see `find_bladder`."""
    sz, py, px = voxel_mm
    smooth = ndimage.gaussian_filter(box, (0, 1.0 / py, 1.0 / px))
    disk = _disk(*(max(1, int(round(opening_mm / p))) for p in (py, px)))  # opening_mm both ways
    best, best_volume = None, min_volume_ml
    top = np.percentile(smooth, 99.5)
    for fraction in fractions:
        bright = ndimage.binary_opening(smooth > fraction * top, disk)
        labels, _ = ndimage.label(bright)
        for i, where in enumerate(ndimage.find_objects(labels), start=1):
            inside = labels[where] == i
            volume = inside.sum() * py * px * sz / 1000.0
            if volume >= best_volume and _homogeneous(box[where], inside, max_cv):
                best, best_volume = (where, inside), volume
        if best is not None:  # the brightest level holding a candidate: urine over fat
            return best
    return None


def find_bladder(
    t2w: np.ndarray,
    spacing_zyx,
    center_yx=None,
    *,
    anterior_sign: float = 1.0,
    fractions=(0.9, 0.8, 0.7, 0.6, 0.5),
    max_cv: float = 0.15,
    min_volume_ml: float = 10.0,
    opening_mm: float = 3.0,
) -> np.ndarray | None:
    """Boolean (z, y, x) mask of the bladder in a raw T2w volume, or None where none is found.

    The bladder lies anterior (and superior) to the prostate, the endorectal coil posterior to it,
    so the search box spans 60 mm anterior to 5 mm posterior of the prostate centre `center_yx`
    (voxel row, column; default the volume centre) and +-50 mm left-right, on a ~1 mm grid of
    whole steps from that centre along each axis (the same voxels however the T2w is stored,
    mirrored or not). Candidates are the connected components of smoothed voxels above each of
    `fractions` of the box's 99.5th percentile, opened with a disk of `opening_mm` radius (an
    ellipse in samples where the grid's two steps differ; removes thin fat layers); the
    bladder is the largest homogeneous one (urine: core coefficient of variation <= `max_cv`) of
    at least `min_volume_ml` at the highest level that has one (urine is brighter than fat away
    from a coil). `anterior_sign` is +1 when rows run anterior -> posterior (LPS y increasing),
    -1 otherwise.
    """
    (cy, cx), (rows, first_row), (columns, first_column), (step_y, step_x) = _search_grid(
        t2w.shape, spacing_zyx, center_yx, anterior_sign
    )
    if len(rows) == 0 or len(columns) == 0:
        return None
    box = _sample_axis(_sample_axis(t2w, rows, 1), columns, 2)  # only the box cast to float32
    sz, sy, sx = (float(s) for s in spacing_zyx)
    found = _bladder_in_box(
        box,
        (sz, sy * step_y, sx * step_x),
        fractions=fractions,
        max_cv=max_cv,
        min_volume_ml=min_volume_ml,
        opening_mm=opening_mm,
    )
    if found is None:
        return None
    where, inside = found
    small = np.zeros(box.shape, bool)
    small[where] = inside
    # Back to the full grid: every voxel whose nearest sample was selected.
    y, ky = _cells(cy, step_y, first_row, len(rows), t2w.shape[1])
    x, kx = _cells(cx, step_x, first_column, len(columns), t2w.shape[2])
    mask = np.zeros(t2w.shape, dtype=bool)
    mask[:, y[:, None], x[None, :]] = small[:, ky[:, None], kx[None, :]]
    return mask


def t2w_reference(
    t2w: np.ndarray,
    spacing_zyx,
    *,
    air_percentile: float = 1.0,
    fallback_percentile: float = 99.5,
    bladder_mask: np.ndarray | None = None,
    center_yx=None,
    case: str = "?",
    **bladder_kwargs,
) -> T2wReference:
    """Air and bladder intensities of a raw T2w volume (z, y, x); logs when the fallback is used.
    A given `bladder_mask` whose median is not above air is a `BladderMaskError`."""
    air = float(np.percentile(t2w, air_percentile))
    if bladder_mask is not None and bladder_mask.any():
        bladder = float(np.median(t2w[bladder_mask]))
        if bladder <= air:  # the normalised T2w would be inverted or infinite
            raise BladderMaskError(
                f"bladder mask: its median T2w {bladder:g} is not above air {air:g} (percentile "
                f"{air_percentile:g} of the T2w); does the mask cover the bladder?"
            )
        return T2wReference(air, bladder, "mask")
    mask = find_bladder(t2w, spacing_zyx, center_yx, **bladder_kwargs)
    if mask is not None:
        bladder, source = float(np.median(t2w[mask])), "bladder"
    else:
        bladder, source = float(np.percentile(t2w, fallback_percentile)), "fallback"
        log.warning(
            "case %s: no bladder found in T2w; upper reference = %.1f (%g-th percentile)",
            case,
            bladder,
            fallback_percentile,
        )
    if bladder <= air:
        bladder, source = float(t2w.max()), "fallback"
        log.warning("case %s: bladder not brighter than air; upper reference = T2w maximum", case)
    if bladder <= air:
        raise ValueError(f"case {case}: T2w is constant ({air}); cannot normalise")
    return T2wReference(air, bladder, source)


def normalise_t2w(x: np.ndarray, scale: T2wReference) -> np.ndarray:
    """air -> 0, bladder -> 1, unclipped; float32."""
    return ((x - scale.air) / (scale.bladder - scale.air)).astype(np.float32)


def normalise_adc(x: np.ndarray, low: float = 0.0, high: float = 3000.0) -> np.ndarray:
    """Clip to [low, high] (1e-6 mm^2/s) and scale to [0, 1]; float32."""
    return ((np.clip(x, low, high) - low) / (high - low)).astype(np.float32)


ADC_UNIT = "1e-6 mm^2/s"
# 99th percentile below the bound -> the map's unit; None: no ADC map in any of the three units
# (1e-3 mm^2/s maps stay below about 5, 1e-6 mm^2/s maps reach 1000 and more).
_ADC_UNIT_BELOW = ((0.1, "mm^2/s"), (10.0, "1e-3 mm^2/s"), (500.0, None))


def adc_unit_problem(volume: np.ndarray) -> str | None:
    """Why a raw ADC map is not in `ADC_UNIT`, or None. Judged by the 99th percentile of its
    non-zero voxels: in 1e-6 mm^2/s (PI-CAI, ProstateX) tissue and urine reach 1000..3500, in
    1e-3 mm^2/s 1..3.5, in mm^2/s 0.001..0.0035; between 10 and 500 it is no ADC map (a DWI
    image, whose values have no fixed unit, or another series)."""
    values = volume[volume != 0]
    if values.size == 0:
        return "ADC map is zero everywhere"
    high = float(np.percentile(values, 99))
    for bound, unit in _ADC_UNIT_BELOW:
        if abs(high) < bound and unit is None:
            return (
                f"not an ADC map in 1e-6, 1e-3 or 1 mm^2/s (99th percentile of non-zero voxels "
                f"{high:.4g}; {ADC_UNIT} maps reach about 3000, 1e-3 mm^2/s maps about 3): a "
                "DWI (high-b) image or another series given as ADC?"
            )
        if abs(high) < bound:
            return (
                f"ADC map looks like {unit} (99th percentile of non-zero voxels {high:.4g}); "
                f"expected {ADC_UNIT} (water about 3000): rescale it"
            )
    return None


def percentile_range(
    volume: np.ndarray, low: float = 1.0, high: float = 99.0
) -> tuple[float, float]:
    """Per-case (low, high) percentiles of a raw volume's non-zero voxels (all voxels where none
    is): the zero fill of an export padded to a larger grid moved both (an HBV's 8.1..101 to
    0..81), scaling the same exam otherwise (reference of `normalise_percentiles`)."""
    values = np.asarray(volume)
    nonzero = values[values != 0]
    lo, hi = np.percentile(nonzero if nonzero.size else values, [low, high])
    return float(lo), float(max(hi, lo + 1e-6))


def normalise_percentiles(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """lo -> 0, hi -> 1, unclipped; float32."""
    return ((x - lo) / (hi - lo)).astype(np.float32)
