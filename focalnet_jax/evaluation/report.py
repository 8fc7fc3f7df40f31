"""`metrics.json` (JSON-safe: NaN/inf -> null) and `report.md` in the paper's table layout.

The markdown report takes one or more methods, each a list of per-fold metrics dicts: one fold
prints plain values, several print mean+-SD over folds (Tables II and III of the paper).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from focalnet_jax.data.atomic_files import write_json_atomic
from focalnet_jax.errors import UserError, plural
from focalnet_jax.evaluation.metrics_shape import metrics_problem, value_at
from focalnet_jax.evaluation.stats import mean_sd

# (title, FROC group, sensitivities of the FP@Sen columns), as the paper's Tables II and III.
TABLE_II = (
    ("Index lesions", "index", ("0.8", "0.9")),
    ("Clinically significant lesions", "clinically_significant", ("0.8", "0.9")),
    ("All lesions", "all", ("0.6", "0.8")),
)
TABLE_III = (
    ("GS 3+3", "gs_3+3", ("0.6", "0.7")),
    ("GS 3+4", "gs_3+4", ("0.8", "0.9")),
    ("GS 4+3", "gs_4+3", ("0.8", "0.9")),
    ("GS >= 8", "gs_8+", ("0.8", "0.9")),
)
MAIN_GROUPS = (("Index", "index"), ("Clin. sig.", "clinically_significant"), ("All", "all"))
ROC_TITLES = {
    "gs_ge_7": "GS >= 7",
    "gs_ge_4+3": "GS >= 4+3",
    "gs_ge_8": "GS >= 8",
    "gs_ge_9": "GS >= 9",
}


def json_safe(value):
    """Plain JSON types: arrays -> lists, NumPy scalars -> Python, NaN/inf -> None."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def write_json(value, path: str | Path) -> Path:
    """`value` made JSON-safe (`json_safe`), written atomically (`write_json_atomic`)."""
    return write_json_atomic(json_safe(value), path)


def read_metrics(path: str | Path) -> dict:
    """Reads a `metrics.json` written by `focalnet evaluate`; errors name the file."""
    path = Path(path)
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # not JSON, or not UTF-8 (UnicodeDecodeError)
        raise UserError(f"{path}: not a readable metrics.json ({error})") from error
    if problem := metrics_problem(metrics):
        raise UserError(f"{path}: not a metrics.json of `focalnet evaluate`: {problem}")
    return metrics


# What of a predictions' `models.json` changes their numbers, beside the models themselves.
PREDICTION_KEYS = ("tta", "candidates")


def check_settings(evaluations: Mapping, *, predictions: bool = True) -> None:
    """Evaluations to be averaged or compared ({metrics.json path or cell: metrics}) must share
    their `settings` (hit radius, score floor, ROC detections, slices): e.g. `evaluate
    --workdir` takes the run's `data.slices` (annotated by default) and `--predictions` all
    slices, whose FP rates and sensitivities are not comparable. With `predictions`, so must
    the test-time augmentation and detection-map candidate settings of the predictions (their
    `models`), where both record them: the folds of one method. A UserError names two that
    differ and how; metrics without `settings` cannot be checked."""
    reference = None
    for where, metrics in evaluations.items():
        settings = metrics.get("settings")
        if settings is None:
            continue
        models = metrics.get("models") if predictions else None
        models = models if isinstance(models, dict) else {}  # another tool's: any shape
        settings = {
            **settings,
            **{f"models.{k}": models[k] for k in PREDICTION_KEYS if k in models},
        }
        if reference is None:
            reference = (where, settings)
            continue
        if diff := _differences(reference[1], settings):
            raise UserError(
                f"{reference[0]} and {where} were evaluated with other settings {diff}: "
                "their numbers are not comparable; evaluate them alike"
            )


def _differences(a: Mapping, b: Mapping) -> dict:
    """{key: (a's value, b's)} where they differ; a `models.` key only where both record it
    (predictions without `models.json` record none)."""
    pairs = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))}
    return {
        k: pair
        for k, pair in pairs.items()
        if pair[0] != pair[1] and not (k.startswith("models.") and None in pair)
    }


def format_cell(values: Sequence, digits: int = 3, empty: str = "n/a", not_reached: int = 0) -> str:
    """One fold: the value (`empty` when null). Several: mean+-SD over the folds with a value,
    with '(n/N)' when some folds have none. `not_reached`: how many of the null folds are 'n.r.'
    (a sensitivity their lesions never reached, rather than no lesion), said in the cell: a mean
    over the other folds alone would look better than the method did."""
    summary = mean_sd(values)
    if summary["mean"] is None:
        if not not_reached:
            return empty
        return "n.r." + (f" ({not_reached}/{summary['of']})" if summary["of"] > 1 else "")
    if summary["of"] == 1:
        return f"{summary['mean']:.{digits}f}"
    text = f"{summary['mean']:.{digits}f}"
    if summary["sd"] is not None:
        text += f"±{summary['sd']:.{digits}f}"
    if summary["n"] < summary["of"]:
        text += f" ({summary['n']}/{summary['of']}" + (
            f"; {not_reached} n.r.)" if not_reached else ")"
        )
    return text


