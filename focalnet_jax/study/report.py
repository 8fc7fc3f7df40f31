"""`focalnet study report --workdir DIR [--partial]`: DIR/report/runs.csv, stats.csv, report.md and
the figures (module `figures`).

runs.csv: a row per training and ensemble cell (`kind`), the `METRICS` of its eval/metrics.json,
and for a training cell its final validation loss, that loss's drop over the last quarter of
training (`convergence`) and its seconds over all its attempts and their number (`attempts`).
stats.csv compares every ordered pair of arms and ensembles on every metric (`statistics`).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from focalnet_jax.data.atomic_files import (
    check_output_folder,
    foreign_entries,
    replaced_atomically,
    replaced_folder,
)
from focalnet_jax.errors import plural
from focalnet_jax.evaluation.metrics_shape import MISSING, is_number, value_at
from focalnet_jax.evaluation.report import check_settings
from focalnet_jax.evaluation.stats import mean_sd
from focalnet_jax.study import convergence, figures, statistics
from focalnet_jax.study.cells import METRICS_JSON, Cell, Study, read_json_file
from focalnet_jax.study.ensembles import ensemble_state
from focalnet_jax.study.spec import StudyError, flatten, relative_to_cwd

CS = ("froc", "clinically_significant")
METRICS = {
    # column: path in metrics.json (paper protocol: FROC of the 2D slices; PI-CAI: 3D, csPCa)
    "picai_auroc": ("picai", "auroc"),
    "picai_ap": ("picai", "ap"),
    "picai_score": ("picai", "score"),
    "froc_cs_sens_at_1fp": (*CS, "sensitivity_at_fp", "1"),
    "froc_cs_sens_at_0.5fp": (*CS, "sensitivity_at_fp", "0.5"),
    "froc_cs_pauc_0.1-3": (*CS, "pauc", "0.1-3"),
    "froc_all_sens_at_1fp": ("froc", "all", "sensitivity_at_fp", "1"),
    "froc_index_sens_at_1fp": ("froc", "index", "sensitivity_at_fp", "1"),
    "roc_gs_ge_7_auc": ("roc", "gs_ge_7", "auc"),
    "roc_gs_ge_4+3_auc": ("roc", "gs_ge_4+3", "auc"),
}
HEADLINE = ("picai_auroc", "picai_ap", "picai_score", "froc_cs_sens_at_1fp")
# What DIR/report/ holds (pvalues.png with two arms or more); any other file there is refused.
REPORT_FILES = ("report.md", "runs.csv", "stats.csv", "metrics.png", "froc_cs.png", "pvalues.png",
                "val_loss.png")  # fmt: skip
CONVERGENCE = ("val_loss", "val_loss_drop_last_quarter")  # NaN for an ensemble
COST = ("total_seconds", "attempts")  # over every attempt of a training cell; NaN for an ensemble
RUN_COLUMNS = (
    "arm",
    "kind",
    "repeat",
    "fold",
    "seed",
    *METRICS,
    *CONVERGENCE,
    "num_patients",
    *COST,
)
STATS_COLUMNS = (
    "metric",
    "arm_a",
    "arm_b",
    "mean_a",
    "mean_b",
    "n_a",
    "n_b",
    "p_permutation",
    "p_welch",
    "p_welch_bonferroni",
    "n_pairs",
    "p_permutation_paired",
    "n_folds",
    "p_permutation_folds",
)


# runs.csv holds each metric rounded to this many decimals, and the tests read those values: equal
# metrics that picai_eval's trapezoid AUROC gives as 0.6666666666666666 or 0.6666666666666667
# (by the ROC curve's steps) are ties, and p_permutation equals picai_eval's test on the columns.
METRIC_DECIMALS = 12


def _lookup(metrics: Mapping, path: Sequence[str], where: str, *, partial: bool) -> float:
    """The number at `path` in a cell's metrics.json, rounded to METRIC_DECIMALS (NaN where the
    metric is undefined: null, or its section says why it was `skipped`); a missing key is a
    `StudyError` naming the cell and key, or with `partial` a warning and NaN."""
    if _skip_reason(metrics, path) is not None:
        return float("nan")
    value = value_at(metrics, path, MISSING)
    if value is MISSING:
        message = f"{where}: no {'.'.join(path)} (evaluated by another version?)"
        if not partial:
            raise StudyError(message + "; --partial reports it as NaN")
        print(f"warning: {message}; reported as NaN", file=sys.stderr)
        return float("nan")
    if value is None:
        return float("nan")
    if not is_number(value):
        raise StudyError(  # '0.7' was read as 0.7; Infinity left out of the mean without a word
            f"{where}: {'.'.join(path)} is {value!r}, not a number (damaged or edited?); remove "
            "the file, and `study run` evaluates the cell again"
        )
    return round(float(value), METRIC_DECIMALS)


def _skip_reason(metrics: Mapping, path: Sequence[str]) -> str | None:
    """Why the first section on `path` in a cell's metrics.json was `skipped` (e.g. picai_eval
    not installed, a ROC task whose detections hold one class), or why the metric itself is
    `undefined` there (a PI-CAI AUROC of a fold without a case of one class), or None."""
    value = metrics
    for key in path:
        if not isinstance(value, Mapping):
            return None
        if "skipped" in value:
            return str(value["skipped"])
        if key == path[-1] and key in value.get("undefined", {}):
            return str(value["undefined"][key])
        value = value.get(key)
    return None


def _undefined_reason(metrics: Mapping, path: Sequence[str]) -> str | None:
    """`_skip_reason`, or for a metric present as null or NaN without a reason (an evaluation by
    an earlier version) a reason saying so; None for a number or a missing key."""
    if (reason := _skip_reason(metrics, path)) is not None:
        return reason
    value = value_at(metrics, path, MISSING)
    undefined = value is None or (isinstance(value, float) and math.isnan(value))
    return "undefined (null in the cell's metrics.json)" if undefined else None


def _cell_name(row: Mapping) -> str:
    """`arm/rep<r>/fold<k>` of a runs.csv row."""
    return f"{row['arm']}/rep{row['repeat']}/fold{row['fold']}"


def _row(
    study: Study, cell: Cell, metrics: Mapping, *, partial: bool
) -> tuple[dict, convergence.LossCurve]:
    """(runs.csv row of `cell`, its validation loss curve: empty for an ensemble)."""
    row = {
        "arm": cell.arm,
        "kind": "ensemble" if cell.ensemble else "arm",
        "repeat": cell.repeat,
        "fold": cell.fold,
        "seed": study.seed(cell),
    }
    where = str(study.path(cell) / METRICS_JSON)
    for column, path in METRICS.items():
        row[column] = _lookup(metrics, path, where, partial=partial)
    curve = convergence.LossCurve(np.zeros(0), np.zeros(0))
    if not cell.ensemble:
        curve = convergence.val_loss_curve(study.path(cell))
    row["val_loss"], row["val_loss_drop_last_quarter"] = curve.final, curve.drop_last_quarter
    row["num_patients"] = metrics.get("num_patients")
    record = {} if cell.ensemble else study.state(cell).record
    row["total_seconds"] = float(record.get("total_seconds", record.get("seconds", math.nan)))
    row["attempts"] = int(record.get("attempts", 1)) if record else math.nan
    return row, curve


@dataclasses.dataclass
class Collected:
    """What the report reads: per done cell (training cells, then ensembles) its runs.csv row,
    its metrics.json contents and its validation loss curve (empty for an ensemble); and the
    cells without metrics."""

    rows: list[dict] = dataclasses.field(default_factory=list)
    metrics: list[dict] = dataclasses.field(default_factory=list)
    curves: list[convergence.LossCurve] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)


def collect(study: Study, *, partial: bool) -> Collected:
    """Read every done cell; refuses missing cells unless `partial`."""
    out = Collected()
    for cell in study.cells() + study.ensemble_cells():
        path = study.path(cell) / METRICS_JSON
        state = ensemble_state(study, cell) if cell.ensemble else study.state(cell).state
        if state == "done":  # its metrics.json is there
            remedy = "remove it, and `study run` evaluates the cell again"
            metrics = read_json_file(path, "metrics file", dict, remedy)
            row, curve = _row(study, cell, metrics, partial=partial)
            out.rows.append(row)
            out.metrics.append(metrics)
            out.curves.append(curve)
            continue
        out.missing.append(cell.name)
    if out.missing and not partial:
        shown = ", ".join(out.missing[:4]) + (", ..." if len(out.missing) > 4 else "")
        raise StudyError(
            f"{study.root}: {plural(len(out.missing), 'cell')} not done ({shown}); "
            "`focalnet study status` lists them, --partial reports the others"
        )
    return out


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping]) -> None:
    with replaced_atomically(path) as tmp, open(tmp, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _fmt_p(p: float) -> str:
    """A p-value: 4 decimals, or 2 significant digits below 0.001 (an exact permutation p of
    1/184756 printed as 0.0000 read as p = 0)."""
    return _fmt(p, 4) if not math.isfinite(p) or p >= 1e-3 else f"{p:.1e}"


def _header(study: Study, missing: Sequence[str]) -> list[str]:
    plain = study.plain
    spec_file = relative_to_cwd(plain["spec_file"])
    lines = [
        f"# Study {Path(spec_file.partition(':')[0]).stem}",
        "",
        f"Spec `{spec_file}`; base `{relative_to_cwd(plain['base'])}`; store "
        f"`{relative_to_cwd(plain['store'])}`; {plural(plain['repeats'], 'repeat')} "
        f"(seed {plain['seed']} + r) x folds {plain['folds']} of {plain['num_folds']}.",
        "",
        "| arm | overrides |",
        "| --- | --- |",
    ]
    for arm in study.arms:
        items = ", ".join(f"`{k}={v!r}`" for k, v in flatten(plain["arms"][arm])) or "(base)"
        lines.append(f"| {arm} | {items} |")
    for name, members in study.ensembles.items():
        lines.append(f"| {name} | ensemble: mean P(class >= k) of {', '.join(members)} |")
    if missing:
        missed = f"{plural(len(missing), 'cell')} missing ({', '.join(missing)})"
        lines += ["", f"**Partial report**: {missed}."]
    return lines


def _metrics_table(rows: Sequence[Mapping], names: Sequence[str]) -> list[str]:
    lines = ["", "## Metrics over runs (mean +- SD, n runs; n/N: N - n runs undefined)", ""]
    lines += ["| arm | " + " | ".join(HEADLINE) + " |", "|---" * (len(HEADLINE) + 1) + "|"]
    for name in names:
        cells = []
        for metric in HEADLINE:
            s = mean_sd([r[metric] for r in rows if r["arm"] == name])
            runs = f"{s['n']}" if s["n"] == s["of"] else f"{s['n']}/{s['of']}"
            cells.append(f"{_fmt(s['mean'])} +- {_fmt(s['sd'])} ({runs})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _comparisons(stats_rows: Sequence[Mapping], iterations: int) -> list[str]:
    """The headline metrics' rows of stats.csv, with what each test permuted and corrected."""
    if not stats_rows:
        return ["", "## Comparisons", "", "One arm: nothing to compare."]
    pairs = (
        sum(1 for r in stats_rows if r["metric"] == stats_rows[0]["metric"]) if stats_rows else 0
    )
    lines = [
        "",
        "## Comparisons (H1: b better than a)",
        "",
        "Unit: the run (one value per trained cell or ensemble cell); n a, n b: the runs with a "
        "value (an undefined metric leaves its run out). p_permutation: picai_eval's one-sided "
        "permutation test of the order AUC, unpaired (the runs of a and b are not matched by "
        "repeat or fold; exact over every split when the two arms have <= 20 runs together, "
        f"else {iterations} random splits drawn with seed {statistics.PERMUTATION_SEED}, p >= "
        f"1/{iterations + 1}); p paired: one-sided sign-flip permutation test of the mean "
        "difference b - a over the n pairs of runs of the same repeat and fold (exact up to 20 "
        f"pairs, else {iterations} random sign patterns); p folds: the same test with the "
        "differences averaged over the repeats of each fold and flipped per fold (n folds; the "
        "repeats of a fold share its patients, so only this one counts a fold once); none is "
        "corrected for multiple comparisons, and all but p folds treat the runs as independent. "
        "p_welch: one-sided Welch t-test, unpaired; p_welch_bonferroni: p_welch x "
        f"{pairs} (the ordered pairs of each metric), capped at 1. See docs/studies.md.",
        "",
        "| metric | a | b | n a | n b | mean a | mean b | p_permutation | n pairs | p paired "
        "| n folds | p folds | p_welch | p_welch_bonferroni |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in stats_rows:
        if r["metric"] in HEADLINE:
            lines.append(
                f"| {r['metric']} | {r['arm_a']} | {r['arm_b']} | {r['n_a']} | {r['n_b']} | "
                f"{_fmt(r['mean_a'])} | {_fmt(r['mean_b'])} | {_fmt_p(r['p_permutation'])} | "
                f"{r['n_pairs']} | {_fmt_p(r['p_permutation_paired'])} | "
                f"{r['n_folds']} | {_fmt_p(r['p_permutation_folds'])} | "
                f"{_fmt_p(r['p_welch'])} | {_fmt_p(r['p_welch_bonferroni'])} |"
            )
    return lines


def _coverage(rows: Sequence[Mapping], names: Sequence[str]) -> list[str]:
    """A warning when arms hold runs of different (repeat, fold) cells (a partial report): an
    unpaired comparison of them mixes folds of other difficulty into the difference."""
    cells = {name: {(r["repeat"], r["fold"]) for r in rows if r["arm"] == name} for name in names}
    if len({frozenset(c) for c in cells.values()}) <= 1:
        return []
    counts = ", ".join(f"{name} {len(c)}" for name, c in cells.items())
    return [
        "",
        f"**The arms hold runs of different cells** (runs: {counts}): their comparisons mix "
        "folds and repeats that the other arm lacks, so a hard or easy fold can make a "
        "difference; compare them once the same cells are done.",
    ]


def _convergence(rows: Sequence[Mapping], arms: Sequence[str]) -> list[str]:
    """Per training arm: final validation loss, its drop over the last quarter, plateau count."""
    limit = f"{convergence.PLATEAU_DROP:.0%}"
    lines = [
        "",
        "## Convergence (validation loss: each arm's own loss on the validation fold)",
        "",
        f"A run is at a plateau when its validation loss fell by at most {limit} over the last "
        "quarter of its steps (a rise counts: more steps would not help). A run without an "
        "evaluation at or before 3/4 of its steps has no drop: it is left out of the drop's mean "
        "and max and of the plateau count, which says how many such runs (n/a). See "
        "docs/studies.md.",
        "",
        "| arm | final val/loss (mean +- SD) | drop over the last quarter (mean; max) "
        "| runs at a plateau |",
        "|---|---|---|---|",
    ]
    for arm in arms:
        selected = [r for r in rows if r["arm"] == arm and r["kind"] == "arm"]
        final = mean_sd([r["val_loss"] for r in selected])
        drops = np.array([r["val_loss_drop_last_quarter"] for r in selected], float)
        known = drops[np.isfinite(drops)]
        spread = f"{known.mean():+.1%}; {known.max():+.1%}" if known.size else "n/a"
        plateau = f"{sum(convergence.at_plateau(d) for d in known)} / {known.size}"
        unknown = len(selected) - known.size  # no reference evaluation: not "not at a plateau"
        plateau += f" ({unknown} n/a)" if unknown else ""
        runs = "" if final["n"] == final["of"] else f" ({final['n']}/{final['of']})"
        lines.append(
            f"| {arm} | {_fmt(final['mean'], 4)} +- {_fmt(final['sd'], 4)}{runs} | {spread} "
            f"| {plateau} |"
        )
    return lines


def _cost(rows: Sequence[Mapping], arms: Sequence[str]) -> list[str]:
    """Per training arm: wall-clock seconds per run over all its attempts, and the retries."""
    lines = [
        "",
        "## Cost (wall-clock time of each run's cell, over all its attempts)",
        "",
        "A run that failed, was killed or was requeued and then resumed counts every attempt "
        "(an attempt killed without a word counts until its last log or state write).",
        "",
        "| arm | s per run (mean +- SD) | total h | attempts | runs with > 1 attempt |",
        "|---|---|---|---|---|",
    ]
    for arm in arms:
        selected = [r for r in rows if r["arm"] == arm and r["kind"] == "arm"]
        seconds = mean_sd([r["total_seconds"] for r in selected])
        total = np.nansum([r["total_seconds"] for r in selected]) / 3600
        attempts = [r["attempts"] for r in selected]
        lines.append(
            f"| {arm} | {_fmt(seconds['mean'], 1)} +- {_fmt(seconds['sd'], 1)} | "
            f"{_fmt(float(total), 3)} | {sum(attempts)} | {sum(a > 1 for a in attempts)} |"
        )
    return lines


def skipped_metrics(found: Collected) -> dict[str, dict[str, list[str]]]:
    """{reason: {metric column: [cell, ...]}} for the metrics a cell's evaluation skipped or found
    undefined, saying why (`_undefined_reason`: e.g. picai_eval not installed where the cell was
    evaluated, or a fold without a case of one class): NaN in runs.csv, and so left out of every
    test."""
    skipped: dict[str, dict[str, list[str]]] = {}
    for row, metrics in zip(found.rows, found.metrics, strict=True):
        for column, path in METRICS.items():
            if (reason := _undefined_reason(metrics, path)) is not None:
                skipped.setdefault(reason, {}).setdefault(column, []).append(_cell_name(row))
    return skipped


def _skipped_cells(columns: Mapping[str, Sequence[str]]) -> list[str]:
    """The cells of one reason of `skipped_metrics` ({column: cells}), each once, sorted."""
    return sorted({cell for cells in columns.values() for cell in cells})


def _skipped_lines(skipped: Mapping[str, Mapping[str, Sequence[str]]]) -> list[str]:
    """report.md's note of `skipped_metrics`: which metrics, in how many cells, and why."""
    lines = []
    for reason, columns in skipped.items():
        cells = _skipped_cells(columns)
        shown = ", ".join(cells[:4]) + (", ..." if len(cells) > 4 else "")
        lines.append(
            f"**Not evaluated or undefined** ({', '.join(columns)}) in "
            f"{plural(len(cells), 'cell')} "
            f"({shown}): {reason}. Those runs are n/a for them and left out of their tests."
        )
    return [line for text in lines for line in ("", text)]


def _markdown(study: Study, found: Collected, stats_rows, iterations: int, skipped) -> str:
    names = list(dict.fromkeys(r["arm"] for r in found.rows))
    lines = _header(study, found.missing) + _skipped_lines(skipped)
    lines += _metrics_table(found.rows, names)
    lines += _comparisons(stats_rows, iterations) + _coverage(found.rows, names)
    lines += _convergence(found.rows, [a for a in study.arms if a in names])
    lines += _cost(found.rows, [a for a in study.arms if a in names])
    lines += ["", "## Figures", ""]
    pngs = ["metrics.png", "froc_cs.png"] + (["pvalues.png"] if len(names) > 1 else [])
    lines += [f"![{png}]({png})" for png in (*pngs, "val_loss.png")]
    return "\n".join(lines) + "\n"


def check_paired_cases(rows: Sequence[Mapping], metrics: Sequence[Mapping]) -> None:
    """The cells the paired tests match, those of one repeat and fold, must have been evaluated
    on the same cases (their metrics.json `cases`, where recorded): a StudyError names two that
    were not, e.g. one evaluated again by hand with `evaluate --cases`."""
    first: dict[tuple, tuple[Mapping, list]] = {}
    for row, m in zip(rows, metrics, strict=True):
        if not isinstance(m.get("cases"), list):
            continue
        cases = sorted(map(str, m["cases"]))
        other, expected = first.setdefault((row["repeat"], row["fold"]), (row, cases))
        if cases != expected:
            raise StudyError(
                f"cell {_cell_name(other)} and cell {_cell_name(row)} were evaluated on other "
                f"cases ({len(expected)} and {len(cases)}, "
                f"{len(set(expected) ^ set(cases))} not in both): their paired comparison would "
                "not be by case; remove the metrics.json of the one evaluated by hand, and "
                "`study run` evaluates it again"
            )


def _report_file(name: str) -> bool:
    """Whether `name` is a file of DIR/report/, or one's `.<name>.tmp-<pid>` a killed run left."""
    return name in REPORT_FILES or any(name.startswith(f".{f}.tmp-") for f in REPORT_FILES)


def check_report_folder(study: Study) -> Path:
    """DIR/report/, to be replaced whole; refuses one that exists as something other than a
    folder (it was moved aside for good) or holds what `study report` does not write."""
    out = study.root / "report"
    check_output_folder(out, "report folder")
    if strays := foreign_entries(out, _report_file):
        raise StudyError(
            f"{out} holds {strays[0]}, which `study report` does not write; the folder is "
            "replaced whole, so move that out"
        )
    return out


def write_report(
    study: Study, *, partial: bool = False, iterations: int = statistics.APPROXIMATE_ITERATIONS
) -> Path:
    """Write DIR/report/ (checked first by `check_report_folder`); returns the folder."""
    out = study.root / "report"
    found = collect(study, partial=partial)
    rows = found.rows
    if not rows:
        raise StudyError(f"{study.root}: no cell is done yet; nothing to report")
    cells = [f"cell {_cell_name(r)}" for r in rows]
    check_settings(dict(zip(cells, found.metrics, strict=True)))  # comparable cells only
    check_paired_cases(rows, found.metrics)
    skipped = skipped_metrics(found)
    for reason, columns in skipped.items():
        count = plural(len(_skipped_cells(columns)), "cell")
        print(
            f"warning: {', '.join(columns)} not evaluated or undefined in {count}: {reason}",
            file=sys.stderr,
        )
    names = list(dict.fromkeys(r["arm"] for r in rows))
    per_metric = {
        metric: {name: [r[metric] for r in rows if r["arm"] == name] for name in names}
        for metric in METRICS
    }
    cells = {name: [(r["repeat"], r["fold"]) for r in rows if r["arm"] == name] for name in names}
    stats_rows = statistics.compare_arms(per_metric, iterations, cells)
    losses = {name: [] for name in names if name in study.arms}
    for row, curve in zip(rows, found.curves, strict=True):
        if row["kind"] == "arm":
            losses[row["arm"]].append((f"rep{row['repeat']} fold{row['fold']}", curve))
    froc = figures.froc_curves(rows, found.metrics, "clinically_significant")
    # Replaced whole: a report stopped half-way leaves the earlier one, not a mix of the two.
    with replaced_folder(out, "focalnet study report") as tmp:
        _write_csv(tmp / "runs.csv", RUN_COLUMNS, rows)
        _write_csv(tmp / "stats.csv", STATS_COLUMNS, stats_rows)
        figures.box_strip(tmp / "metrics.png", {m: per_metric[m] for m in HEADLINE})
        figures.froc_bands(tmp / "froc_cs.png", froc, "Clinically significant lesions")
        if len(names) > 1:
            figures.pvalue_matrices(tmp / "pvalues.png", stats_rows, HEADLINE)
        figures.val_loss_curves(tmp / "val_loss.png", losses)
        (tmp / "report.md").write_text(_markdown(study, found, stats_rows, iterations, skipped))
    return out
