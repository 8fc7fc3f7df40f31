"""Inference as the field does it (evaluation/ensemble.py, detection_map.py, batch_predict.py,
run_predictions.py): fold ensembles, flip TTA, PI-CAI detection maps, batches of exams, test stores.

The models are a two-fold cross-validation of a tiny network trained for two steps on a small
synthetic PI-CAI store (module fixtures); their maps are compared with NumPy references."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from cli_calls import cli_error, run_cli
from scipy import ndimage
from test_train_helpers import small_synthetic_store, tiny_config

from focalnet_jax.cli import main
from focalnet_jax.evaluation.detection_map import CandidateSettings, lesion_candidates
from focalnet_jax.evaluation.ensemble import (
    LEFT_RIGHT_AXIS,
    EnsembleError,
    load_ensemble,
    resolve_folder,
)
from focalnet_jax.evaluation.inference import Predictor
from focalnet_jax.run.checkpoint_digests import variables_digest
from focalnet_jax.run.workdir import load_for_inference

CASES = 5


@pytest.fixture(scope="module", autouse=True)
def quick_compiles():
    """Every model of this module compiles with most XLA optimisations off (tiny models)."""
    yield


@pytest.fixture(scope="module")
def cv(tmp_path_factory):
    """{'data', 'store', 'cv'}: a small synthetic PI-CAI folder, its store, and `cv/fold0`,
    `cv/fold1` runs (2 steps each) of a two-fold cross-validation on it."""
    from focalnet_jax.training import train_and_evaluate

    root = tmp_path_factory.mktemp("inference")
    store = small_synthetic_store(root, cases=CASES, seed=4)
    overrides = ["--config.train.steps=2", "--config.loss.mfl=False", "--config.data.slices=all",
                 "--config.data.num_folds=2", f"--config.data.store={store}"]  # fmt: skip
    with contextlib.redirect_stderr(io.StringIO()):
        for fold in (0, 1):
            config = tiny_config(overrides=[*overrides, f"--config.data.fold={fold}"])
            train_and_evaluate(config, root / "cv" / f"fold{fold}")
    return {"data": root / "data", "store": store, "cv": root / "cv"}


def exam(data: Path, index: int = 0) -> dict[str, Path]:
    """The files of the index-th synthetic case (sorted ids): components and gland mask."""
    t2w = sorted((data / "images").glob("*/*_t2w.mha"))[index]
    case = t2w.name[: -len("_t2w.mha")]
    return {
        "case": case,
        "t2w": t2w,
        "adc": t2w.with_name(f"{case}_adc.mha"),
        "mask": data / "masks" / f"{case}.nii.gz",
    }


def store_images(store_path: Path, rows: int = 6) -> np.ndarray:
    from focalnet_jax.data.store import open_store

    return np.asarray(open_store(store_path).images[:rows])


def predict_one(checkpoints, files, out, *extra) -> Path:
    argv = ["predict", "--t2w", files["t2w"], "--adc", files["adc"], "--mask", files["mask"]]
    for checkpoint in checkpoints:
        argv += ["--checkpoint", checkpoint]
    run_cli([*argv, "--out", out, *extra])
    return out


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# --- ensembles and TTA ----------------------------------------------------------------------------


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


# --- detection maps -------------------------------------------------------------------------------


def gaussian(shape, center, peak, sigma=2.0):
    grid = np.indices(shape, dtype=np.float64)
    d2 = sum((g - c) ** 2 for g, c in zip(grid, center, strict=True))
    return peak * np.exp(-0.5 * d2 / sigma**2)


def test_candidate_flags_default_to_the_library_defaults():
    import inspect

    from report_guided_annotation import extract_lesion_candidates

    from focalnet_jax.cli import build_parser

    library = inspect.signature(extract_lesion_candidates).parameters
    args = build_parser().parse_args(["predict", "--checkpoint", "r", "--out", "o"])
    assert CandidateSettings.from_flags(args) == CandidateSettings(
        threshold=library["threshold"].default,
        min_voxels=library["min_voxels_detection"].default,
        num_lesions=library["num_lesions_to_extract"].default,
        dynamic_threshold_factor=library["dynamic_threshold_factor"].default,
    )


def test_lesion_candidates_fill_each_blob_with_its_peak_and_picai_eval_reads_them():
    import picai_eval

    shape = (8, 40, 40)
    scores = np.maximum.reduce([gaussian(shape, (3, 10, 10), 0.9),
                                gaussian(shape, (4, 28, 28), 0.5),
                                gaussian(shape, (4, 10, 30), 0.3)])  # fmt: skip
    det = lesion_candidates(scores)
    # dynamic-fast: threshold 0.9 / 2.5 = 0.36, so the 0.3 blob is not a candidate.
    np.testing.assert_allclose(sorted(np.unique(det)), [0.0, 0.5, 0.9], atol=1e-6)
    np.testing.assert_array_equal(det > 0, scores >= 0.36)
    label = (det == det.max()).astype(np.int32)
    metrics = picai_eval.evaluate(y_det=[det], y_true=[label], num_parallel_calls=1)
    results = np.asarray(sorted(metrics.lesion_results[0]), np.float64)
    np.testing.assert_allclose(results, [(0, 0.5, 0.0), (1, 0.9, 1.0)], atol=1e-6)
    fixed = lesion_candidates(scores, CandidateSettings(threshold="0.2"))
    np.testing.assert_allclose(sorted(np.unique(fixed)), [0.0, 0.3, 0.5, 0.9], atol=1e-6)
    with pytest.raises(ValueError, match="candidate threshold 'half'"):
        CandidateSettings(threshold="half")


def test_detection_map_on_the_t2w_grid_with_one_value_per_blob(cv, tmp_path):
    import picai_eval

    files = exam(cv["data"])
    out = predict_one([cv["cv"]], files, tmp_path / "exam")
    t2w = sitk.ReadImage(str(files["t2w"]))
    det_image = sitk.ReadImage(str(out / "detection_map.nii.gz"))
    assert det_image.GetSize() == t2w.GetSize()
    np.testing.assert_allclose(det_image.GetSpacing(), t2w.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(det_image.GetOrigin(), t2w.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(det_image.GetDirection(), t2w.GetDirection(), atol=1e-6)
    det = sitk.GetArrayFromImage(det_image)
    cspca = read(out / "cspca_score.nii.gz")
    blobs, count = ndimage.label(det > 0, structure=np.ones((3, 3, 3)))
    assert count >= 1
    for i in range(1, count + 1):
        values = np.unique(det[blobs == i])
        assert len(values) == 1  # one value per blob: its peak csPCa score
        assert values[0] == pytest.approx(cspca[blobs == i].max(), abs=1e-6)
    label = (read(cv["data"] / "labels" / f"{files['case']}.nii.gz") >= 2).astype(np.int32)
    metrics = picai_eval.evaluate(y_det=[det], y_true=[label], num_parallel_calls=1)
    assert metrics.num_cases == 1
    assert len(metrics.lesion_results[0]) >= count  # every candidate is a TP or a FP


# --- batches --------------------------------------------------------------------------------------


def test_batch_predicts_every_good_case_and_lists_the_corrupt_one(cv, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(cv["data"] / "images", images)
    bad = exam(cv["data"], 1)
    corrupt = images / bad["adc"].parent.name / bad["adc"].name
    corrupt.write_bytes(corrupt.read_bytes()[:300])  # header without its pixels
    argv = ["predict", "--checkpoint", cv["cv"], "--layout", "picai", "--images", images,
            "--masks", cv["data"] / "masks", "--out", tmp_path / "out"]  # fmt: skip
    message = cli_error(argv)
    assert bad["case"] in message and str(corrupt) in message
    assert not (tmp_path / "out").exists()  # no models.json without its cases
    assert (tmp_path / "out.partial" / "models.json").is_file()  # kept for --resume
    printed = run_cli([*argv, "--skip-bad-cases", "--resume"])
    assert f"wrote {CASES - 1} cases" in printed
    names = ("lesion_score", "cspca_score", "detection_map")
    expected = {exam(cv["data"], i)["case"] for i in range(CASES)} - {bad["case"]}
    written = {p.name for p in (tmp_path / "out").iterdir() if p.is_dir()}
    assert written == expected  # no temporary folder left
    for case in expected:
        folder = tmp_path / "out" / case
        assert {f"{n}.nii.gz" for n in names} | {"detections.csv", "overlay.png"} == {
            p.name for p in folder.iterdir()
        }
    with (tmp_path / "out" / "errors.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["file"]) for r in rows] == [(bad["case"], str(corrupt))]
    # Slices pooled across cases give each case the maps of a prediction of it alone.
    first = exam(cv["data"], 0)
    alone = predict_one([cv["cv"]], first, tmp_path / "alone")
    for name in names:
        np.testing.assert_allclose(
            read(tmp_path / "out" / first["case"] / f"{name}.nii.gz"),
            read(alone / f"{name}.nii.gz"),
            atol=1e-6,
        )


def test_batch_from_a_manifest_without_labels(cv, tmp_path):
    manifest = tmp_path / "cases.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id", "patient_id", "t2w", "adc", "prostate_mask"])
        for i in (0, 2):
            files = exam(cv["data"], i)
            writer.writerow([files["case"], f"p{i}", files["t2w"], files["adc"], files["mask"]])
    out = tmp_path / "out"
    (out / "old-case").mkdir(parents=True)  # a case of an earlier run
    (out / "models.json").write_text("{}")  # ... which wrote models.json
    argv = ["predict", "--checkpoint", cv["cv"], "--layout", "manifest", "--manifest", manifest,
            "--tta", "flip", "--out", out]  # fmt: skip
    message = cli_error(argv)
    assert message.endswith(f"--out {out} is not empty (outputs of an earlier run?); choose a "
                            "new folder or add --overwrite to replace it")  # fmt: skip
    run_cli([*argv, "--overwrite"])
    cases = {exam(cv["data"], i)["case"] for i in (0, 2)}
    assert {p.name for p in out.iterdir()} == cases | {"models.json", "crop_centres.json",
                                                       "inputs.json"}  # fmt: skip
    centres = json.loads((out / "crop_centres.json").read_text())  # old-case is gone
    assert centres == {
        exam(cv["data"], i)["case"]: f"prostate mask {Path(exam(cv['data'], i)['mask']).resolve()}"
        for i in (0, 2)
    }
    for case in cases:
        assert (out / case / "detection_map.nii.gz").is_file()


def test_batch_overwrite_never_deletes_a_folder_predict_did_not_write(cv, tmp_path):
    # `--out DATA --overwrite` replaced DATA whole: the exams it was reading were deleted.
    data = tmp_path / "data"
    shutil.copytree(cv["data"], data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    argv = ["predict", "--checkpoint", cv["cv"], "--layout", "picai", "--images", data / "images",
            "--out", data, "--overwrite"]  # fmt: skip
    message = cli_error(argv)
    assert message.endswith(f"--out {data} holds the input {data / 'images'}: it is not the output "
                            "folder of an earlier focalnet predict, and --overwrite would delete "
                            "it "
                            "whole; choose a new folder")  # fmt: skip
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    message = cli_error([*argv[:-2], other, "--overwrite"])
    assert message.endswith(f"--out {other} has no models.json: it is not the output folder of an "
                            "earlier focalnet predict, and --overwrite would delete it whole; "
                            "choose a new folder")  # fmt: skip
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    assert (other / "notes.txt").read_text() == "mine"


# --- external test sets ---------------------------------------------------------------------------


def held_out_store(root: Path, extra: int = 2) -> Path:
    """A store of `extra` synthetic cases the `cv` models never saw: cases CASES .. CASES + extra
    - 1 of the same synthetic series (case i depends only on the seed and i; ids go on from the
    training ones)."""
    data = root / "held_out_data"
    run_cli(["synth", f"--out={data}", f"--cases={CASES + extra}", "--seed=4", "--small"])
    for t2w in sorted((data / "images").glob("*/*_t2w.mha"))[:CASES]:
        case = t2w.name[: -len("_t2w.mha")]
        for path in [*t2w.parent.glob(f"{case}_*"), data / "labels" / f"{case}.nii.gz",
                     data / "masks" / f"{case}.nii.gz"]:  # fmt: skip
            path.unlink()
    store = root / "held_out_store"
    run_cli(["preprocess", "--layout=picai", f"--images={data / 'images'}", f"--out={store}",
             f"--labels={data / 'labels'}", f"--masks={data / 'masks'}"])  # fmt: skip
    return store


def test_all_cases_evaluation_counts_every_patient_of_the_test_store(
    cv, tmp_path, monkeypatch, capsys
):
    """... and records the store given relative to the working folder by its absolute path (it
    was recorded as typed, naming no store once read from another folder). Its prediction pass
    shows a progress bar (it showed none)."""
    from focalnet_jax.data.store import open_store

    store_path = held_out_store(tmp_path)
    store = open_store(store_path)
    assert len(store.cases) == 2 and not set(store.case_ids) & set(open_store(cv["store"]).case_ids)
    out = tmp_path / "test"
    (out / "predictions").mkdir(parents=True)
    (out / "predictions" / "other.npz").write_bytes(b"a case of an earlier run")
    monkeypatch.chdir(store_path.parent)
    capsys.readouterr()
    flags = ["--all-cases", "--out", str(out), "--picai-bootstraps", "0", "--no-figures"]
    assert main(["evaluate", "--workdir", str(cv["cv"]), "--store", store_path.name, *flags]) == 0
    assert re.search(r"predict: 100%.* 2/2 ", capsys.readouterr().err)
    metrics = json.loads((out / "metrics.json").read_text())
    patients = {r["patient_id"] for r in store.cases}
    assert metrics["num_patients"] == len(patients)
    assert metrics["num_cases"] == len(store.cases) == 2
    assert metrics["picai"]["num_cases"] == 2
    assert sorted(p.stem for p in (out / "predictions").glob("*.npz")) == sorted(store.case_ids)
    folds = [{"run": str(cv["cv"] / f"fold{k}"), "step": 2} for k in (0, 1)]
    weights = [variables_digest(load_for_inference(cv["cv"] / f"fold{k}")[1]) for k in (0, 1)]
    store_read = {"path": str(store_path.resolve()), "slices": "all"}
    assert metrics["models"] == {
        "models": folds,
        "tta": "none",
        "weights": weights,
        "store": store_read,
    }
    assert (out / "report.md").is_file()


def test_test_store_holding_training_cases_is_refused(cv, tmp_path):
    """The fold models trained, between them, on every case of their own store: evaluating the
    ensemble on it would report training-set numbers."""
    from focalnet_jax.data.run_store import recorded_cases

    out = tmp_path / "eval"
    message = cli_error(["evaluate", "--workdir", cv["cv"], "--store", cv["store"], "--all-cases",
                         "--out", out])  # fmt: skip
    trained = sorted(recorded_cases(cv["cv"] / "fold0", "train_cases"))
    assert message.endswith(
        f"test store {cv['store']}: {len(trained)} of its {CASES} cases are training cases of "
        f"run {cv['cv'] / 'fold0'} ({', '.join(trained[:3])}); its metrics would be training-set "
        "numbers: evaluate on held-out cases"
    )
    assert trained[0] in message and not out.exists()
    # Allowed on request (a deliberate training-set evaluation): a warning, no error.
    run_cli(["evaluate", "--workdir", cv["cv"], "--store", cv["store"], "--all-cases",
             "--allow-training-cases", "--no-picai", "--no-figures", "--out", out])  # fmt: skip
    assert sorted(json.loads((out / "metrics.json").read_text())["models"]["models"][0]) == [
        "run", "step"
    ]  # fmt: skip


def test_test_store_with_other_settings_is_a_one_line_error(cv, tmp_path):
    other = tmp_path / "linear_store"
    run_cli(["preprocess", "--layout", "picai", "--images", cv["data"] / "images",
             "--labels", cv["data"] / "labels", "--masks", cv["data"] / "masks",
             "--interpolator", "linear", "--out", other])  # fmt: skip
    message = cli_error(["evaluate", "--workdir", cv["cv"], "--store", other, "--all-cases",
                         "--out", tmp_path / "eval"])  # fmt: skip
    assert "['interpolator']" in message and "('linear', 'bspline')" in message
    assert str(other) in message


def test_predictions_of_a_store_carry_which_lesion_grades_are_unknown(tmp_path):
    """A store lesion of unknown grade (class 2, PI-CAI label 1) stays marked in the predictions
    file, so that the GS groups leave it out."""
    import jax
    from test_train_helpers import FakeStore, tiny_config

    from focalnet_jax.evaluation.inference import Predictor, predict_cases
    from focalnet_jax.evaluation.predictions import read_case
    from focalnet_jax.run import RunSpec

    store = FakeStore(patients=2, slices=2, size=32)
    store.case("case001")["lesion_grade_known"] = [False]  # patient 1: class 2
    store.slice_index = np.tile(np.arange(2, dtype=np.int32), 2)  # source slice of each row
    spec = RunSpec.from_config(tiny_config(), num_devices=1, image_size=(32, 32))
    images = np.zeros((1, 32, 32, 2), np.float32)
    variables = spec.model.init(jax.random.key(0), images, train=False)
    predictor = Predictor.from_variables(spec, variables, batch_size=2)
    paths = predict_cases(predictor, store, ["case000", "case001"], tmp_path)
    known = [read_case(p).grade_known.tolist() for p in paths]
    assert known == [[True], [False]]


# --- execution: batches and transfers -------------------------------------------------------------


def _tiny_predictor(batch_size: int, seed: int = 0):
    import jax
    from test_train_helpers import tiny_config

    from focalnet_jax.run import RunSpec

    spec = RunSpec.from_config(tiny_config(), num_devices=1, image_size=(32, 32))
    variables = spec.model.init(jax.random.key(seed), np.zeros((1, 32, 32, 2), np.float32))
    return Predictor.from_variables(spec, variables, batch_size=batch_size)


@pytest.mark.parametrize("batch_size", [0, -3, 2.0, True])
def test_a_batch_size_below_one_or_not_an_integer_is_refused(batch_size):
    # -3 was rounded to -2 (a multiple of 2 devices) and every batch loop ran no step: all-zero
    # scores, no detection, no error; 0 failed at the first call.
    with pytest.raises(
        ValueError, match=f"batch_size: expected an integer >= 1, got {batch_size!r}"
    ):
        _tiny_predictor(batch_size=batch_size)


def test_cases_of_a_store_share_whole_inference_batches(tmp_path):
    """5 cases of 3 slices at batch 4: 4 model calls (15 slices), not one padded call per case,
    and each case's scores are those of the case predicted alone."""
    import dataclasses

    from test_train_helpers import FakeStore

    from focalnet_jax.evaluation.inference import predict_cases
    from focalnet_jax.evaluation.predictions import read_case

    store = FakeStore(patients=5, slices=3, size=32)
    store.slice_index = np.tile(np.arange(3, dtype=np.int32), 5)
    predictor = _tiny_predictor(batch_size=4)
    calls = []
    counted = dataclasses.replace(
        predictor, apply=lambda v, x: calls.append(len(x)) or predictor.apply(v, x)
    )
    paths = predict_cases(counted, store, store.case_ids, tmp_path)
    assert calls == [4, 4, 4, 4]
    for case_id, path in zip(store.case_ids, paths, strict=True):
        alone = predictor(store.images[store.case_slices(case_id)])
        np.testing.assert_allclose(read_case(path).scores, alone, atol=1e-6, err_msg=case_id)


