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
    """Per task: auc, num_positive, num_negative, curve {fpr, tpr}, over the pooled top-12
    detections of all cases."""
    scores = np.concatenate([s.roc_scores for s in summaries] or [np.zeros((0, 5))])
    classes = np.concatenate([s.roc_classes for s in summaries] or [np.zeros(0, np.int32)])
    results = {}
    for task, k in TASKS.items():
        labels = classes >= k
        fpr, tpr = roc_curve(scores[:, k - 1], labels)
        results[task] = {
            "auc": mann_whitney_auc(scores[:, k - 1], labels),
            "num_positive": int(labels.sum()),
            "num_negative": int((~labels).sum()),
            "curve": {"fpr": fpr, "tpr": tpr},
        }
    return results
