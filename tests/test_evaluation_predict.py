"""`focalnet predict` on the real ProstateX exam and `focalnet evaluate --workdir`, with a tiny
model trained for two steps on a store made from that exam."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from focalnet_jax.cli import main
from focalnet_jax.evaluation.predictions import write_case

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.real_data


@pytest.fixture(scope="module")
def exam_components(prostatex_case_dir):
    return {"t2w": str(prostatex_case_dir / "t2w"), "adc": str(prostatex_case_dir / "adc")}


@pytest.fixture(scope="module")
def trained_run(exam_components, tmp_path_factory):
    """A workdir with a 2-step checkpoint (ResNet-18 width 0.125) trained on a store holding the
    exam twice, as two patients of two folds (the second copy 0.1 % darker: a store refuses one
    exam's data under two ids)."""
    from focalnet_jax.config_loading import load_config
    from focalnet_jax.data import preprocess_case
    from focalnet_jax.data.store import StoreWriter
    from focalnet_jax.data.store_settings import store_settings
    from focalnet_jax.training import train_and_evaluate

    root = tmp_path_factory.mktemp("run")
    case = preprocess_case(exam_components, case_id="px")
    components = ("t2w", "adc")
    with StoreWriter(root / "store", components, store_settings(None, components)) as writer:
        for i in range(2):
            copy = dataclasses.replace(case, case_id=f"px{i}", images=case.images * (1 - i / 1000))
            writer.add(copy, patient_id=f"patient{i}")
        writer.commit()
    overrides = [
        "--config.model.depth=18",
        "--config.model.width=0.125",
        "--config.model.output_stride=16",
        "--config.train.batch_size=4",
        "--config.train.steps=2",
        "--config.train.checkpoint_every=1000",
        "--config.train.eval_every=0",
        "--config.loss.mfl=False",
        "--config.data.slices=all",
        "--config.data.num_folds=2",
        f"--config.data.store={root / 'store'}",
    ]
    config = load_config(str(REPO / "configs" / "focalnet.py"), overrides)
    with contextlib.redirect_stderr(io.StringIO()):
        train_and_evaluate(config, root / "workdir")
    return root / "workdir"


def test_predict_maps_on_t2w_grid_and_detections_map_back(trained_run, exam_components, tmp_path):
    from focalnet_jax.data import preprocess_case
    from focalnet_jax.data.io import read_image

    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["predict", "--checkpoint", str(trained_run), "--t2w", exam_components["t2w"],
                     "--adc", exam_components["adc"], "--out", str(out),
                     "--threshold", "0"]) == 0  # fmt: skip
    t2w = read_image(exam_components["t2w"])
    for name in ("lesion_score.nii.gz", "cspca_score.nii.gz"):
        image = sitk.ReadImage(str(out / name))
        assert image.GetSize() == t2w.GetSize()
        np.testing.assert_allclose(image.GetSpacing(), t2w.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(image.GetOrigin(), t2w.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(image.GetDirection(), t2w.GetDirection(), atol=1e-5)
        values = sitk.GetArrayFromImage(image)
        assert 0.0 <= values.min() and values.max() <= 1.0 and values.max() > 0.0
    with (out / "detections.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows, "an untrained model still has local maxima above 1e-3"
    case = preprocess_case(exam_components, case_id="px")
    for row in rows[:200]:
        world = tuple(float(row[k]) for k in ("x_lps_mm", "y_lps_mm", "z_lps_mm"))
        voxel = [int(row[k]) for k in ("t2w_i", "t2w_j", "t2w_k")]
        # The world point lies in the listed T2w voxel (written to 1e-4 mm).
        index = np.asarray(t2w.TransformPhysicalPointToContinuousIndex(world))
        assert np.all(np.abs(index - voxel) <= 0.5 + 1e-3), (row, index)
        # ... and maps back to the crop pixel it was found at.
        crop = case.world_to_pixel(*world)
        expected = [float(row[k]) for k in ("crop_slice", "crop_row", "crop_col")]
        np.testing.assert_allclose(crop, expected, atol=1e-3)
        scores = [float(row[k]) for k in ("lesion_score", "p_gs_ge_3+4", "p_gs_ge_9")]
        assert all(0.0 <= s <= 1.0 for s in scores)
    assert (out / "overlay.png").stat().st_size > 0


def test_evaluate_workdir_predicts_the_validation_fold(trained_run):
    out = trained_run / "eval"
    # A file left from an earlier evaluation is not one of the fold's cases: it is removed.
    empty = {"scores": np.zeros((1, 4, 4, 5)), "lesions": np.zeros((1, 4, 4))}
    write_case(out / "predictions", "stale", **empty, lesion_classes=[], spacing=(1, 1),
               patient_id="old")  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["evaluate", "--workdir", str(trained_run), "--picai-bootstraps", "0"]) == 0
    files = sorted((out / "predictions").glob("*.npz"))
    assert len(files) == 1  # one patient per fold; stale.npz is gone
    with np.load(files[0]) as data:
        assert data["scores"].shape == (19, 128, 128, 5)
        assert data["t2w"].shape == (19, 128, 128)
        np.testing.assert_array_equal(data["slice_index"], np.arange(19))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_patients"] == metrics["num_cases"] == 1
    assert metrics["froc"]["all"]["num_lesions"] == 0  # the exam has no label here
    assert metrics["picai"]["num_cases"] == 1


def test_predict_bad_checkpoint_and_missing_component(trained_run, exam_components, tmp_path):
    from focalnet_jax.evaluation.predict import predict_exam

    with pytest.raises(ValueError, match=r"lacks component\(s\) \['adc'\]"):
        predict_exam(trained_run, {"t2w": exam_components["t2w"]}, tmp_path / "x")
    other = tmp_path / "other"
    shutil.copytree(trained_run, other, ignore=shutil.ignore_patterns("eval", "tb"))
    config = json.loads((other / "config.json").read_text())
    config["model"]["depth"] = 34
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=str(other)):
        main(["predict", "--checkpoint", str(other), "--t2w", exam_components["t2w"],
              "--adc", exam_components["adc"], "--out", str(tmp_path / "y")])  # fmt: skip
    with pytest.raises(SystemExit, match="no config.json"):
        main(["predict", "--checkpoint", str(tmp_path), "--t2w", exam_components["t2w"],
              "--adc", exam_components["adc"], "--out", str(tmp_path / "y")])  # fmt: skip


def test_predict_refuses_a_folder_of_two_series_unless_one_is_chosen(
    trained_run, exam_components, tmp_path
):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("t2w", "adc"):
        for file in Path(exam_components[name]).iterdir():
            shutil.copy(file, mixed / f"{name}_{file.name}")
    args = ["predict", "--checkpoint", str(trained_run), "--t2w", exam_components["t2w"],
            "--adc", str(mixed)]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        main([*args, "--out", str(tmp_path / "refused")])
    message = str(info.value)
    assert (
        "\n" not in message and str(mixed) in message and "folder holds 2 DICOM series" in message
    )
    assert (
        "'ep2d_diff_tra_DYNDIST_ADC', 19 files" in message and not (tmp_path / "refused").exists()
    )
    out = tmp_path / "chosen"
    assert main([*args, "--adc-series", "ep2d_diff_tra_DYNDIST_ADC", "--out", str(out)]) == 0
    assert (out / "detections.csv").is_file()


def test_predict_on_a_y_flipped_nifti_equals_predict_on_the_dicom(
    trained_run, exam_components, tmp_path
):
    # The same exam as a dcm2niix-style NIfTI (rows stored anterior to posterior: direction
    # (1, -1, 1)): the model sees the same crop, so the maps are the DICOM maps on the flipped
    # grid, and the detections sit at the same world points. (The crop used to be upside down.)
    from focalnet_jax.data.image_writing import write_image
    from focalnet_jax.data.io import read_image

    flipped = sitk.Flip(read_image(exam_components["t2w"]), [False, True, False])
    write_image(flipped, tmp_path / "t2w.nii.gz")
    outputs = {}
    for name, t2w in (("dicom", exam_components["t2w"]), ("nifti", tmp_path / "t2w.nii.gz")):
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["predict", "--checkpoint", str(trained_run), "--t2w", str(t2w),
                         "--adc", exam_components["adc"], "--out", str(tmp_path / name),
                         "--threshold", "0"]) == 0  # fmt: skip
        outputs[name] = sitk.ReadImage(str(tmp_path / name / "lesion_score.nii.gz"))
    np.testing.assert_allclose(outputs["nifti"].GetDirection(), flipped.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(outputs["nifti"].GetOrigin(), flipped.GetOrigin(), atol=1e-3)
    dicom = sitk.GetArrayFromImage(outputs["dicom"])
    nifti = sitk.GetArrayFromImage(outputs["nifti"])
    assert dicom.max() > 0.0
    np.testing.assert_allclose(nifti[:, ::-1, :], dicom, atol=1e-4)  # 1e-7 measured
    rows = {}
    for name in outputs:
        with (tmp_path / name / "detections.csv").open() as f:
            rows[name] = [
                [float(r[k]) for k in ("x_lps_mm", "y_lps_mm", "z_lps_mm")]
                for r in csv.DictReader(f)
            ]
    assert len(rows["nifti"]) == len(rows["dicom"]) > 0
    np.testing.assert_allclose(rows["nifti"][:20], rows["dicom"][:20], atol=1e-3)


def test_outputs_put_a_known_score_blob_at_its_world_point(exam_components, tmp_path):
    # Scores made by hand: a Gaussian (sigma 6 mm, peak 0.9) around the exam's GS 4+3 finding,
    # evaluated at every crop pixel's world point. Read back as a viewer would (SimpleITK, the
    # T2w DICOM series), each output must hold that Gaussian at each T2w voxel's world point.
    from focalnet_jax.data import preprocess_case
    from focalnet_jax.evaluation.predict import write_exam_outputs

    finding = np.array([25.7457, 31.8707, -38.511])  # LPS mm (shared/data/prostatex/README.md)

    def gaussian(world):
        return 0.9 * np.exp(-np.sum((np.asarray(world) - finding) ** 2, -1) / (2 * 6.0**2))

    case = preprocess_case(exam_components, case_id="px")
    s, r, c = np.meshgrid(*(np.arange(n) for n in case.images.shape[:3]), indexing="ij")
    blob = gaussian(np.stack(case.pixel_to_world(s, r, c), -1)).astype(np.float32)
    scores = blob[..., None] * np.array([1.0, 0.8, 0.5, 0.2, 0.1], np.float32)
    write_exam_outputs(case, scores, tmp_path, threshold=0.3)

    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(exam_components["t2w"])
    t2w = sitk.ReadImage(files)
    names = ("lesion_score", "cspca_score", "detection_map")
    maps = {n: sitk.ReadImage(str(tmp_path / f"{n}.nii.gz")) for n in names}
    peak = t2w.TransformPhysicalPointToIndex(tuple(finding))  # (167, 224, 8)
    size = np.array(t2w.GetSize())
    voxels = [peak, (174, 219, 8), (157, 227, 9), (167, 224, 6), (192, 192, 0), tuple(size - 1)]
    for image in maps.values():
        assert image.GetPixelID() == sitk.sitkFloat32 and image.GetSize() == t2w.GetSize()
        for index in [(0, 0, 0), tuple(int(v) for v in size - 1), peak]:
            world = t2w.TransformIndexToPhysicalPoint(index)
            np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(index), world, atol=1e-4)
    lesion = sitk.GetArrayFromImage(maps["lesion_score"])
    for index in voxels:
        world = t2w.TransformIndexToPhysicalPoint(tuple(int(v) for v in index))
        inside = np.all(np.abs(case.world_to_pixel(*world)[1:] - np.array([63.5, 63.5])) < 63.5)
        expected = gaussian(world) if inside else 0.0  # 0 outside the crop
        # Linear interpolation between 0.625 mm crop pixels: within 3e-3 (2e-3 measured).
        assert abs(lesion[index[2], index[1], index[0]] - expected) < 3e-3, (index, expected)
    assert np.unravel_index(np.argmax(lesion), lesion.shape) == peak[::-1]
    # One PI-CAI candidate, around the finding, holding the peak csPCa score.
    detection = sitk.GetArrayFromImage(maps["detection_map"])
    cspca = sitk.GetArrayFromImage(maps["cspca_score"])
    assert np.unique(detection).tolist() == [0.0, cspca.max()]
    assert detection[peak[::-1]] == cspca.max() and abs(cspca.max() - 0.8 * lesion.max()) < 1e-6
    with (tmp_path / "detections.csv").open() as f:
        rows = list(csv.DictReader(f))
    best = np.array([float(rows[0][k]) for k in ("x_lps_mm", "y_lps_mm", "z_lps_mm")])
    # The best local maximum is the crop pixel nearest the finding on a slice next to it.
    assert np.linalg.norm(best - finding) < 2.0 and float(rows[0]["lesion_score"]) > 0.85


