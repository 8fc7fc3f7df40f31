"""`focalnet summarize --runs NAME=DIR... --out DIR`: combines the folds of several methods.

Every `metrics.json` found under a method's DIR (recursively, sorted by path) is one fold. Writes
`summary.json` (mean, SD, n of N and fold values of each metric, and for FP at a sensitivity how
many folds never reached it; two-sided Welch p-values between methods with Bonferroni correction,
the folds each test used, and how many never-reached folds it left out), `summary.md` (the
paper's tables, mean+-SD), and `froc.png`, `froc_gs.png`, `roc.png` with a +-2 SD band per method.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from focalnet_jax.data.atomic_files import replaced_outputs
from focalnet_jax.errors import UserError
from focalnet_jax.evaluation import figures
from focalnet_jax.evaluation.evaluate import FROC_PANELS, GS_PANELS
from focalnet_jax.evaluation.froc import GROUPS, sensitivity_at
from focalnet_jax.evaluation.metrics_shape import model_runs, value_at
from focalnet_jax.evaluation.report import (
    ROC_TITLES,
    TABLE_II,
    TABLE_III,
    case_sets_differ,
    case_sets_text,
    check_settings,
    folds_not_reached,
    folds_sharing_cases,
    folds_sharing_text,
    format_cell,
    markdown_report,
    read_metrics,
    write_json,
)
from focalnet_jax.evaluation.stats import band, compare_methods, mean_sd

log = logging.getLogger(__name__)

FP_GRID = np.geomspace(figures.FP_RANGE[0], figures.FP_RANGE[1], 400)
FPR_GRID = np.linspace(0.0, 1.0, 201)
SUMMARY_FIGURES = ("froc.png", "froc_gs.png", "roc.png")  # `write_band_figures`


def summary_metrics() -> list[tuple[str, ...]]:
    """The metric paths summarised and compared: Tables II/III, sensitivity at FP and partial AUCs
    of every group, the four GS ROC AUCs and the PI-CAI metrics."""
    paths = [
        ("froc", g, "fp_at_sensitivity", s) for _, g, sens in TABLE_II + TABLE_III for s in sens
    ]
    for group in GROUPS:
        paths += [("froc", group, "sensitivity_at_fp", x) for x in ("0.25", "0.5", "1", "2", "3")]
        paths += [("froc", group, "pauc", r) for r in ("0.01-1", "0.1-3")]
    paths += [("roc", task, "auc") for task in ROC_TITLES]
    paths += [("picai", key) for key in ("auroc", "ap", "score")]
    return list(dict.fromkeys(paths))


def metric_summary(fold_metrics: list[dict], path: tuple[str, ...]) -> dict:
    """mean_sd of one metric over the folds with its `values`; for FP at a sensitivity also
    `not_reached`: how many of the null folds never reached it (their lesions were found at no
    threshold often enough), so that a mean over the other folds is not read as the method's; for
    a PI-CAI metric also `values_95_ci`, each fold's bootstrap interval (null where none)."""
    values = [value_at(m, path) for m in fold_metrics]
    result = {**mean_sd(values), "values": values}
    if path[2:3] == ("fp_at_sensitivity",):
        result["not_reached"] = folds_not_reached(fold_metrics, path)
    if path[0] == "picai":
        result["values_95_ci"] = [value_at(m, ("picai", f"{path[1]}_95_ci")) for m in fold_metrics]
    return result


def method_comparisons(folds: Mapping[str, list[dict]]) -> tuple[dict, list[str]]:
    """Per metric ('/'-joined path): the pairwise Welch tests (`compare_methods`) over the folds
    with a value, and the summary.md lines of the pairs where either method has a value (p = n/a
    where there is no test, and why). For FP at a sensitivity each row also holds `not_reached`
    ({method: folds that never reached it}): those folds are not in the test, which then favours
    the method that missed more often, so its line says so."""
    comparisons, lines = {}, []
    for path in summary_metrics():
        rows = compare_methods(
            {name: [value_at(m, path) for m in fm] for name, fm in folds.items()}
        )
        if path[2:3] == ("fp_at_sensitivity",):
            missed = {name: folds_not_reached(fm, path) for name, fm in folds.items()}
            for row in rows:
                row["not_reached"] = {row["a"]: missed[row["a"]], row["b"]: missed[row["b"]]}
        comparisons["/".join(path)] = rows
        lines += [_comparison_line(path, row) for row in rows if row["n_a"] or row["n_b"]]
    return comparisons, lines


