"""Inputs that must not change the evaluation's numbers silently: repeated or unsafe case ids
given to the Python API, predictions files with wrong dtypes, a spacing too coarse for the hit
radius, and methods summarised over different cases."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from cli_calls import cli_error, run_cli
from evaluation_cohort import write_blob_case, write_cohort

from focalnet_jax.errors import UserError
from focalnet_jax.evaluation.evaluate import evaluate_predictions
from focalnet_jax.evaluation.predictions import PredictionsError, read_case


def test_the_api_refuses_a_repeated_or_unsafe_case_id(tmp_path):
    predictions = tmp_path / "predictions"
    write_cohort(predictions)
    evaluated = evaluate_predictions(
        predictions, cases=["c1", "c2"], with_picai=False, with_figures=False
    )
    assert evaluated["num_cases"] == 2 and evaluated["cases"] == ["c1", "c2"]
    with pytest.raises(PredictionsError, match=r"listed twice: \['c1'\]"):
        evaluate_predictions(predictions, cases=["c1", "c1", "c2"], with_picai=False)
    with pytest.raises(PredictionsError, match="expected a list of case ids, got the string 'c1'"):
        evaluate_predictions(predictions, cases="c1", with_picai=False)
    with pytest.raises(PredictionsError, match="the case list is empty"):
        evaluate_predictions(predictions, cases=[], with_picai=False)
    write_blob_case(tmp_path / "outside", "x")
    with pytest.raises(UserError, match=r"case id '\.\./outside/x' starts with '\.'"):
        evaluate_predictions(predictions, cases=["../outside/x"], with_picai=False)


def _case_with(tmp_path, **replaced):
    good = write_blob_case(tmp_path / "good", "case", lesion=(2, (4, 20, 20)))
    with np.load(good) as data:
        arrays = {**dict(data), **replaced}
    bad = tmp_path / "bad"
    bad.mkdir(exist_ok=True)
    np.savez(bad / "case.npz", **arrays)
    return bad / "case.npz"


@pytest.mark.parametrize(
    "key, value, reason",
    [
        ("spacing", np.array(["0.6", "0.6"]), r"'spacing' must be 2 numbers \(mm\), got <U3"),
        ("spacing", np.array([True, True]), r"'spacing' must be 2 numbers \(mm\), got bool"),
        # In metres: the 5 mm window and hit radius covered the slice, any detection hit.
        (
            "spacing",
            np.array([0.000625, 0.000625]),
            r"'spacing' \[0.000625, 0.000625\] is no "
            r"pixel size in mm \(expected 0.01..50; metres or cm\?\)",
        ),  # fmt: skip
        ("spacing", np.array([1e-30, 1.0]), r"'spacing' .* is no pixel size in mm"),  # overflow
        ("slice_index", np.arange(8) + 0.5, r"'slice_index' must be integers .*float64"),
        ("slice_index", np.array(list("abcdefgh")), r"'slice_index' must be integers .*<U1"),
        ("t2w", np.full((8, 48, 48), "x"), r"'t2w' must be a numeric image, got <U1"),
        ("patient_id", np.array(["p"], dtype=object), r"'patient_id' holds Python objects"),
        ("lesion_classes", np.array([2], dtype=object), r"'lesion_classes' holds Python objects"),
        ("lesion_classes", np.array([2.0], np.float32), r"'lesion_classes' .* got float32 \(1,\)"),
    ],
)
def test_a_wrong_dtype_is_a_one_line_error_naming_file_and_key(tmp_path, key, value, reason):
    path = _case_with(tmp_path, **{key: value})
    with pytest.raises(PredictionsError, match=rf"^{path}: {reason}"):
        read_case(path)
    message = cli_error(
        ["evaluate", "--predictions", str(path.parent), "--out", str(tmp_path / "o")]
    )
    assert str(path) in message and key in message
    assert not (tmp_path / "o").exists()


def test_a_spacing_too_coarse_for_the_radius_names_the_file(tmp_path):
    write_blob_case(tmp_path / "p", "fine", lesion=(2, (4, 20, 20)))
    coarse = _case_with(tmp_path / "c", spacing=np.array([12.0, 12.0], np.float32))
    (tmp_path / "p" / "coarse.npz").write_bytes(coarse.read_bytes())
    argv = ["evaluate", "--predictions", str(tmp_path / "p"), "--out", str(tmp_path / "o")]
    message = cli_error([*argv, "--no-picai"])
    assert f"{tmp_path / 'p' / 'coarse.npz'}: radius_mm 5 is under half a pixel" in message


def test_summarize_warns_where_methods_were_evaluated_on_other_cases(tmp_path, caplog):
    predictions = tmp_path / "predictions"
    write_cohort(predictions)
    folds = {
        "A": (["c1", "c2"], ["c3"]),
        "B": (["c4"], ["c2"]),
        "C": (["c3"], ["c2", "c1"]),  # A's cases, split otherwise
    }
    for method, lists in folds.items():
        for fold, cases in enumerate(lists):
            listed = tmp_path / f"{method}{fold}.txt"
            listed.write_text("\n".join(cases))
            run_cli(["evaluate", "--predictions", str(predictions), "--cases", str(listed),
                     "--out", str(tmp_path / method / f"fold{fold}"), "--no-picai",
                     "--no-figures"])  # fmt: skip
    out = tmp_path / "summary"
    with caplog.at_level(logging.WARNING):
        run_cli(["summarize", "--runs", f"A={tmp_path / 'A'}", f"B={tmp_path / 'B'}",
                 "--out", str(out)])  # fmt: skip
    # Pooled: A {c1, c2, c3}, B {c2, c4}; c1, c3 and c4 are not evaluated by both.
    expected = "pooled over folds: A 3, B 2; 3 not evaluated by every method"
    assert expected in caplog.text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["case_sets_differ"] == {"cases": {"A": 3, "B": 2}, "not_shared": 3}
    report = (out / "summary.md").read_text()
    assert expected in report
    assert "Patients per fold (A): 2, 1" in report and "Patients per fold (B): 1, 1" in report

    same = tmp_path / "same"
    run_cli(["summarize", "--runs", f"A={tmp_path / 'A'}", f"C={tmp_path / 'C'}",
             "--out", str(same)])  # fmt: skip
    assert json.loads((same / "summary.json").read_text())["case_sets_differ"] is None
    assert "Warning" not in (same / "summary.md").read_text()


def test_summarize_warns_where_folds_of_one_method_evaluated_the_same_cases(tmp_path, caplog):
    """A fold evaluated again beside the first (or two repeats of a cross-validation) under one
    method's folder: each counted as a fold, without a word."""
    predictions = tmp_path / "predictions"
    write_cohort(predictions)
    for fold, cases in enumerate((["c1", "c2"], ["c2", "c3"], ["c4"])):
        listed = tmp_path / f"{fold}.txt"
        listed.write_text("\n".join(cases))
        run_cli(["evaluate", "--predictions", str(predictions), "--cases", str(listed),
                 "--out", str(tmp_path / "A" / f"fold{fold}"), "--no-picai",
                 "--no-figures"])  # fmt: skip
    with caplog.at_level(logging.WARNING):
        run_cli(["summarize", "--runs", f"A={tmp_path / 'A'}", "--out", str(tmp_path / "s")])
    expected = (
        "folds of one method evaluated the same cases (cases in more than one fold: A 1): each "
        "fold counts once in the mean, the SD and the tests, which take folds as independent"
    )
    assert expected in caplog.text
    assert f"**Warning:** {expected}." in (tmp_path / "s" / "summary.md").read_text()
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["folds_sharing_cases"] == {"A": 1}
    assert summary["methods"]["A"]["metrics"]["froc/all/pauc/0.1-3"]["of"] == 3


def test_cases_are_recorded_sorted_by_id_and_integer_images_read_as_float(tmp_path):
    for case_id in ("P10", "P1-2", "P1"):  # by file name "P1-2.npz" < "P1.npz" ('-' < '.')
        write_blob_case(tmp_path / "p", case_id, lesion=(2, (4, 20, 20)))
    evaluated = evaluate_predictions(tmp_path / "p", with_picai=False, with_figures=False)
    assert evaluated["cases"] == ["P1", "P1-2", "P10"]
    path = _case_with(tmp_path, t2w=np.full((8, 48, 48), 300, np.int16))
    t2w = read_case(path).t2w
    assert t2w.dtype == np.float32 and float(t2w.max()) == 300.0
