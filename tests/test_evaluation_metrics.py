"""`focalnet evaluate` end to end on a five-case cohort of score blobs: the contract keys of
metrics.json, PI-CAI metrics as picai_eval computes them and their bootstrap by patient, the
figures, report.md and the printed summary line."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from cli_calls import run_cli
from evaluation_cohort import _evaluate_argv, write_blob_case, write_cohort

from focalnet_jax.evaluation.predictions import read_case


def test_evaluate_writes_contract_metrics_picai_and_figures(tmp_path):
    predictions, out = tmp_path / "predictions", tmp_path / "eval"
    write_cohort(predictions)
    run_cli(["evaluate", "--predictions", str(predictions), "--out", str(out),
             "--picai-bootstraps", "20"])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_patients"] == 5
    for group in ("all", "clinically_significant", "index", "gs_3+3", "gs_3+4", "gs_4+3", "gs_8+"):
        froc = metrics["froc"][group]
        assert set(froc["sensitivity_at_fp"]) == {"0.25", "0.5", "1", "2", "3"}
        assert set(froc["fp_at_sensitivity"]) == {"0.6", "0.7", "0.8", "0.9"}
        assert set(froc["pauc"]) == {"0.01-1", "0.1-3"}
        assert len(froc["curve"]["fp"]) == len(froc["curve"]["sensitivity"])
        assert froc["num_patients"] == 5
    assert set(metrics["roc"]) == {"gs_ge_7", "gs_ge_4+3", "gs_ge_8", "gs_ge_9"}
    # One detection per blob; the lesions of c1 (0.9) and c5 (0.5) are hit, c2's is missed;
    # FPs: 0.7 (c4), 0.6 (c2), 0.3 (c3) over 5 patients.
    assert metrics["froc"]["all"]["num_lesions"] == 3
    # Thresholds 0.9, 0.7, 0.6, 0.5, 0.3: (0, 1/3) (0.2, 1/3) (0.4, 1/3) (0.4, 2/3) (0.6, 2/3).
    np.testing.assert_allclose(metrics["froc"]["all"]["curve"]["fp"], [0, 0.2, 0.4, 0.4, 0.6])
    np.testing.assert_allclose(
        metrics["froc"]["all"]["curve"]["sensitivity"], [1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3]
    )
    assert metrics["froc"]["gs_8+"]["fp_at_sensitivity"]["0.9"] is None

    # The same detection maps through picai_eval.evaluate give the numbers in metrics.json.
    with contextlib.redirect_stdout(io.StringIO()):
        from picai_eval import evaluate
        from report_guided_annotation import extract_lesion_candidates
    cases = [read_case(predictions / f"c{i}.npz") for i in range(1, 6)]
    y_det = [extract_lesion_candidates(c.scores[..., 1])[0] for c in cases]
    assert all(d.max() > 0 for d in y_det)  # real candidates in every case
    y_true = [(c.classes >= 2).astype(np.int32) for c in cases]
    reference = evaluate(y_det=y_det, y_true=y_true, num_parallel_calls=1)
    picai = metrics["picai"]
    assert picai["auroc"] == pytest.approx(reference.auroc)
    assert picai["ap"] == pytest.approx(reference.AP)
    assert picai["score"] == pytest.approx(reference.score)
    assert (picai["num_cases"], picai["num_lesions"]) == (5, 2)
    # Case scores 0.9*0.8, 0.6*0.8 (positive) vs 0.3*0.8, 0.7*0.8, 0.5*0.8 (negative): 5 of 6 pairs.
    assert picai["auroc"] == pytest.approx(5 / 6)
    assert len(picai["score_95_ci"]) == 2
    for name in ("froc.png", "froc_gs.png", "roc.png", "montage.png", "report.md"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "Table II" in report and "PI-CAI protocol" in report


def test_predictions_of_a_store_of_annotated_slices_get_no_picai_numbers(tmp_path):
    """A store made with `--slices annotated` holds a few slices of each case and no lesion-free
    case: PI-CAI's 3D protocol scored those slices as the volume (candidates on the others never
    counted), an AP and AUROC of no PI-CAI evaluation. Skipped, with the reason, where the
    predictions' models.json names such a store; the paper's protocol is computed as before."""
    predictions, out = tmp_path / "predictions", tmp_path / "eval"
    write_cohort(predictions)
    models = {"models": [{"run": "/r", "step": 1}], "tta": "none"}
    (predictions / "models.json").write_text(json.dumps(models))
    evaluate = ["evaluate", "--predictions", str(predictions), "--out", str(out)]
    run_cli([*evaluate, "--picai-bootstraps", "0", "--no-figures"])
    whole = json.loads((out / "metrics.json").read_text())
    assert whole["picai"]["auroc"] == pytest.approx(5 / 6)
    models["store"] = {"path": "/data/store", "slices": "annotated"}
    (predictions / "models.json").write_text(json.dumps(models))
    run_cli([*evaluate, "--picai-bootstraps", "0", "--no-figures"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["picai"] == {
        "skipped": "the predictions hold only the annotated slices of store /data/store (made "
        "with --slices annotated, its lesion-free cases left out): the 3D protocol needs every "
        "slice of every case; predict from a store made with --slices all"
    }
    assert metrics["froc"] == whole["froc"] and metrics["models"]["store"] == models["store"]
    for other in ([], {"store": "/data/store"}):  # another tool's models.json: read as before
        (predictions / "models.json").write_text(json.dumps(other))
        run_cli([*evaluate, "--picai-bootstraps", "0", "--no-figures"])
        assert json.loads((out / "metrics.json").read_text())["picai"]["auroc"] == 5 / 6


def test_a_rerun_into_the_same_out_leaves_no_figure_of_the_earlier_evaluation(tmp_path):
    """A second evaluation writes its own figures or none: an earlier run's PNGs beside the new
    metrics.json would show other numbers. Only the evaluation's own file names are removed."""
    predictions, out = tmp_path / "predictions", tmp_path / "eval"
    write_cohort(predictions)
    figures = {"froc.png", "froc_gs.png", "roc.png", "montage.png"}
    run_cli(["evaluate", "--predictions", str(predictions), "--out", str(out), "--no-picai"])
    assert figures <= {p.name for p in out.iterdir()}
    (out / "notes.txt").write_text("mine")
    (out / "slide.png").write_bytes(b"mine")
    # Without T2w in any file there is no montage: the earlier montage.png must not stay.
    no_images = tmp_path / "no_images"
    write_blob_case(no_images, "n1", lesion=(2, (4, 20, 20)), blobs=[((4, 20, 20), 0.8)],
                    with_images=False)  # fmt: skip
    run_cli(["evaluate", "--predictions", str(no_images), "--out", str(out), "--no-picai"])
    assert {p.name for p in out.iterdir()} == figures - {"montage.png"} | {
        "metrics.json", "report.md", "notes.txt", "slide.png"}  # fmt: skip
    run_cli(["evaluate", "--predictions", str(predictions), "--out", str(out), "--no-picai",
             "--no-figures"])  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.json", "notes.txt", "report.md", "slide.png"]  # fmt: skip
    assert json.loads((out / "metrics.json").read_text())["num_cases"] == 5
    assert (out / "notes.txt").read_text() == "mine" and (out / "slide.png").read_bytes() == b"mine"