def _comparison_line(path: tuple[str, ...], row: dict) -> str:
    """The summary.md line of one comparison; an untestable pair (p NaN) says why."""
    line = f"- {'/'.join(path)}: {row['a']} vs {row['b']} (folds {row['n_a']} vs {row['n_b']}): "
    if np.isfinite(row["p"]):
        line += f"p = {row['p']:.4g}, Bonferroni p = {row['p_bonferroni']:.4g}"
    elif min(row["n_a"], row["n_b"]) < 2:
        line += "p = n/a (Welch's test needs 2 folds with a value per method)"
    else:
        line += "p = n/a (no spread: each method has one value in every fold)"
    missed = [f"{name} {k}" for name, k in row.get("not_reached", {}).items() if k]
    if missed:
        line += f" (n.r. folds left out: {', '.join(missed)})"
    return line


def find_folds(run_dir: str | Path) -> list[Path]:
    """Sorted `metrics.json` files under a run folder; an error naming the folder when none."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise UserError(
            f"{run_dir}: a file, not a run folder: give the folder holding metrics.json (the "
            "`--out` of `focalnet evaluate`, or a run or cross-validation folder above it)"
        )
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run folder does not exist")
    found = sorted(Path(folder) / "metrics.json" for folder in _folders(run_dir)
                   if (Path(folder) / "metrics.json").is_file())  # fmt: skip
    if not found:
        raise UserError(f"{run_dir}: no metrics.json (output of `focalnet evaluate`) under it")
    return found


def _folders(run_dir: Path):
    """`run_dir` and the folders under it, but hidden ones (an unfinished writer's temporary
    folder: `atomic_files.replaced_outputs`); one it cannot list is a `UserError` naming it
    (`rglob` skipped it: a fold left out without a word)."""

    def unreadable(error: OSError):
        raise UserError(f"{run_dir}: cannot search {error.filename} ({error.strerror})")

    for folder, subfolders, _ in os.walk(run_dir, onerror=unreadable):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        yield folder


def check_folds(run_dir, paths: list[Path], fold_metrics: list[dict]) -> None:
    """Each metrics.json must be one fold: a UserError names one that evaluated an ensemble of
    several runs (e.g. `evaluate --all-cases` of the folder, written under it) or two that
    evaluated the same run (e.g. with and without `--tta`), either of which would change the
    mean, the SD and the tests. Their `models` record says which runs made the predictions
    (metrics without one, from `--predictions`, cannot be checked); runs compare by
    `run_identity`."""
    seen: dict[str, tuple[Path, str]] = {}
    for path, metrics in zip(paths, fold_metrics, strict=True):
        models = model_runs(metrics)
        if len(models) > 1:
            raise UserError(
                f"{path}: evaluates an ensemble of {len(models)} runs, not one fold; move it out "
                f"of {run_dir}"
            )
        for model in models:
            run = str(model.get("run"))
            key = run_identity(run)
            if key in seen:
                first, recorded = seen[key]
                named = run if recorded == run else f"{key} (recorded as {recorded} and {run})"
                raise UserError(
                    f"{first} and {path} both evaluate run {named}: one fold would count "
                    f"twice; keep one of them under {run_dir}"
                )
            seen[key] = (path, run)


def check_summary_folder(out_dir: Path) -> None:
    """A UserError for an `--out` that holds an evaluation (`metrics.json`, `report.md`,
    `predictions/`): its figures would be replaced by the summary's, beside its own report."""
    found = [n for n in ("metrics.json", "report.md", "predictions") if (out_dir / n).exists()]
    if found:
        raise UserError(
            f"--out {out_dir} holds an evaluation ({found[0]}): its figures would be replaced by "
            "the summary's; choose another folder"
        )


