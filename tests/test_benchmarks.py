"""The benchmark scripts run and report what they claim, on a tiny model (their numbers are not
checked here: speed targets live in the benchmarks, not in tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_train_helpers import REPO, TINY, small_synthetic_store

from focalnet_jax.evaluation.predictions import write_case


def _run(script: str, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout  # one JSON line, nothing else on stdout
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    return small_synthetic_store(tmp_path_factory.mktemp("bench"), cases=10, seed=2)


def test_train_step_benchmark_times_the_chosen_kinds():
    result = _run(
        "train_step.py",
        "--config=configs/focalnet.py",
        "--kinds=fl,fl_mfl_select",
        "--steps=1",
        "--size=32",
        *TINY,
    )
    assert {"fl", "fl_mfl_select"} <= set(result) and "fl_mfl_vmap" not in result
    assert result["ratio_fl_mfl_select_to_fl"] == pytest.approx(
        result["fl_mfl_select"]["step_time_s"] / result["fl"]["step_time_s"]
    )
    for kind in ("fl", "fl_mfl_select"):
        assert result[kind]["flops_per_step"] > 0
        assert result[kind]["tflops_per_s"] == pytest.approx(
            result[kind]["flops_per_step"] / result[kind]["step_time_s"] / 1e12
        )
    assert result["model"] == "deeplab-18 width 0.125 OS 16 float32"
    assert result["platform"] == "cpu" and result["batch_size"] == 4


def test_train_step_flops_count_every_device_like_images_per_s(monkeypatch):
    """XLA counts one device's program of a sharded step: on 2 devices each holds half the batch,
    so that count is about half the 1-device one; `flops_per_step` (x 2) is the whole step's
    arithmetic, as much as on one device plus the replicated work (the update of the weights)."""
    args = ("--config=configs/focalnet.py", "--kinds=fl", "--steps=1", "--size=32", *TINY)
    one = _run("train_step.py", *args)["fl"]
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    result = _run("train_step.py", *args)
    two = result["fl"]
    assert result["num_devices"] == 2
    assert one["flops_per_step"] == one["flops_per_device_step"]
    assert two["flops_per_step"] == 2 * two["flops_per_device_step"]
    assert 1.0 <= two["flops_per_step"] / one["flops_per_step"] < 1.3
    assert two["tflops_per_s"] == pytest.approx(two["flops_per_step"] / two["step_time_s"] / 1e12)
    assert two["images_per_s"] == pytest.approx(4 / two["step_time_s"])


def test_fold_time_benchmark_projects_the_paper_fold_from_a_short_run(small_store):
    result = _run(
        "fold_time.py",
        "--config=configs/focalnet.py",
        f"--store={small_store}",
        "--train-slices=40",
        "--max-steps=6",
        *TINY,
        "--config.train.log_every=2",
    )
    # 200 epochs of 40 // 4 = 10 steps: 2000 steps, of which 6 ran.
    assert (result["fold_steps"], result["steps_run"], result["projected"]) == (2000, 6, True)
    steady, overhead = result["steady_step_time_s"], result["overhead_s"]
    assert steady > 0 and overhead > 0
    assert result["wall_s"] == pytest.approx(overhead + 6 * steady)
    assert result["projected_fold_s"] == pytest.approx(overhead + 2000 * steady)
    assert result["mfl"] == "select" and result["store_train_slices"] > 0  # the default mode
    assert result["compilation_cache"] is None


def test_bf16_curves_redraw_a_saved_result(tmp_path):
    saved = REPO / "benchmarks" / "results" / "bf16_loss_curves_demo_cpu_2026-11-22.json"
    png = tmp_path / "curves.png"
    result = _run("bf16_loss_curves.py", f"--result={saved}", f"--plot={png}")
    assert result == json.loads(saved.read_text())
    with Image.open(png) as image:
        assert image.size == (840, 480)  # 7 x 4 inches at 120 dpi


def test_bf16_curves_train_both_dtypes_and_evaluate_them(small_store, tmp_path):
    png = tmp_path / "curves.png"
    result = _run(
        "bf16_loss_curves.py",
        f"--store={small_store}",
        "--config=configs/demo.py",
        "--steps=6",
        "--smooth=2",
        "--evaluate",
        f"--plot={png}",
        *TINY,
        "--config.train.log_every=1",
    )
    assert result["steps"] == [1, 2, 3, 4, 5, 6]
    assert len(result["loss_float32"]) == len(result["loss_bfloat16"]) == 6
    assert result["loss_float32"] != result["loss_bfloat16"]  # the compute dtype took effect
    for dtype in ("float32", "bfloat16"):
        sensitivities = result["froc_sensitivity_at_1fp"][dtype]
        assert set(sensitivities) == {"index", "clinically_significant", "all"}
        assert all(0.0 <= v <= 1.0 for v in sensitivities.values())
        assert "val/loss" in result["final_val"][dtype]
    assert png.stat().st_size > 0


def test_inference_benchmark_times_one_model_and_an_ensemble():
    result = _run(
        "inference.py", "--config=configs/focalnet.py", "--models=2", "--repeats=1", *TINY
    )
    assert result["slices"] == 20 and result["platform"] == "cpu"
    for count in ("models_1", "models_2"):
        assert 0 < result[count]["predict_s"] < result[count]["with_preprocessing_s"]
    assert result["preprocess_s"] > 0 and result["write_outputs_s"] > 0
    assert result["model"] == "deeplab-18 width 0.125 OS 16 float32"


def test_flat_maxima_benchmark_counts_each_upsampled_peak_once():
    result = _run("flat_maxima.py", "--patients=6", "--peaks=4")
    # Every peak is one flat maximum (the background is below min_score); pixel by pixel an
    # interior peak gives 2 x 2 window maxima, a border peak 4 x 2, a corner one 4 x 4.
    assert result["one_per_flat_maximum"]["detections_per_patient"] == 4.0
    assert 4 * 2 + 8 * 2 <= result["every_window_max_pixel"]["detections_per_patient"] <= 4 * 16


def test_flat_maxima_benchmark_counts_detections_per_patient_not_per_case(tmp_path):
    """Two one-slice cases of one patient: 8 detections over one patient, not two."""
    scores = np.full((1, 64, 64, 5), 1e-4, np.float32)
    for row, col in ((10, 10), (10, 50), (50, 10), (50, 50)):
        scores[0, row - 1 : row + 1, col - 1 : col + 1] = 0.6  # a flat top of 2 x 2 pixels
    lesions = np.zeros((1, 64, 64), np.int32)
    lesions[0, 8:13, 8:13] = 1
    for case_id in ("p0_exam1", "p0_exam2"):
        write_case(
            tmp_path, case_id, scores=scores, lesions=lesions, lesion_classes=[2],
            spacing=(0.5, 0.5), patient_id="p0",
        )  # fmt: skip
    result = _run("flat_maxima.py", f"--predictions={tmp_path}")
    assert (result["cases"], result["patients"]) == (2, 1)
    assert result["one_per_flat_maximum"]["detections"] == 8
    assert result["one_per_flat_maximum"]["detections_per_patient"] == 8.0
    # Pixel by pixel every top is 4 window maxima.
    assert result["every_window_max_pixel"]["detections_per_patient"] == 32.0


def test_mfl_scaling_benchmark_reports_ratios_to_the_plain_step_of_the_same_run():
    result = _run(
        "mfl_scaling.py",
        "--config=configs/focalnet.py",
        "--components=t2w,adc,hbv",
        "--subset-counts=2",
        "--modes=select",
        "--steps=1",
        "--rounds=1",
        "--size=32",
        *TINY,
    )
    (row,) = result["results"]
    assert (row["subsets"], row["mode"], row["mfl_chunk"]) == (2, "select", 4)
    assert row["memory_ratio"] == pytest.approx(row["peak_bytes"] / result["plain_peak_bytes"])
    assert row["memory_ratio"] > 1 and row["time_ratio"] > 0
    assert row["flops_ratio"] > 1  # two subsets without chunks: more arithmetic than plain
    assert result["components"] == ["t2w", "adc", "hbv"] and result["device"] == "cpu"


def test_mfl_chunk_loop_benchmark_times_each_kind_vmapped_and_looped():
    result = _run(
        "mfl_chunk_loop.py",
        "--config=configs/focalnet.py",
        "--chunk=1",
        "--size=32",
        "--repeats=1",
        *TINY,
    )
    assert (result["subsets"], result["chunk"], result["device_kind"]) == (2, 1, "cpu")
    for kind in ("forward", "input_gradient", "parameter_gradient"):
        ratio = result[f"{kind}_loop_s"] / result[f"{kind}_vmap_s"]
        assert result[f"{kind}_loop_over_vmap"] == pytest.approx(ratio) and ratio > 0
        assert result[f"{kind}_vmap_temp_bytes"] > 0 and result[f"{kind}_loop_temp_bytes"] > 0
