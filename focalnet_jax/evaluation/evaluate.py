"""`focalnet evaluate --predictions DIR --out DIR`: streams the contract files of one evaluation
(typically one validation fold) through localisation, FROC, GS ROC and PI-CAI metrics, then writes
`metrics.json`, `report.md` and the PNG figures."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from focalnet_jax.data.atomic_files import replaced_outputs
from focalnet_jax.errors import UserError
from focalnet_jax.evaluation import figures, picai
from focalnet_jax.evaluation.froc import count_patients, froc_analysis
from focalnet_jax.evaluation.localization import MIN_SCORE, RADIUS_MM, check_detection_settings
from focalnet_jax.evaluation.matching import (
    ROC_DETECTIONS,
    CaseSummary,
    lesion_hits,
    summarize_case,
)
from focalnet_jax.evaluation.predictions import MODELS_FILE, list_cases, read_case
from focalnet_jax.evaluation.report import ROC_TITLES, json_safe, markdown_report, write_json
from focalnet_jax.evaluation.roc import gs_roc

log = logging.getLogger(__name__)

FROC_PANELS = (
    ("Index lesions", "index"),
    ("Clinically significant lesions", "clinically_significant"),
    ("All lesions", "all"),
)
GS_PANELS = (("GS 3+3", "gs_3+3"), ("GS 3+4", "gs_3+4"), ("GS 4+3", "gs_4+3"), ("GS >= 8", "gs_8+"))
# Every figure `write_figures` may write: an evaluation removes those of an earlier one in its
# output folder before writing its metrics, so no figure is left beside numbers it does not show.
FIGURE_FILES = ("froc.png", "froc_gs.png", "roc.png", "montage.png")
OUTPUT_FILES = ("metrics.json", "report.md", *FIGURE_FILES)  # what an evaluation writes in OUT


def _warn_without_case_list(predictions_dir: str | Path, found: int) -> None:
    """Without a case list, a missing prediction file would go unnoticed: say so."""
    log.warning(
        "no case list: evaluating the %d <case_id>.npz file(s) found in %s "
        "(a missing case would go unnoticed; --cases FILE names the expected ones)",
        found,
        predictions_dir,
    )


def _read_and_summarize(paths, settings: dict, with_picai: bool, models: dict):
    """Each case's `CaseSummary` (`settings`: summarize_case's keywords), whether it holds images,
    its PI-CAI detection results, and why PI-CAI is skipped (None where it is not; then the
    results hold every case). `models`: the predictions' `models.json`, or {}."""
    picai_skipped = picai.available() if with_picai else "disabled (--no-picai)"
    if picai_skipped is None:
        picai_skipped = picai.store_reason(models)
    summaries: list[CaseSummary] = []
    picai_results: dict[str, tuple] = {}
    has_images: list[bool] = []
    for path in paths:
        case = read_case(path)
        try:
            summaries.append(summarize_case(case, **settings))
        except UserError as error:  # e.g. a spacing too coarse for radius_mm: name the file
            raise UserError(f"{path}: {error}") from error
        has_images.append(case.t2w is not None)
        if picai_skipped is None:
            picai_skipped = picai.volume_reason(case)
        if picai_skipped is None:
            picai_results[case.case_id] = picai.evaluate_case(case)
    return summaries, has_images, picai_results, picai_skipped


def _paper_metrics(summaries: list[CaseSummary], settings: dict, predictions_dir) -> dict:
    """The paper protocol's counts, FROC and GS ROC over the cases' evaluated slices; a UserError
    where no slice is evaluated."""
    num_patients = count_patients(summaries)
    if num_patients == 0:
        raise UserError(
            f"{predictions_dir}: no slice to evaluate with slices={settings['slices']!r}"
        )
    return {
        "num_patients": num_patients,
        "num_cases": len(summaries),
        "cases": [s.case_id for s in summaries],
        "settings": settings,
        "froc": froc_analysis(summaries, num_patients),
        "roc": gs_roc(summaries),
        "wide_flat_maxima": _wide_flat_maxima(summaries, settings["radius_mm"]),
    }


def _wide_flat_maxima(summaries: list[CaseSummary], radius_mm: float) -> int:
    """The number of detections whose flat maximum reaches farther than `radius_mm` from their
    point, named in one warning: each is one detection at its centre (docs/evaluation.md), so a
    lesion under the far part of such a plateau (a saturated score map: s1 is 1.0 in float32 from
    a logit of 17) is missed by it, and the point may count as a false positive."""
    wide = [
        (float(d.reach_mm[i]), s.case_id, int(d.slice[i]))
        for s in summaries
        if (d := s.detections).reach_mm is not None
        for i in np.flatnonzero(d.reach_mm > radius_mm)
    ]
    if wide:
        reach, case, slice_ = max(wide)
        log.warning(
            "%d detection(s) stand for a flat maximum reaching more than %g mm from their point "
            "(farthest %.1f mm: case %s, slice %d): each is one detection at its centre, so a "
            "lesion under the far part of it is not hit by it (a saturated score map?)",
            len(wide), radius_mm, reach, case, slice_,
        )  # fmt: skip
    return len(wide)


