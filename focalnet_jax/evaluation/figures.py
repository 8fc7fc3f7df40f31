"""PNG figures in the paper's style: FROC (Figs. 5-6, log FP axis 0.01..10), GS ROC (Fig. 7) and a
montage of cases (Fig. 4: T2w, ADC, truth contours coloured by GS, detection crosses)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from focalnet_jax.data.atomic_files import replaced_atomically  # noqa: E402
from focalnet_jax.evaluation.froc import sensitivity_at  # noqa: E402

FP_RANGE = (0.01, 10.0)
GS_NAMES = {1: "GS 3+3", 2: "GS 3+4", 3: "GS 4+3", 4: "GS 8", 5: "GS >= 9"}
GS_COLOURS = {1: "#2ca02c", 2: "#1f77b4", 3: "#9467bd", 4: "#d62728", 5: "#8c564b"}
UNKNOWN_GRADE = ("csPCa, GS unknown", "#e377c2")  # class 2 of unknown grade: not known 3+4
CROSS_COLOUR = "#ff7f0e"
LABELLED_POINTS = 10


@dataclasses.dataclass(frozen=True)
class Curve:
    """One line of a plot, with an optional shaded band (e.g. mean +- 2 SD over folds)."""

    x: np.ndarray
    y: np.ndarray
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    step: bool = False


@dataclasses.dataclass(frozen=True)
class MontageCase:
    """One column of the montage: `t2w`, `adc` (or None), `classes` `[H, W]` true class per pixel,
    `points` `[P, 2]` (row, col) of the detections shown, `unknown_grade` bool `[H, W]` (or None):
    pixels of lesions known only as clinically significant, drawn apart from GS 3+4."""

    title: str
    t2w: np.ndarray
    adc: np.ndarray | None
    classes: np.ndarray
    points: np.ndarray
    unknown_grade: np.ndarray | None = None


def froc_step_curve(fp: np.ndarray, sens: np.ndarray) -> Curve:
    """The step function S(x) of one FROC curve over the plotted FP range."""
    inside = fp[(fp > FP_RANGE[0]) & (fp < FP_RANGE[1])]
    x = np.concatenate([[FP_RANGE[0]], np.unique(inside), [FP_RANGE[1]]])
    return Curve(x=x, y=sensitivity_at(fp, sens, x), step=True)


def _draw(ax, label: str, curve: Curve, colour) -> None:
    """`curve` in `colour`, named `label` (escaped: `_draw_all`) in the legend."""
    if curve.step:
        ax.step(curve.x, curve.y, where="post", label=label, color=colour)
    else:
        ax.plot(curve.x, curve.y, label=label, color=colour)
    if curve.lower is not None and curve.upper is not None:
        ax.fill_between(curve.x, curve.lower, curve.upper, color=colour, alpha=0.2, linewidth=0)


def _draw_all(ax, curves: Mapping[str, Curve | None]) -> None:
    """Each curve in the colour of its place among `curves`, and a legend naming every label: one
    without a curve (None) as '<label> (n/a)', which the panel would otherwise leave out as if
    that method had not been run. A label is a name (a method, `--label`), never a formula, so
    its `$` are escaped (`cost_$5 vs $10` was drawn as maths; a name whose `$...$` was no
    formula ended the command in a parse error)."""
    for i, (label, curve) in enumerate(curves.items()):
        label = label.replace("$", r"\$")
        if curve is None:
            ax.plot([], [], color=f"C{i}", label=f"{label} (n/a)")
        else:
            _draw(ax, label, curve, f"C{i}")
    if curves:
        ax.legend(loc="lower right", fontsize="small")


def _grid(num_panels: int, width: float = 4.0):
    cols = min(num_panels, 4)
    rows = -(-num_panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, width * rows), squeeze=False)
    for ax in axes.flat[num_panels:]:
        ax.set_visible(False)
    return fig, axes.flat


def froc_figure(path: str | Path, panels: Mapping[str, Mapping[str, Curve | None]]) -> Path:
    """One panel per lesion group (title -> {method label -> curve}); log FP axis 0.01..10. A
    method's colour is its place among the labels, so None (no curve in that panel) keeps the
    others' colours the same in every panel."""
    fig, axes = _grid(len(panels))
    for ax, (title, curves) in zip(axes, panels.items(), strict=False):
        _draw_all(ax, curves)
        ax.set_xscale("log")
        ax.set_xlim(*FP_RANGE)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("False positives per patient")
        ax.set_ylabel("Sensitivity")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    return save_png(fig, path)


