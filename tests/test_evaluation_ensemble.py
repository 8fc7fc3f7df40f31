"""Fold ensembles and flip TTA as the field does them (evaluation/ensemble.py): the mean of the fold
models, of the plain and re-flipped prediction, and the runs a folder's ensemble leaves out or
refuses (unfinished, never trained, copies, another config or fold, other components).

The models are a two-fold cross-validation of a tiny network trained for two steps on a small
synthetic PI-CAI store (module fixtures); their maps are compared with NumPy references."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import inference_models
import numpy as np
import pytest
from cli_calls import cli_error, run_cli
from inference_models import exam, predict_one, read
from test_train_helpers import tiny_config

from focalnet_jax.evaluation.ensemble import (
    LEFT_RIGHT_AXIS,
    EnsembleError,
    load_ensemble,
    resolve_folder,
)
from focalnet_jax.evaluation.inference import Predictor
from focalnet_jax.run.checkpoint_digests import variables_digest
from focalnet_jax.run.workdir import load_for_inference

cv = inference_models.cv  # a module-scoped fixture


def store_images(store_path: Path, rows: int = 6) -> np.ndarray:
    from focalnet_jax.data.store import open_store

    return np.asarray(open_store(store_path).images[:rows])


def test_cv_folder_ensemble_is_the_mean_of_its_fold_models(cv):
    images = store_images(cv["store"])
    singles = [Predictor.from_workdir(cv["cv"] / f"fold{k}")(images) for k in (0, 1)]
    ensemble = load_ensemble(cv["cv"])
    assert [r.name for r in ensemble.runs] == ["fold0", "fold1"]
    assert not np.allclose(singles[0], singles[1], atol=1e-3)  # two different models
    np.testing.assert_allclose(ensemble(images), (singles[0] + singles[1]) / 2, atol=1e-5)


def test_predict_maps_of_the_ensemble_are_the_mean_of_the_single_models(cv, tmp_path):
    files = exam(cv["data"])
    folds = [cv["cv"] / "fold0", cv["cv"] / "fold1"]
    single = [predict_one([f], files, tmp_path / f.name) for f in folds]
    for checkpoints, name in (([cv["cv"]], "cv"), (folds, "repeated")):
        out = predict_one(checkpoints, files, tmp_path / name)
        for score in ("lesion_score.nii.gz", "cspca_score.nii.gz"):
            mean = (read(single[0] / score) + read(single[1] / score)) / 2
            np.testing.assert_allclose(read(out / score), mean, atol=1e-5)
    # models.json names the runs, steps and weights that made each output folder (the digest of
    # each checkpoint's variables, as loaded again here); no temporary is left.
    expected = [{"run": str(f), "step": 2} for f in folds]
    weights = [variables_digest(load_for_inference(f)[1]) for f in folds]
    assert len(set(weights)) == 2 and all(len(w) == 16 for w in weights)
    candidates = {"threshold": "dynamic-fast", "num_lesions": 5, "min_voxels": 10,
                  "dynamic_threshold_factor": 2.5}  # fmt: skip
    # The preprocessing the inputs were made with: the run's record but how labels read.
    preprocess = json.loads((folds[0] / "store.json").read_text())["settings"]["preprocess"]
    assert preprocess.pop("label_values") == "isup"
    # Each run's inference config: the same weights under an edited config give other scores.
    configs = {}
    for fold in folds:
        config = json.loads((fold / "config.json").read_text())
        config["model"].pop("pretrained", None)
        configs[str(fold)] = {"model": config["model"], "output_encoding": "ordinal",
                              "components": config["data"]["components"]}  # fmt: skip
    assert json.loads((tmp_path / "cv" / "models.json").read_text()) == {
        "models": expected,
        "tta": "none",
        "weights": weights,
        "threshold": 0.5,
        "candidates": candidates,
        "preprocess": preprocess,
        "configs": configs,
    }
    recorded = json.loads((tmp_path / "fold1" / "models.json").read_text())
    assert recorded["models"] == expected[1:] and recorded["weights"] == weights[1:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cv", "fold0", "fold1", "repeated"]


def test_flip_tta_is_the_mean_of_plain_and_reflipped_flipped_prediction(cv):
    images = store_images(cv["store"])
    plain = Predictor.from_workdir(cv["cv"] / "fold0")
    flipped = np.flip(plain(np.flip(images, axis=2)), axis=2)
    expected = (plain(images) + flipped) / 2
    tta = load_ensemble(cv["cv"] / "fold0", tta="flip")
    np.testing.assert_allclose(tta(images), expected, atol=1e-5)
    assert not np.allclose(expected, plain(images), atol=1e-4)  # the flip changes the output


def test_flip_tta_names_a_model_trained_without_the_flip(cv, tmp_path, caplog):
    """`--tta flip` gave a model trained with `augment.flip=False` mirrored slices it never saw,
    without a word; the docs said the flip was the one the models were trained with."""
    run = tmp_path / "noflip"
    shutil.copytree(cv["cv"] / "fold1", run)  # not fold0's weights: no copy beside it
    config = json.loads((run / "config.json").read_text())
    config["augment"]["flip"] = False
    (run / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="focalnet_jax.evaluation.ensemble"):
        load_ensemble([cv["cv"] / "fold0", run], tta="flip")
    assert [r.getMessage() for r in caplog.records] == [
        f"{run} was trained without the left-right flip (augment.flip=False): --tta flip averages "
        "in its predictions of mirrored slices it never saw"
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="focalnet_jax.evaluation.ensemble"):
        load_ensemble(run, tta="none")
    assert not caplog.records


def test_flipped_axis_is_left_right_in_lps(cv):
    """Crop columns (axis 2 of [N, H, W, C]) run along LPS +x (patient right -> left)."""
    from focalnet_jax.data.store import open_store

    store = open_store(cv["store"])
    geometry = store.geometry(store.case_ids[0])
    a = np.asarray(geometry.pixel_to_world(0, 10, 10))
    b = np.asarray(geometry.pixel_to_world(0, 10, 11))
    step = (b - a) / np.linalg.norm(b - a)
    assert LEFT_RIGHT_AXIS == 2
    np.testing.assert_allclose(np.abs(step), [1.0, 0.0, 0.0], atol=1e-6)


@pytest.mark.real_data
def test_real_exam_columns_run_left_right(prostatex_case_dir):
    """The ProstateX T2w (oblique axial) has its x axis, the crop's columns, along LPS +x."""
    from focalnet_jax.data.io import read_image

    direction = np.asarray(read_image(prostatex_case_dir / "t2w").GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction[:, 0], [1.0, 0.0, 0.0], atol=0.01)