def _picai_section(
    results: dict, skipped: str | None, summaries: list[CaseSummary], bootstraps: int, seed: int
) -> dict:
    """picai_eval's metrics of the cases' 3D detection results (intervals over patients), or
    why they were skipped."""
    if skipped is None:
        patients = {s.case_id: s.patient_id for s in summaries}
        return picai.picai_metrics(results, patients=patients, bootstraps=bootstraps, seed=seed)
    log.warning("PI-CAI metrics skipped: %s", skipped)
    return {"skipped": skipped}


def _models_record(predictions_dir: str | Path) -> dict:
    """{"models": ...} from the `models.json` beside the predictions (the runs and steps that made
    them: `ensemble.write_models`; another tool's, of any shape, is copied as it is), else {}; a
    `UserError` naming the file where it is not JSON."""
    path = Path(predictions_dir) / MODELS_FILE
    if not path.is_file():
        return {}
    try:
        return {"models": json.loads(path.read_text())}
    except (OSError, ValueError) as error:  # also not UTF-8 (UnicodeDecodeError)
        raise UserError(f"{path}: not a readable {MODELS_FILE} ({error})") from None


def evaluate_predictions(
    predictions_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    cases: Sequence[str] | None = None,
    radius_mm: float = RADIUS_MM,
    min_score: float = MIN_SCORE,
    roc_detections: int = ROC_DETECTIONS,
    with_picai: bool = True,
    picai_bootstraps: int = 1000,
    seed: int = 0,
    with_figures: bool = True,
    montage_cases: int = 6,
    label: str = "model",
    slices: str = "all",
) -> dict:
    """Evaluates the `<case_id>.npz` of `predictions_dir` for every case id of `cases` (a listed
    case without a file is an error naming it), or without `cases` every file found; writes the
    outputs to `out_dir` when given (`metrics.json`, `report.md`, the figures: all of them in
    place of the earlier ones, or none, `replaced_outputs`); a `models.json` beside the
    predictions (the runs and steps that made them) is copied into the metrics as "models".
    Returns the metrics dict (arrays as NumPy; `metrics.json` holds its JSON-safe form).

    `slices` selects the slices of the paper's 2D protocol ('all', or 'annotated': slices with a
    lesion ROI, as the paper's validation); the PI-CAI 3D protocol always uses every slice.
    """
    check_detection_settings(radius_mm, min_score)
    paths = list_cases(predictions_dir, cases)
    if cases is None:
        _warn_without_case_list(predictions_dir, len(paths))
    settings = {
        "radius_mm": radius_mm,
        "min_score": min_score,
        "roc_detections": roc_detections,
        "slices": slices,
    }
    record = _models_record(predictions_dir)
    summaries, has_images, picai_results, picai_skipped = _read_and_summarize(
        paths, settings, with_picai, record.get("models", {})
    )
    metrics = _paper_metrics(summaries, settings, predictions_dir)
    metrics["picai"] = _picai_section(
        picai_results, picai_skipped, summaries, picai_bootstraps, seed
    )
    metrics.update(record)
    if out_dir is not None:
        report = markdown_report({label: [json_safe(metrics)]}, title=f"Evaluation of {label}")
        with replaced_outputs(out_dir, "metrics.json", OUTPUT_FILES, "evaluate") as tmp:
            write_json(metrics, tmp / "metrics.json")
            (tmp / "report.md").write_text(report)
            if with_figures:
                write_figures(metrics, summaries, paths, has_images, tmp, montage_cases, label)
    return metrics


def remove_evaluation(out_dir: str | Path) -> None:
    """Removes the outputs of an earlier evaluation in `out_dir` (`OUTPUT_FILES`; no other file):
    none is left to describe predictions it did not read."""
    for name in OUTPUT_FILES:
        (Path(out_dir) / name).unlink(missing_ok=True)


