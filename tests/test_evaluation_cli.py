"""`focalnet evaluate` / `focalnet summarize` end to end: contract keys, PI-CAI metrics from
picai_eval, figures, cross-validation statistics, and bad input."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from focalnet_jax.cli import main
from focalnet_jax.evaluation.predictions import PredictionsError, read_case, write_case
from focalnet_jax.evaluation.summary import method_comparisons

SHAPE = (8, 48, 48)


def blob(center, sigma=3.0, peak=1.0):
    """A 2D Gaussian on the centre slice only (one local maximum, one 3D candidate)."""
    z, y, x = center
    rows, cols = np.indices(SHAPE[1:], dtype=np.float64)
    volume = np.zeros(SHAPE)
    volume[z] = peak * np.exp(-0.5 * ((rows - y) ** 2 + (cols - x) ** 2) / sigma**2)
    return volume


def write_blob_case(out_dir, case_id, *, lesion=None, blobs=(), with_images=True, patient=None):
    """lesion: (class, (z, y, x)) a 3 x 7 x 7 lesion; blobs: ((z, y, x), peak) score blobs with
    P(class >= k) = peak * 0.8^(k-1) at the centre; patient: its patient id (patient-<case>)."""
    lesions = np.zeros(SHAPE, np.int32)
    classes = []
    if lesion is not None:
        cls, (z, y, x) = lesion
        lesions[z - 1 : z + 2, y - 3 : y + 4, x - 3 : x + 4] = 1
        classes = [cls]
    s = np.zeros(SHAPE)
    for center, peak in blobs:
        s = np.maximum(s, blob(center, peak=peak))
    scores = np.stack([s * 0.8**k for k in range(5)], axis=-1)
    images = {}
    if with_images:
        images = {"t2w": 0.3 + 0.4 * s, "adc": 0.6 - 0.4 * s}
    return write_case(
        out_dir,
        case_id,
        scores=scores,
        lesions=lesions,
        lesion_classes=classes,
        spacing=(0.625, 0.625),
        patient_id=patient or f"patient-{case_id}",
        slice_index=np.arange(SHAPE[0]) + 3,
        **images,
    )


def write_cohort(out_dir, shift=0.0):
    """Five cases: a hit csPCa, a missed csPCa (and a FP), two negatives with FPs, one GS 3+3."""
    write_blob_case(out_dir, "c1", lesion=(3, (4, 20, 20)), blobs=[((4, 20, 20), 0.9 - shift)])
    write_blob_case(out_dir, "c2", lesion=(2, (3, 12, 30)), blobs=[((5, 35, 10), 0.6 + shift)])
    write_blob_case(out_dir, "c3", blobs=[((4, 24, 24), 0.3 + shift)])
    write_blob_case(out_dir, "c4", blobs=[((2, 30, 30), 0.7 - shift)], with_images=False)
    write_blob_case(out_dir, "c5", lesion=(1, (4, 24, 24)), blobs=[((4, 24, 24), 0.5)])


def run_cli(argv):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return stdout.getvalue()


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


def test_summarize_mean_sd_welch_bonferroni(tmp_path):
    runs = []
    for method, shifts in (
        ("A", (0.0, 0.05, 0.1)),
        ("B", (0.2, 0.25, 0.15)),
        ("C", (0.1, 0.1, 0.3)),
    ):
        for fold, shift in enumerate(shifts):
            predictions = tmp_path / "pred" / method / str(fold)
            write_cohort(predictions, shift)
            out = tmp_path / method / f"fold{fold}"
            run_cli(["evaluate", "--predictions", str(predictions), "--out", str(out),
                     "--no-picai", "--no-figures"])  # fmt: skip
        runs.append(f"{method}={tmp_path / method}")
    out = tmp_path / "summary"
    run_cli(["summarize", "--runs", *runs, "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    key = "froc/all/pauc/0.1-3"
    values = {}
    for method in "ABC":
        folds = sorted((tmp_path / method).glob("fold*/metrics.json"))
        values[method] = [json.loads(p.read_text())["froc"]["all"]["pauc"]["0.1-3"] for p in folds]
        entry = summary["methods"][method]["metrics"][key]
        assert entry["mean"] == pytest.approx(np.mean(values[method]))
        assert entry["sd"] == pytest.approx(np.std(values[method], ddof=1))
    # Welch: t = (ma - mb) / sqrt(va/na + vb/nb), Welch-Satterthwaite df; 3 pairs -> p x 3.
    a, b = np.array(values["A"]), np.array(values["B"])
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 3
    t = (a.mean() - b.mean()) / np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    p = 2 * stats.t.sf(abs(t), df)
    # FP at a sensitivity: the cohort's missed csPCa (c2) keeps `all` below 80% in every fold
    # of A (60%: at 0.4 FP), while no fold has a GS 8+ lesion: both null, only the first n.r.
    metrics = summary["methods"]["A"]["metrics"]
    reached = metrics["froc/all/fp_at_sensitivity/0.6"]
    assert (reached["values"], reached["not_reached"]) == ([0.4] * 3, 0)
    missed = metrics["froc/all/fp_at_sensitivity/0.8"]
    assert (missed["mean"], missed["n"], missed["of"], missed["not_reached"]) == (None, 0, 3, 3)
    assert metrics["froc/gs_8+/fp_at_sensitivity/0.9"]["not_reached"] == 0
    assert "not_reached" not in metrics[key]
    row = summary["comparisons"][key][0]
    assert (row["a"], row["b"]) == ("A", "B")
    assert row["p"] == pytest.approx(p)
    assert row["p_bonferroni"] == pytest.approx(min(1.0, 3 * p))
    for name in ("froc.png", "froc_gs.png", "roc.png", "summary.md"):
        assert (out / name).stat().st_size > 0
    assert "±" in (out / "summary.md").read_text()


def test_summarize_comparisons_name_the_folds_that_never_reached_a_sensitivity():
    """A's second fold never reached 80% sensitivity (lesions, null value): Welch's test over the
    folds with a value leaves it out, so the row and its summary.md line say so."""

    def fold(fp, num_lesions=2):
        return {"froc": {"all": {"num_lesions": num_lesions, "fp_at_sensitivity": {"0.8": fp}}}}

    folds = {"A": [fold(0.2), fold(None), fold(0.4)], "B": [fold(0.5), fold(0.6), fold(0.7)]}
    comparisons, lines = method_comparisons(folds)
    # Welch over [0.2, 0.4] vs [0.5, 0.6, 0.7]: va = 0.02 / 2, vb = 0.01 / 3.
    va, vb = 0.01, 0.01 / 3
    t = -0.3 / np.sqrt(va + vb)
    p = 2 * stats.t.sf(abs(t), (va + vb) ** 2 / (va**2 / 1 + vb**2 / 2))
    (row,) = comparisons["froc/all/fp_at_sensitivity/0.8"]
    assert row["p"] == pytest.approx(p) and row["p_bonferroni"] == pytest.approx(p)
    assert row["not_reached"] == {"A": 1, "B": 0}
    assert lines == [
        f"- froc/all/fp_at_sensitivity/0.8: A vs B (folds 2 vs 3): p = {p:.4g}, "
        f"Bonferroni p = {p:.4g} (n.r. folds left out: A 1)"
    ]
    assert "not_reached" not in comparisons["froc/all/pauc/0.1-3"][0]


def test_summarize_comparisons_give_the_folds_each_test_used():
    """A's second fold has no GS >= 9 AUC (no such lesion: null): the two-sided Welch test uses
    A's 2 other folds, and its row and line say so (they gave no n; the table's 2/3 was the only
    trace). Reference: SciPy's Welch test on the folds with a value."""
    from scipy import stats

    def fold(auc):
        return {"froc": {}, "roc": {"gs_ge_9": {"auc": auc}}}

    folds = {"A": [fold(0.7), fold(None), fold(0.8)], "B": [fold(0.6), fold(0.65), fold(0.5)]}
    comparisons, lines = method_comparisons(folds)
    (row,) = comparisons["roc/gs_ge_9/auc"]
    p = stats.ttest_ind([0.7, 0.8], [0.6, 0.65, 0.5], equal_var=False).pvalue
    assert (row["n_a"], row["n_b"]) == (2, 3) and row["p"] == pytest.approx(p)
    assert lines == [
        f"- roc/gs_ge_9/auc: A vs B (folds 2 vs 3): p = {p:.4g}, Bonferroni p = {p:.4g}"
    ]