def test_picai_bootstrap_redraws_resamples_with_one_class(tmp_path):
    # Two of four cases have neither lesions nor score blobs: some bootstrap resamples hold only
    # those (no lesion: AUROC undefined, and picai_eval's precision-recall fails) or only the
    # two positive cases. They are drawn again; every other resample ranks both lesions (0.9,
    # 0.6) above the empty cases (score 0) with no false candidate: AUROC 1 and AP 1.
    predictions, out = tmp_path / "predictions", tmp_path / "eval"
    write_blob_case(predictions, "c1", lesion=(3, (4, 20, 20)), blobs=[((4, 20, 20), 0.9)])
    write_blob_case(predictions, "c2", lesion=(2, (3, 12, 30)), blobs=[((3, 12, 30), 0.6)])
    write_blob_case(predictions, "c3")
    write_blob_case(predictions, "c4")
    run_cli(["evaluate", "--predictions", str(predictions), "--out", str(out), "--no-figures",
             "--picai-bootstraps", "50"])  # fmt: skip
    picai = json.loads((out / "metrics.json").read_text())["picai"]
    assert picai["num_cases"] == 4 and picai["num_positive_cases"] == 2
    assert picai["auroc"] == pytest.approx(1.0)
    assert picai["auroc_95_ci"] == [1.0, 1.0] and picai["ap_95_ci"] == [1.0, 1.0]
    # P(all four draws from one class) = 2 x (1/2)^4 = 1/8 per resample.
    assert picai["bootstrap_resamples_redrawn"] > 0
    assert picai["bootstrap_patients"] == 4


def test_picai_bootstrap_draws_the_exams_of_a_patient_together(tmp_path):
    """Two exams of one patient (c3, c4) are one unit of the bootstrap: 3 patients are drawn."""
    predictions, out = tmp_path / "predictions", tmp_path / "eval"
    write_blob_case(predictions, "c1", lesion=(3, (4, 20, 20)), blobs=[((4, 20, 20), 0.9)])
    write_blob_case(predictions, "c2", lesion=(2, (3, 12, 30)), blobs=[((3, 12, 30), 0.6)])
    write_blob_case(predictions, "c3", patient="p3", blobs=[((4, 24, 24), 0.3)])
    write_blob_case(predictions, "c4", patient="p3")
    run_cli(["evaluate", "--predictions", str(predictions), "--out", str(out), "--no-figures",
             "--picai-bootstraps", "20"])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_patients"] == 3
    assert metrics["picai"]["num_cases"] == 4 and metrics["picai"]["bootstrap_patients"] == 3
    report = (out / "report.md").read_text()
    assert "95 % bootstrap intervals (model, 3 patients resampled): AUROC " in report


