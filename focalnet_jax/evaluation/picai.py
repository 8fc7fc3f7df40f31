"""PI-CAI metrics (case AUROC, lesion AP, ranking score) from 3D detection maps, with `picai_eval`.

This is PI-CAI's protocol, reported beside the paper's and never mixed with it: the csPCa score
P(class >= 2) over every slice of a case's crop becomes a 3D map, lesion candidates are extracted
with `report_guided_annotation.extract_lesion_candidates` (dynamic-fast threshold, as the PI-CAI
baselines), and candidates are matched to the clinically significant lesions (class >= 2) by 3D
overlap (IoU >= 0.1) with `picai_eval.eval.evaluate_case`. The per-case results are aggregated into
`picai_eval.Metrics` exactly as `picai_eval.evaluate` does, one case at a time, so that no set of
3D maps is ever held in memory.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping

import numpy as np

from focalnet_jax.evaluation.detection_map import import_picai, lesion_candidates
from focalnet_jax.evaluation.predictions import CasePredictions

log = logging.getLogger(__name__)

MIN_OVERLAP = 0.1


def available() -> str | None:
    """None when picai_eval can be used, else the reason it cannot."""
    try:
        import_picai()
    except ImportError as error:
        return f"picai_eval is not installed ({error}); install the 'picai' extra"
    return None


def volume_reason(case: CasePredictions) -> str | None:
    """None when the case's slices form a volume (consecutive source slices), else why not."""
    if case.slice_index is not None and np.any(np.diff(case.slice_index) != 1):
        return f"{case.case_id}: slices {case.slice_index.tolist()} are not consecutive"
    return None


def store_reason(models) -> str | None:
    """None unless the predictions' `models.json` (`models`) names a store that keeps only the
    annotated slices (`preprocess --slices annotated`), else why the 3D protocol cannot score
    them: each case is then a few slices of its volume (the others' candidates never counted),
    and its lesion-free cases are not in the store."""
    store = models.get("store") if isinstance(models, Mapping) else None  # any JSON, by hand
    if isinstance(store, Mapping) and store.get("slices") == "annotated":
        return (
            f"the predictions hold only the annotated slices of store {store.get('path')} (made "
            "with --slices annotated, its lesion-free cases left out): the 3D protocol needs "
            "every slice of every case; predict from a store made with --slices all"
        )
    return None


def case_label(case: CasePredictions) -> np.ndarray:
    """int32 `[S, H, W]`: 1 on clinically significant lesions (class >= 2), else 0."""
    return (case.classes >= 2).astype(np.int32)


def evaluate_case(case: CasePredictions, *, min_overlap: float = MIN_OVERLAP) -> tuple:
    """picai_eval's per-case result: (list of (is_lesion, confidence, overlap), case confidence)."""
    _, picai_evaluate_case, _, _ = import_picai()
    y_det = lesion_candidates(case.scores[..., 1])
    lesion_results, confidence, _, _ = picai_evaluate_case(
        y_det=y_det, y_true=case_label(case), min_overlap=min_overlap
    )
    return [tuple(map(float, r)) for r in lesion_results], float(confidence)


def picai_metrics(
    case_results: Mapping[str, tuple],
    *,
    patients: Mapping[str, str] | None = None,
    bootstraps: int = 1000,
    seed: int = 0,
    min_overlap: float = MIN_OVERLAP,
) -> dict:
    """Case AUROC, lesion AP and ranking score (AUROC + AP) / 2 of `picai_eval.Metrics`, with 95 %
    bootstrap intervals over patients (`bootstraps` = 0 skips them; `patients`: case id ->
    patient id, a patient's exams drawn together; None: each case its own patient); NaN where
    undefined: the AUROC without a positive or a negative case, the AP without a lesion
    (picai_eval gives 0 there, or fails when no case has a candidate either), each named with its
    reason in `undefined`."""
    _, _, Metrics, version = import_picai()
    lesion_results = {case: list(results) for case, (results, _) in case_results.items()}
    metrics = Metrics(
        lesion_results=lesion_results,
        case_target={
            case: int(max((r[0] for r in results), default=0))
            for case, results in lesion_results.items()
        },
        case_pred={case: conf for case, (_, conf) in case_results.items()},
        case_weight={case: 1.0 for case in case_results},
        lesion_weight={case: [1.0] * len(results) for case, results in lesion_results.items()},
    )
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        # sklearn warns (and returns NaN) when a set has only one class.
        warnings.simplefilter("ignore")
        num_lesions = int(metrics.num_lesions)
        auroc = float(metrics.auroc)
        ap = float(metrics.AP) + 0.0 if num_lesions else float("nan")  # its sum can give -0.0
        out = {
            "auroc": auroc,
            "ap": ap,
            "score": (auroc + ap) / 2,  # as Metrics.score
            "num_cases": int(metrics.num_cases),
            "num_lesions": num_lesions,
            "num_positive_cases": int(sum(metrics.case_target.values())),
        }
        if undefined := _undefined_reasons(out):
            out["undefined"] = undefined
        if bootstraps > 0:
            out.update(_bootstrap_intervals(metrics, bootstraps, seed, patients))
    out.update(
        {
            "picai_eval_version": str(version),
            "protocol": "3D lesion candidates (extract_lesion_candidates, dynamic-fast) of "
            f"P(class >= 2), matched to class >= 2 lesions by IoU >= {min_overlap:g}",
        }
    )
    return out