def check_fold_steps(run_dir, paths: list[Path], fold_metrics: list[dict]) -> None:
    """The folds of one method against the runs they evaluated (where `run_dir` holds a run of a
    recorded run's name, from a cv folder moved or copied since, that one). A UserError
    names a metrics.json that evaluated a step other than the step its finished run ended at
    while another fold evaluated its run's final step (one evaluated while its run trained, or
    was stopped, and trained on since: the mean would mix an unfinished model with finished
    ones); folds that all evaluate earlier steps (`evaluate --step`), a run not finished, and a
    `fold<k>` run of `run_dir` without a metrics.json in it or evaluating it (the mean is over
    the other folds alone) are named in a warning."""
    from focalnet_jax.evaluation.ensemble import final_step  # Orbax: only where runs exist
    from focalnet_jax.run.run_folder import CONFIG_FILE, fold_runs

    root = Path(run_dir).resolve()
    evaluated, earlier, final = {p.resolve().parent for p in paths}, [], 0
    for path, metrics in zip(paths, fold_metrics, strict=True):
        for model in model_runs(metrics):
            run = Path(str(model.get("run")))
            copy = root / run.name
            if (copy / CONFIG_FILE).is_file() and not run.resolve().is_relative_to(root):
                run = copy  # a cv folder moved or copied: the run as it is there
            if not run.is_dir():
                continue
            evaluated.add(run.resolve())
            finished, why = final_step(run)
            if finished is None:
                log.warning("%s: evaluates run %s, not finished (%s)", path, run, why)
            elif model.get("step") != finished:
                earlier.append((path, model.get("step"), run, finished))
            else:
                final += 1
    if earlier:
        path, step, run, finished = earlier[0]
        if final:
            raise UserError(
                f"{path}: evaluates step {step} of run {run}, whose training ended at step "
                f"{finished}, while other folds evaluate their final step: evaluate the finished "
                f"run again (focalnet evaluate --workdir {run}), or move this metrics.json out "
                f"of {run_dir}"
            )
        log.warning(
            "%s: every fold evaluates a step before its run's final one (e.g. %s: step %s of %s)",
            run_dir, path, step, finished,
        )  # fmt: skip
    missing = [r for r in fold_runs(Path(run_dir)) if not _evaluated(r.resolve(), evaluated)]
    if missing:
        log.warning(
            "%s: %d fold run(s) without an evaluation, left out of the summary: %s",
            run_dir,
            len(missing),
            ", ".join(str(r) for r in missing),
        )


def _evaluated(run: Path, evaluated: set[Path]) -> bool:
    """Whether `run` is one of `evaluated` (runs, and folders of metrics.json) or holds one."""
    return any(where == run or where.is_relative_to(run) for where in evaluated)


def run_identity(run: str) -> str:
    """A recorded run as summarize compares it: the run folder resolved (absolute, symlinks
    followed) where it exists, a relative one taken against the current folder (metrics written
    before runs were recorded absolute); else the text as recorded (a run moved or deleted since,
    or relative to another folder, is then told apart from its other names only by the text)."""
    folder = Path(run)
    return str(folder.resolve()) if folder.is_dir() else run


def check_methods_apart(runs: Mapping[str, str | Path], paths: Mapping[str, list[Path]]) -> None:
    """A UserError names a metrics.json found under the folders of two methods (the same folder
    given twice, or one inside the other): the comparison would test a fold against itself."""
    owner: dict[Path, str] = {}
    for name, found in paths.items():
        for path in found:
            other = owner.setdefault(path.resolve(), name)
            if other != name:
                raise UserError(
                    f"{path} is a fold of both {other} ({runs[other]}) and {name} ({runs[name]}): "
                    "a method would be compared with its own folds; give each its own folder"
                )


def summarize_runs(runs: Mapping[str, str | Path], out_dir: str | Path) -> dict:
    """Summarises each method's folds and compares methods; writes the outputs to `out_dir`."""
    if not runs:
        raise UserError("summarize needs at least one --runs NAME=DIR")
    paths = {name: find_folds(d) for name, d in runs.items()}
    check_methods_apart(runs, paths)
    folds = {name: [read_metrics(p) for p in found] for name, found in paths.items()}
    for name, fold_metrics in folds.items():
        check_folds(runs[name], paths[name], fold_metrics)
        check_fold_steps(runs[name], paths[name], fold_metrics)
    # Evaluated alike throughout; predicted alike within a method (two methods may differ in TTA).
    check_settings(
        {p: m for n in folds for p, m in zip(paths[n], folds[n], strict=True)}, predictions=False
    )
    for name in folds:
        check_settings(dict(zip(paths[name], folds[name], strict=True)))
    differ, shared = case_sets_differ(folds), folds_sharing_cases(folds)
    if differ is not None:
        log.warning("%s", case_sets_text(differ))
    if shared:
        log.warning("%s", folds_sharing_text(shared))
    summary = {
        "methods": {},
        "comparisons": {},
        "case_sets_differ": differ,
        "folds_sharing_cases": shared or None,
    }
    for name, fold_metrics in folds.items():
        summary["methods"][name] = {
            "folds": [str(p) for p in paths[name]],
            "metrics": {
                "/".join(path): metric_summary(fold_metrics, path) for path in summary_metrics()
            },
        }
    lines = []
    if len(folds) >= 2:
        summary["comparisons"], lines = method_comparisons(folds)
    out_dir = Path(out_dir)
    title = "Cross-validation summary: " + ", ".join(folds)
    markdown = markdown_report(folds, title=title, comparisons=lines)  # before anything is written
    outputs = ("summary.json", "summary.md", *SUMMARY_FIGURES)
    with replaced_outputs(out_dir, "summary.json", outputs, "summarize") as tmp:
        write_json(summary, tmp / "summary.json")  # all in place of an earlier summary, or none
        (tmp / "summary.md").write_text(markdown)
        write_band_figures(folds, tmp)
    return summary