def test_summarize_says_which_comparisons_have_no_test():
    """A pair without a Welch test (p NaN) had no summary.md line at all, so a reader could not
    tell an untested pair from one never asked for; it now reads p = n/a with the reason."""

    def fold(auc):
        return {"froc": {}, "roc": {"gs_ge_9": {"auc": auc}}}

    one_fold = {"A": [fold(0.7), fold(None)], "B": [fold(0.6), fold(0.65)]}
    constant = {"A": [fold(0.7), fold(0.7)], "B": [fold(0.6), fold(0.6)]}
    for folds, counts, reason in (
        (one_fold, "1 vs 2", "Welch's test needs 2 folds with a value per method"),
        (constant, "2 vs 2", "no spread: each method has one value in every fold"),
    ):
        comparisons, lines = method_comparisons(folds)
        assert np.isnan(comparisons["roc/gs_ge_9/auc"][0]["p"])
        assert lines == [f"- roc/gs_ge_9/auc: A vs B (folds {counts}): p = n/a ({reason})"]


def _error(argv) -> str:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    return str(raised.value)


def test_bad_predictions_name_file_and_reason(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = _error(["evaluate", "--predictions", str(empty), "--out", str(tmp_path / "o")])
    assert str(empty) in message and "no <case_id>.npz" in message

    good = write_blob_case(tmp_path / "good", "ok", lesion=(2, (4, 20, 20)))
    with np.load(good) as data:
        arrays = dict(data)
    missing = tmp_path / "missing"
    missing.mkdir()
    np.savez(missing / "case.npz", **{k: v for k, v in arrays.items() if k != "spacing"})
    message = _error(["evaluate", "--predictions", str(missing), "--out", str(tmp_path / "o")])
    assert str(missing / "case.npz") in message and "missing contract key(s) ['spacing']" in message

    shapes = tmp_path / "shapes"
    shapes.mkdir()
    np.savez(shapes / "case.npz", **{**arrays, "lesions": arrays["lesions"][:, :40]})
    with pytest.raises(
        PredictionsError, match=r"case\.npz: 'lesions' shape \(8, 40, 48\) does not"
    ):
        read_case(shapes / "case.npz")

    np.savez(shapes / "case.npz", **{**arrays, "lesion_classes": np.array([], np.int32)})
    with pytest.raises(PredictionsError, match=r"case\.npz: 'lesions' ids must lie in 0\.\.0"):
        read_case(shapes / "case.npz")

    # float16 scores passed the check and ended in scipy's traceback (no file named); big-endian
    # float32 is float32.
    np.savez(shapes / "case.npz", **{**arrays, "scores": arrays["scores"].astype(np.float16)})
    message = _error(["evaluate", "--predictions", str(shapes), "--out", str(tmp_path / "o")])
    assert message.endswith("case.npz: 'scores' must be float32 (or float64), got float16")
    assert not (tmp_path / "o").exists()
    np.savez(shapes / "case.npz", **{**arrays, "scores": arrays["scores"].astype(">f4")})
    assert read_case(shapes / "case.npz").scores.dtype == np.dtype(">f4")

    (shapes / "case.npz").write_bytes(b"")  # a writer killed, a full disk: numpy's EOFError
    with pytest.raises(PredictionsError, match=r"case\.npz: not a readable \.npz file \(No data"):
        read_case(shapes / "case.npz")

    (shapes / "case.npz").write_text("not a zip")
    with pytest.raises(PredictionsError, match=r"case\.npz: not a valid predictions \.npz file"):
        read_case(shapes / "case.npz")

    # Each ended in a traceback: a .npy under the .npz name, a damaged compressed member, and a
    # member that is no .npy array.
    with (shapes / "case.npz").open("wb") as f:
        np.save(f, arrays["scores"])
    with pytest.raises(PredictionsError, match=r"case\.npz: not a valid predictions \.npz file "
                                               r"\(one \.npy array, not a zip"):  # fmt: skip
        read_case(shapes / "case.npz")
    np.savez_compressed(shapes / "case.npz", **arrays)
    assert read_case(shapes / "case.npz").scores.shape == arrays["scores"].shape
    with zipfile.ZipFile(shapes / "case.npz") as archive:
        info = archive.getinfo("scores.npy")
    data = bytearray((shapes / "case.npz").read_bytes())
    name_and_extra = sum(
        struct.unpack("<2H", data[info.header_offset + 26 : info.header_offset + 30])
    )
    start = info.header_offset + 30 + name_and_extra  # after the member's local header
    data[start : start + 8] = b"\xff" * 8  # the deflate stream's first bytes
    (shapes / "case.npz").write_bytes(bytes(data))
    with pytest.raises(PredictionsError, match=r"case\.npz: not a readable \.npz file \(Error"):
        read_case(shapes / "case.npz")
    np.savez(shapes / "case.npz", **arrays)
    with zipfile.ZipFile(shapes / "case.npz", "a") as archive:
        archive.writestr("t2w", b"not an array")
    with pytest.raises(PredictionsError, match=r"case\.npz: 't2w' is no \.npy array"):
        read_case(shapes / "case.npz")


def test_predictions_without_a_patient_id_are_refused(tmp_path):
    """The FP rate is per patient id: three lesion-free cases of patient id '' (or 'None', which
    str(None) wrote) were one patient, their 3 false positives 3 FP per patient, not 1."""
    for case_id, peak in (("n1", 0.7), ("n2", 0.6), ("n3", 0.5)):
        write_blob_case(tmp_path / "given", case_id, blobs=[((4, 24, 24), peak)])
    out = tmp_path / "given_eval"
    run_cli(["evaluate", "--predictions", str(tmp_path / "given"), "--out", str(out),
             "--no-picai", "--no-figures"])  # fmt: skip
    curve = json.loads((out / "metrics.json").read_text())["froc"]["all"]["curve"]
    assert curve["fp"] == pytest.approx([1 / 3, 2 / 3, 1.0])  # one FP each, 3 patients
    empty = tmp_path / "empty_id"
    empty.mkdir()
    for case_id in ("n1", "n2", "n3"):
        with np.load(tmp_path / "given" / f"{case_id}.npz") as data:
            np.savez(empty / f"{case_id}.npz", **{**dict(data), "patient_id": np.asarray("")})
    message = _error(["evaluate", "--predictions", str(empty), "--out", str(tmp_path / "o")])
    assert f"{empty / 'n1.npz'}: 'patient_id' is empty" in message
    assert not (tmp_path / "o").exists()
    with np.load(tmp_path / "given" / "n1.npz") as data:
        arrays = {k: data[k] for k in ("scores", "lesions", "lesion_classes", "spacing")}
    with pytest.raises(PredictionsError, match=r"n1\.npz: 'patient_id' is None"):
        write_case(tmp_path / "none", "n1", patient_id=None, **arrays)
    # Saved as bytes (h5py-based tools): read as "b'P1'", another patient than 'P1'.
    with np.load(tmp_path / "given" / "n1.npz") as data:
        np.savez(tmp_path / "given" / "n1.npz", **{**dict(data), "patient_id": np.bytes_(b"n2")})
    with np.load(tmp_path / "given" / "n2.npz") as data:
        np.savez(tmp_path / "given" / "n2.npz", **{**dict(data), "patient_id": np.asarray("n2")})
    assert read_case(tmp_path / "given" / "n1.npz").patient_id == "n2"
    run_cli(["evaluate", "--predictions", str(tmp_path / "given"), "--out", str(out),
             "--no-picai", "--no-figures"])  # fmt: skip
    assert json.loads((out / "metrics.json").read_text())["num_patients"] == 2
    with np.load(tmp_path / "given" / "n1.npz") as data:
        np.savez(tmp_path / "given" / "n1.npz", **{**dict(data), "patient_id": np.bytes_(b"\xff")})
    with pytest.raises(PredictionsError, match=r"n1\.npz: 'patient_id' must be a string"):
        read_case(tmp_path / "given" / "n1.npz")


def test_predictions_with_unsafe_names_or_a_lesion_on_no_slice_are_refused(tmp_path):
    for name in ("a b", ".hidden"):
        folder = tmp_path / name.strip(".").replace(" ", "_")
        write_blob_case(folder, "ok", lesion=(2, (4, 20, 20)))
        (folder / "ok.npz").rename(folder / f"{name}.npz")
        message = _error(["evaluate", "--predictions", str(folder), "--out", str(tmp_path / "o")])
        assert f"{folder}: case id of {name}.npz {name!r}" in message
        assert not (tmp_path / "o").exists()
    with np.load(write_blob_case(tmp_path / "five", "c", lesion=(5, (4, 20, 20)))) as data:
        arrays = dict(data)
    for key in ("scores", "lesions", "t2w", "adc", "slice_index"):
        arrays[key] = arrays[key][:1]  # slice 0 alone: the GS 5 lesion (slices 3-5) would vanish
    np.savez(tmp_path / "empty.npz", **arrays)
    with pytest.raises(
        PredictionsError, match=r"lesion id\(s\) \[1\] of 'lesion_classes' appear on no"
    ):
        read_case(tmp_path / "empty.npz")


@pytest.mark.parametrize("shape", [(0, 48, 48), (8, 0, 48), (8, 48, 0)])
def test_predictions_without_a_pixel_are_refused_in_one_line(tmp_path, shape):
    """A lesion-free case with no slice (or no row, or no column) passed validation and
    `focalnet evaluate` then failed in the local maxima with a NumPy traceback ("zero-size array
    to reduction operation maximum")."""
    arrays = {"scores": np.zeros((*shape, 5), np.float32), "lesions": np.zeros(shape, np.int32),
              "lesion_classes": np.zeros(0, np.int32)}  # fmt: skip
    with pytest.raises(PredictionsError, match=r"e\.npz: 'scores' shape .* holds no pixel"):
        write_case(tmp_path / "w", "e", spacing=(0.625, 0.625), patient_id="p", **arrays)
    write_blob_case(tmp_path / "p", "c1", blobs=[((4, 24, 24), 0.3)])
    np.savez(tmp_path / "p" / "e.npz", spacing=np.float32([0.625, 0.625]),
             patient_id=np.asarray("p"), **arrays)  # fmt: skip
    message = _error(_evaluate_argv(tmp_path / "p", tmp_path / "o"))
    assert f"{tmp_path / 'p' / 'e.npz'}: 'scores' shape {(*shape, 5)} holds no pixel" in message
    assert not (tmp_path / "o").exists()


def test_out_at_or_under_a_file_is_refused_before_any_work(tmp_path):
    predictions = tmp_path / "predictions"
    write_cohort(predictions)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out, where in ((blocker, ""), (blocker / "sub", f": {blocker}")):
        expected = f"--out {out}{where} exists and is not a folder"
        message = _error(["evaluate", "--predictions", str(predictions), "--out", str(out)])
        assert message.endswith(expected)
        message = _error(["summarize", "--runs", f"A={predictions}", "--out", str(out)])
        assert message.endswith(expected)


def test_summarize_rejects_bad_runs(tmp_path):
    assert "NAME=DIR" in _error(["summarize", "--runs", "nodir", "--out", str(tmp_path)])
    (tmp_path / "run").mkdir()
    message = _error(["summarize", "--runs", f"A={tmp_path / 'run'}", "--out", str(tmp_path)])
    assert "no metrics.json" in message
    twice = ["--runs", f"A={tmp_path / 'run'}", "A=other", "--out", str(tmp_path / "o")]
    message = _error(["summarize", *twice])
    assert message.endswith(f"--runs names 'A' twice ({tmp_path / 'run'} and other)")


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda m: m["froc"]["all"]["sensitivity_at_fp"].update({"1": "x"}),  # a traceback
         "froc.all.sensitivity_at_fp.1 is 'x', not a number or null"),
        (lambda m: m.update(froc=None),  # summarised as "n/a" everywhere
         "froc.all missing"),
        (lambda m: m["roc"].clear(), "roc.gs_ge_7 missing"),
        (lambda m: m["froc"]["index"].pop("sensitivity_at_fp"),
         "froc.index.sensitivity_at_fp missing"),
        (lambda m: m.update(num_patients="x"), "num_patients is 'x', not a count"),
        (lambda m: m["roc"]["gs_ge_8"].update(auc=[0.5]),
         "roc.gs_ge_8.auc is [0.5], not a number or null"),
        # Infinity (JSON as Python writes it) was left out of the mean as if undefined.
        (lambda m: m["roc"]["gs_ge_8"].update(auc=float("inf")),
         "roc.gs_ge_8.auc is inf, not a number or null"),
        (lambda m: m["roc"]["gs_ge_8"].update(auc=10**400),  # an OverflowError on float()
         f"roc.gs_ge_8.auc is {'1' + '0' * 36}..., not a number or null"),
        # An IndexError once summary.json and summary.md were written (a band quietly wrong
        # where the list was longer).
        (lambda m: m["froc"]["all"]["curve"]["sensitivity"].pop(),
         "froc.all.curve holds lists of different lengths (threshold 5, fp 5, sensitivity 4), "
         "not one curve"),
        (lambda m: m["settings"].update(radius_mm="5"),  # a ValueError, summary.json written
         "settings.radius_mm is '5', not a number"),
        # A TypeError once summary.json was written beside the earlier summary.md.
        (lambda m: m.update(picai={"auroc": 0.5, "ap": 0.2, "score": 0.35,
                                   "auroc_95_ci": 0.6, "score_95_ci": [0.3, 0.4]}),
         "picai.auroc_95_ci is 0.6, not null or a list of 2 numbers or nulls"),
        (lambda m: m.update(cases="c1"),  # its characters taken as case ids
         "cases is 'c1', not a list of case ids"),
        (lambda m: m.update(cases=None), "cases is None, not a list of case ids"),
    ],
)  # fmt: skip
def test_summarize_refuses_a_damaged_metrics_file_naming_the_key(tmp_path, damage, problem):
    predictions, out = tmp_path / "predictions", tmp_path / "A" / "fold0"
    write_cohort(predictions)
    run_cli(_evaluate_argv(predictions, out))
    metrics = json.loads((out / "metrics.json").read_text())
    damage(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics))
    message = _error(["summarize", "--runs", f"A={tmp_path / 'A'}", "--out", str(tmp_path / "s")])
    assert message == (
        f"focalnet summarize: error: {out / 'metrics.json'}: not a metrics.json of `focalnet "
        f"evaluate`: {problem}"
    )
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "damage, reason",
    [(b'{"models": [', "Expecting value: line 1"), (b"\xff", "'utf-8' codec can't decode")],
)
def test_unreadable_models_json_or_metrics_json_is_one_line(tmp_path, damage, reason):
    """A models.json beside the predictions, or a metrics.json under a method's folder, that is
    not JSON or not UTF-8 ended `evaluate` or `summarize` in a traceback."""
    predictions, out = tmp_path / "predictions", tmp_path / "A" / "fold0"
    write_cohort(predictions)
    (predictions / "models.json").write_bytes(damage)
    message = _error(_evaluate_argv(predictions, out))
    assert message.startswith(
        f"focalnet evaluate: error: {predictions / 'models.json'}: not a readable models.json ("
    )
    assert reason in message and "\n" not in message and not out.exists()
    (predictions / "models.json").unlink()
    run_cli(_evaluate_argv(predictions, out))
    (out / "metrics.json").write_bytes(damage)
    message = _error(["summarize", "--runs", f"A={tmp_path / 'A'}", "--out", str(tmp_path / "s")])
    assert message.startswith(
        f"focalnet summarize: error: {out / 'metrics.json'}: not a readable metrics.json ("
    )
    assert reason in message and "\n" not in message


