"""`study report` on hand-made cells: metrics missing or undefined, partial FROC curves, ensembles
of predictions with unknown grades or annotated slices only, and its figures (FROC bands, legend,
p-value matrix)."""

from __future__ import annotations

import contextlib
import json
import math
import sys

import numpy as np
import pytest

from focalnet_jax.study.synthetic import focalnet


def test_report_refuses_a_metric_missing_from_metrics_json(capsys):
    from focalnet_jax.study.report import _lookup
    from focalnet_jax.study.spec import StudyError

    metrics = {"picai": {"auroc": 0.75, "ap": None}, "roc": {"skipped": "one class"}}
    assert _lookup(metrics, ("picai", "auroc"), "c/eval/metrics.json", partial=False) == 0.75
    assert math.isnan(_lookup(metrics, ("picai", "ap"), "c", partial=False))  # undefined: null
    assert math.isnan(_lookup(metrics, ("roc", "gs_ge_7", "auc"), "c", partial=False))
    with pytest.raises(StudyError, match=r"^c/eval/metrics.json: no picai.score "):
        _lookup(metrics, ("picai", "score"), "c/eval/metrics.json", partial=False)
    assert math.isnan(_lookup(metrics, ("picai", "score"), "c/m.json", partial=True))
    assert "warning: c/m.json: no picai.score" in capsys.readouterr().err
    # Not a number (a dict traced back; a string or a bool was read as 0.7 or 1.0; Infinity,
    # which evaluate never writes, was left out of the mean and the tests without a word).
    for value in ({"value": 0.5}, "0.7", True, [0.7], math.inf, -math.inf, 10**400):
        with pytest.raises(StudyError) as refused:
            _lookup({"picai": {"auroc": value}}, ("picai", "auroc"), "c/m.json", partial=True)
        assert str(refused.value) == (
            f"c/m.json: picai.auroc is {value!r}, not a number (damaged or edited?); remove the "
            "file, and `study run` evaluates the cell again"
        )
    assert _lookup({"picai": {"auroc": 1}}, ("picai", "auroc"), "c", partial=False) == 1.0


def test_report_says_which_metrics_a_cell_did_not_evaluate_and_why():
    """A cell evaluated without picai_eval read as NaN on three headline metrics, left out of
    their tests, and the report did not say why."""
    from focalnet_jax.study.report import Collected, _skipped_lines, skipped_metrics

    absent = "picai_eval is not installed (No module named 'picai_eval'); install the 'picai' extra"
    rows = [{"arm": a, "repeat": 0, "fold": f} for a, f in (("ce", 0), ("ce", 1), ("fl", 0))]
    metrics = [
        {"picai": {"skipped": absent}, "roc": {"gs_ge_7": {"auc": 0.7}}},
        {"picai": {"auroc": 0.8, "ap": 0.5, "score": 0.65}, "roc": {"skipped": "one class"}},
        {"picai": {"skipped": absent}, "roc": {"skipped": "one class"}},
    ]
    skipped = skipped_metrics(Collected(rows=rows, metrics=metrics))
    picai = {
        m: ["ce/rep0/fold0", "fl/rep0/fold0"] for m in ("picai_auroc", "picai_ap", "picai_score")
    }
    roc = {m: ["ce/rep0/fold1", "fl/rep0/fold0"] for m in ("roc_gs_ge_7_auc", "roc_gs_ge_4+3_auc")}
    assert skipped == {absent: picai, "one class": roc}
    assert _skipped_lines(skipped) == [
        "",
        "**Not evaluated or undefined** (picai_auroc, picai_ap, picai_score) in 2 cells "
        f"(ce/rep0/fold0, fl/rep0/fold0): {absent}. Those runs are n/a for them and left out of "
        "their tests.",
        "",
        "**Not evaluated or undefined** (roc_gs_ge_7_auc, roc_gs_ge_4+3_auc) in 2 cells "
        "(ce/rep0/fold1, fl/rep0/fold0): one class. Those runs are n/a for them and left out of "
        "their tests.",
    ]