def roc_figure(path: str | Path, panels: Mapping[str, Mapping[str, Curve | None]]) -> Path:
    """One panel per GS task (title -> {label (with AUC) -> curve}, None as in `froc_figure`),
    with the chance diagonal."""
    fig, axes = _grid(len(panels))
    for ax, (title, curves) in zip(axes, panels.items(), strict=False):
        ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
        _draw_all(ax, curves)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_aspect("equal")
        ax.set_xlabel("False positive rate")
        ax.set_ylabel("True positive rate")
        ax.set_title(title)
    return save_png(fig, path)


def montage_figure(path: str | Path, cases: Sequence[MontageCase]) -> Path:
    """T2w (top) and ADC (below, where given) of each case with GS-coloured truth contours and
    detection crosses."""
    rows = 2 if any(case.adc is not None for case in cases) else 1
    fig, axes = plt.subplots(rows, len(cases), figsize=(3 * len(cases), 3 * rows), squeeze=False)
    for col, case in enumerate(cases):
        for row, (name, image) in enumerate((("T2w", case.t2w), ("ADC", case.adc))[:rows]):
            ax = axes[row, col]
            ax.axis("off")
            if image is None:
                continue
            ax.imshow(np.clip(image, 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            unknown = _unknown_grade(case)
            for cls in np.unique(case.classes[(case.classes > 0) & ~unknown]):
                ax.contour((case.classes == cls) & ~unknown, levels=[0.5],
                           colors=GS_COLOURS[int(cls)])  # fmt: skip
            if unknown.any():
                ax.contour(unknown, levels=[0.5], colors=UNKNOWN_GRADE[1])
            if len(case.points):
                ax.scatter(case.points[:, 1], case.points[:, 0], marker="+", s=120, c=CROSS_COLOUR)
            ax.set_title(f"{case.title}\n{name}" if row == 0 else name, fontsize="small")
    handles = [
        plt.Line2D([], [], color=colour, label=GS_NAMES[cls]) for cls, colour in GS_COLOURS.items()
    ]
    if any(_unknown_grade(case).any() for case in cases):
        handles.append(plt.Line2D([], [], color=UNKNOWN_GRADE[1], label=UNKNOWN_GRADE[0]))
    handles.append(
        plt.Line2D([], [], color=CROSS_COLOUR, marker="+", linestyle="", label="detection")
    )
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize="small")
    fig.subplots_adjust(bottom=0.12)
    return save_png(fig, path)


def _unknown_grade(case: MontageCase) -> np.ndarray:
    if case.unknown_grade is None:
        return np.zeros(case.classes.shape, bool)
    return case.unknown_grade


def save_png(fig, path: str | Path, dpi: int = 100) -> Path:
    """Writes `fig` to the PNG `path` atomically (a killed write leaves no half image; a full disk
    names `path`), creating its folder, and closes it."""
    try:
        with replaced_atomically(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


@dataclasses.dataclass(frozen=True)
class OverlayPanel:
    """One slice of `focalnet predict`'s overlay: T2w `[H, W]` in [0, 1], lesion score `[H, W]`,
    detections `[P, 2]` (row, col) with their scores `[P]`."""

    title: str
    t2w: np.ndarray
    score: np.ndarray
    points: np.ndarray
    point_scores: np.ndarray


def overlay_figure(path: str | Path, panels: Sequence[OverlayPanel]) -> Path:
    """T2w slices with the lesion score as a translucent heat map and numbered detection crosses."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        ax.imshow(np.clip(panel.t2w, 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        heat = np.ma.masked_less(panel.score, 0.05)
        image = ax.imshow(heat, cmap="inferno", vmin=0, vmax=1, alpha=0.45)
        if len(panel.points):
            ax.scatter(panel.points[:, 1], panel.points[:, 0], marker="+", s=150, c=CROSS_COLOUR)
        # Scores are written next to the highest few crosses only, to stay readable.
        best = np.argsort(-panel.point_scores, kind="stable")[:LABELLED_POINTS]
        for (row, col), score in zip(panel.points[best], panel.point_scores[best], strict=True):
            ax.annotate(f"{score:.2f}", (col, row), xytext=(4, 4), textcoords="offset points",
                        color=CROSS_COLOUR, fontsize="small")  # fmt: skip
        ax.set_title(panel.title, fontsize="small")
        ax.axis("off")
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="P(lesion)")
    return save_png(fig, path)
