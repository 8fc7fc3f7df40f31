"""`focalnet study report --workdir DIR [--partial]`: DIR/report/runs.csv, stats.csv, report.md and
the figures (module `figures`).

runs.csv has one row per training cell and per ensemble cell (`kind` says which), with the
metrics of its `eval/metrics.json` in the columns of `METRICS`. stats.csv compares every ordered
pair of arms and ensembles on every metric (module `statistics`).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from focalnet_jax.evaluation.stats import mean_sd
from focalnet_jax.study import figures, statistics
from focalnet_jax.study.cells import METRICS as METRICS_FILE
from focalnet_jax.study.cells import Cell, Study
from focalnet_jax.study.spec import StudyError, flatten

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
RUN_COLUMNS = ("arm", "kind", "repeat", "fold", "seed", *METRICS, "num_patients")
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
)


def _lookup(metrics: Mapping, path: Sequence[str]) -> float:
    value = metrics
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return float("nan")
        value = value[key]
    return float("nan") if value is None else float(value)


def _row(study: Study, cell: Cell, metrics: Mapping) -> dict:
    row = {
        "arm": cell.arm,
        "kind": "ensemble" if cell.ensemble else "arm",
        "repeat": cell.repeat,
        "fold": cell.fold,
        "seed": study.seed(cell),
    }
    row.update({column: _lookup(metrics, path) for column, path in METRICS.items()})
    row["num_patients"] = metrics.get("num_patients")
    return row


def collect(study: Study, *, partial: bool) -> tuple[list[dict], list[dict], list[str]]:
    """(runs.csv rows, their metrics.json contents, cells without metrics); refuses missing
    cells unless `partial`."""
    rows, contents, missing = [], [], []
    for cell in study.cells() + study.ensemble_cells():
        path = study.path(cell) / METRICS_FILE
        if cell.ensemble or study.state(cell).state == "done":
            if path.is_file():
                metrics = json.loads(path.read_text())
                rows.append(_row(study, cell, metrics))
                contents.append(metrics)
                continue
        missing.append(cell.name)
    if missing and not partial:
        shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        raise StudyError(
            f"{study.root}: {len(missing)} cells not done ({shown}); "
            "`focalnet study status` lists them, --partial reports the others"
        )
    return rows, contents, missing


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _markdown(study: Study, rows, stats_rows, missing, iterations: int) -> str:
    names = list(dict.fromkeys(r["arm"] for r in rows))
    plain = study.plain
    lines = [
        f"# Study {study.root.resolve().name}",
        "",
        f"Spec `{plain['spec_file']}`; base `{plain['base']}`; store `{plain['store']}`; "
        f"{plain['repeats']} repeats (seed {plain['seed']} + r) x folds {plain['folds']} of "
        f"{plain['num_folds']}.",
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
        lines += ["", f"**Partial report**: {len(missing)} cells missing ({', '.join(missing)})."]
    lines += ["", "## Metrics over runs (mean +- SD, n runs)", ""]
    lines += ["| arm | " + " | ".join(HEADLINE) + " |", "|---" * (len(HEADLINE) + 1) + "|"]
    for name in names:
        cells = []
        for metric in HEADLINE:
            s = mean_sd([r[metric] for r in rows if r["arm"] == name])
            cells.append(f"{_fmt(s['mean'])} +- {_fmt(s['sd'])} ({s['n']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Comparisons (H1: b better than a)",
        "",
        "p_permutation: picai_eval's permutation test over runs (exact when the two arms have "
        f"<= 20 runs together, else {iterations} random splits); p_welch: one-sided Welch "
        "t-test; Bonferroni over the ordered pairs of each metric. See docs/studies.md.",
        "",
        "| metric | a | b | mean a | mean b | p_permutation | p_welch | p_welch_bonferroni |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in stats_rows:
        if r["metric"] in HEADLINE:
            lines.append(
                f"| {r['metric']} | {r['arm_a']} | {r['arm_b']} | {_fmt(r['mean_a'])} | "
                f"{_fmt(r['mean_b'])} | {_fmt(r['p_permutation'], 4)} | {_fmt(r['p_welch'], 4)} "
                f"| {_fmt(r['p_welch_bonferroni'], 4)} |"
            )
    lines += ["", "## Figures", ""]
    for png in ("metrics.png", "froc_cs.png", "pvalues.png")[: 3 if len(names) > 1 else 2]:
        lines.append(f"![{png}]({png})")
    return "\n".join(lines) + "\n"


def write_report(
    study: Study, *, partial: bool = False, iterations: int = statistics.APPROXIMATE_ITERATIONS
) -> Path:
    """Write DIR/report/; returns the folder."""
    rows, contents, missing = collect(study, partial=partial)
    if not rows:
        raise StudyError(f"{study.root}: no cell is done yet; nothing to report")
    out = study.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(r["arm"] for r in rows))
    per_metric = {
        metric: {name: [r[metric] for r in rows if r["arm"] == name] for name in names}
        for metric in METRICS
    }
    stats_rows = statistics.compare_arms(per_metric, iterations)
    _write_csv(out / "runs.csv", RUN_COLUMNS, rows)
    _write_csv(out / "stats.csv", STATS_COLUMNS, stats_rows)
    figures.box_strip(out / "metrics.png", {m: per_metric[m] for m in HEADLINE})
    curves = {name: [] for name in names}
    for row, metrics in zip(rows, contents, strict=True):
        curve = metrics["froc"]["clinically_significant"]["curve"]
        curves[row["arm"]].append((curve["fp"], curve["sensitivity"]))
    figures.froc_bands(out / "froc_cs.png", curves, "Clinically significant lesions")
    if len(names) > 1:
        figures.pvalue_matrices(out / "pvalues.png", stats_rows, HEADLINE)
    markdown = _markdown(study, rows, stats_rows, missing, iterations)
    (out / "report.md").write_text(markdown)
    return out
