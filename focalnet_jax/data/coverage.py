"""Which crop pixels a component's grid covers (docs/data.md, "What is refused and why").

Resampling fills crop pixels outside a component's field of view with 0, and after normalisation 0
is the value that looks most like tumour, so every component must cover the crop of every stored
slice. A crop pixel centre counts as covered when it lies within `MARGIN_VOXELS` of the component's
outermost voxel centres along each of the component's axes (continuous index in
[-MARGIN_VOXELS, size - 1 + MARGIN_VOXELS], give or take float rounding); inside that margin
preprocessing extrapolates the nearest voxel instead of writing 0. The T2w's margin is half a
voxel (`T2W_MARGIN_VOXELS`: its voxels' outer face). Inference, and a store made with `--slices
covered`, keep only the slices every component covers (`covered_slices`: a DWI slab shorter than
the T2w's).
"""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk

from focalnet_jax.data.io import CaseError

log = logging.getLogger(__name__)

MARGIN_VOXELS = 1.0
# The T2w, on whose grid `focalnet predict` writes its maps: every crop pixel centre within the
# outer face of its voxels, so that each lies in a T2w voxel (with 1, a detection on a crop's edge
# row was listed at T2w row -1, a voxel no map holds).
T2W_MARGIN_VOXELS = 0.5
# Positions are written to about 8 decimals: a T2w slice exactly one slice beyond a DWI slab read
# at -1.000000053 of its voxels from DICOM and at -1.0 from an MHA copy, kept in one and not the
# other.
_ROUNDING_VOXELS = 1e-4
_COVERED_HINT = "; --slices covered keeps only the slices every component covers"
# The T2w misses every crop slice alike (the crop lies in its slice plane): no slice choice helps.
T2W_HINT = "; the crop reaches past the T2w's field of view: centre it further inside the T2w"


def _grid(image: sitk.Image):
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    return np.asarray(image.GetOrigin()), np.asarray(image.GetSpacing()), direction


def covered(
    image: sitk.Image, reference: sitk.Image, slices, margin: float = MARGIN_VOXELS
) -> np.ndarray:
    """bool [S, H, W]: whether `image` covers each pixel centre of `reference` slices `slices`
    (reference z indices; H, W the reference's rows and columns), within `margin` of its voxels
    beyond its outermost voxel centres."""
    origin, spacing, direction = _grid(reference)
    nx, ny, _ = reference.GetSize()
    k, j, i = np.meshgrid(
        np.asarray(slices, np.float64), np.arange(ny), np.arange(nx), indexing="ij"
    )
    index = np.stack([i, j, k], axis=-1) * spacing  # (x, y, z) order, mm along the reference axes
    world = origin + index @ direction.T
    img_origin, img_spacing, img_direction = _grid(image)
    continuous = np.linalg.solve(img_direction, (world - img_origin).reshape(-1, 3).T).T
    continuous = continuous / img_spacing
    size = np.asarray(image.GetSize(), dtype=np.float64)
    reach = margin + _ROUNDING_VOXELS
    inside = (continuous >= -reach) & (continuous <= size - 1 + reach)
    return inside.all(axis=-1).reshape(k.shape)


def _margins(images) -> dict:
    """{component name: its coverage margin}: the T2w (the first) `T2W_MARGIN_VOXELS`."""
    return {name: T2W_MARGIN_VOXELS if i == 0 else MARGIN_VOXELS for i, name in enumerate(images)}


def shortfall(name: str, inside: np.ndarray, slices, margin: float = MARGIN_VOXELS) -> str | None:
    """Why a component with coverage `inside` (from `covered`) is refused, or None if complete."""
    if inside.all():
        return None
    per_slice = inside.mean(axis=(1, 2))
    partial = np.flatnonzero(per_slice < 1)
    worst = int(partial[np.argmin(per_slice[partial])])
    return (
        f"{name} covers {100 * inside.mean():.1f} % of the crop of the stored slices: "
        f"{len(partial)} of {len(per_slice)} slices not fully covered (least: T2w slice "
        f"{int(np.asarray(slices)[worst])}, {100 * per_slice[worst]:.1f} %); every component must "
        f"cover the crop of every stored slice (tolerance {margin:g} {name} voxel)"
    )


def check_covered(
    images, components, reference, keep: np.ndarray, case: str, hint: str = ""
) -> None:
    """Each component image (`images`, name -> image; `components`, name -> path) must cover the
    crop (`reference`) on the kept T2w slices `keep`; else a CaseError naming the file, its
    reason ended by `hint`."""
    margins = _margins(images)
    for i, name in enumerate(images):
        margin = margins[name]
        problem = shortfall(name, covered(images[name], reference, keep, margin), keep, margin)
        if problem:
            raise CaseError(case, components[name], problem + (hint if i else T2W_HINT))


def covered_slices(images, components, reference, annotated: np.ndarray, case: str) -> np.ndarray:
    """int [S]: the T2w slices whose crop (`reference`) every component covers; the others are
    named in a warning. None covered, or a lesion (`annotated` [Z]) on an uncovered slice, is the
    `check_covered` error."""
    every = np.arange(len(annotated))
    margins = _margins(images)
    full = np.all(
        [
            covered(image, reference, every, margins[name]).all(axis=(1, 2))
            for name, image in images.items()
        ],
        axis=0,
    )
    keep = np.flatnonzero(full)
    if len(keep) == 0 or annotated[~full].any():
        check_covered(images, components, reference, every, case)
    if len(keep) < len(every):
        log.warning(
            "case %s: T2w slices %s lie partly outside a component's field of view; only the "
            "other %d slices, which every component covers, are used",
            *(case, np.flatnonzero(~full).tolist(), len(keep)),
        )
    return keep


def kept_slices(images, components, reference, annotated: np.ndarray, slices: str, case: str):
    """int [S]: the T2w slices to store under `slices`: 'all' (every one), 'annotated' (those
    holding a lesion, `annotated` [Z]) or 'covered' (`covered_slices`); a kept slice that a
    component does not cover is the `check_covered` error."""
    if slices == "covered":
        return covered_slices(images, components, reference, annotated, case)
    if slices == "annotated":
        keep, hint = np.flatnonzero(annotated), ""
    else:
        keep, hint = np.arange(len(annotated)), _COVERED_HINT
    check_covered(images, components, reference, keep, case, hint)
    return keep
