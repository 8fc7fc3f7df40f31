"""FROC analysis (paper section II-E3; docs/evaluation.md): curves per lesion group and their
summaries.

At threshold t a lesion is detected when a detection with s1 >= t hits it; a detection with
s1 >= t that hits no lesion of any class is a false positive. Sensitivity(t) = detected lesions of
the group / lesions of the group; FP per patient(t) = false positives / patients evaluated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from focalnet_jax.evaluation.matching import CaseSummary

GROUPS = ("all", "clinically_significant", "index", "gs_3+3", "gs_3+4", "gs_4+3", "gs_8+")
SENSITIVITY_AT_FP = (0.25, 0.5, 1.0, 2.0, 3.0)
FP_AT_SENSITIVITY = (0.6, 0.7, 0.8, 0.9)
PAUC_RANGES = ((0.01, 1.0), (0.1, 3.0))
_SENS_TOL = 1e-12


@dataclasses.dataclass(frozen=True)
class LesionTable:
    """Every present lesion of an evaluation, flattened over cases: `classes` int32 `[N]`,
    `scores` float64 `[N]` (highest hitting s1, -inf when never hit), `index` bool `[N]`,
    `grade_known` bool `[N]` (False: clinically significant of unknown grade, class 2)."""

    classes: np.ndarray
    scores: np.ndarray
    index: np.ndarray
    grade_known: np.ndarray

    def group(self, name: str) -> np.ndarray:
        """bool `[N]`: lesions of group `name` (one of `GROUPS`). A lesion of unknown grade is in
        `all`, `clinically_significant` and possibly `index`, never in a GS group: its GS is not
        known to be 3+4."""
        c, known = self.classes, self.grade_known
        masks = {
            "all": np.ones_like(c, bool),
            "clinically_significant": c >= 2,
            "index": self.index,
            "gs_3+3": known & (c == 1),
            "gs_3+4": known & (c == 2),
            "gs_4+3": known & (c == 3),
            "gs_8+": known & (c >= 4),
        }
        if name not in masks:
            raise ValueError(f"unknown lesion group {name!r}; expected one of {GROUPS}")
        return masks[name]


def lesion_table(summaries: Sequence[CaseSummary]) -> LesionTable:
    """Flattens the present lesions of all cases and marks each patient's index lesion: the highest
    class, ties broken by the largest in-plane diameter, then by case order and lesion id."""
    classes, scores, diameters, patients, known = [], [], [], [], []
    for summary in summaries:
        present = summary.lesion_present
        classes.append(summary.lesion_classes[present])
        known.append(summary.lesion_grade_known[present])
        scores.append(summary.lesion_score[present])
        diameters.append(summary.lesion_diameter_mm[present])
        patients += [summary.patient_id] * int(present.sum())
    classes = np.concatenate(classes or [np.zeros(0, np.int32)]).astype(np.int32)
    scores = np.concatenate(scores or [np.zeros(0)]).astype(np.float64)
    diameters = np.concatenate(diameters or [np.zeros(0)])
    known = np.concatenate(known or [np.zeros(0, bool)]).astype(bool)
    patient_codes = np.unique(np.asarray(patients, dtype=object), return_inverse=True)[1]
    # Sort by patient, then class and diameter descending, then original position: the first row
    # of each patient is its index lesion.
    order = np.lexsort((np.arange(classes.size), -diameters, -classes, patient_codes))
    first = np.ones(order.size, bool)
    first[1:] = patient_codes[order][1:] != patient_codes[order][:-1]
    index = np.zeros(classes.size, bool)
    index[order[first]] = True
    return LesionTable(classes=classes, scores=scores, index=index, grade_known=known)


def froc_curve(
    lesion_scores: np.ndarray,
    fp_scores: np.ndarray,
    detection_scores: np.ndarray,
    num_patients: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FROC points at every distinct detection score, in order of decreasing threshold.

    Args:
      lesion_scores: `[N]` highest hitting s1 of each lesion of the group (-inf: never hit).
      fp_scores: `[F]` s1 of the detections that hit no lesion.
      detection_scores: `[D]` s1 of all detections (the thresholds).
      num_patients: patients evaluated (lesion-free ones included).
    Returns:
      (threshold, fp_per_patient, sensitivity), each `[P]`, one point per distinct detection
      score. Sensitivity is NaN when the group has no lesion.
    """
    if num_patients <= 0:
        raise ValueError(f"num_patients must be positive, got {num_patients}")
    thresholds = np.unique(np.asarray(detection_scores, np.float64))[::-1]
    fp_sorted = np.sort(np.asarray(fp_scores, np.float64))
    lesion_sorted = np.sort(np.asarray(lesion_scores, np.float64))
    num_fp = fp_sorted.size - np.searchsorted(fp_sorted, thresholds, side="left")
    num_hit = lesion_sorted.size - np.searchsorted(lesion_sorted, thresholds, side="left")
    fp = num_fp / num_patients
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = num_hit / lesion_sorted.size if lesion_sorted.size else np.full(fp.shape, np.nan)
    return thresholds, fp, sens


