"""The study report's figures: per-metric box and strip plots by arm, FROC curves with a mean +-2 SD
band per arm, the permutation p-value matrix of each headline metric, and each arm's validation
loss curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from focalnet_jax.evaluation import figures as eval_figures  # noqa: E402
from focalnet_jax.evaluation.froc import sensitivity_at  # noqa: E402
from focalnet_jax.evaluation.stats import band, finite_values  # noqa: E402

FP_GRID = np.geomspace(eval_figures.FP_RANGE[0], eval_figures.FP_RANGE[1], 400)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    return eval_figures.save_png(fig, path, dpi=120)


def box_strip(path: Path, metrics: Mapping[str, Mapping[str, Sequence[float]]]) -> Path:
    """One panel per metric: a box per arm with every run as a jittered point; an arm with runs
    whose metric is undefined (NaN, not drawn) says how many runs are drawn: `arm (n/N)`."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.8), squeeze=False)
    rng = np.random.default_rng(0)  # jitter only
    for ax, (metric, per_arm) in zip(axes[0], metrics.items(), strict=True):
        arms = list(per_arm)
        values = [finite_values(per_arm[a]) for a in arms]
        shown = [v if v.size else np.array([np.nan]) for v in values]
        ax.boxplot(shown, widths=0.5, showfliers=False)
        for i, v in enumerate(values, start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, v.size), v, s=14, color=f"C{i - 1}", zorder=3)
        labels = [
            arm if v.size == len(per_arm[arm]) else f"{arm} ({v.size}/{len(per_arm[arm])})"
            for arm, v in zip(arms, values, strict=True)
        ]
        ax.set_xticks(range(1, len(arms) + 1), labels, rotation=30, ha="right")
        ax.set_title(metric, fontsize="medium")
        ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def froc_bands(path: Path, curves: Mapping[str, Sequence[tuple]], title: str) -> Path:
    """FROC sensitivity S(x) per arm: the mean over runs with a +-2 SD band; `curves` maps an arm
    to its runs' (fp, sensitivity) curve points."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for i, (arm, runs) in enumerate(curves.items()):
        sampled = [sensitivity_at(np.asarray(fp), np.asarray(s), FP_GRID) for fp, s in runs]
        if not sampled:  # named still: the panel looked as if the arm had not been run
            ax.plot([], [], color=f"C{i}", label=f"{arm} (n=0)")
            continue
        mean, lower, upper = band(sampled)
        ax.plot(FP_GRID, mean, color=f"C{i}", label=f"{arm} (n={len(sampled)})")
        ax.fill_between(FP_GRID, lower, upper, color=f"C{i}", alpha=0.2, linewidth=0)
    ax.set_xscale("log")
    ax.set_xlim(*eval_figures.FP_RANGE)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("False positives per patient")
    ax.set_ylabel("Sensitivity")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


PVALUE_CMAP = "viridis_r"  # small p (the finding) light yellow, p = 1 dark purple


def pvalue_text_color(p: float) -> str:
    """Black on the light (small p) half of PVALUE_CMAP, white on its dark half, so that the
    p-values that matter stay readable (white on yellow did not)."""
    return "k" if p < 0.5 else "w"


def pvalue_matrices(path: Path, rows: Sequence[Mapping], metrics: Sequence[str]) -> Path:
    """One panel per metric: p_permutation of (row = baseline a, column = alternative b); a pair
    whose p is undefined (NaN: an arm without values) reads n/a, the diagonal stays empty."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        selected = [r for r in rows if r["metric"] == metric]
        arms = list(dict.fromkeys([r["arm_a"] for r in selected] + [r["arm_b"] for r in selected]))
        matrix = np.full((len(arms), len(arms)), np.nan)
        for r in selected:
            matrix[arms.index(r["arm_a"]), arms.index(r["arm_b"])] = r["p_permutation"]
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap=PVALUE_CMAP)
        for (i, j), p in np.ndenumerate(matrix):
            if np.isfinite(p):
                ax.text(j, i, f"{p:.2g}", ha="center", va="center", fontsize="small",
                        color=pvalue_text_color(p))  # fmt: skip
            elif i != j:  # an empty cell read as no comparison, like the diagonal
                ax.text(j, i, "n/a", ha="center", va="center", fontsize="small", color="k")
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
        ax.set_yticks(range(len(arms)), arms)
        ax.set_xlabel("alternative b (H1: b better)")
        ax.set_ylabel("baseline a")
        ax.set_title(metric, fontsize="medium")
        fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def val_loss_curves(path: Path, curves: Mapping[str, Sequence[tuple[str, object]]]) -> Path:
    """One panel per training arm: each run's validation loss against the step, from `curves`
    (arm -> (run label, `convergence.LossCurve`) pairs), the last quarter of training shaded."""
    arms = list(curves) or ["(none)"]
    fig, axes = plt.subplots(1, len(arms), figsize=(3.8 * len(arms), 3.4), squeeze=False)
    for ax, arm in zip(axes[0], arms, strict=True):
        runs = [(label, c) for label, c in curves.get(arm, []) if c.steps.size]
        for i, (label, curve) in enumerate(runs):
            ax.plot(curve.steps, curve.losses, marker="o", markersize=3, color=f"C{i}", label=label)
        if runs:
            last = max(int(c.steps[-1]) for _, c in runs)
            ax.axvspan(0.75 * last, last, color="0.88", zorder=0, label="last quarter")
            ax.legend(loc="upper right", fontsize="x-small")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{arm} (n={len(runs)})", fontsize="medium")
        ax.grid(True, alpha=0.3)
    return _save(fig, path)


def froc_curves(rows: Sequence[Mapping], metrics: Sequence[Mapping], group: str) -> dict:
    """{arm: [(fp, sensitivity) curve of each run]} for FROC `group`, over the runs whose
    validation fold has a lesion of the group (elsewhere the sensitivity is undefined). A run
    whose metrics.json lacks the group's curve (another version, taken by `--partial`, which
    warned of it) is left out."""
    curves = {row["arm"]: [] for row in rows}
    for row, m in zip(rows, metrics, strict=True):
        froc = m.get("froc", {}).get(group, {})
        if froc.get("num_lesions") and "curve" in froc:
            points = froc["curve"]
            curves[row["arm"]].append((points["fp"], points["sensitivity"]))
    return curves
