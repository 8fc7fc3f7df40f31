"""GS ROC (paper section II-E4; docs/evaluation.md): the 12 highest detections of each case,
mimicking a 12-core biopsy, scored for four binary tasks with the Mann-Whitney AUC."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from focalnet_jax.evaluation.matching import CaseSummary

# task name -> k: scores P(class >= k) and labels class >= k.
TASKS = {"gs_ge_7": 2, "gs_ge_4+3": 3, "gs_ge_8": 4, "gs_ge_9": 5}


def mann_whitney_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUC = P(score_pos > score_neg) + P(equal) / 2 via mid-ranks; NaN without positives or
    without negatives."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, bool)
    num_pos, num_neg = int(labels.sum()), int((~labels).sum())
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct score, from (0, 0) to (1, 1);
    empty arrays when a class is missing."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, bool)
    num_pos, num_neg = int(labels.sum()), int((~labels).sum())
    if num_pos == 0 or num_neg == 0:
        return np.zeros(0), np.zeros(0)
    thresholds = np.unique(scores)[::-1]
    pos = np.sort(scores[labels])
    neg = np.sort(scores[~labels])
    tpr = (pos.size - np.searchsorted(pos, thresholds, side="left")) / num_pos
    fpr = (neg.size - np.searchsorted(neg, thresholds, side="left")) / num_neg
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def gs_roc(summaries: Sequence[CaseSummary]) -> dict:
    """Per task: auc, num_positive, num_negative, num_unknown_grade, curve {fpr, tpr}, over the
    pooled top-12 detections of all cases.

    A detection on a lesion of unknown grade (class 2 meaning "GS >= 3+4") is a positive of
    `gs_ge_7` and left out of the tasks k >= 3, whose label it does not determine
    (`num_unknown_grade` counts them). A task whose detections hold one class only has auc NaN
    and `skipped` saying so."""
    scores = np.concatenate([s.roc_scores for s in summaries] or [np.zeros((0, 5))])
    classes = np.concatenate([s.roc_classes for s in summaries] or [np.zeros(0, np.int32)])
    known = np.concatenate([s.roc_grade_known for s in summaries] or [np.zeros(0, bool)])
    results = {}
    for task, k in TASKS.items():
        kept = known | (k <= 2)
        labels = classes[kept] >= k
        task_scores = scores[kept, k - 1]
        fpr, tpr = roc_curve(task_scores, labels)
        results[task] = {
            "auc": mann_whitney_auc(task_scores, labels),
            "num_positive": int(labels.sum()),
            "num_negative": int((~labels).sum()),
            "num_unknown_grade": int((~kept).sum()),
            "curve": {"fpr": fpr, "tpr": tpr},
        }
        if fpr.size == 0:  # the study report names such metrics and their cells
            results[task]["skipped"] = _undefined_reason(labels, k)
    return results


def _undefined_reason(labels: np.ndarray, k: int) -> str:
    """Why a task's AUC is undefined (its detections hold one class only, or none)."""
    if labels.size == 0:
        return "AUC undefined: no detection"
    if labels.any():
        return f"AUC undefined: every top-12 detection lies on a lesion of class >= {k}"
    return f"AUC undefined: no top-12 detection lies on a lesion of class >= {k}"