def test_pooled_predictions_pad_only_the_last_batch_and_keep_the_case_order():
    """Cases of 3, 5, 2, 7, 1 and 0 slices at batch 4: ceil(18 / 4) = 5 batches (flushing the
    pooled cases whenever they fill a batch would take 6); every case gets its own scores."""
    import dataclasses

    from focalnet_jax.evaluation.inference import pooled_predictions

    rng = np.random.default_rng(0)
    cases = [(f"c{i}", rng.uniform(0, 1, (n, 32, 32, 2)).astype(np.float32))
             for i, n in enumerate((3, 5, 2, 7, 1, 0))]  # fmt: skip
    predictor = _tiny_predictor(batch_size=4)
    calls = []
    counted = dataclasses.replace(
        predictor, apply=lambda v, x: calls.append(len(x)) or predictor.apply(v, x)
    )
    out = list(pooled_predictions(counted, iter(cases), 4))
    assert len(calls) == 5
    assert [key for key, _ in out] == [key for key, _ in cases]
    for (key, images), (_, scores) in zip(cases, out, strict=True):
        assert scores.shape == (*images.shape[:3], 5)
        np.testing.assert_allclose(scores, predictor(images), atol=1e-6, err_msg=key)


def test_predictor_dispatches_the_next_batch_before_reading_one_back():
    """10 slices at batch 4: batch i + 1 is handed to the device before batch i's scores are
    read back, so the host's copy of one batch overlaps the device's work on the next."""
    import dataclasses

    predictor = _tiny_predictor(batch_size=4)
    events = []

    class Scores:
        def __init__(self, value, index):
            self.value, self.index = value, index

        def __array__(self, dtype=None, copy=None):
            events.append(f"read {self.index}")
            return np.asarray(self.value)

    def apply(variables, images):
        index = sum(event.startswith("dispatch") for event in events)
        events.append(f"dispatch {index}")
        return Scores(predictor.apply(variables, images), index)

    images = np.random.default_rng(0).uniform(0, 1, (10, 32, 32, 2)).astype(np.float32)
    scores = dataclasses.replace(predictor, apply=apply)(images)
    assert events == ["dispatch 0", "dispatch 1", "read 0", "dispatch 2", "read 1", "read 2"]
    np.testing.assert_allclose(scores, predictor(images), atol=0)