def test_a_model_of_lesion_against_no_lesion_writes_no_grades(exam_components, tmp_path, caplog):
    """A binary model (configs/unet_sing.py: one output, P(lesion)) wrote its lesion score in
    every GS column of detections.csv, read as grade predictions, and said nothing."""
    import jax
    import jax.numpy as jnp

    from focalnet_jax.config_loading import load_config
    from focalnet_jax.evaluation.ensemble import make_ensemble
    from focalnet_jax.evaluation.inference import Predictor
    from focalnet_jax.evaluation.predict import predict_exam
    from focalnet_jax.run import RunSpec

    overrides = ["--config.model.unet_features=4", "--config.model.unet_levels=2"]
    config = load_config(str(REPO / "configs" / "unet_sing.py"), overrides)
    spec = RunSpec.from_config(config, num_devices=1)
    assert spec.output_encoding == "binary"
    images = jnp.zeros((1, *spec.image_size, len(spec.components)), jnp.float32)
    variables = jax.device_get(spec.model.init(jax.random.key(0), images, train=False))
    models = make_ensemble([Predictor.from_variables(spec, variables)], [Path("sing")], [None])
    with caplog.at_level("WARNING"):
        predict_exam(models, exam_components, tmp_path / "out", threshold=0.0)
    assert "predict lesion against no lesion only (output encoding 'binary')" in caplog.text
    with (tmp_path / "out" / "detections.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and all(0.0 <= float(row["lesion_score"]) <= 1.0 for row in rows)
    gs = ("p_gs_ge_3+4", "p_gs_ge_4+3", "p_gs_ge_8", "p_gs_ge_9")
    assert {row[k] for row in rows for k in gs} == {""}
    # models.json says so too: its scores are P(lesion), of any grade. It records the threshold
    # and candidate settings, as a batch's does (one exam's recorded neither).
    recorded = json.loads((tmp_path / "out" / "models.json").read_text())
    assert recorded["output_encoding"] == "binary"
    assert recorded["threshold"] == 0.0 and recorded["candidates"]["threshold"] == "dynamic-fast"
    assert "dicom" not in recorded


def test_predict_without_picai_eval_is_refused_before_the_models_load(
    exam_components, tmp_path, monkeypatch
):
    """detection_map.nii.gz needs picai_eval (the `picai` extra): without it `predict` ended in
    a ModuleNotFoundError traceback after preprocessing and inference."""
    from focalnet_jax.evaluation import picai

    monkeypatch.setattr(picai, "available", lambda: "picai_eval is not installed (x)")
    expected = (
        "focalnet predict: error: focalnet predict writes detection_map.nii.gz with picai_eval's "
        "lesion candidates: picai_eval is not installed (x)"
    )
    with pytest.raises(SystemExit, match="^" + re.escape(expected) + "$"):
        main(["predict", "--checkpoint", str(tmp_path / "no_run"), "--t2w",
              exam_components["t2w"], "--adc", exam_components["adc"],
              "--out", str(tmp_path / "out")])  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_predict_leaves_out_the_t2w_slices_a_shorter_dwi_slab_misses(
    trained_run, exam_components, tmp_path, caplog
):
    # An ADC slab shorter than the T2w's (here its 3 caudal slices cut off) is common in clinical
    # exams; the whole exam used to be refused ("adc covers 89.5 % of the crop"). Now the T2w
    # slices the ADC covers are predicted, as with the whole ADC, and the others hold 0.
    from focalnet_jax.data.image_writing import write_image
    from focalnet_jax.data.io import read_image
    from focalnet_jax.evaluation.predict import predict_exam

    short = tmp_path / "adc_short.mha"
    write_image(read_image(exam_components["adc"])[:, :, 3:], short)
    maps = {}
    for name, adc in (("whole", exam_components["adc"]), ("short", short)):
        predict_exam(trained_run, {**exam_components, "adc": str(adc)}, tmp_path / name)
        image = sitk.ReadImage(str(tmp_path / name / "lesion_score.nii.gz"))
        maps[name] = sitk.GetArrayFromImage(image)  # [z, y, x]
    assert "T2w slices [0, 1] lie partly outside a component's field of view" in caplog.text
    assert maps["short"].shape == maps["whole"].shape == (19, 384, 384)
    assert not maps["short"][:2].any() and maps["short"][2:].max(axis=(1, 2)).min() > 0
    # B-spline resampling of the cut ADC differs next to the cut only.
    np.testing.assert_allclose(maps["short"][6:], maps["whole"][6:], atol=1e-3)
    # An ADC narrower than the crop on every slice is still refused.
    narrow = tmp_path / "adc_narrow.mha"
    write_image(read_image(exam_components["adc"])[:42], narrow)
    with pytest.raises(ValueError, match=r"adc covers 50.0 % of the crop of the stored slices"):
        predict_exam(trained_run, {**exam_components, "adc": str(narrow)}, tmp_path / "narrow")


def test_predict_refuses_a_single_slice_t2w_in_one_line(
    trained_run, exam_components, tmp_path, capfd
):
    # One file of the T2w series (a broken export) was predicted as a 1-slice exam without a word.
    t2w = tmp_path / "t2w"
    t2w.mkdir()
    shutil.copy(Path(exam_components["t2w"]) / "1-10.dcm", t2w)
    capfd.readouterr()
    with pytest.raises(SystemExit) as raised:
        main(["predict", "--checkpoint", str(trained_run), "--t2w", str(t2w),
              "--adc", exam_components["adc"], "--out", str(tmp_path / "out")])  # fmt: skip
    err = capfd.readouterr().err
    assert raised.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("focalnet predict: error: case ")
    assert err.endswith(f", file '{t2w}': t2w has a single slice (384 x 384 x 1 voxels): "
                        "a broken or partial export (prostate MRI series hold about 20-30 "
                        "slices); export the whole series\n")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_center_ras_is_the_lps_point_with_x_and_y_negated(trained_run, exam_components, tmp_path):
    # 3D Slicer shows the exam's GS 4+3 finding, LPS (25.7457, 31.8707, -38.511) mm
    # (shared/data/prostatex/README.md), as RAS (-25.7457, -31.8707, -38.511). Given that way, the
    # crop is centred on the finding: each detection lies at the crop pixel the LPS-centred crop
    # puts it at (the RAS numbers taken as LPS would put the crop 82 mm away, partly outside).
    from focalnet_jax.data import preprocess_case

    finding = (25.7457, 31.8707, -38.511)
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["predict", "--checkpoint", str(trained_run), "--t2w", exam_components["t2w"],
                     "--adc", exam_components["adc"], "--out", str(out), "--threshold", "0",
                     "--center-ras=-25.7457,-31.8707,-38.511"]) == 0  # fmt: skip
    with (out / "detections.csv").open() as f:
        rows = list(csv.DictReader(f))[:50]
    assert rows
    centred = preprocess_case(exam_components, case_id="px", center=finding)
    np.testing.assert_allclose(centred.center, finding)
    np.testing.assert_allclose(centred.world_to_pixel(*finding)[1:], (63.5, 63.5), atol=1e-6)
    for row in rows:
        world = [float(row[k]) for k in ("x_lps_mm", "y_lps_mm", "z_lps_mm")]
        listed = [float(row[k]) for k in ("crop_row", "crop_col")]
        np.testing.assert_allclose(centred.world_to_pixel(*world)[1:], listed, atol=1e-3)
    argv = ["predict", "--checkpoint", str(trained_run), "--t2w", exam_components["t2w"],
            "--adc", exam_components["adc"], "--out", str(tmp_path / "x")]  # fmt: skip
    with contextlib.redirect_stderr(io.StringIO()) as stderr, pytest.raises(SystemExit):
        main([*argv, "--center", "1,2,3", "--center-ras", "1,2,3"])
    assert "argument --center-ras: not allowed with argument --center" in stderr.getvalue()


