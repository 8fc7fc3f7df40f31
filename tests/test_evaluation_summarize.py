"""`focalnet summarize` over evaluated folds: mean, SD and Welch tests with Bonferroni's
correction (the folds each test used or left out), the runs and folds it refuses (damaged or
unreadable metrics, an ensemble, a run counted twice, other settings or TTA), and an earlier
summary replaced whole or kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_calls import cli_error, run_cli
from evaluation_cohort import _evaluate_argv, _evaluate_fold, write_cohort
from scipy import stats

from focalnet_jax.evaluation.summary import method_comparisons


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


def test_summarize_rejects_bad_runs(tmp_path):
    assert "NAME=DIR" in cli_error(["summarize", "--runs", "nodir", "--out", str(tmp_path)])
    (tmp_path / "run").mkdir()
    message = cli_error(["summarize", "--runs", f"A={tmp_path / 'run'}", "--out", str(tmp_path)])
    assert "no metrics.json" in message
    twice = ["--runs", f"A={tmp_path / 'run'}", "A=other", "--out", str(tmp_path / "o")]
    message = cli_error(["summarize", *twice])
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
    message = cli_error(
        ["summarize", "--runs", f"A={tmp_path / 'A'}", "--out", str(tmp_path / "s")]
    )
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
    message = cli_error(_evaluate_argv(predictions, out))
    assert message.startswith(
        f"focalnet evaluate: error: {predictions / 'models.json'}: not a readable models.json ("
    )
    assert reason in message and "\n" not in message and not out.exists()
    (predictions / "models.json").unlink()
    run_cli(_evaluate_argv(predictions, out))
    (out / "metrics.json").write_bytes(damage)
    message = cli_error(
        ["summarize", "--runs", f"A={tmp_path / 'A'}", "--out", str(tmp_path / "s")]
    )
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
    message = cli_error(["summarize", "--runs", f"A={method}", "--out", str(tmp_path / "s1")])
    assert message.endswith(
        f"{method / 'test_eval' / 'metrics.json'}: evaluates an ensemble of 2 runs, not one fold; "
        f"move it out of {method}"
    )
    shutil.rmtree(method / "test_eval")
    _evaluate_fold(tmp_path / "pred" / "tta", method / "fold0" / "eval_tta", ["runs/A/fold0"])
    message = cli_error(["summarize", "--runs", f"A={method}", "--out", str(tmp_path / "s2")])
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
    message = cli_error(["summarize", "--runs", "A=runs/cv", "--out", str(tmp_path / "s")])
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
        message = cli_error(
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
    message = cli_error(["summarize", "--runs", f"A={tmp_path / 'A'}", f"B={tmp_path / 'B'}",
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
    message = cli_error(
        ["summarize", "--runs", f"A={tmp_path / 'A'}", "--out", str(tmp_path / "s")]
    )
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
    message = cli_error(["summarize", "--runs", f"A={tmp_path / 'A'}", "--runs",
                      f"A={tmp_path / 'B'}", "--out", str(tmp_path / "s2")])  # fmt: skip
    assert message.endswith(f"--runs names 'A' twice ({tmp_path / 'A'} and {tmp_path / 'B'})")


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