@pytest.mark.parametrize("record", [[1, 2], {"models": "x"}, {"models": [1]}])
def test_another_tools_models_json_of_any_shape_is_summarized(tmp_path, record):
    """`evaluate` copies another tool's models.json as it is; `summarize` then ended in an
    AttributeError ('list' object has no attribute 'get'). Such a record names no run."""
    for fold, shift in enumerate((0.0, 0.1)):
        predictions = tmp_path / "pred" / str(fold)
        write_cohort(predictions, shift)
        (predictions / "models.json").write_text(json.dumps(record))
        run_cli(_evaluate_argv(predictions, tmp_path / "A" / f"fold{fold}"))
    run_cli(["summarize", "--runs", f"A={tmp_path / 'A'}", "--out", str(tmp_path / "s")])
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["methods"]["A"]["metrics"]["froc/all/pauc/0.1-3"]["of"] == 2


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


def _evaluate_argv(predictions, out, *extra):
    return ["evaluate", "--predictions", str(predictions), "--out", str(out), "--no-picai",
            "--no-figures", *extra]  # fmt: skip


@pytest.mark.parametrize("as_json", [True, False])
@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"])
def test_evaluate_cases_evaluates_exactly_the_listed_subset(tmp_path, as_json, encoding):
    """Also saved with a byte-order mark and CRLF, as spreadsheets do (the mark stuck to the
    first id, or made a JSON list one id)."""
    predictions, out = tmp_path / "predictions", tmp_path / "eval"
    write_cohort(predictions)
    listed = tmp_path / ("cases.json" if as_json else "cases.txt")
    text = json.dumps(["c3", "c1"]) if as_json else "c3\r\n\r\nc1\r\n"
    listed.write_text(text, encoding=encoding, newline="")
    run_cli(_evaluate_argv(predictions, out, "--cases", str(listed)))
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["num_patients"], metrics["num_cases"]) == (2, 2)
    # c1's lesion hit at 0.9, c3's blob a FP at 0.3: thresholds 0.9, 0.3 over 2 patients.
    froc = metrics["froc"]["all"]
    assert froc["num_lesions"] == 1
    np.testing.assert_allclose(froc["curve"]["fp"], [0.0, 0.5])
    np.testing.assert_allclose(froc["curve"]["sensitivity"], [1.0, 1.0])