def test_cv_folder_without_finished_fold_is_a_one_line_error(cv, tmp_path):
    empty = tmp_path / "cv_unfinished"
    shutil.copytree(cv["cv"] / "fold0", empty / "fold0", ignore=shutil.ignore_patterns("*"))
    shutil.copy(cv["cv"] / "fold0" / "config.json", empty / "fold0" / "config.json")
    shutil.copytree(cv["cv"] / "fold1", empty / "fold1")
    config = json.loads((empty / "fold1" / "config.json").read_text())
    config["train"]["steps"] = 10
    (empty / "fold1" / "config.json").write_text(json.dumps(config))
    with pytest.raises(EnsembleError, match="fold0: no checkpoint; fold1: latest checkpoint at"):
        resolve_folder(empty)
    message = cli_error(["predict", "--checkpoint", empty, "--t2w", "x", "--adc", "y",
                         "--out", tmp_path / "out"])  # fmt: skip
    assert "no fold with a finished checkpoint" in message and str(empty) in message


def test_folds_never_trained_are_named_in_a_warning_and_models_json(cv, tmp_path, caplog):
    """`cv --folds 0,1` of data.num_folds=3: the folder's ensemble is 2 of 3 folds, said in one
    line (a subset may be trained on purpose, so not an error) and recorded in models.json."""
    partial = tmp_path / "cv3"
    for k in (0, 1):
        shutil.copytree(cv["cv"] / f"fold{k}", partial / f"fold{k}")
        config = json.loads((partial / f"fold{k}" / "config.json").read_text())
        config["data"]["num_folds"] = 3
        (partial / f"fold{k}" / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="focalnet_jax"):
        assert resolve_folder(partial)[0] == [partial / "fold0", partial / "fold1"]
    assert f"{partial}: ensemble of 2 of 3 folds; fold2 was never trained" in caplog.messages
    out = predict_one([partial], exam(cv["data"]), tmp_path / "out")
    models = json.loads((out / "models.json").read_text())
    assert [m["run"] for m in models["models"]] == [str(partial / f"fold{k}") for k in (0, 1)]
    assert models["left_out"] == [{"run": str(partial / "fold2"), "reason": "never trained"}]


