"""GS ROC: the 12 highest detections per case and the Mann-Whitney AUC, by hand."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from focalnet_jax.evaluation.matching import summarize_case
from focalnet_jax.evaluation.predictions import CasePredictions
from focalnet_jax.evaluation.roc import gs_roc, mann_whitney_auc, roc_curve

# One detection per slice at (7, 7); slice z has s1 = 0.95 - 0.05 z, so slice 12 is the 13th
# detection and is left out. True classes: slices 0-2 GS 3+4 (2), 3-4 GS 8 (4), 5 GS 9 (5),
# 6-12 none.
P2 = [0.8, 0.6, 0.6, 0.9, 0.7, 0.5, 0.6, 0.3, 0.2, 0.6, 0.1, 0.4, 0.99]
P4 = [0.2, 0.1, 0.3, 0.7, 0.3, 0.6, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.9]
P5 = [0.1, 0.1, 0.1, 0.4, 0.3, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def thirteen_detections_case():
    scores = np.zeros((13, 20, 20, 5), np.float32)
    lesions = np.zeros((13, 20, 20), np.int32)
    lesions[0:3, 5:10, 5:10] = 1
    lesions[3:5, 5:10, 5:10] = 2
    lesions[5, 5:10, 5:10] = 3
    for z in range(13):
        scores[z, 7, 7] = [0.95 - 0.05 * z, P2[z], P4[z], P4[z], P5[z]]
    return CasePredictions(
        case_id="case",
        patient_id="p",
        scores=scores,
        lesions=lesions,
        lesion_classes=np.array([2, 4, 5], np.int32),
        spacing=np.array([1.0, 1.0]),
    )


def test_gs_roc_equals_hand_mann_whitney():
    summary = summarize_case(thirteen_detections_case())
    assert summary.roc_classes.tolist() == [2, 2, 2, 4, 4, 5, 0, 0, 0, 0, 0, 0]
    roc = gs_roc([summary])
    # GS >= 7: positives (slices 0-5) 0.8 0.6 0.6 0.9 0.7 0.5, negatives 0.6 0.3 0.2 0.6 0.1 0.4.
    # Negatives below (+ half the ties) each positive: 6, 4 + 1, 4 + 1, 6, 6, 4 = 32 of 36 pairs.
    assert roc["gs_ge_7"]["auc"] == pytest.approx(32 / 36)
    assert (roc["gs_ge_7"]["num_positive"], roc["gs_ge_7"]["num_negative"]) == (6, 6)
    # GS >= 8: positives 0.7 0.3 0.6; negatives 0.2 0.1 0.3 and six 0.05: 9 + 8.5 + 9 of 27.
    assert roc["gs_ge_8"]["auc"] == pytest.approx(26.5 / 27)
    assert roc["gs_ge_4+3"]["auc"] == pytest.approx(26.5 / 27)
    # GS >= 9: positive 0.3; negatives 0.1 x3, 0.4, 0.3, 0.0 x6: 9 below, one tie: 9.5 of 11.
    assert roc["gs_ge_9"]["auc"] == pytest.approx(9.5 / 11)


def test_mann_whitney_matches_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(40), 1)
    labels = rng.random(40) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert mann_whitney_auc(scores, labels) == pytest.approx(pairs / (pos.size * neg.size))


def test_degenerate_tasks_are_nan_and_curve_runs_corner_to_corner():
    assert np.isnan(mann_whitney_auc([0.1, 0.2], [True, True]))
    assert np.isnan(mann_whitney_auc([0.1, 0.2], [False, False]))
    fpr, tpr = roc_curve([0.9, 0.5, 0.5, 0.1], [True, True, False, False])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    # No detections at all: every task is NaN.
    empty = gs_roc([])
    assert all(np.isnan(empty[task]["auc"]) for task in empty)


def test_detections_on_a_lesion_of_unknown_grade_only_count_for_gs_ge_7():
    # Lesion 1 (slices 0-2, class 2) is csPCa of unknown grade (PI-CAI label 1): a positive of
    # GS >= 7 (unchanged: 32/36), left out of the three tasks k >= 3.
    case = dataclasses.replace(
        thirteen_detections_case(), lesion_grade_known=np.array([False, True, True])
    )
    roc = gs_roc([summarize_case(case)])
    assert roc["gs_ge_7"]["auc"] == pytest.approx(32 / 36)
    assert roc["gs_ge_7"]["num_unknown_grade"] == 0
    # GS >= 8: positives 0.7 0.3 0.6 (slices 3-5); negatives six 0.05 (slices 6-11): 18 of 18.
    # (Taking the unknown grade for 3+4 adds negatives 0.2 0.1 0.3: 26.5 of 27.)
    for task in ("gs_ge_4+3", "gs_ge_8"):
        assert roc[task]["auc"] == pytest.approx(1.0)
        assert (roc[task]["num_positive"], roc[task]["num_negative"]) == (3, 6)
        assert roc[task]["num_unknown_grade"] == 3
    # GS >= 9: positive 0.3 (slice 5); negatives 0.4, 0.3 (slices 3, 4), six 0.0: 6.5 of 8.
    assert roc["gs_ge_9"]["auc"] == pytest.approx(6.5 / 8)


def test_the_mean_roc_band_follows_each_fold_staircase():
    """`summarize`'s ROC band reads each fold's curve at a grid of false-positive rates. Scores
    0.9 0.7 0.5 0.3 with labels 1 0 1 0: the curve (0,0) (0,.5) (.5,.5) (.5,1) (1,1), AUC 0.75.
    Interpolating between the tops of its vertical segments drew (0,.5)-(.5,1) as a diagonal:
    0.75 at FPR 0.25 and an area of 0.875 under the plotted curve."""
    from focalnet_jax.evaluation.summary import FPR_GRID, roc_at

    fpr, tpr = roc_curve(np.array([0.9, 0.7, 0.5, 0.3]), np.array([1, 0, 1, 0], bool))
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    at = roc_at(fpr, tpr, np.array([0.0, 0.25, 0.5, 0.75, 1.0]))
    np.testing.assert_allclose(at, [0.5, 0.5, 1.0, 1.0, 1.0])  # tops of the vertical segments
    curve = roc_at(fpr, tpr, FPR_GRID)
    area = float(np.sum((curve[1:] + curve[:-1]) / 2 * np.diff(FPR_GRID)))
    assert area == pytest.approx(0.75, abs=1 / 200)  # one grid step at the rise: 0.75 + 0.0025
    # Ties: a diagonal segment (a positive and a negative scored alike) stays a diagonal.
    fpr, tpr = roc_curve(np.array([0.9, 0.5, 0.5]), np.array([1, 1, 0], bool))
    np.testing.assert_allclose(roc_at(fpr, tpr, np.array([0.0, 0.5, 1.0])), [0.5, 0.75, 1.0])