def test_evaluate_cases_picai_subject_list_dict(tmp_path):
    predictions, out = tmp_path / "predictions", tmp_path / "eval"
    write_cohort(predictions)
    listed = tmp_path / "subjects.json"
    listed.write_text(json.dumps({"subject_list": ["c2", "c4", "c5"]}))
    run_cli(_evaluate_argv(predictions, out, "--cases", str(listed)))
    assert json.loads((out / "metrics.json").read_text())["num_patients"] == 3


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


def test_no_evaluated_slice_is_a_one_line_error_naming_the_setting(tmp_path):
    predictions, out = tmp_path / "predictions", tmp_path / "eval"
    write_blob_case(predictions, "n1", blobs=[((4, 24, 24), 0.3)])
    message = _error(_evaluate_argv(predictions, out, "--slices", "annotated"))
    assert f"{predictions}: no slice to evaluate with slices='annotated'" in message
    assert not (out / "metrics.json").exists()


def test_listed_case_without_prediction_is_a_one_line_error_and_writes_nothing(tmp_path):
    predictions, out = tmp_path / "predictions", tmp_path / "eval"
    write_cohort(predictions)
    listed = tmp_path / "cases.txt"
    listed.write_text("c1\nc9\nc2\n")
    done = subprocess.run(
        [sys.executable, "-m", "focalnet_jax.cli", *_evaluate_argv(predictions, out),
         "--cases", str(listed)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "no prediction for 1 of the 3 listed case(s): c9.npz" in lines[0]
    assert str(predictions) in lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "text, reason",
    [
        ('["c1", "../c2"]', "case id '../c2' starts with '.'"),
        ("c1\nsub/c2\n", "case id 'sub/c2' contains '/'"),
        ("c1\nc1\n", "listed twice: ['c1']"),
        ("\n\n", "the case list is empty"),
        ('{"cases": ["c1"]}', "expected a JSON list of case id strings"),
        ('["c1",', "not valid JSON"),
    ],
)
def test_bad_case_list_names_the_file_and_reason(tmp_path, text, reason):
    predictions, out = tmp_path / "predictions", tmp_path / "eval"
    write_cohort(predictions)
    listed = tmp_path / "cases.txt"
    listed.write_text(text)
    message = _error(_evaluate_argv(predictions, out, "--cases", str(listed)))
    assert str(listed) in message and reason in message
    assert not out.exists()


def test_evaluate_without_case_list_says_how_many_files_it_found(tmp_path, caplog):
    predictions, out = tmp_path / "predictions", tmp_path / "eval"
    write_cohort(predictions)
    with caplog.at_level(logging.WARNING, logger="focalnet_jax"):
        run_cli(_evaluate_argv(predictions, out))
    assert f"evaluating the 5 <case_id>.npz file(s) found in {predictions}" in caplog.text
    assert json.loads((out / "metrics.json").read_text())["num_patients"] == 5


def test_cases_with_workdir_is_refused(tmp_path):
    listed = tmp_path / "cases.txt"
    listed.write_text("c1\n")
    message = _error(["evaluate", "--workdir", str(tmp_path), "--cases", str(listed)])
    assert "--cases goes with --predictions" in message


@pytest.mark.parametrize(
    "flag",
    [
        ["--tta", "flip"],
        ["--step", "5"],
        ["--store", "s"],
        ["--all-cases"],
        ["--batch-size", "8"],
        ["--compilation_cache", "cache"],
    ],  # fmt: skip
)
def test_prediction_flags_with_predictions_are_refused(tmp_path, flag):
    """--predictions evaluates files already predicted: a --tta flip there was ignored, so the
    metrics of plain predictions passed for flip-TTA ones (likewise --step, --store); no model
    runs, so a --batch-size or --compilation_cache there did nothing."""
    import jax

    write_cohort(tmp_path / "p")
    argv = ["evaluate", "--predictions", str(tmp_path / "p"), "--out", str(tmp_path / "o")]
    cache_before = jax.config.jax_compilation_cache_dir
    with contextlib.chdir(tmp_path):
        message = _error([*argv, *flag])
    named = f"{flag[0]}{' flip' if flag[0] == '--tta' else ''}"
    assert message.endswith(
        f"{named} goes with --workdir (it makes the predictions); --predictions "
        f"{tmp_path / 'p'} evaluates the files as they were predicted"
    )
    assert "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no out, no cache folder
    assert jax.config.jax_compilation_cache_dir == cache_before


def test_evaluate_flag_defaults_are_the_localisation_defaults():
    """The CLI spells the defaults out (importing localization would load SciPy at parse)."""
    from focalnet_jax.cli import build_parser
    from focalnet_jax.evaluation import localization

    args = build_parser().parse_args(["evaluate", "--predictions", "p", "--out", "o"])
    assert (args.radius_mm, args.min_score) == (localization.RADIUS_MM, localization.MIN_SCORE)


def test_allow_training_cases_without_all_cases_is_refused(tmp_path):
    """--allow-training-cases only loosens --all-cases' held-out check; elsewhere it was ignored
    without a word."""
    write_cohort(tmp_path / "p")
    argv = ["evaluate", "--predictions", str(tmp_path / "p"), "--out", str(tmp_path / "o")]
    message = _error([*argv, "--allow-training-cases"])
    assert "--allow-training-cases goes with --all-cases" in message
    assert not (tmp_path / "o").exists()


def _evaluate_fold(predictions_dir, out, runs, shift=0.0, tta="none"):
    """evaluate of a cohort whose predictions say (models.json) they were made by `runs`."""
    write_cohort(predictions_dir, shift)
    models = {"models": [{"run": r, "step": 2} for r in runs], "tta": tta}
    (predictions_dir / "models.json").write_text(json.dumps(models))
    run_cli(["evaluate", "--predictions", str(predictions_dir), "--out", str(out), "--no-picai",
             "--no-figures"])  # fmt: skip


def test_summarize_refuses_an_ensemble_or_a_run_counted_twice_as_folds(tmp_path):
    """Two folds; then the folder's ensemble evaluated on a test store into the same folder, or
    one fold evaluated twice: either would be counted as a third fold (n 3, other mean and SD)."""
    method = tmp_path / "A"
    for fold, shift in enumerate((0.0, 0.1)):
        _evaluate_fold(tmp_path / "pred" / str(fold), method / f"fold{fold}" / "eval",
                       [f"runs/A/fold{fold}"], shift)  # fmt: skip
    run_cli(["summarize", "--runs", f"A={method}", "--out", str(tmp_path / "ok")])
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert summary["methods"]["A"]["metrics"]["froc/all/pauc/0.1-3"]["of"] == 2

    _evaluate_fold(
        tmp_path / "pred" / "test", method / "test_eval", ["runs/A/fold0", "runs/A/fold1"]
    )
    message = _error(["summarize", "--runs", f"A={method}", "--out", str(tmp_path / "s1")])
    assert message.endswith(
        f"{method / 'test_eval' / 'metrics.json'}: evaluates an ensemble of 2 runs, not one fold; "
        f"move it out of {method}"
    )
    shutil.rmtree(method / "test_eval")
    _evaluate_fold(tmp_path / "pred" / "tta", method / "fold0" / "eval_tta", ["runs/A/fold0"])
    message = _error(["summarize", "--runs", f"A={method}", "--out", str(tmp_path / "s2")])
    first, second = (method / "fold0" / d / "metrics.json" for d in ("eval", "eval_tta"))
    assert message.endswith(
        f"{first} and {second} both evaluate run runs/A/fold0: one fold would count twice; keep "
        f"one of them under {method}"
    )


def test_summarize_refuses_one_run_recorded_by_two_names(tmp_path, monkeypatch):
    """`evaluate --workdir runs/cv/fold1`, then `--workdir /abs/.../runs/cv/fold1 --tta flip`
    into the same fold folder: metrics written before runs were recorded absolute hold the path
    as typed, and the two names of one run were counted as two folds (n 3 of a 2-fold CV)."""
    monkeypatch.chdir(tmp_path)
    cv = tmp_path / "runs" / "cv"
    for fold in (0, 1):
        (cv / f"fold{fold}").mkdir(parents=True)
    _evaluate_fold(tmp_path / "pred" / "0", cv / "fold0" / "eval", ["runs/cv/fold0"])
    _evaluate_fold(tmp_path / "pred" / "1", cv / "fold1" / "eval", ["runs/cv/fold1"], 0.1)
    _evaluate_fold(tmp_path / "pred" / "tta", cv / "fold1" / "eval_tta", [str(cv / "fold1")])
    message = _error(["summarize", "--runs", "A=runs/cv", "--out", str(tmp_path / "s")])
    first, second = (f"runs/cv/fold1/{d}/metrics.json" for d in ("eval", "eval_tta"))
    assert message.endswith(
        f"{first} and {second} both evaluate run {cv / 'fold1'} (recorded as runs/cv/fold1 and "
        f"{cv / 'fold1'}): one fold would count twice; keep one of them under runs/cv"
    )
    assert "\n" not in message and not (tmp_path / "s").exists()


def test_summarize_refuses_a_fold_shared_by_two_methods(tmp_path):
    """The same folder given for two methods (or one inside the other) compared a method with
    its own folds: every test p = 1, without a word."""
    for fold, shift in enumerate((0.0, 0.1)):
        _evaluate_fold(tmp_path / "pred" / str(fold), tmp_path / "A" / f"fold{fold}" / "eval",
                       [f"runs/A/fold{fold}"], shift)  # fmt: skip
    out = tmp_path / "s"
    for b, shared in ((tmp_path / "A", "fold0"), (tmp_path / "A" / "fold1", "fold1")):
        message = _error(
            ["summarize", "--runs", f"A={tmp_path / 'A'}", f"B={b}", "--out", str(out)]
        )
        fold = tmp_path / "A" / shared / "eval" / "metrics.json"
        assert message.endswith(
            f"{fold} is a fold of both A ({tmp_path / 'A'}) and B ({b}): a method would be "
            "compared with its own folds; give each its own folder"
        )
    assert not out.exists()


def test_summarize_refuses_folds_evaluated_with_other_settings(tmp_path):
    """Method A on all slices, B on annotated slices only (as `evaluate --workdir` does with the
    default data.slices): B's FP rate counts 3 of the 5 patients and none of the false positives
    off the lesion slices, so the two were compared on different scales without a word."""
    for method, slices in (("A", "all"), ("B", "annotated")):
        write_cohort(tmp_path / "pred" / method)
        run_cli(["evaluate", "--predictions", str(tmp_path / "pred" / method), "--out",
                 str(tmp_path / method / "fold0"), "--no-picai", "--no-figures",
                 "--slices", slices])  # fmt: skip
    fold = {m: json.loads((tmp_path / m / "fold0" / "metrics.json").read_text()) for m in "AB"}
    assert (fold["A"]["num_patients"], fold["B"]["num_patients"]) == (5, 3)
    message = _error(["summarize", "--runs", f"A={tmp_path / 'A'}", f"B={tmp_path / 'B'}",
                      "--out", str(tmp_path / "s")])  # fmt: skip
    first, second = (tmp_path / m / "fold0" / "metrics.json" for m in "AB")
    assert message.endswith(
        f"{first} and {second} were evaluated with other settings {{'slices': ('all', "
        "'annotated')}: their numbers are not comparable; evaluate them alike"
    )
    assert not (tmp_path / "s").exists()


def test_summarize_refuses_a_method_whose_folds_were_predicted_with_other_tta(tmp_path):
    """Fold 0 predicted with flip TTA, fold 1 without, were averaged as one method without a
    word; two methods that differ in TTA (does it help?) are compared as before."""
    for method, ttas in (("A", ("flip", "none")), ("B", ("none", "none"))):
        for fold, tta in enumerate(ttas):
            _evaluate_fold(tmp_path / "pred" / method / str(fold),
                           tmp_path / method / f"fold{fold}" / "eval",
                           [f"runs/{method}/fold{fold}"], 0.1 * fold, tta)  # fmt: skip
    message = _error(["summarize", "--runs", f"A={tmp_path / 'A'}", "--out", str(tmp_path / "s")])
    first, second = (tmp_path / "A" / f"fold{k}" / "eval" / "metrics.json" for k in (0, 1))
    assert message.endswith(
        f"{first} and {second} were evaluated with other settings {{'models.tta': ('flip', "
        "'none')}: their numbers are not comparable; evaluate them alike"
    )
    for fold in (0, 1):  # A predicted with flip throughout
        _evaluate_fold(tmp_path / "pred" / "A" / str(fold), tmp_path / "A" / f"fold{fold}" / "eval",
                       [f"runs/A/fold{fold}"], 0.1 * fold, "flip")  # fmt: skip
    run_cli(["summarize", "--runs", f"A={tmp_path / 'A'}", f"B={tmp_path / 'B'}", "--out",
             str(tmp_path / "s")])  # fmt: skip
    assert set(json.loads((tmp_path / "s" / "summary.json").read_text())["methods"]) == {"A", "B"}


def test_summarize_keeps_every_method_of_a_repeated_runs_flag(tmp_path):
    """`--runs A=x --runs B=y` compares A and B (argparse's default kept only the last flag, so
    the summary silently held B alone)."""
    for method, shift in (("A", 0.0), ("B", 0.1)):
        _evaluate_fold(tmp_path / "pred" / method, tmp_path / method / "fold0" / "eval",
                       [f"runs/{method}/fold0"], shift)  # fmt: skip
    out = tmp_path / "summary"
    run_cli(["summarize", "--runs", f"A={tmp_path / 'A'}", "--runs", f"B={tmp_path / 'B'}",
             "--out", str(out)])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["A", "B"]
    assert (out / "summary.md").read_text().startswith("# Cross-validation summary: A, B")
    message = _error(["summarize", "--runs", f"A={tmp_path / 'A'}", "--runs",
                      f"A={tmp_path / 'B'}", "--out", str(tmp_path / "s2")])  # fmt: skip
    assert message.endswith(f"--runs names 'A' twice ({tmp_path / 'A'} and {tmp_path / 'B'})")


@pytest.mark.parametrize("command", ["evaluate", "summarize", "predict"])
def test_help_shows_each_default_the_parser_uses(command):
    """A flag with a default says it in its help, and the value said is the one parsed."""
    import argparse

    from focalnet_jax.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in commands.choices[command]._actions:
        if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            continue
        shown = f"{action.default:g}" if isinstance(action.default, float) else action.default
        assert f"default: {shown})" in action.help, (action.option_strings, action.help)


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


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_summarize_stopped_while_drawing_leaves_the_earlier_summary_and_counts_an_aucs_folds(
    tmp_path, monkeypatch
):
    """summary.json and summary.md were written before the figures, an earlier summary's figures
    left in place: a run stopped between them (a crash drawing) left figures of other methods
    beside the new numbers; removing them first lost the earlier summary's. Now all or nothing.
    And roc.png's legend gave a mean AUC of one fold of three as the method's, where
    summary.md's cell says '(1/3)'."""
    from focalnet_jax.evaluation import figures, summary

    for fold in range(3):
        _evaluate_fold(tmp_path / "pred" / str(fold), tmp_path / "A" / f"fold{fold}", [f"/r{fold}"])
    out = tmp_path / "summary"
    run_cli(["summarize", "--runs", f"A={tmp_path / 'A'}", "--out", str(out)])
    assert {p.name for p in out.glob("*.png")} == set(summary.SUMMARY_FIGURES)
    earlier = _files(out)
    for fold in (1, 2):  # their ROC of GS >= 7 undefined (one class)
        path = tmp_path / "A" / f"fold{fold}" / "metrics.json"
        metrics = json.loads(path.read_text())
        metrics["roc"]["gs_ge_7"].update(auc=None)
        path.write_text(json.dumps(metrics))
    drawn = {}

    def stopped(path, panels):
        drawn.update(panels)
        raise KeyboardInterrupt

    monkeypatch.setattr(figures, "roc_figure", stopped)
    with pytest.raises(KeyboardInterrupt):
        summary.summarize_runs({"A": tmp_path / "A"}, out)
    assert _files(out) == earlier  # nothing of the new one, no temporary folder
    auc = json.loads((tmp_path / "A" / "fold0" / "metrics.json").read_text())["roc"]["gs_ge_7"]
    assert list(drawn["GS >= 7"]) == [f"A (AUC {auc['auc']:.3f} (1/3))"]


def test_summarize_on_a_full_disk_leaves_the_earlier_summary_whole(tmp_path, monkeypatch):
    """A rerun stopped between summary.json and summary.md (a full disk) left the earlier
    summary.md, of other methods and numbers, beside the new summary.json; removing the earlier
    files first lost them. The error names the file at its place in --out."""
    from focalnet_jax.evaluation import summary

    for method in "AB":
        for fold in range(2):
            run = [f"/{method}{fold}"]
            _evaluate_fold(tmp_path / method / "p" / str(fold), tmp_path / method / str(fold), run)
    out = tmp_path / "summary"
    run_cli(["summarize", "--runs", f"A={tmp_path / 'A'}", "--out", str(out)])
    earlier = _files(out)

    def full_disk(folds, folder):
        (folder / "froc.png").write_bytes(b"half a figure")
        raise OSError(28, "No space left on device", str(folder / "froc.png"))

    monkeypatch.setattr(summary, "write_band_figures", full_disk)
    with pytest.raises(OSError) as failed:
        summary.summarize_runs({"A": tmp_path / "A", "B": tmp_path / "B"}, out)
    assert str(failed.value) == f"[Errno 28] No space left on device: '{out / 'froc.png'}'"
    assert _files(out) == earlier
    assert json.loads((out / "summary.json").read_text())["methods"].keys() == {"A"}


@pytest.mark.parametrize("command", ["evaluate", "summarize", "synth"])
def test_a_second_writer_of_one_folder_is_refused_in_one_line(tmp_path, command):
    """Two evaluate (or summarize) runs into one --out each ended well, one's figures beside the
    other's metrics; two synth runs both passed the check for an empty --out, the later one
    replacing the other's dataset without a word."""
    from focalnet_jax.data.writer_folders import lock_beside, writer_lock

    out = tmp_path / "out"
    argv = {
        "evaluate": ["evaluate", "--predictions", str(tmp_path / "pred"), "--out", str(out)],
        "summarize": ["summarize", "--runs", f"A={tmp_path / 'A'}", "--out", str(out)],
        "synth": ["synth", "--out", str(out), "--cases", "1", "--small"],
    }[command]
    with writer_lock(out, command):
        message = _error(argv)
        assert lock_beside(out, command).is_file()
    assert message == (
        f"focalnet {command}: error: {out} is being written by another focalnet {command} (pid "
        f"{os.getpid()} on {socket.gethostname()}); wait for it to end"
    )
    assert not out.exists() and not lock_beside(out, command).exists()


def test_a_refused_evaluate_or_summarize_leaves_no_folder_made_for_its_lock(tmp_path):
    """The lock beside --out made its parent folders before the inputs were read: a typo in an
    input path left them behind."""
    missing = tmp_path / "missing"
    message = _error(["evaluate", "--predictions", str(missing), "--out", str(tmp_path / "a/x")])
    assert message.endswith(f"{missing}: predictions folder does not exist")
    message = _error(["summarize", "--runs", f"A={missing}", "--out", str(tmp_path / "b/c/x")])
    assert message.endswith(f"{missing}: run folder does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    metrics = tmp_path / "metrics.json"  # the file named instead of its folder
    metrics.write_text("{}")
    message = _error(["summarize", "--runs", f"A={metrics}", "--out", str(tmp_path / "b/c/x")])
    assert message.endswith(f"{metrics}: a file, not a run folder: give the folder holding "
                            "metrics.json (the `--out` of `focalnet evaluate`, or a run or "
                            "cross-validation folder above it)")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_lock_file_that_cannot_be_opened_is_named_not_the_output_folder(tmp_path):
    """A lock file beside --out that cannot be opened (another user's; here a folder of its name)
    was reported as the output folder being denied, a folder that did not even exist."""
    from focalnet_jax.data.writer_folders import lock_beside

    out = tmp_path / "out"
    lock_beside(out, "synth").mkdir()
    message = _error(["synth", "--out", str(out), "--cases", "1", "--small"])
    assert message == (
        f"focalnet synth: error: [Errno 21] Is a directory: '{lock_beside(out, 'synth')}'"
    )
    assert not out.exists()