def test_predict_refuses_an_image_as_mask_and_centres_on_a_zonal_mask(
    trained_run, exam_components, tmp_path, capfd
):
    # `--mask <the T2w folder>` was accepted: the centroid of every voxel > 0 (the whole slab)
    # centred the crop. A 0/1 gland mask and a 0/1/2 zonal mask of the same voxels centre it alike.
    from focalnet_jax.data import preprocess_case
    from focalnet_jax.data.io import read_image

    argv = ["predict", "--checkpoint", str(trained_run), "--t2w", exam_components["t2w"],
            "--adc", exam_components["adc"], "--threshold", "0"]  # fmt: skip
    t2w = read_image(exam_components["t2w"])
    values = np.unique(sitk.GetArrayViewFromImage(t2w))
    capfd.readouterr()
    with pytest.raises(SystemExit) as raised:
        main([*argv, "--mask", exam_components["t2w"], "--out", str(tmp_path / "bad")])
    err = capfd.readouterr().err
    assert raised.value.code == 2 and err.endswith(": t2w and prostate mask are the same folder\n")
    copy = shutil.copytree(exam_components["t2w"], tmp_path / "t2w_copy")  # read as a mask
    with pytest.raises(SystemExit) as raised:
        main([*argv, "--mask", str(copy), "--out", str(tmp_path / "bad")])
    err = capfd.readouterr().err
    assert raised.value.code == 2 and err.count("\n") == 1, err
    assert err.endswith(
        f", file '{copy}': prostate mask holds {len(values)} distinct values "
        f"(min {float(values[0])}, max {float(values[-1])}): an image, not a label map (at most 8 "
        "integer labels in 0..255, 0 the background)\n"
    )
    assert len(values) > 8 and not (tmp_path / "bad").exists()
    i, j, k = t2w.TransformPhysicalPointToIndex((25.7457, 31.8707, -38.511))  # the finding
    labels = np.zeros(sitk.GetArrayViewFromImage(t2w).shape, np.uint8)
    labels[k - 2 : k + 3, j - 30 : j + 10, i - 20 : i + 30] = 1
    zonal = labels.copy()
    zonal[:, j - 30 : j - 10] *= 2
    voxels = np.argwhere(labels > 0).mean(0)[::-1]  # mean (x, y, z) index
    centre = t2w.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in voxels))
    crop = preprocess_case(exam_components, case_id="px", center=centre)
    maps = {}
    for name, array in (("gland", labels), ("zonal", zonal)):
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(t2w)
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
        out = tmp_path / name
        with contextlib.redirect_stdout(io.StringIO()):
            assert main([*argv, "--mask", str(tmp_path / f"{name}.nii.gz"), "--out", str(out)]) == 0
        maps[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "lesion_score.nii.gz")))
        with (out / "detections.csv").open() as f:
            rows = list(csv.DictReader(f))[:20]
        assert rows
        for row in rows:  # each detection at the crop pixel of the centroid-centred crop
            world = [float(row[key]) for key in ("x_lps_mm", "y_lps_mm", "z_lps_mm")]
            listed = [float(row[key]) for key in ("crop_row", "crop_col")]
            np.testing.assert_allclose(crop.world_to_pixel(*world)[1:], listed, atol=1e-3)
    np.testing.assert_array_equal(maps["zonal"], maps["gland"])