def test_report_names_the_metrics_a_cell_evaluated_as_undefined():
    """A fold whose top-12 detections lay only on class >= 2 lesions, or whose cases were all
    positive: the evaluation wrote the AUC as NaN without a reason, and the report left the run
    out of those tests without a word (only runs.csv's n_a, n_b told)."""
    from types import SimpleNamespace

    from focalnet_jax.evaluation.picai import picai_metrics
    from focalnet_jax.evaluation.roc import gs_roc
    from focalnet_jax.study.report import Collected, skipped_metrics

    detections = SimpleNamespace(  # 3 detections: classes 3, 2, 3; scores P(class >= k)
        roc_scores=np.array([[0.9, 0.2, 0.1, 0.05, 0.01], [0.5, 0.1, 0.05, 0.01, 0.0],
                             [0.3, 0.05, 0.01, 0.0, 0.0]]),
        roc_classes=np.array([3, 2, 3], np.int32),
        roc_grade_known=np.ones(3, bool),
    )  # fmt: skip
    roc = gs_roc([detections])
    # gs_ge_4+3 scores P(class >= 3) = 0.1, 0.05, 0.01: positives 0.1 and 0.01 against 0.05.
    assert np.isnan(roc["gs_ge_7"]["auc"]) and roc["gs_ge_4+3"]["auc"] == 0.5
    assert "skipped" not in roc["gs_ge_4+3"]
    all_positive = {c: ([(1.0, 0.8, 0.5)], 0.8) for c in ("c0", "c1")}
    picai = picai_metrics(all_positive, bootstraps=0)
    metrics = json.loads(json.dumps({"roc": roc, "picai": picai}, default=lambda a: a.tolist()))
    rows = [{"arm": "ce", "repeat": 0, "fold": 0}]
    auroc = "AUROC undefined: every one of the 2 cases has a clinically significant lesion"
    assert skipped_metrics(Collected(rows=rows, metrics=[metrics])) == {
        auroc: {"picai_auroc": ["ce/rep0/fold0"], "picai_score": ["ce/rep0/fold0"]},
        "AUC undefined: every top-12 detection lies on a lesion of class >= 2": {
            "roc_gs_ge_7_auc": ["ce/rep0/fold0"]
        },
    }
    # A NaN without a reason (metrics.json of an earlier version) is named too.
    del metrics["picai"]["undefined"]
    found = skipped_metrics(Collected(rows=rows, metrics=[metrics]))
    assert found["undefined (null in the cell's metrics.json)"] == {
        "picai_auroc": ["ce/rep0/fold0"],
        "picai_score": ["ce/rep0/fold0"],
    }


def test_report_partial_leaves_out_a_run_without_the_groups_froc_curve():
    """`study report --partial` (what the missing-metric error advises) ended in a KeyError
    traceback when a run's metrics.json lacked the FROC group."""
    from focalnet_jax.study.figures import froc_curves

    curve = {"fp": [0.0, 1.0], "sensitivity": [0.5, 1.0]}
    rows = [{"arm": "ce"}, {"arm": "ce"}, {"arm": "fl"}]
    metrics = [
        {"froc": {"cs": {"num_lesions": 2, "curve": curve}}},
        {"froc": {}},  # another version's metrics.json
        {"froc": {"cs": {"num_lesions": 0, "curve": curve}}},  # no lesion of the group
    ]
    assert froc_curves(rows, metrics, "cs") == {"ce": [([0.0, 1.0], [0.5, 1.0])], "fl": []}


def test_focalnet_child_writes_where_stdout_is_redirected(capfd):
    """A benchmark that redirects stdout to stderr (one JSON line on stdout) gets its `focalnet`
    child's prints on stderr too."""
    with contextlib.redirect_stdout(sys.stderr):
        focalnet(["synth", "--help"])
    out, err = capfd.readouterr()
    assert out == ""
    assert "$ focalnet synth --help" in err and "usage: focalnet synth" in err


def test_ensemble_predictions_keep_the_members_unknown_grades(tmp_path):
    """Member maps 0.2 and 0.6 average to 0.4; the lesion of unknown grade stays marked."""
    from focalnet_jax.evaluation.predictions import read_case, write_case
    from focalnet_jax.study.ensembles import average_predictions

    lesions = np.zeros((1, 8, 8), np.int32)
    lesions[0, 2:4, 2:4] = 1
    for name, value in (("a", 0.2), ("b", 0.6)):
        write_case(
            tmp_path / name,
            "c1",
            scores=np.full((1, 8, 8, 5), value, np.float32),
            lesions=lesions,
            lesion_classes=[2],
            lesion_grade_known=[False],
            spacing=(1.0, 1.0),
            patient_id="p1",
        )
    assert average_predictions([tmp_path / "a", tmp_path / "b"], tmp_path / "mean") == ["c1"]
    case = read_case(tmp_path / "mean" / "c1.npz")
    np.testing.assert_allclose(case.scores, 0.4, rtol=1e-6)
    assert case.grade_known.tolist() == [False]
    assert not (tmp_path / "mean" / "models.json").exists()  # the members name no store