class _LoggedScores:
    """Scores whose read-back is logged in `events`."""

    def __init__(self, value, tag: str, events: list):
        self.value, self.tag, self.events = value, tag, events

    def __array__(self, dtype=None, copy=None):
        self.events.append(f"read {self.tag}")
        return np.asarray(self.value)


def _logged(predictor, model: int, events: list):
    """`predictor` whose dispatches (`dispatch <model>.<batch>`) and reads are logged."""
    import dataclasses
    import itertools

    counter = itertools.count()

    def apply(variables, images):
        tag = f"{model}.{next(counter)}"
        events.append(f"dispatch {tag}")
        return _LoggedScores(predictor.apply(variables, images), tag, events)

    return dataclasses.replace(predictor, apply=apply)


def test_ensemble_dispatches_the_next_model_before_reading_the_last_one_back():
    """Two models, 6 slices with flip TTA (12 a model, 3 batches of 4): model 1's first batch is
    dispatched before model 0's last scores are read back (one batch waits at a time, across
    models), and the scores are the mean over models of each one's plain and re-flipped
    prediction, the models called one by one."""
    from focalnet_jax.evaluation.ensemble import LEFT_RIGHT_AXIS, make_ensemble

    plain = [_tiny_predictor(batch_size=4, seed=seed) for seed in (0, 1)]
    events: list[str] = []
    logged = [_logged(p, model, events) for model, p in enumerate(plain)]
    ensemble = make_ensemble(logged, [Path("a"), Path("b")], [None, None], "flip")
    ensemble.predictors = logged  # make_ensemble shares one model's apply: keep both logs
    images = np.random.default_rng(0).uniform(0, 1.2, (6, 32, 32, 2)).astype(np.float32)
    scores = ensemble(images)
    assert events == [
        "dispatch 0.0", "dispatch 0.1", "read 0.0", "dispatch 0.2", "read 0.1",
        "dispatch 1.0", "read 0.2", "dispatch 1.1", "read 1.0", "dispatch 1.2", "read 1.1",
        "read 1.2",
    ]  # fmt: skip
    flipped = np.flip(images, LEFT_RIGHT_AXIS)
    each = [0.5 * (p(images) + np.flip(p(flipped), LEFT_RIGHT_AXIS)) for p in plain]
    np.testing.assert_allclose(scores, np.mean(each, axis=0), atol=1e-6)
    assert np.abs(each[0] - each[1]).max() > 1e-3  # two different models