def test_a_copy_of_a_fold_is_left_out_of_the_folders_ensemble(cv, tmp_path, caplog):
    """`fold0.bak`, a copy of fold0 beside the folds, joined the ensemble as a third model without
    a word: fold 0 counted twice in the mean. Only `fold<k>` runs are the folder's folds (`k`
    written as `focalnet cv` writes it: `fold01`, a copy of fold1, passed as fold 1)."""
    folder = tmp_path / "cv_copy"
    copies = (("fold0", "fold0"), ("fold1", "fold1"), ("fold0.bak", "fold0"), ("fold01", "fold1"))
    for name, source in copies:
        shutil.copytree(cv["cv"] / source, folder / name)
    with caplog.at_level("WARNING", logger="focalnet_jax"):
        runs, left_out = resolve_folder(folder)
    assert runs == [folder / "fold0", folder / "fold1"]
    reason = "not a fold<k> run of focalnet cv (a copy of a fold would count it twice)"
    # `fold01` (data.fold 1) passed as fold 1: the mean was (fold0 + 2 x fold1) / 3
    strays = ["fold0.bak", "fold01"]
    assert left_out == [{"run": str(folder / name), "reason": reason} for name in strays]
    for name in strays:
        assert f"{folder}: {name} left out of the ensemble ({reason})" in caplog.messages


def test_a_copy_of_a_run_named_beside_it_is_refused(cv, tmp_path):
    """A copy of fold1 named beside the folder it was copied from was a third model, fold 1
    counted twice (its weights digest twice in models.json); now refused naming both."""
    copy = shutil.copytree(cv["cv"] / "fold1", tmp_path / "elsewhere" / "run")
    with pytest.raises(EnsembleError) as refused:
        load_ensemble([cv["cv"], copy])
    assert str(refused.value) == (
        f"{cv['cv'] / 'fold1'} and {copy} hold the same weights (one a copy of the other?): the "
        "ensemble would count that model twice; name one of them"
    )


def test_a_fold_trained_with_another_config_is_refused(cv, tmp_path):
    """`focalnet train --workdir cv/fold1 --config.data.fold=1` with another config: the
    folder's "ensemble of the folds" averaged two experiments without a word."""
    folder = shutil.copytree(cv["cv"], tmp_path / "cv_mixed")
    config = json.loads((folder / "fold1" / "config.json").read_text())
    config["loss"]["gamma"], config["seed"] = 1.0, 7
    config["train"]["log_every"] = 3  # a key a resumed run may change: no difference
    (folder / "fold1" / "config.json").write_text(json.dumps(config))
    with pytest.raises(EnsembleError) as refused:
        resolve_folder(folder)
    assert str(refused.value) == (
        f"{folder}: fold1 was trained with another config than fold0 (loss.gamma 2.0 -> 1.0; "
        "seed 0 -> 7); the ensemble of a cross-validation folder's folds stands for one config: "
        "train the fold again with the folds' config, or move it out"
    )