def test_an_ensemble_of_predictions_of_annotated_slices_gets_no_picai_numbers(tmp_path):
    """The arms' cells skipped PI-CAI on predictions from a store of annotated slices, while the
    ensemble of the same predictions, written without the members' models.json, computed it."""
    from focalnet_jax.evaluation.evaluate import evaluate_predictions
    from focalnet_jax.evaluation.predictions import write_case
    from focalnet_jax.study.ensembles import average_predictions

    store = {"path": "/data/store", "slices": "annotated"}
    lesions = np.zeros((2, 8, 8), np.int32)
    lesions[0, 2:4, 2:4] = 1
    for name, value in (("a", 0.2), ("b", 0.6)):
        for case, classes in (("c1", [3]), ("c2", [])):
            write_case(tmp_path / name, case, scores=np.full((2, 8, 8, 5), value, np.float32),
                       lesions=lesions if classes else 0 * lesions, lesion_classes=classes,
                       spacing=(1.0, 1.0), patient_id=case)  # fmt: skip
        models = {"models": [{"run": f"/{name}", "step": 1}], "tta": "none", "store": store}
        (tmp_path / name / "models.json").write_text(json.dumps(models))
    average_predictions([tmp_path / "a", tmp_path / "b"], tmp_path / "mean")
    assert json.loads((tmp_path / "mean" / "models.json").read_text()) == {"store": store}
    metrics = evaluate_predictions(tmp_path / "mean", with_figures=False, picai_bootstraps=0)
    assert metrics["picai"]["skipped"].startswith(
        "the predictions hold only the annotated slices of store /data/store"
    )


def test_froc_band_leaves_out_runs_without_a_lesion_of_the_group(tmp_path):
    """Two runs of arm a: one with 2 csPCa lesions (S = 0.5 from FP 0, 1 from FP 0.5), one
    whose fold has none (null sensitivities): the band is the first run alone (n=1)."""
    from focalnet_jax.evaluation.froc import sensitivity_at
    from focalnet_jax.study import figures
    from focalnet_jax.study.figures import froc_curves

    def metrics(num_lesions, sensitivity):
        curve = {"fp": [0.0, 0.5], "sensitivity": sensitivity}
        return {"froc": {"clinically_significant": {"num_lesions": num_lesions, "curve": curve}}}

    rows = [{"arm": "a"}, {"arm": "a"}]
    runs = [metrics(2, [0.5, 1.0]), metrics(0, [None, None])]
    curves = froc_curves(rows, runs, "clinically_significant")
    assert curves == {"a": [([0.0, 0.5], [0.5, 1.0])]}
    fp, sens = (np.asarray(v) for v in curves["a"][0])
    assert sensitivity_at(fp, sens, [0.25, 0.5]).tolist() == [0.5, 1.0]
    assert figures.froc_bands(tmp_path / "froc.png", curves, "cs").is_file()


def test_an_arm_without_a_froc_curve_stays_in_the_legend(tmp_path, monkeypatch):
    # An arm none of whose runs has a clinically significant lesion was left out of froc_cs.png,
    # whose legend otherwise gives n per arm.
    from focalnet_jax.study import figures

    kept = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: kept.append(fig) or path)
    figures.froc_bands(tmp_path / "f.png", {"ce": [([0.0, 0.5], [0.5, 1.0])], "fl": []}, "cs")
    legend = kept[0].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["ce (n=1)", "fl (n=0)"]


def test_pvalue_matrix_labels_stay_readable_on_their_cells(tmp_path, monkeypatch):
    """Each p-value is written in the colour that contrasts with its cell: black on the light
    yellow of a small p (the finding; it was white there), white on the dark purple of p = 1."""
    import matplotlib

    from focalnet_jax.study import figures

    kept = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: kept.append(fig) or path)
    rows = [
        {"metric": "m", "arm_a": "a", "arm_b": "b", "p_permutation": 0.01},
        {"metric": "m", "arm_a": "b", "arm_b": "a", "p_permutation": 1.0},
    ]
    figures.pvalue_matrices(tmp_path / "p.png", rows, ["m"])
    colours = {t.get_text(): t.get_color() for t in kept[0].axes[0].texts}
    cmap = matplotlib.colormaps[figures.PVALUE_CMAP]
    for text, p in (("0.01", 0.01), ("1", 1.0)):
        r, g, b, _ = cmap(p)
        background = 0.2126 * r + 0.7152 * g + 0.0722 * b  # relative luminance
        text_luminance = 0.0 if colours[text] == "k" else 1.0
        assert abs(text_luminance - background) > 0.5, (text, colours[text], background)