@pytest.mark.usefixtures("without_compilation_cache")
def test_one_compilation_serves_exams_of_any_length_and_the_flip_ensemble():
    """Padded batches: a model compiles once for exams of 3, 7, 9 and 1 slices, and a flip-TTA
    ensemble of two such models (one shared function) compiles nothing more."""
    import collections

    import jax

    from focalnet_jax.evaluation.ensemble import make_ensemble

    compiles = collections.Counter()

    def count(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles[kwargs["fun_name"]] += 1

    predictor = _tiny_predictor(batch_size=4)
    other = _tiny_predictor(batch_size=4)
    ensemble = make_ensemble([predictor, other], [Path("a"), Path("b")], [None, None], "flip")
    rng = np.random.default_rng(0)
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        for n in (3, 7, 9, 1):
            images = rng.uniform(0, 1, (n, 32, 32, 2)).astype(np.float32)
            assert predictor(images).shape == (n, 32, 32, 5)
            assert ensemble(images).shape == (n, 32, 32, 5)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert dict(compiles) == {"jit(apply)": 1}


# --- persistent compilation cache -----------------------------------------------------------------


@pytest.mark.usefixtures("without_compilation_cache")
def test_predict_and_evaluate_keep_their_compiled_inference_in_the_cache_given(cv, tmp_path):
    """`--compilation_cache DIR`, as in training: the inference function compiled by `predict`
    and by `evaluate --workdir` is written to DIR (every compilation kept here, however fast),
    and JAX's own setting is back after the command."""
    import jax

    files = exam(cv["data"])
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        cache = ["--compilation_cache", tmp_path / "predict_cache"]
        predict_one([cv["cv"] / "fold0"], files, tmp_path / "pred", *cache)
        evaluate = ["evaluate", "--workdir", cv["cv"] / "fold1", "--out", tmp_path / "eval"]
        cache = ["--compilation_cache", tmp_path / "eval_cache"]
        run_cli([*evaluate, "--no-picai", "--no-figures", *cache])
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)
    for folder in ("predict_cache", "eval_cache"):
        cached = [p.name for p in (tmp_path / folder).iterdir()]
        assert len([n for n in cached if n.startswith("jit_apply-")]) == 1, (folder, cached)
    assert jax.config.jax_compilation_cache_dir is None


def test_variables_digest_reads_values_not_containers():
    """One digest for one set of weights, as NumPy or JAX arrays; another where one value, a
    dtype or a name differs."""
    import jax
    import jax.numpy as jnp

    tree = {"params": {"conv": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}}
    digest = variables_digest(tree)
    on_device = jax.tree.map(jnp.asarray, tree)
    assert variables_digest(on_device) == digest
    changed = tree["params"]["conv"]["kernel"].copy()
    changed[1, 2] = 5.5
    assert variables_digest({"params": {"conv": {"kernel": changed}}}) != digest
    as_f64 = tree["params"]["conv"]["kernel"].astype(np.float64)
    assert variables_digest({"params": {"conv": {"kernel": as_f64}}}) != digest
    assert variables_digest({"params": {"conv2": tree["params"]["conv"]}}) != digest
