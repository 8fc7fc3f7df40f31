"""The paper's hit rule (section II-E3) and the per-case reduction the FROC and GS ROC need.

A detection hits a lesion when it lies on a slice where the lesion has an ROI and its in-plane
distance to the nearest ROI pixel is <= 5 mm (0 inside the ROI). Each case is reduced to a few small
arrays (`CaseSummary`) so that a whole cross-validation is evaluated without holding score maps.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage
from scipy.spatial.distance import pdist

from focalnet_jax.evaluation.localization import MIN_SCORE, RADIUS_MM, Detections, local_maxima
from focalnet_jax.evaluation.predictions import CasePredictions

ROC_DETECTIONS = 12
SLICE_MODES = ("all", "annotated")
# Distances are compared with a tolerance so that a point exactly 5 mm away (e.g. 8 pixels of
# 0.625 mm) hits despite floating-point rounding in the distance transform.
_DISTANCE_TOL_MM = 1e-6


@dataclasses.dataclass(frozen=True)
class CaseSummary:
    """What the evaluation keeps of one case.

    lesion_classes, lesion_present, lesion_diameter_mm, lesion_score, lesion_grade_known: `[L]`
      per lesion instance (`lesion_score` = highest s1 of the detections hitting it, -inf when
      none; lesions without any ROI pixel in the predictions are not present and not counted;
      `lesion_grade_known` False: clinically significant of unknown grade, class 2).
    detection_scores: float32 `[D]` s1 of every detection; fp_scores: s1 of those hitting no lesion.
    roc_scores float32 `[R, 5]`, roc_classes int32 `[R]`, roc_grade_known bool `[R]`: the R <= 12
      highest detections, their P(class >= k), the true class at their pixel and whether that
      class is known exactly (False on a lesion of unknown grade).
    detections: the localisation points; num_slices: slices evaluated.
    """

    case_id: str
    patient_id: str
    lesion_classes: np.ndarray
    lesion_present: np.ndarray
    lesion_diameter_mm: np.ndarray
    lesion_score: np.ndarray
    detection_scores: np.ndarray
    fp_scores: np.ndarray
    roc_scores: np.ndarray
    roc_classes: np.ndarray
    detections: Detections
    num_slices: int
    lesion_grade_known: np.ndarray
    roc_grade_known: np.ndarray


def _margin(spacing, radius_mm: float) -> np.ndarray:
    """Pixels beyond which every point is farther than radius_mm from a box."""
    return np.ceil(radius_mm / np.asarray(spacing, np.float64)).astype(int) + 1


def lesion_hits(
    detections: Detections,
    lesions: np.ndarray,
    spacing,
    num_lesions: int,
    *,
    radius_mm: float = RADIUS_MM,
) -> np.ndarray:
    """bool `[D, L]`: detection d hits lesion l (same slice, in-plane distance <= radius_mm).

    One Euclidean distance transform in mm (`sampling=spacing`) per (lesion, slice) that carries
    detections, over the lesion's box grown by radius_mm.
    """
    spacing = np.asarray(spacing, np.float64)
    hits = np.zeros((len(detections), num_lesions), bool)
    if not len(detections) or num_lesions == 0:
        return hits
    height, width = lesions.shape[1:]
    margin = _margin(spacing, radius_mm)
    for lesion_id, box in enumerate(ndimage.find_objects(lesions, max_label=num_lesions), 1):
        if box is None:
            continue
        r0, r1 = max(box[1].start - margin[0], 0), min(box[1].stop + margin[0], height)
        c0, c1 = max(box[2].start - margin[1], 0), min(box[2].stop + margin[1], width)
        near = (
            (detections.slice >= box[0].start)
            & (detections.slice < box[0].stop)
            & (detections.row >= r0)
            & (detections.row < r1)
            & (detections.col >= c0)
            & (detections.col < c1)
        )
        for z in np.unique(detections.slice[near]):
            roi = lesions[z, r0:r1, c0:c1] == lesion_id
            if not roi.any():
                continue
            index = np.nonzero(near & (detections.slice == z))[0]
            distance = ndimage.distance_transform_edt(~roi, sampling=spacing)
            d = distance[detections.row[index] - r0, detections.col[index] - c0]
            hits[index, lesion_id - 1] = d <= radius_mm + _DISTANCE_TOL_MM
    return hits


def lesion_diameters(lesions: np.ndarray, spacing, num_lesions: int) -> np.ndarray:
    """float64 `[L]`: largest in-plane diameter (mm) of each lesion over its slices, between pixel
    centres (0 for one pixel, or for an id without pixels)."""
    spacing = np.asarray(spacing, np.float64)
    diameters = np.zeros(num_lesions)
    for lesion_id, box in enumerate(ndimage.find_objects(lesions, max_label=num_lesions), 1):
        if box is None:
            continue
        roi = lesions[box] == lesion_id
        # The farthest pair of pixels lies on the boundary, which keeps pdist small.
        edge = roi & ~ndimage.binary_erosion(roi, structure=np.ones((1, 3, 3), bool))
        for z in range(edge.shape[0]):
            points = np.argwhere(edge[z]) * spacing
            if len(points) > 1:
                diameters[lesion_id - 1] = max(diameters[lesion_id - 1], pdist(points).max())
    return diameters


def summarize_case(
    case: CasePredictions,
    *,
    radius_mm: float = RADIUS_MM,
    min_score: float = MIN_SCORE,
    roc_detections: int = ROC_DETECTIONS,
    slices: str = "all",
    localize=local_maxima,
) -> CaseSummary:
    """Localises, matches and reduces one case (see `CaseSummary`).

    `slices='annotated'` keeps only the detections on slices holding a lesion ROI (the paper's
    validation setting); `'all'` keeps every slice. `localize`: the detection rule, a function
    like `local_maxima` (benchmarks pass former rules to compare).
    """
    if slices not in SLICE_MODES:
        raise ValueError(f"slices={slices!r}: expected one of {SLICE_MODES}")
    num_lesions = int(case.lesion_classes.size)
    detections = localize(case.scores, case.spacing, radius_mm=radius_mm, min_score=min_score)
    num_slices = case.lesions.shape[0]
    if slices == "annotated":
        annotated = (case.lesions > 0).any(axis=(1, 2))
        keep = annotated[detections.slice]
        detections = dataclasses.replace(
            detections,
            **{
                f.name: getattr(detections, f.name)[keep]
                for f in dataclasses.fields(detections)
                if getattr(detections, f.name) is not None
            },
        )
        num_slices = int(annotated.sum())
    hits = lesion_hits(detections, case.lesions, case.spacing, num_lesions, radius_mm=radius_mm)
    s1 = detections.scores[:, 0]
    lesion_score = np.where(hits, s1[:, None], -np.inf).max(axis=0, initial=-np.inf)
    present = np.bincount(case.lesions.reshape(-1), minlength=num_lesions + 1)[1:] > 0
    top = slice(0, roc_detections)
    roc_lesions = case.lesions[detections.slice[top], detections.row[top], detections.col[top]]
    roc_classes = np.concatenate([[0], case.lesion_classes])[roc_lesions]
    roc_grade_known = np.concatenate([[True], case.grade_known])[roc_lesions]
    return CaseSummary(
        case_id=case.case_id,
        patient_id=case.patient_id,
        lesion_classes=case.lesion_classes.astype(np.int32),
        lesion_present=present,
        lesion_diameter_mm=lesion_diameters(case.lesions, case.spacing, num_lesions),
        lesion_score=lesion_score,
        detection_scores=s1.astype(np.float32),
        fp_scores=s1[~hits.any(axis=1)].astype(np.float32),
        roc_scores=detections.scores[top],
        roc_classes=roc_classes.astype(np.int32),
        detections=detections,
        num_slices=num_slices,
        lesion_grade_known=case.grade_known.astype(bool),
        roc_grade_known=roc_grade_known.astype(bool),
    )