def evaluation_summary(metrics: dict) -> str:
    """One line: the cases read, the patients counted for the FP rate (those with an evaluated
    slice under the `slices` setting) and the index / all-lesion sensitivity at 1 FP/patient
    ('n/a (no lesions)' where a group has none)."""

    def at_one_fp(group: str) -> str:
        sensitivity = metrics["froc"][group]["sensitivity_at_fp"]["1"]
        return "n/a (no lesions)" if sensitivity is None else f"{sensitivity:.3f}"

    cases, patients = metrics["num_cases"], metrics["num_patients"]
    return (
        f"{cases} case{'s' * (cases != 1)}, {patients} patient{'s' * (patients != 1)} with "
        "evaluated slices "
        f"(slices={metrics['settings']['slices']}); sensitivity at 1 FP/patient: "
        f"index {at_one_fp('index')}, all {at_one_fp('all')}"
    )


def operating_threshold(curve: dict, fp_per_patient: float = 1.0) -> float:
    """The lowest curve threshold whose FP per patient <= fp_per_patient (inf where none)."""
    within = np.asarray(curve["fp"]) <= fp_per_patient
    return float(np.asarray(curve["threshold"])[within].min()) if within.any() else float("inf")


def write_figures(
    metrics: dict,
    summaries: list[CaseSummary],
    paths: list[Path],
    has_images: list[bool],
    out_dir: Path,
    montage_cases: int,
    label: str,
) -> list[Path]:
    """froc.png (Fig. 5), froc_gs.png (Fig. 6), roc.png (Fig. 7) and montage.png (Fig. 4, when the
    predictions carry T2w): `FIGURE_FILES`."""
    froc = metrics["froc"]

    def froc_panels(panels):
        """{panel title: {label: curve}}; no curve for a group without lesions (its sensitivity
        is undefined: a line at 0 drawn before the first FP point said otherwise)."""
        return {
            f"{title} (n={froc[group]['num_lesions']})": {
                label: figures.froc_step_curve(
                    froc[group]["curve"]["fp"], froc[group]["curve"]["sensitivity"]
                )
                if froc[group]["num_lesions"]
                else None
            }
            for title, group in panels
        }

    written = [
        figures.froc_figure(out_dir / "froc.png", froc_panels(FROC_PANELS)),
        figures.froc_figure(out_dir / "froc_gs.png", froc_panels(GS_PANELS)),
    ]
    roc_panels = {}
    for task, title in ROC_TITLES.items():
        result = metrics["roc"][task]
        auc = "n/a" if not np.isfinite(result["auc"]) else f"{result['auc']:.3f}"
        curve = figures.Curve(x=result["curve"]["fpr"], y=result["curve"]["tpr"])
        roc_panels[title] = {f"{label} (AUC {auc})": curve}
    written.append(figures.roc_figure(out_dir / "roc.png", roc_panels))
    threshold = operating_threshold(froc["all"]["curve"])
    chosen = _montage_choice(summaries, has_images, montage_cases)
    if chosen:
        radius = metrics["settings"]["radius_mm"]
        columns = [_montage_column(paths[i], summaries[i], threshold, radius) for i in chosen]
        written.append(figures.montage_figure(out_dir / "montage.png", columns))
    return written


def _montage_choice(summaries, has_images, count: int) -> list[int]:
    """Up to `count` cases with T2w: cases with lesions first, in file order."""
    with_images = [i for i, ok in enumerate(has_images) if ok]
    lesion_first = sorted(with_images, key=lambda i: not summaries[i].lesion_present.any())
    return lesion_first[:count]


def _montage_column(
    path: Path, summary: CaseSummary, threshold: float, radius_mm: float
) -> figures.MontageCase:
    """The case's slice with the largest lesion area among those where a detection at the 1 FP
    per patient operating threshold hits a lesion (else among all; else its highest detection),
    with the detections at that threshold; titled with its slice number in the source volume
    (`slice_index`, where the predictions carry it). The first slice of the largest area showed
    a lesion hit on the next one as missed."""
    case = read_case(path)
    area = (case.lesions > 0).sum(axis=(1, 2))
    det = summary.detections
    if area.any():
        hits = lesion_hits(det, case.lesions, case.spacing, case.lesion_classes.size,
                           radius_mm=radius_mm).any(axis=1)  # fmt: skip
        hit = np.isin(np.arange(area.size), det.slice[hits & (det.scores[:, 0] >= threshold)])
        z = int(np.argmax(np.where(hit, area, -1) if (hit & (area > 0)).any() else area))
    else:
        z = int(det.slice[0]) if len(det) else 0
    shown = (det.slice == z) & (det.scores[:, 0] >= threshold)
    number = z if case.slice_index is None else int(case.slice_index[z])
    return figures.MontageCase(
        title=f"{case.case_id} (slice {number})",
        t2w=case.t2w[z],
        adc=None if case.adc is None else case.adc[z],
        classes=case.classes[z],
        points=np.stack([det.row[shown], det.col[shown]], axis=1),
        unknown_grade=np.concatenate([[False], ~case.grade_known])[case.lesions[z]],
    )
