"""`summarize` against the runs its folds evaluated: a metrics.json of a step other than the one
its finished run ended at (evaluated while the run trained or was stopped, trained on since) was
averaged with finished folds; an unfinished run and a trained fold without an evaluation were
left in or out without a word; an `--out` holding an evaluation had its figures replaced."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from cli_calls import cli_error, run_cli
from evaluation_cohort import _evaluate_fold
from test_train_helpers import FakeStore, tiny_config

from focalnet_jax.training import train_and_evaluate


def _with_step(metrics_file, step: int) -> None:
    metrics = json.loads(metrics_file.read_text())
    metrics["models"]["models"][0]["step"] = step
    metrics_file.write_text(json.dumps(metrics))


def test_summarize_checks_each_fold_against_its_run(tmp_path, caplog):
    cv = tmp_path / "cv"
    steps = ["--config.loss.mfl=false", "--config.train.steps=2"]
    every = ["--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=5"]
    train_and_evaluate(tiny_config(overrides=steps + every), cv / "fold0", store=FakeStore())
    shutil.copytree(cv / "fold0", cv / "fold1")
    shutil.copytree(cv / "fold0", cv / "fold2")
    shutil.rmtree(cv / "fold2" / "checkpoints" / "2")  # stopped at step 1 of 2
    (cv / "fold3").mkdir()  # trained, never evaluated
    shutil.copy(cv / "fold0" / "config.json", cv / "fold3" / "config.json")
    for fold in (0, 1, 2):
        run = cv / f"fold{fold}"
        _evaluate_fold(tmp_path / f"p{fold}", run / "eval", [str(run)], 0.1 * fold)
    _with_step(cv / "fold2" / "eval" / "metrics.json", 1)
    with caplog.at_level(logging.WARNING):
        run_cli(["summarize", "--runs", f"A={cv}", "--out", tmp_path / "s"])
    assert f"evaluates run {cv / 'fold2'}, not finished (latest checkpoint at step 1 of 2)" in (
        caplog.text
    )
    assert f"{cv}: 1 fold run(s) without an evaluation, left out of the summary: " in caplog.text
    assert str(cv / "fold3") in caplog.text
    # fold0 evaluated at step 1, its run trained on to step 2 since; fold1 at its final step.
    _with_step(cv / "fold0" / "eval" / "metrics.json", 1)
    message = cli_error(["summarize", "--runs", f"A={cv}", "--out", tmp_path / "s2"])
    assert message.endswith(
        f"{cv / 'fold0' / 'eval' / 'metrics.json'}: evaluates step 1 of run {cv / 'fold0'}, whose "
        "training ended at step 2, while other folds evaluate their final step: evaluate the "
        f"finished run again (focalnet evaluate --workdir {cv / 'fold0'}), or move this "
        f"metrics.json out of {cv}"
    )
    assert not (tmp_path / "s2").exists()
    # Every fold at an earlier step (`evaluate --step 1`): summarised, and said.
    _with_step(cv / "fold1" / "eval" / "metrics.json", 1)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_cli(["summarize", "--runs", f"A={cv}", "--out", tmp_path / "s3"])
    assert "every fold evaluates a step before its run's final one" in caplog.text
    # Evaluations written outside the runs' folder (`evaluate --out results/A/fold<k>`): judged
    # against the runs they recorded.
    results = tmp_path / "results"
    for fold in (0, 1):
        shutil.copytree(cv / f"fold{fold}" / "eval", results / f"fold{fold}")
    _with_step(results / "fold1" / "metrics.json", 2)
    message = cli_error(["summarize", "--runs", f"A={results}", "--out", tmp_path / "s5"])
    assert message.endswith(
        f"evaluates step 1 of run {cv / 'fold0'}, whose training ended at step 2, while other "
        "folds evaluate their final step: evaluate the finished run again (focalnet evaluate "
        f"--workdir {cv / 'fold0'}), or move this metrics.json out of {results}"
    )
    # Moved: the runs recorded are gone; each is judged as its copy in the folder, and each
    # fold's metrics.json lies in its run.
    shutil.move(cv, tmp_path / "moved")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_cli(["summarize", "--runs", f"A={tmp_path / 'moved'}", "--out", tmp_path / "s4"])
    moved = tmp_path / "moved"
    assert f"{moved}: 1 fold run(s) without an evaluation, left out of the summary: " in (
        caplog.text
    )
    assert f"left out of the summary: {moved / 'fold3'}\n" in caplog.text
    assert f"evaluates run {moved / 'fold2'}, not finished" in caplog.text  # its copy there
    assert "every fold evaluates a step before its run's final one" in caplog.text


def test_summarize_into_an_evaluation_folder_is_refused(tmp_path):
    _evaluate_fold(tmp_path / "p", tmp_path / "A" / "fold0" / "eval", ["runs/A/fold0"])
    evaluation = tmp_path / "A" / "fold0" / "eval"
    before = {p.name: p.read_bytes() for p in evaluation.iterdir() if p.is_file()}
    message = cli_error(["summarize", "--runs", f"A={tmp_path / 'A'}", "--out", evaluation])
    assert message.endswith(
        f"--out {evaluation} holds an evaluation (metrics.json): its figures would be replaced "
        "by the summary's; choose another folder"
    )
    assert {p.name: p.read_bytes() for p in evaluation.iterdir() if p.is_file()} == before


def test_folds_are_searched_in_every_folder_but_hidden_ones_and_an_unlistable_one_is_named(
    tmp_path, monkeypatch
):
    """`rglob` skipped a folder it could not list (permission denied): a fold left out of the
    mean, the SD and the tests without a word. A hidden folder is an unfinished writer's
    (`replaced_outputs`): its metrics.json is no fold."""
    import errno
    import os

    from focalnet_jax.errors import UserError
    from focalnet_jax.evaluation.summary import find_folds

    method = tmp_path / "A"
    for folder in ("fold0", "fold1/eval", "fold1/eval/.metrics.json.tmp-1@h-00000000-0000"):
        (method / folder).mkdir(parents=True)
        (method / folder / "metrics.json").write_text("{}")
    assert find_folds(method) == [
        method / "fold0" / "metrics.json",
        method / "fold1" / "eval" / "metrics.json",
    ]
    scandir = os.scandir

    def denied(path):
        if os.fspath(path) == str(method / "fold1"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(UserError) as refused:
        find_folds(method)
    assert str(refused.value) == f"{method}: cannot search {method / 'fold1'} (Permission denied)"


def test_a_method_without_a_curve_stays_in_the_figures_legends(tmp_path, monkeypatch):
    """A method whose GS ROC AUC was undefined in every fold, or with no lesion of a FROC group
    in any, had no line and no legend entry: the panel looked as if it had not been run, while
    summary.md shows it as n/a. A FROC band of some folds said nothing of it ('(n/N)' in the
    ROC legend)."""
    import matplotlib.pyplot as plt
    import numpy as np

    from focalnet_jax.evaluation import figures, summary

    curve = {"fp": [0.1, 1.0, 5.0], "sensitivity": [0.2, 0.5, 0.9]}
    lesions = [{"froc": {"index": {"curve": curve, "num_lesions": 3}}} for _ in range(2)]
    folds = {"A": [*lesions, {"froc": {"index": {"curve": None, "num_lesions": 0}}}], "B": [{}]}
    drawn = {}
    monkeypatch.setattr(figures, "froc_figure", lambda path, panels: drawn.update(panels))
    monkeypatch.setattr(figures, "roc_figure", lambda path, panels: drawn.update(panels))
    summary.write_band_figures(folds, tmp_path)
    index_title = next(title for title, group in summary.FROC_PANELS if group == "index")
    assert list(drawn[index_title]) == ["A (2/3 folds)", "B"]
    assert drawn[index_title]["B"] is None
    fig, ax = plt.subplots()
    line = figures.Curve(x=np.array([0.0, 1.0]), y=np.array([0.0, 1.0]))
    figures._draw_all(ax, {"A": line, "B": None})
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["A", "B (n/a)"]
    plt.close(fig)