def test_one_fold_evaluated_by_two_names_is_one_run_to_summarize(cv, tmp_path, monkeypatch):
    """`evaluate --workdir runs/cv/fold1`, then the same run by its absolute path with
    `--tta flip` into the fold's folder: metrics.json records the run absolute, so summarize
    refuses the second evaluation of the fold rather than counting three folds of two."""
    runs = tmp_path / "runs" / "cv"
    for k in (0, 1):
        shutil.copytree(cv["cv"] / f"fold{k}", runs / f"fold{k}")
    monkeypatch.chdir(tmp_path)
    flags = ["--no-picai", "--no-figures"]
    for k in (0, 1):
        run_cli(["evaluate", "--workdir", f"runs/cv/fold{k}", *flags])
    run_cli(["evaluate", "--workdir", runs / "fold1", "--tta", "flip",
             "--out", "runs/cv/fold1/eval_tta", *flags])  # fmt: skip
    for name in ("eval", "eval_tta"):
        models = json.loads((runs / "fold1" / name / "metrics.json").read_text())["models"]
        assert models["models"] == [{"run": str(runs / "fold1"), "step": 2}]
    message = cli_error(["summarize", "--runs", "A=runs/cv", "--out", tmp_path / "summary"])
    first, second = (f"runs/cv/fold1/{name}/metrics.json" for name in ("eval", "eval_tta"))
    assert message.endswith(
        f"{first} and {second} both evaluate run {runs / 'fold1'}: one fold would count twice; "
        "keep one of them under runs/cv"
    )
    assert "\n" not in message and not (tmp_path / "summary").exists()


def test_one_run_by_two_paths_is_named_twice(cv, monkeypatch):
    monkeypatch.chdir(cv["cv"])
    with pytest.raises(EnsembleError, match="a run is named twice"):
        load_ensemble([cv["cv"] / "fold0", "fold0"])


def test_a_fold_run_of_another_fold_is_refused_not_counted_twice(cv, tmp_path):
    """`cv/fold1` trained without `--fold 1` (data.fold 0): the ensemble of "two folds" was fold
    0's model twice (one weights digest twice in models.json), without a word."""
    for fold in ("fold0", "fold1"):
        shutil.copytree(cv["cv"] / "fold0", tmp_path / "cv" / fold)
    with pytest.raises(EnsembleError) as refused:
        resolve_folder(tmp_path / "cv")
    config = tmp_path / "cv" / "fold1" / "config.json"
    assert str(refused.value) == (
        f"{tmp_path / 'cv'}: fold1 trained data.fold=0 ({config}); in the ensemble it would stand "
        "for fold1, counting another fold's model: retrain it with --fold 1, or move it out"
    )


def test_a_fold_run_with_a_damaged_config_is_named_as_damaged(cv, tmp_path):
    from focalnet_jax.errors import UserError

    shutil.copytree(cv["cv"], tmp_path / "cv")
    config = tmp_path / "cv" / "fold1" / "config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(UserError) as refused:
        load_ensemble(tmp_path / "cv")
    assert str(refused.value).startswith(f"{config} is damaged (not JSON: ")