def _undefined_reasons(out: Mapping) -> dict[str, str]:
    """{metric: why it is NaN} for the AUROC, AP and score of `picai_metrics`' result."""
    reasons = {}
    positive, cases = out["num_positive_cases"], out["num_cases"]
    if positive in (0, cases):
        which = "no case has" if positive == 0 else f"every one of the {cases} cases has"
        reasons["auroc"] = f"AUROC undefined: {which} a clinically significant lesion"
    if out["num_lesions"] == 0:
        reasons["ap"] = "AP undefined: no clinically significant lesion"
    if reasons:
        reasons["score"] = reasons.get("auroc", reasons.get("ap"))
    return reasons


def _bootstrap_intervals(
    metrics, bootstraps: int, seed: int, patients: Mapping[str, str] | None
) -> dict:
    """95 % percentile intervals of AUROC, AP and ranking score over `bootstraps` resamples of
    the patients, each drawn patient bringing all of its exams (`patients`: case id -> patient
    id; None: one case, one patient).

    As picai_eval's `Metrics.bootstrap_score_ci` (its AUROC and AP of each resample,
    `np.percentile` 2.5 and 97.5), which draws cases: two exams of one patient (a repeat study)
    are not independent, and drawing them apart gives intervals too narrow. Where every patient
    has one exam the draws are picai_eval's (the same resamples as drawing cases). A resample
    without a positive or without a negative case is drawn again, as picai_eval's own matched
    bootstrap does: there the AUROC is NaN, which made the whole AUROC and score intervals NaN,
    and the AP of a resample without lesions is 0, which dragged the AP interval down to 0.
    `bootstrap_resamples_redrawn` counts them. Intervals are null, with the reason, when the
    evaluation itself has no positive or no negative case.
    """
    cases = list(metrics.subject_list)
    positive = np.array([bool(metrics.case_target[c]) for c in cases])
    groups = _patient_groups(cases, patients)
    out = {"bootstraps": int(bootstraps), "bootstrap_patients": len(groups)}
    if positive.all() or not positive.any():
        reason = (
            f"every one of the {len(cases)} cases is {'positive' if positive.any() else 'negative'}"
        )
        log.warning("PI-CAI bootstrap intervals not computed: %s", reason)
        return (
            out
            | {"bootstrap_error": reason}
            | {key: None for key in ("auroc_95_ci", "ap_95_ci", "score_95_ci")}
        )
    rng = np.random.default_rng(seed)
    auroc, ap, redrawn = [], [], 0
    while len(auroc) < bootstraps:
        drawn = np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])
        if positive[drawn].all() or not positive[drawn].any():
            redrawn += 1
            continue
        sample = [cases[i] for i in drawn]
        auroc.append(metrics.calc_auroc(subject_list=sample))
        ap.append(metrics.calc_AP(subject_list=sample))
    score = (np.asarray(auroc) + np.asarray(ap)) / 2
    return out | {
        "auroc_95_ci": [float(v) for v in np.percentile(auroc, [2.5, 97.5])],
        "ap_95_ci": [float(v) + 0.0 for v in np.percentile(ap, [2.5, 97.5])],
        "score_95_ci": [float(v) for v in np.percentile(score, [2.5, 97.5])],
        "bootstrap_resamples_redrawn": redrawn,
    }


def _patient_groups(cases: list[str], patients: Mapping[str, str] | None) -> list[np.ndarray]:
    """Indices into `cases` of each patient's exams, patients in the order of their first case
    (one group per case where `patients` is None); a case without a patient id is an error."""
    if patients is None:
        return [np.array([i]) for i in range(len(cases))]
    if missing := [case for case in cases if case not in patients]:
        raise ValueError(f"no patient id for cases {missing[:5]} ({len(missing)} in all)")
    groups: dict[str, list[int]] = {}
    for i, case in enumerate(cases):
        groups.setdefault(patients[case], []).append(i)
    return [np.array(group) for group in groups.values()]