def sensitivity_at(fp: np.ndarray, sens: np.ndarray, x) -> np.ndarray:
    """S(x): the highest sensitivity of any curve point with FP <= x (0 where there is none)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(fp, kind="stable")
    best = np.maximum.accumulate(np.concatenate([[0.0], sens[order]]))
    return best[np.searchsorted(fp[order], x, side="right")]


def fp_at_sensitivity(fp: np.ndarray, sens: np.ndarray, s: float) -> float | None:
    """The lowest curve FP per patient whose sensitivity >= s; None if never reached."""
    reached = sens >= s - _SENS_TOL
    return float(fp[reached].min()) if reached.any() else None


def partial_auc(fp: np.ndarray, sens: np.ndarray, low: float, high: float) -> float:
    """Exact integral of the step function S over [low, high] FP per patient (linear axis)."""
    knots = np.unique(fp[(fp > low) & (fp < high)])
    edges = np.concatenate([[low], knots, [high]])
    return float(np.sum(sensitivity_at(fp, sens, edges[:-1]) * np.diff(edges)))


def froc_summary(fp: np.ndarray, sens: np.ndarray, num_lesions: int) -> dict:
    """Sensitivity at FP, FP at sensitivity and partial AUCs (contract keys); None without
    lesions."""
    defined = num_lesions > 0
    return {
        "sensitivity_at_fp": {
            contract_key(x): float(sensitivity_at(fp, sens, x)) if defined else None
            for x in SENSITIVITY_AT_FP
        },
        "fp_at_sensitivity": {
            contract_key(s): fp_at_sensitivity(fp, sens, s) if defined else None
            for s in FP_AT_SENSITIVITY
        },
        "pauc": {
            f"{contract_key(a)}-{contract_key(b)}": partial_auc(fp, sens, a, b) if defined else None
            for a, b in PAUC_RANGES
        },
    }


def contract_key(value: float) -> str:
    """Contract key spelling: 0.25 -> "0.25", 1.0 -> "1"."""
    return f"{value:g}"


def count_patients(summaries: Sequence[CaseSummary]) -> int:
    """Patients evaluated: those with at least one evaluated slice (lesion-free ones included)."""
    return len({s.patient_id for s in summaries if s.num_slices > 0})


def froc_analysis(summaries: Sequence[CaseSummary], num_patients: int | None = None) -> dict:
    """Per group: curve (threshold, fp, sensitivity), num_lesions, num_patients (the FP
    denominator, the same for every group) and the summaries."""
    table = lesion_table(summaries)
    if num_patients is None:
        num_patients = count_patients(summaries)
    fp_scores = np.concatenate([s.fp_scores for s in summaries] or [np.zeros(0)])
    detection_scores = np.concatenate([s.detection_scores for s in summaries] or [np.zeros(0)])
    results = {}
    for group in GROUPS:
        mask = table.group(group)
        threshold, fp, sens = froc_curve(
            table.scores[mask], fp_scores, detection_scores, num_patients
        )
        results[group] = {
            "num_lesions": int(mask.sum()),
            "num_patients": int(num_patients),
            **froc_summary(fp, sens, int(mask.sum())),
            "curve": {"threshold": threshold, "fp": fp, "sensitivity": sens},
        }
    return results
