"""Inference outputs as the field makes them (evaluation/detection_map.py, batch_predict.py,
run_predictions.py): PI-CAI detection maps, batches of exams, test stores, the compilation cache
of `predict` and `evaluate`, and the weights digest models.json records.

The models are a two-fold cross-validation of a tiny network trained for two steps on a small
synthetic PI-CAI store (module fixtures); their maps are compared with NumPy references."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import inference_models
import numpy as np
import pytest
import SimpleITK as sitk
from cli_calls import cli_error, run_cli
from inference_models import CASES, exam, predict_one, read
from scipy import ndimage

from focalnet_jax.cli import main
from focalnet_jax.evaluation.detection_map import CandidateSettings, lesion_candidates
from focalnet_jax.run.checkpoint_digests import variables_digest
from focalnet_jax.run.workdir import load_for_inference

cv = inference_models.cv  # a module-scoped fixture


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