def test_summary_line_counts_cases_and_the_patients_with_evaluated_slices(tmp_path):
    predictions, out = tmp_path / "predictions", tmp_path / "eval"
    write_cohort(predictions)
    printed = run_cli(_evaluate_argv(predictions, out, "--slices", "annotated"))
    # Annotated slices: lesion-free c3 and c4 have none, so 3 patients set the FP rate. c1's
    # (0.9) and c5's (0.5) lesions are hit; c2's blob lies on slice 5, outside its lesion's
    # slices 2-4: no hit, no FP. Each lesion is its patient's index: 2 of 3 at 0 FP either way.
    assert printed.strip() == (
        "5 cases, 3 patients with evaluated slices (slices=annotated); sensitivity at 1 "
        f"FP/patient: index 0.667, all 0.667; wrote {out / 'metrics.json'}"
    )
    negatives = tmp_path / "negatives"
    write_blob_case(negatives, "n1", blobs=[((4, 24, 24), 0.3)])
    printed = run_cli(_evaluate_argv(negatives, out))
    assert printed.startswith(
        "1 case, 1 patient with evaluated slices (slices=all); sensitivity at 1 FP/patient: "
        "index n/a (no lesions), all n/a (no lesions); wrote "
    )


def test_evaluate_workdir_dot_names_the_method_after_the_run_folder(tmp_path, monkeypatch):
    """`focalnet evaluate --workdir .` named the method '' ("# Evaluation of ", legends without
    labels, a blank method in `summarize`)."""
    from focalnet_jax.cli.evaluation_commands import method_label

    run = tmp_path / "fold0"
    run.mkdir()
    monkeypatch.chdir(run)
    assert method_label(None, Path(".")) == "fold0"
    assert method_label("mine", Path(".")) == "mine"
    assert method_label(None, None) == "model"


def test_the_report_names_the_hit_radius_it_was_evaluated_with(tmp_path):
    """`--radius-mm 10` computed every table with a 10 mm hit rule; the report (and a summary of
    such folds) said "5 mm same-slice hit rule", the paper's."""
    predictions, out = tmp_path / "predictions", tmp_path / "eval"
    write_cohort(predictions)
    run_cli(_evaluate_argv(predictions, out, "--radius-mm", "10"))
    lines = (out / "report.md").read_text().splitlines()
    assert "## Paper protocol (2D local maxima, 10 mm same-slice hit rule)" in lines
    assert "### GS prediction: ROC AUC of the 12 highest detections per case" in lines
    run_cli(["summarize", "--runs", f"A={out}", "--out", str(tmp_path / "s")])
    summary = (tmp_path / "s" / "summary.md").read_text().splitlines()
    assert "## Paper protocol (2D local maxima, 10 mm same-slice hit rule)" in summary


def test_the_montage_shows_the_slice_where_a_lesion_was_hit_numbered_as_in_the_source(tmp_path):
    """c1's lesion covers slices 3-5 alike and is hit on slice 4 (source slice 7): the montage
    showed slice 3 (the first of the largest area) without the detection, a hit drawn as a miss,
    titled by its array index."""
    from focalnet_jax.evaluation.evaluate import _montage_column
    from focalnet_jax.evaluation.matching import summarize_case
    from focalnet_jax.evaluation.predictions import read_case

    predictions = tmp_path / "predictions"
    write_cohort(predictions)
    path = predictions / "c1.npz"
    case = read_case(path)
    assert (case.lesions > 0).sum(axis=(1, 2)).tolist() == [0, 0, 0, 49, 49, 49, 0, 0]
    column = _montage_column(path, summarize_case(case), threshold=0.3, radius_mm=5.0)
    assert column.title == f"c1 (slice {int(case.slice_index[4])})"
    assert column.points.tolist() == [[20, 20]]


def test_a_label_with_dollar_signs_is_drawn_as_written(tmp_path):
    """Matplotlib read `$...$` in a label as a formula: `cost_$5 vs $10` was drawn as 'cost_5vs10'
    in italics, and `a$\\q$` ended the command in a parse error after metrics.json was written."""
    predictions, out = tmp_path / "predictions", tmp_path / "eval"
    write_cohort(predictions)
    label = "a$\\q$ cost_$5 vs $10"
    run_cli(["evaluate", "--predictions", str(predictions), "--out", str(out), "--no-picai",
             "--label", label])  # fmt: skip
    assert {p.name for p in out.glob("*.png")} == {"froc.png", "froc_gs.png", "roc.png",
                                                   "montage.png"}  # fmt: skip
    # Escaped in the legend, drawn as written; other text (the log axis's 10^k) stays maths.
    import matplotlib
    import matplotlib.pyplot as plt

    from focalnet_jax.evaluation import figures

    fig, ax = plt.subplots()
    figures._draw_all(ax, {label: figures.Curve(x=np.ones(2), y=np.ones(2))})
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [label.replace("$", r"\$")]
    assert matplotlib.rcParams["text.parse_math"]
    plt.close(fig)
