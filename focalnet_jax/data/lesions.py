"""Lesions of a label volume: 3D instances, their classes, and the index lesion (docs/data.md).

A label volume holds 0 (background) and 1..5 per voxel: 2..5 are ISUP grade groups and 1 is, under
the 'picai' scheme, csPCa of unknown grade (class 2, grade bits invalid) or, under 'isup', GS 3+3.
"""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from focalnet_jax.data.io import CaseError

_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)
log = logging.getLogger(__name__)


def label_instances(label: np.ndarray, case, path):
    """3D connected lesions of a raw label volume -> (instance map int32, value of each [L]).

    A lesion is a connected region of one label value, so two touching lesions of different
    values stay two lesions, each voxel keeping its value (one region of both would take one
    value and re-grade the other lesion's voxels). Ids follow the raster order of each lesion's
    first voxel. Values outside 0..5 raise `CaseError` naming `case` and `path`."""
    values = np.unique(label)
    bad = [int(v) for v in values if v not in (0, 1, 2, 3, 4, 5)]
    if bad:
        raise CaseError(case, path, f"label values {bad[:5]} outside the allowed set 0..5")
    regions = np.zeros(label.shape, np.int64)
    region_values = [0]
    for value in values[values > 0]:
        parts, n = ndimage.label(label == value, structure=_CONNECTIVITY)
        regions[parts > 0] = parts[parts > 0] + len(region_values) - 1
        region_values += [int(value)] * n
    ids, first = np.unique(regions.ravel(), return_index=True)
    order = ids[ids > 0][np.argsort(first[ids > 0], kind="stable")]  # regions in raster order
    renumber = np.zeros(len(region_values), np.int32)
    renumber[order] = np.arange(1, len(order) + 1)
    inst_values = np.asarray(region_values, np.int64)[order]
    return renumber[regions], inst_values


def instance_classes(values: np.ndarray, label_values: str) -> tuple[np.ndarray, np.ndarray]:
    """Label value of each lesion [L] -> (class int32 [L], grade known bool [L]); under the
    'picai' scheme value 1 is class 2 of unknown grade."""
    unknown = (values == 1) & (label_values == "picai")
    return np.where(unknown, 2, values).astype(np.int32), ~unknown


def _max_diameter_mm(mask2d: np.ndarray, spacing: float) -> float:
    points = np.argwhere(mask2d).astype(np.float64)
    if len(points) > 400:  # the extreme points lie on the boundary
        points = np.argwhere(mask2d & ~ndimage.binary_erosion(mask2d)).astype(np.float64)
    diff = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((diff**2).sum(-1)).max() * spacing)


def index_lesion(lesions: np.ndarray, lesion_classes: np.ndarray, spacing: float) -> int:
    """Instance id of the highest-class lesion (ties: largest in-plane diameter, mm, on any
    slice of `lesions` [S, H, W] with square pixels of `spacing` mm); 0 if none."""
    if len(lesion_classes) == 0:
        return 0
    best, best_key = 0, None
    for i, cls in enumerate(lesion_classes, start=1):
        present = lesions == i
        diameter = max(
            (_max_diameter_mm(present[s], spacing) for s in np.flatnonzero(present.any((1, 2)))),
            default=0.0,
        )
        key = (int(cls), diameter)
        if best_key is None or key > best_key:
            best, best_key = i, key
    return best


def gland_dice(full, gland: sitk.Image, label, mask, case) -> float | None:
    """The Dice overlap of the lesions of `full` (a `PreprocessedCase` of every T2w slice, from
    `label`) and the gland mask `gland` (read from the file `mask`, taken onto the crop grid by
    nearest neighbour); None without lesions. A label of whole-gland masks scores about 1 (the
    run judges its cases together: `build_store`). A warning names the lesions that share no
    voxel with the gland: a label or mask of another exam, or one stored mirrored."""
    count = len(full.lesion_classes)
    if not count:
        return None
    grid = full.geometry.reference_image(len(full.annotated))
    gland = sitk.Resample(gland, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
    inside = sitk.GetArrayViewFromImage(gland) > 0
    labelled = full.lesions > 0
    dice = 2 * np.count_nonzero(labelled & inside) / (labelled.sum() + inside.sum())
    outside = sorted(set(range(1, count + 1)) - set(np.unique(full.lesions[inside]).tolist()))
    if outside:
        log.warning(
            "case %s: %d of %d lesions of label %s (instances %s) lie wholly outside the prostate "
            "mask %s: a label or mask of another exam, or one stored mirrored?",
            case, len(outside), count, label, outside[:5], mask,
        )  # fmt: skip
    return float(dice)
