"""PI-CAI bootstrap intervals against a reference computed here with scikit-learn, on per-case
detection results small enough to list; resampled by patient, a patient's exams together."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from focalnet_jax.evaluation.picai import picai_metrics


def twelve_cases():
    """Cases c0-c11: c0-c2 hold one lesion each (found with confidence 0.9, 0.5, 0.8), the
    others none but one false candidate each (0.1 .. 0.55, c9 at 0.6 above c1's lesion).
    picai_eval's per-case results: (is_lesion, confidence, overlap) rows and the case score."""
    results = {}
    for i, conf in enumerate([0.9, 0.5, 0.8]):
        results[f"c{i}"] = ([(1.0, conf, 0.5)], conf)
    for i, conf in enumerate([0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.6, 0.55, 0.15], start=3):
        results[f"c{i}"] = ([(0.0, conf, 0.0)], conf)
    return results


def reference_intervals(results, bootstraps, seed):
    """Case resamples drawn as the evaluation draws them (NumPy `default_rng(seed)`, `integers`
    over the sorted case ids, picai_eval's order), those without a positive or without a negative
    case drawn again; AUROC and AP by sklearn."""
    cases = sorted(results)
    target = np.array([max(r[0] for r in results[c][0]) for c in cases])
    score = np.array([results[c][1] for c in cases])
    rng = np.random.default_rng(seed)
    auroc, ap = [], []
    while len(auroc) < bootstraps:
        drawn = rng.integers(0, len(cases), len(cases))
        if target[drawn].all() or not target[drawn].any():
            continue
        auroc.append(roc_auc_score(target[drawn], score[drawn]))
        rows = [row for i in drawn for row in results[cases[i]][0]]
        ap.append(average_precision_score([r[0] for r in rows], [r[1] for r in rows]))
    return (
        np.percentile(auroc, [2.5, 97.5]),
        np.percentile(ap, [2.5, 97.5]),
        np.percentile((np.array(auroc) + np.array(ap)) / 2, [2.5, 97.5]),
    )


def test_intervals_leave_out_resamples_with_one_class():
    """3 positive cases of 12: (9/12)^12 = 3 % of resamples hold no positive case. Their AUROC is
    undefined (it made the AUROC and score intervals NaN) and their AP 0 (it pulled the AP
    interval down to 0): such resamples are drawn again."""
    results = twelve_cases()
    out = picai_metrics(results, bootstraps=300, seed=0)
    # Point estimate: positives 0.9, 0.5, 0.8 vs the 9 negatives: c1 (0.5) beats 7 (not 0.55, 0.6).
    assert out["auroc"] == pytest.approx((9 + 7 + 9) / 27)
    auroc, ap, score = reference_intervals(results, 300, seed=0)
    assert out["auroc_95_ci"] == pytest.approx(auroc.tolist())
    assert out["ap_95_ci"] == pytest.approx(ap.tolist())
    assert out["score_95_ci"] == pytest.approx(score.tolist())
    assert out["ap_95_ci"][0] > 0.3  # every resample has a lesion, found above most FPs
    assert out["bootstrap_resamples_redrawn"] > 0


def test_one_exam_per_patient_draws_as_the_case_bootstrap():
    """Where every patient has one exam the patient bootstrap is picai_eval's case bootstrap:
    the same resamples, the same intervals."""
    results = twelve_cases()
    by_case = picai_metrics(results, bootstraps=200, seed=3)
    by_patient = picai_metrics(
        results, patients={case: f"p-{case}" for case in results}, bootstraps=200, seed=3
    )
    assert by_patient == by_case
    assert by_case["bootstrap_patients"] == 12


def test_a_patients_exams_are_drawn_together():
    """Each of 12 patients has two identical exams. Drawn by patient, the 24 exams give exactly
    the intervals of the 12 single exams (a duplicated set has the same AUROC and AP); drawn by
    case, the duplicates count as independent evidence and the intervals come out narrower."""
    single = twelve_cases()
    double = {f"{case}-{exam}": r for case, r in single.items() for exam in ("a", "b")}
    patients = {exam: exam[:-2] for exam in double}
    clustered = picai_metrics(double, patients=patients, bootstraps=300, seed=1)
    assert clustered["bootstrap_patients"] == 12 and clustered["num_cases"] == 24
    # Patients come in the order of picai_eval's sorted case ids: c0-a c0-b c1-a ... as c0 c1 ...
    reference = picai_metrics(single, bootstraps=300, seed=1)
    for key in ("auroc_95_ci", "ap_95_ci", "score_95_ci"):
        assert clustered[key] == pytest.approx(reference[key])
    naive = picai_metrics(double, bootstraps=300, seed=1)
    assert naive["bootstrap_patients"] == 24
    width = [b - a for a, b in (clustered["score_95_ci"], naive["score_95_ci"])]
    assert width[1] < 0.85 * width[0]


def test_a_case_without_a_patient_id_is_refused():
    results = twelve_cases()
    patients = {case: "p" for case in results if case != "c5"}
    with pytest.raises(ValueError, match=r"no patient id for cases \['c5'\] \(1 in all\)"):
        picai_metrics(results, patients=patients, bootstraps=10)


def test_intervals_without_a_negative_case_are_null_with_the_reason():
    results = {c: r for c, r in twelve_cases().items() if c in ("c0", "c1", "c2")}
    out = picai_metrics(results, bootstraps=50, seed=0)
    assert out["auroc_95_ci"] is None and out["score_95_ci"] is None
    assert out["bootstrap_error"] == "every one of the 3 cases is positive"
    # The AUROC (and with it the score) is NaN, named with its reason; the AP is defined.
    assert np.isnan(out["auroc"]) and out["ap"] == pytest.approx(1.0)
    reason = "AUROC undefined: every one of the 3 cases has a clinically significant lesion"
    assert out["undefined"] == {"auroc": reason, "score": reason}


def test_ap_without_a_lesion_is_undefined_not_zero():
    """No clinically significant lesion: recall, hence AP, is undefined. picai_eval's AP is 0 with
    candidates (scikit-learn sets the recall to 1 everywhere) and raises without any; both used to
    reach metrics.json (an AP of 0 entered the study means and tests)."""
    with_candidates = {"c0": ([(0.0, 0.7, 0.0)], 0.7), "c1": ([(0.0, 0.2, 0.0)], 0.2)}
    without_candidates = {"c0": ([], 0.0), "c1": ([], 0.0)}
    for results in (with_candidates, without_candidates):
        out = picai_metrics(results, bootstraps=0)
        assert (out["num_lesions"], out["num_positive_cases"], out["num_cases"]) == (0, 0, 2)
        assert np.isnan(out["auroc"]) and np.isnan(out["ap"]) and np.isnan(out["score"])
        auroc = "AUROC undefined: no case has a clinically significant lesion"
        ap = "AP undefined: no clinically significant lesion"
        assert out["undefined"] == {"auroc": auroc, "ap": ap, "score": auroc}


def test_point_estimates_equal_scikit_learn():
    """AUROC of the case scores, AP of the lesion rows and their mean (picai_eval's score)."""
    results = twelve_cases()
    out = picai_metrics(results, bootstraps=0)
    rows = [row for case in sorted(results) for row in results[case][0]]
    ap = average_precision_score([r[0] for r in rows], [r[1] for r in rows])
    assert out["ap"] == pytest.approx(ap)
    assert out["score"] == pytest.approx(((9 + 7 + 9) / 27 + ap) / 2)
    assert "undefined" not in out