def test_epoch_based_run_killed_early_is_left_out_of_the_ensemble(cv, tmp_path, caplog):
    """An epoch-based run records its total steps (epochs x whole batches of its training
    slices) at start; a run whose checkpoints stop short of it is not finished."""
    from focalnet_jax.data.store import open_store
    from focalnet_jax.evaluation.ensemble import final_step
    from focalnet_jax.training import train_and_evaluate

    overrides = ["--config.train.steps=0", "--config.train.epochs=1",
                 "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=100",
                 "--config.loss.mfl=False", "--config.data.slices=all",
                 "--config.data.num_folds=2", f"--config.data.store={cv['store']}"]  # fmt: skip
    finished = tmp_path / "cv_epochs" / "fold0"
    with contextlib.redirect_stderr(io.StringIO()):
        train_and_evaluate(tiny_config(overrides=overrides), finished)
    record = json.loads((finished / "store.json").read_text())
    store = open_store(cv["store"])
    train_slices = sum(
        store.case(c)["stop"] - store.case(c)["start"] for c in record["train_cases"]
    )
    total = train_slices // 4  # one epoch of whole batches of 4 (TINY)
    assert total >= 2 and record["total_steps"] == total
    assert final_step(finished) == (total, "")
    killed = tmp_path / "cv_epochs" / "fold1"
    shutil.copytree(finished, killed)
    shutil.rmtree(killed / "checkpoints" / str(total))  # killed before the last step was saved
    config = json.loads((killed / "config.json").read_text())
    config["data"]["fold"] = 1  # as fold 1's own run records it
    (killed / "config.json").write_text(json.dumps(config))
    assert final_step(killed) == (None, f"latest checkpoint at step {total - 1} of {total}")
    with caplog.at_level("WARNING", logger="focalnet_jax"):
        assert resolve_folder(tmp_path / "cv_epochs")[0] == [finished]
    left_out = f"fold left out of the ensemble (fold1: latest checkpoint at step {total - 1} of"
    assert f"{left_out} {total})" in caplog.text
    # Named itself, the unfinished run is used at its latest checkpoint, and said to be.
    caplog.clear()
    with caplog.at_level("WARNING", logger="focalnet_jax.evaluation.ensemble"):
        load_ensemble(finished)
        assert "not finished" not in caplog.text
        load_ensemble(killed)
    assert caplog.messages == [
        f"{killed}: not finished (latest checkpoint at step {total - 1} of {total}): its latest "
        "checkpoint is used"
    ]
    # The folder and its unfinished fold named both: the fold is used, so neither listed nor
    # logged as left out.
    caplog.clear()
    with caplog.at_level("WARNING", logger="focalnet_jax"):
        both = load_ensemble([tmp_path / "cv_epochs", killed])
    assert [m["run"] for m in both.describe()["models"]] == [str(finished), str(killed)]
    assert both.left_out == []
    assert "left out" not in caplog.text
    # A run from before total steps were recorded cannot be told finished.
    record.pop("total_steps")
    (killed / "store.json").write_text(json.dumps(record))
    assert final_step(killed)[1].startswith("counts epochs but records no total steps")


def test_evaluate_workdir_refuses_a_cv_folder_with_one_finished_fold(cv, tmp_path):
    folder = tmp_path / "cv_one"
    shutil.copytree(cv["cv"] / "fold0", folder / "fold0")
    message = cli_error(["evaluate", "--workdir", folder, "--out", tmp_path / "eval"])
    assert message == (
        f"focalnet evaluate: error: {folder}: not a training run (no config.json); a "
        "cross-validation folder's ensemble has seen every fold in training: evaluate it on a "
        "test store (--store TEST --all-cases) or evaluate each fold run"
    )
    assert not (tmp_path / "eval").exists()


def test_models_that_disagree_on_the_set_of_components_are_a_one_line_error(cv, tmp_path):
    """Another set (t2w, hbv for t2w, adc) is refused; another order of one set is not
    (tests/test_predict_components.py)."""
    other = tmp_path / "other_set"
    shutil.copytree(cv["cv"] / "fold1", other)
    config = json.loads((other / "config.json").read_text())
    config["data"]["components"] = ["t2w", "hbv"]
    (other / "config.json").write_text(json.dumps(config))
    files = exam(cv["data"])
    message = cli_error(["predict", "--checkpoint", cv["cv"] / "fold0", "--checkpoint", other,
                         "--t2w", files["t2w"], "--adc", files["adc"],
                         "--out", tmp_path / "o"])  # fmt: skip
    assert message == (
        "focalnet predict: error: models disagree on the set of components: "
        f"{cv['cv'] / 'fold0'}: ['t2w', 'adc']; {other}: ['t2w', 'hbv']"
    )
