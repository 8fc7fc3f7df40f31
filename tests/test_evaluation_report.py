"""report.md tables: which empty cells read 'n.r.' (sensitivity never reached) and which 'n/a'
(no lesion of the group), on FROC results counted by hand."""

from __future__ import annotations

import numpy as np
import pytest
from froc_cases import make_case, three_patients

from focalnet_jax.errors import UserError
from focalnet_jax.evaluation.froc import froc_analysis
from focalnet_jax.evaluation.matching import summarize_case
from focalnet_jax.evaluation.report import check_settings, json_safe, markdown_report
from focalnet_jax.evaluation.roc import gs_roc


def fold_metrics(summaries) -> dict:
    froc = froc_analysis(summaries)
    return json_safe({"num_patients": len(summaries), "froc": froc, "roc": gs_roc(summaries)})


def with_missed_gs8_lesion():
    """The three patients plus D: a GS 8 lesion (class 4) that no detection hits, so the GS >= 8
    group has one lesion and its sensitivity stays 0 at every threshold."""
    d = make_case("D", "D", (1, 64, 64), boxes=[(0, 30, 34, 30, 34, 4)])
    return [*three_patients(), summarize_case(d)]


def table_row(report: str, table: str, method: str) -> dict[str, str]:
    """{column header: cell} of `method`'s row in the table under heading `table`."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("### " + table))
    header = [c.strip() for c in lines[start + 2].strip("|").split("|")]
    for line in lines[start + 4 :]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == method:
            return dict(zip(header, cells, strict=True))
    raise AssertionError(f"no row {method} in {table}")


TABLE_III = "False positives per patient at given sensitivity per GS group"


def test_group_without_lesions_is_na_and_a_missed_group_is_not_reached():
    no_gs8 = fold_metrics(three_patients())
    missed_gs8 = fold_metrics(with_missed_gs8_lesion())
    assert no_gs8["froc"]["gs_8+"]["num_lesions"] == 0
    assert missed_gs8["froc"]["gs_8+"]["num_lesions"] == 1
    report = markdown_report({"none": [no_gs8], "missed": [missed_gs8]}, title="t")
    none = table_row(report, TABLE_III, "none")
    missed = table_row(report, TABLE_III, "missed")
    assert none["GS >= 8 FP@Sen90%"] == "n/a"  # no GS >= 8 lesion: undefined
    assert missed["GS >= 8 FP@Sen90%"] == "n.r."  # one lesion, never detected
    # GS 3+3 (A's lesion, first hit at 0.3): 60 % sensitivity at 4/3 FP per patient over
    # patients A-C, and 4/4 = 1 FP per patient once lesion-free-of-FP patient D is added.
    assert none["GS 3+3 FP@Sen60%"] == "1.333"
    assert missed["GS 3+3 FP@Sen60%"] == "1.000"


def test_folds_that_never_reach_a_sensitivity_are_counted_apart_from_folds_without_lesions():
    """Over folds, the mean FP at 90 % sensitivity is over the folds that reach it; the cell must
    say how many folds had lesions but never reached it (an optimistic mean otherwise) and
    not count folds without lesions among them."""
    no_gs8 = fold_metrics(three_patients())
    missed_gs8 = fold_metrics(with_missed_gs8_lesion())
    reached = fold_metrics(three_patients())
    reached["froc"]["gs_8+"] = reached["froc"]["gs_4+3"]  # a GS >= 8 lesion found at 0 FP
    report = markdown_report({"cv": [reached, missed_gs8, no_gs8]}, title="t")
    cell = table_row(report, TABLE_III, "cv")["GS >= 8 FP@Sen90%"]
    assert cell == "0.000 (1/3; 1 n.r.)"
    only_empty = markdown_report({"cv": [no_gs8, no_gs8]}, title="t")
    assert table_row(only_empty, TABLE_III, "cv")["GS >= 8 FP@Sen90%"] == "n/a"
    only_missed = markdown_report({"cv": [missed_gs8, no_gs8]}, title="t")
    assert table_row(only_missed, TABLE_III, "cv")["GS >= 8 FP@Sen90%"] == "n.r. (1/2)"


def test_evaluations_of_predictions_made_with_other_tta_or_candidates_are_not_pooled():
    """`summarize` and `study report` pooled a fold evaluated with flip TTA and one without: only
    the evaluation settings were compared. Predictions without `models.json` record neither."""
    settings = {"radius_mm": 5.0, "min_score": 0.001, "roc_detections": 12, "slices": "all"}
    flip = {"settings": settings, "models": {"tta": "flip", "candidates": {"mode": "peak"}}}
    plain = {"settings": settings, "models": {"tta": "none", "candidates": {"mode": "peak"}}}
    with pytest.raises(UserError) as raised:
        check_settings({"a": flip, "b": plain})
    assert str(raised.value) == (
        "a and b were evaluated with other settings {'models.tta': ('flip', 'none')}: their "
        "numbers are not comparable; evaluate them alike"
    )
    other = {"settings": settings, "models": {"tta": "flip", "candidates": {"mode": "mean"}}}
    with pytest.raises(UserError, match="models.candidates"):
        check_settings({"a": flip, "b": other})
    check_settings({"a": flip, "b": {"settings": settings}, "c": dict(flip)})  # no models.json


def test_a_method_keeps_its_colour_in_a_panel_where_another_has_no_curve(tmp_path):
    """Summary figures coloured curves by their place in each panel, leaving out methods without
    a curve there (no lesion of the group, no ROC positive): B was orange in one panel and blue
    in the next. A method's colour is now its place among all methods."""
    import matplotlib.pyplot as plt

    from focalnet_jax.evaluation import figures

    curve = figures.Curve(x=np.array([0.1, 1.0]), y=np.array([0.5, 0.8]))
    fig, ax = plt.subplots()
    figures._draw_all(ax, {"A": None, "B": curve})
    empty, line = ax.get_lines()
    assert line.get_color() == "C1" and line.get_label() == "B"
    assert empty.get_color() == "C0" and not len(empty.get_xdata())  # a legend entry alone
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["A (n/a)", "B"]
    plt.close(fig)
    path = figures.froc_figure(tmp_path / "f.png", {"GS 4+3": {"A": None, "B": curve}})
    assert path.is_file()


def test_each_single_run_method_gives_its_bootstrap_intervals():
    """Two final models (one run each): summary.md gave the first method's PI-CAI intervals only,
    and summary.json none."""
    from focalnet_jax.evaluation.summary import metric_summary

    runs = {}
    for name, low in (("A", 0.5), ("B", 0.8)):
        metrics = fold_metrics(three_patients())
        metrics["picai"] = {"auroc": low + 0.1, "ap": 0.3, "score": 0.4,
                            "auroc_95_ci": [low, low + 0.2], "ap_95_ci": None,
                            "score_95_ci": [0.25, 0.55]}  # fmt: skip
        runs[name] = [metrics]
    report = markdown_report(runs, title="t")
    assert "95 % bootstrap intervals (A): AUROC [0.500, 0.700], AP n/a, score [0.250, 0.550]" in (
        report
    )
    assert "95 % bootstrap intervals (B): AUROC [0.800, 1.000], AP n/a, score [0.250, 0.550]" in (
        report
    )
    assert metric_summary(runs["B"], ("picai", "auroc"))["values_95_ci"] == [[0.8, 1.0]]
    assert metric_summary(runs["B"], ("picai", "ap"))["values_95_ci"] == [None]