def not_reached(metrics: Mapping, path: Sequence[str]) -> bool:
    """Whether a FROC `fp_at_sensitivity` value at `path` is null because the group's lesions
    never reached that sensitivity (False when the group has no lesion, or for other paths)."""
    if len(path) != 4 or path[0] != "froc" or path[2] != "fp_at_sensitivity":
        return False
    return value_at(metrics, path) is None and bool(value_at(metrics, (*path[:2], "num_lesions")))


def folds_not_reached(fold_metrics: Sequence[Mapping], path: Sequence[str]) -> int:
    """How many folds' value at `path` is null because they never reached that sensitivity
    (`not_reached`)."""
    return sum(not_reached(m, path) for m in fold_metrics)


def _table(runs: Mapping[str, Sequence[Mapping]], columns: Sequence[tuple]) -> list[str]:
    """Markdown rows: one per method, one column per (header, metric path)."""
    lines = [
        "| Method | " + " | ".join(header for header, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for name, folds in runs.items():
        cells = [
            format_cell(
                [value_at(m, path) for m in folds],
                not_reached=folds_not_reached(folds, path),
            )
            for _, path in columns
        ]
        shown = " ".join(str(name).split()).replace("|", "\\|")  # one markdown cell
        lines.append(f"| {shown} | " + " | ".join(cells) + " |")
    return lines


def _fp_columns(table) -> list[tuple]:
    return [
        (f"{title} FP@Sen{float(s) * 100:.0f}%", ("froc", group, "fp_at_sensitivity", s))
        for title, group, sens in table
        for s in sens
    ]


def markdown_report(
    runs: Mapping[str, Sequence[Mapping]], *, title: str, comparisons: Sequence[str] = ()
) -> str:
    """The report: cohort, Tables II and III (FP per patient at sensitivity), sensitivity at FP,
    partial AUCs, GS ROC AUCs, PI-CAI metrics, and optional comparison lines."""
    lines = [f"# {title}", "", *_cohort(runs), *_paper_protocol(runs), *_picai_protocol(runs)]
    if comparisons:
        lines += [
            "## Comparisons (Welch's two-sided t-test over folds, Bonferroni-corrected)",
            "",
            "Unpaired (the folds of two methods are not matched); a fold without a value is left "
            "out (the folds each test used are given); Bonferroni: p x the method pairs, capped "
            "at 1.",
            "",
        ]
        lines += list(comparisons) + [""]
    return "\n".join(lines)


def case_sets_differ(runs: Mapping[str, Sequence[Mapping]]) -> dict | None:
    """Where the methods were evaluated on different case sets (their folds' `cases` records):
    {"cases": {method: cases pooled over its folds}, "not_shared": cases some method lacks};
    else None (also where a fold has no record: metrics written before it was kept)."""
    pooled = {}
    for name, folds in runs.items():
        if any("cases" not in m for m in folds):
            return None
        pooled[name] = frozenset(c for m in folds for c in m["cases"])
    if len(set(pooled.values())) <= 1:
        return None
    shared = frozenset.intersection(*pooled.values())
    return {
        "cases": {name: len(cases) for name, cases in pooled.items()},
        "not_shared": len(frozenset.union(*pooled.values()) - shared),
    }


def case_sets_text(differ: Mapping) -> str:
    """One sentence on the methods' different case sets (`case_sets_differ`)."""
    counts = ", ".join(f"{name} {n}" for name, n in differ["cases"].items())
    return (
        f"the methods were evaluated on different cases (pooled over folds: {counts}; "
        f"{differ['not_shared']} not evaluated by every method): their numbers and comparisons "
        "mix case sets"
    )


def folds_sharing_cases(runs: Mapping[str, Sequence[Mapping]]) -> dict[str, int]:
    """{method: how many cases more than one of its folds evaluated} for the methods with any
    (from the folds' `cases` records, where kept): e.g. a fold evaluated again beside the first,
    or the folds of two repeats of a cross-validation, each counted as one fold."""
    shared = {}
    for name, folds in runs.items():
        counts = Counter(case for m in folds for case in set(m.get("cases") or ()))
        if n := sum(k > 1 for k in counts.values()):
            shared[name] = n
    return shared


def folds_sharing_text(shared: Mapping[str, int]) -> str:
    """One sentence on `folds_sharing_cases`."""
    counts = ", ".join(f"{name} {n}" for name, n in shared.items())
    return (
        f"folds of one method evaluated the same cases (cases in more than one fold: {counts}): "
        "each fold counts once in the mean, the SD and the tests, which take folds as independent"
    )


def _cohort(runs: Mapping[str, Sequence[Mapping]]) -> list[str]:
    """Folds per method; patients per fold of each method (a warning where the methods' case sets
    differ or folds of one method share cases); lesions per group of the first method."""
    first = next(iter(runs.values()))
    differ, shared = case_sets_differ(runs), folds_sharing_cases(runs)
    warning = [] if differ is None else ["", f"**Warning:** {case_sets_text(differ)}."]
    warning += [] if not shared else ["", f"**Warning:** {folds_sharing_text(shared)}."]
    return [
        "Folds: " + ", ".join(f"{name} {len(folds)}" for name, folds in runs.items()),
        *(
            "Patients per fold ({}): {}".format(
                name, ", ".join(str(m.get("num_patients")) for m in folds)
            )
            for name, folds in runs.items()
        ),
        *warning,
        "",
        "Lesions per group (first method, summed over folds): "
        + ", ".join(
            f"{group} {sum(value_at(m, ('froc', group, 'num_lesions')) or 0 for m in first)}"
            for group in (first[0].get("froc") or {})
        ),
        "",
    ]


def _paper_protocol(runs: Mapping[str, Sequence[Mapping]]) -> list[str]:
    """Tables II and III, sensitivity at 1 FP and partial AUCs, GS ROC AUCs; the hit radius and
    the detections per case in the headings are the evaluation's (`settings`: every fold's, by
    `check_settings`; the paper's 5 mm and 12 where a file records none)."""
    settings = next(iter(runs.values()))[0].get("settings") or {}
    radius, detections = settings.get("radius_mm", 5.0), settings.get("roc_detections", 12)
    return [
        f"## Paper protocol (2D local maxima, {radius:g} mm same-slice hit rule)",
        "",
        "### False positives per patient at given sensitivity (Table II)",
        "",
        *_table(runs, _fp_columns(TABLE_II)),
        "",
        "### False positives per patient at given sensitivity per GS group (Table III)",
        "",
        *_table(runs, _fp_columns(TABLE_III)),
        "",
        "n.r.: sensitivity not reached at any threshold (over folds, 'k n.r.': k folds with "
        "lesions of the group never reached it and are left out of the mean); n/a: undefined "
        "(no lesion, no positive or no negative).",
        "",
        "### Sensitivity at 1 false positive per patient and partial AUCs",
        "",
        *_table(
            runs,
            [(f"{t} Sen@1FP", ("froc", g, "sensitivity_at_fp", "1")) for t, g in MAIN_GROUPS]
            + [
                (f"{t} pAUC {r}", ("froc", g, "pauc", r))
                for t, g in MAIN_GROUPS
                for r in ("0.01-1", "0.1-3")
            ],
        ),
        "",
        f"### GS prediction: ROC AUC of the {detections} highest detections per case",
        "",
        *_table(runs, [(t, ("roc", task, "auc")) for task, t in ROC_TITLES.items()]),
        "",
    ]


def _picai_protocol(runs: Mapping[str, Sequence[Mapping]]) -> list[str]:
    """PI-CAI metrics (or why they were not evaluated), with the bootstrap intervals of each
    method of a single run."""
    lines = ["## PI-CAI protocol (3D lesion candidates of P(class >= 2), picai_eval)", ""]
    skipped = [value_at(m, ("picai", "skipped")) for folds in runs.values() for m in folds]
    if any(skipped):
        lines += ["Not evaluated: " + "; ".join(sorted({s for s in skipped if s})), ""]
    if all(skipped):
        return lines
    lines += _table(
        runs,
        [
            ("Case AUROC", ("picai", "auroc")),
            ("Lesion AP", ("picai", "ap")),
            ("Ranking score", ("picai", "score")),
        ],
    )
    for name, folds in runs.items():
        if len(folds) == 1 and value_at(folds[0], ("picai", "score_95_ci")):
            ci = folds[0]["picai"]
            patients = ci.get("bootstrap_patients")  # absent from metrics of older versions
            resampled = f"{name}, {plural(patients, 'patient')} resampled" if patients else name
            lines += [
                "",
                "95 % bootstrap intervals ({}): AUROC {}, AP {}, score {}".format(
                    resampled,
                    *(_interval(ci.get(k)) for k in ("auroc_95_ci", "ap_95_ci", "score_95_ci")),
                ),
            ]
    return lines + [""]


def _interval(values) -> str:
    if not values or any(v is None for v in values):
        return "n/a"
    return f"[{values[0]:.3f}, {values[1]:.3f}]"
