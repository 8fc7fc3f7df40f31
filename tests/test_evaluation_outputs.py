"""What `focalnet evaluate` leaves in `--out` besides its numbers: a run stopped between its two
writes left the earlier run's report beside the new metrics; a file at OUT/predictions was moved
aside under a hidden name for good; the user's own `roc.png` went with `--no-figures` where no
evaluation had been; a `|` in `--label` moved every number of report.md into another column."""

from __future__ import annotations

import json

import pytest
from cli_calls import run_cli
from evaluation_cohort import write_cohort

from focalnet_jax.errors import UserError
from focalnet_jax.evaluation import evaluate
from focalnet_jax.evaluation.run_predictions import check_replaceable_predictions


def _evaluate(predictions, out, *flags):
    run_cli(["evaluate", "--predictions", str(predictions), "--out", str(out), "--no-picai",
             *flags])  # fmt: skip


def test_an_evaluation_stopped_before_its_report_leaves_the_earlier_one_whole(
    tmp_path, monkeypatch
):
    write_cohort(tmp_path / "pred")
    _evaluate(tmp_path / "pred", tmp_path / "out", "--no-figures")
    before = {n: (tmp_path / "out" / n).read_text() for n in ("metrics.json", "report.md")}
    (tmp_path / "two").mkdir()
    for case in ("c1", "c5"):
        (tmp_path / "two" / f"{case}.npz").write_bytes(
            (tmp_path / "pred" / f"{case}.npz").read_bytes()
        )

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "markdown_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate_predictions(tmp_path / "two", tmp_path / "out", with_picai=False)
    after = {n: (tmp_path / "out" / n).read_text() for n in ("metrics.json", "report.md")}
    assert after == before and json.loads(after["metrics.json"])["num_cases"] == 5


def test_an_evaluation_on_a_full_disk_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    """The earlier metrics.json, report.md and figures were removed before the new ones were
    written: a full disk while drawing lost the earlier evaluation and left the new numbers
    without their figures. The error names the figure at its place in --out."""
    from focalnet_jax.evaluation import figures

    write_cohort(tmp_path / "pred")
    out = tmp_path / "out"
    _evaluate(tmp_path / "pred", out)
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"metrics.json", "report.md", "froc.png", "roc.png"} <= set(earlier)

    def full_disk(path, panels):
        path.write_bytes(b"half a figure")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(figures, "roc_figure", full_disk)
    with pytest.raises(OSError) as failed:
        evaluate.evaluate_predictions(tmp_path / "pred", out, with_picai=False, min_score=0.5)
    assert str(failed.value) == f"[Errno 28] No space left on device: '{out / 'roc.png'}'"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier


def test_a_file_where_the_predictions_go_is_refused(tmp_path):
    (tmp_path / "predictions").write_text("mine")
    with pytest.raises(
        UserError, match="predictions exists and is not a folder: focalnet evaluate"
    ):
        check_replaceable_predictions(tmp_path / "predictions")


def test_no_figures_into_a_folder_without_an_evaluation_keeps_its_files(tmp_path):
    write_cohort(tmp_path / "pred")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "roc.png").write_text("my own figure")
    _evaluate(tmp_path / "pred", tmp_path / "mine", "--no-figures")
    assert (tmp_path / "mine" / "roc.png").read_text() == "my own figure"
    # An earlier evaluation's figures go, without figures of this one.
    _evaluate(tmp_path / "pred", tmp_path / "again")
    assert (tmp_path / "again" / "roc.png").is_file()
    _evaluate(tmp_path / "pred", tmp_path / "again", "--no-figures")
    assert not (tmp_path / "again" / "roc.png").exists()


def test_a_bar_in_the_label_stays_in_its_cell(tmp_path):
    write_cohort(tmp_path / "pred")
    _evaluate(tmp_path / "pred", tmp_path / "out", "--no-figures", "--label", "FocalNet | MFL")
    rows, header = 0, ""
    for line in (tmp_path / "out" / "report.md").read_text().splitlines():
        header = line if line.startswith("| Method") else header
        if line.startswith("| FocalNet"):  # as many cells as its table's header
            assert line.startswith("| FocalNet \\| MFL |")
            assert line.replace("\\|", "").count("|") == header.count("|"), (header, line)
            rows += 1
    assert rows == 4


def test_froc_figures_draw_no_curve_for_a_group_without_lesions(tmp_path, monkeypatch):
    """A GS group with no lesion (n=0) has no sensitivity (`n/a` in report.md, null in
    metrics.json), but its froc_gs.png panel drew a line at sensitivity 0 before the first FP
    point, with the method in its legend."""
    from evaluation_cohort import write_blob_case

    from focalnet_jax.evaluation import figures

    write_blob_case(tmp_path / "p", "c1", lesion=(3, (4, 20, 20)), blobs=[((4, 20, 20), 0.9)])
    write_blob_case(tmp_path / "p", "c2", blobs=[((4, 12, 30), 0.6)])
    drawn, real = {}, figures.froc_figure
    monkeypatch.setattr(  # the real figure, its panels kept to look at
        figures,
        "froc_figure",
        lambda path, panels: drawn.update({path.name: panels}) or real(path, panels),
    )
    evaluate.evaluate_predictions(tmp_path / "p", tmp_path / "eval", with_picai=False)
    gs = drawn["froc_gs.png"]
    assert sorted(gs) == ["GS 3+3 (n=0)", "GS 3+4 (n=0)", "GS 4+3 (n=1)", "GS >= 8 (n=0)"]
    assert all(curves["model"] is None for title, curves in gs.items() if "(n=0)" in title)
    assert gs["GS 4+3 (n=1)"]["model"] is not None
    assert (tmp_path / "eval" / "froc_gs.png").is_file()