def _has_froc(metrics: dict, group: str) -> bool:
    """Whether a fold's `metrics` hold a FROC curve of `group` (it has a lesion of it)."""
    return bool(value_at(metrics, ("froc", group, "curve"))) and bool(
        value_at(metrics, ("froc", group, "num_lesions"))
    )


def _froc_band(fold_metrics: list[dict], group: str) -> figures.Curve | None:
    curves = []
    for m in fold_metrics:
        if _has_froc(m, group):
            curve = value_at(m, ("froc", group, "curve"))
            fp = np.asarray(curve["fp"], np.float64)
            sens = np.asarray(curve["sensitivity"], np.float64)
            curves.append(sensitivity_at(fp, sens, FP_GRID))
    if not curves:
        return None
    mean, lower, upper = band(curves)
    return figures.Curve(x=FP_GRID, y=mean, lower=lower, upper=upper)


def roc_at(fpr: np.ndarray, tpr: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The ROC polyline through (`fpr`, `tpr`) (non-decreasing, from (0, 0) to (1, 1), both
    corners of each step) read at the false-positive rates `grid`: along each segment from the
    last point at or left of the rate to the next one, so a step rises at its rate (the top of a
    vertical segment there) and stays flat before it. Keeping only the top point of each vertical
    segment and interpolating between those drew each step as a diagonal, above the curve."""
    last = np.searchsorted(fpr, grid, side="right") - 1  # the last point at or left of the rate
    nxt = np.minimum(last + 1, len(fpr) - 1)
    run = fpr[nxt] - fpr[last]
    slope = np.divide(tpr[nxt] - tpr[last], run, out=np.zeros_like(run), where=run > 0)
    return tpr[last] + (grid - fpr[last]) * slope


def _roc_band(fold_metrics: list[dict], task: str) -> figures.Curve | None:
    curves = []
    for m in fold_metrics:
        curve = value_at(m, ("roc", task, "curve"))
        if curve and curve["fpr"]:
            fpr = np.asarray(curve["fpr"], np.float64)
            curves.append(roc_at(fpr, np.asarray(curve["tpr"], np.float64), FPR_GRID))
    if not curves:
        return None
    mean, lower, upper = band(curves)
    return figures.Curve(x=FPR_GRID, y=mean, lower=lower, upper=upper)


def write_band_figures(folds: Mapping[str, list[dict]], out_dir: Path) -> list[Path]:
    """FROC (index, clinically significant, all; and per GS group) and ROC, mean +- 2 SD."""

    def froc_panels(panels):
        result = {}
        for title, group in panels:  # None kept: each method keeps its colour in every panel
            result[title] = {}
            for name, fm in folds.items():
                used = sum(_has_froc(m, group) for m in fm)  # as the ROC legend's '(n/N)'
                label = name if used in (0, len(fm)) else f"{name} ({used}/{len(fm)} folds)"
                result[title][label] = _froc_band(fm, group)
        return result

    roc_panels = {}
    for task, title in ROC_TITLES.items():
        panel = {}
        for name, fm in folds.items():
            curve = _roc_band(fm, task)
            if curve is None:
                panel[name] = None  # keeps the others' colours
                continue
            # As summary.md's cell: with '(n/N)' where some folds have no AUC.
            auc = format_cell([value_at(m, ("roc", task, "auc")) for m in fm])
            panel[f"{name} (AUC {auc})"] = curve
        roc_panels[title] = panel
    froc, froc_gs, roc = (out_dir / name for name in SUMMARY_FIGURES)
    return [
        figures.froc_figure(froc, froc_panels(FROC_PANELS)),
        figures.froc_figure(froc_gs, froc_panels(GS_PANELS)),
        figures.roc_figure(roc, roc_panels),
    ]
