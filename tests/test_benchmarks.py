"""The fold-time, bf16 loss-curve, inference, flat-maxima and store-opening benchmarks run and
report what they claim, on a tiny model (their numbers are not checked here: speed targets live in
the benchmarks, not in tests), and a result line records the commit it ran."""

from __future__ import annotations

import json
import subprocess
import types

import numpy as np
import pytest
from benchmark_calls import benchmark_module, run
from PIL import Image
from test_train_helpers import REPO, TINY, small_synthetic_store, xla_flags

from focalnet_jax.evaluation.predictions import write_case

result_line = benchmark_module("result_line")


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    return small_synthetic_store(tmp_path_factory.mktemp("bench"), cases=10, seed=2)


def test_fold_time_takes_a_sigterm_after_the_last_step_as_a_complete_run(monkeypatch):
    """Such a run had validated and checkpointed at its last step; counted as stopped there, one
    validation too few was taken out of the projection."""
    from focalnet_jax.training.graceful_stop import TrainingStopped

    fold_time = benchmark_module("fold_time")

    def train(config, workdir, store):
        raise TrainingStopped(6, workdir, complete=True)

    monkeypatch.setattr(fold_time, "train_and_evaluate", train)
    monkeypatch.setattr(fold_time, "loop_timings", lambda workdir, batch_size: {})
    config = types.SimpleNamespace(train=types.SimpleNamespace(batch_size=4))
    assert fold_time._timed_run(config, None)[2] is None


@pytest.mark.usefixtures("without_compilation_cache")
def test_fold_time_benchmark_projects_the_paper_fold_from_a_short_run(small_store):
    result = run(
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
    assert result["mfl"] == "vmap" and result["store_train_slices"] > 0  # the paper's, as trained
    assert result["compilation_cache"] is None
    # The fold validates only at the end (eval_every 0): the run validates at steps 3 and 6, so
    # that a validation after the compiled one is timed. Checkpoints every 1000 steps and at the
    # end; the fold's validation set is the store's share of the schedule's 40 slices.
    assert result["run_eval_every"] == 3
    assert result["validations"] == {"run": 2, "fold": 1}
    assert result["checkpoints"] == {"run": 1, "fold": 2}
    val = result["val_slices"]
    assert val["schedule"] == round(40 * val["store"] / result["store_train_slices"])
    validation, saving = result["validation_s"], result["checkpoint_s"]
    assert validation > 0 and saving > 0 and result["projection_leaves_out"] == []
    expected = overhead + 2000 * steady + validation * (val["schedule"] / val["store"] - 2) + saving
    assert result["projected_fold_s"] == pytest.approx(expected)


def test_fold_time_projection_adds_the_folds_validations_and_checkpoints():
    fold_time = benchmark_module("fold_time")
    timings = {
        "intervals": [5.0, 0.1, 0.3, 0.2],  # steady 0.2 s a step
        "validation_s": [9.0, 2.0, 4.0],  # the first compiles: 3 s each after it
        "checkpoint_s": [1.0, 0.5],  # 0.75 s each
    }
    counts = {"validations": {"run": 3, "fold": 9}, "checkpoints": {"run": 2, "fold": 18}}
    got = fold_time._projection(100.0, timings, 300, 17400, counts, val_scale=2.0)
    overhead = 100.0 - 300 * 0.2
    assert (got["steady_step_time_s"], got["validation_s"], got["checkpoint_s"]) == (0.2, 3.0, 0.75)
    # 9 validations of twice the slices, less the run's 3 (in the overhead); 16 more checkpoints.
    assert got["projected_fold_s"] == pytest.approx(
        overhead + 17400 * 0.2 + (9 * 3.0 * 2 - 3 * 3.0) + (18 - 2) * 0.75
    )
    assert got["projection_leaves_out"] == [] and got["projected"]
    # A SIGTERM before the second validation: no validation timed, and the line says so.
    stopped = fold_time._projection(
        100.0, timings | {"validation_s": [9.0]}, 300, 17400, counts, val_scale=2.0
    )
    assert stopped["validation_s"] is None and stopped["projection_leaves_out"] == ["validations"]
    assert stopped["projected_fold_s"] == pytest.approx(overhead + 17400 * 0.2 + 16 * 0.75)
    # The whole fold ran: its wall time, nothing projected.
    whole = fold_time._projection(100.0, timings, 17400, 17400, counts, val_scale=1.0)
    assert whole["projected_fold_s"] == 100.0 and not whole["projected"]


def test_fold_time_run_validates_twice_when_shortened():
    fold_time = benchmark_module("fold_time")
    assert fold_time.run_eval_every(0, 6, 2000) == 3  # steps 3 and 6
    assert fold_time.run_eval_every(2000, 2000, 17400) == 1000  # 1000 and 2000
    assert fold_time.run_eval_every(2000, 1999, 17400) == 1000  # 1000 and 1999
    assert fold_time.run_eval_every(400, 1200, 1200) == 400  # the whole fold: the config's
    assert fold_time.run_eval_every(400, 900, 1200) == 400  # 400, 800, 900: twice already


def test_fold_time_counts_validations_as_the_loop_runs_them():
    fold_time = benchmark_module("fold_time")
    # The paper's config: every 2000 of 17,400 steps (8 times) and once more at the end.
    assert fold_time.event_counts(2000, 17400) == 9
    assert fold_time.event_counts(400, 1200) == 3  # the demo: 400, 800, 1200
    assert fold_time.event_counts(0, 5) == 1
    # Stopped by SIGTERM after a step: validated at the earlier multiples only, not at its stop
    # (counted once too often where it stopped at one), checkpointed there too.
    every = {"validations": (2, 2), "checkpoints": (4, 4)}
    counts = {steps: fold_time._event_counts(every, steps, 12, True) for steps in (6, 7)}
    assert [counts[6]["validations"]["run"], counts[7]["validations"]["run"]] == [2, 3]
    assert counts[6]["validations"]["fold"] == 6


def test_bf16_curves_redraw_a_saved_result(tmp_path):
    saved = REPO / "benchmarks" / "results" / "bf16_loss_curves_demo_cpu_2026-12-01.json"
    png = tmp_path / "curves.png"
    result = run("bf16_loss_curves.py", f"--result={saved}", f"--plot={png}")
    assert result == json.loads(saved.read_text())
    with Image.open(png) as image:
        assert image.size == (840, 480)  # 7 x 4 inches at 120 dpi


def test_bf16_curves_train_both_dtypes_and_evaluate_them(small_store, tmp_path):
    png = tmp_path / "curves.png"
    result = run(
        "bf16_loss_curves.py",
        f"--store={small_store}",
        "--config=configs/demo.py",
        "--steps=6",
        "--smooth=2",
        "--evaluate",
        f"--plot={png}",
        *TINY,
        "--config.train.log_every=1",
        "--config.loss.mfl=false",  # the dtype is what differs; MFL's steps compile longer
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


def test_inference_benchmark_times_one_model_and_an_ensemble_of_four_components(monkeypatch):
    """On 2 devices: inference splits each batch of slices over every local device.
    `configs/mfl4.py` (T2w, ADC, high-b DWI, DCE) was refused: the exam had T2w and ADC only."""
    monkeypatch.setenv("XLA_FLAGS", xla_flags(2))
    result = run("inference.py", "--config=configs/mfl4.py", "--models=2", "--repeats=1", *TINY)
    assert result["components"] == ["t2w", "adc", "hbv", "dce"]
    assert result["slices"] == 20 and result["platform"] == "cpu"
    assert result["num_devices"] == 2
    for count in ("models_1", "models_2"):
        assert 0 < result[count]["predict_s"] < result[count]["with_preprocessing_s"]
    assert result["preprocess_s"] > 0 and result["write_outputs_s"] > 0
    assert result["model"] == "deeplab-18 width 0.125 OS 16 float32"


def test_flat_maxima_benchmark_counts_each_upsampled_peak_once(monkeypatch):
    monkeypatch.setenv("BENCHMARK_COMMIT", "0123abc")
    result = run("flat_maxima.py", "--patients=6", "--peaks=4", "--upsample=half_pixel")
    assert result["commit"] == "0123abc" and result["date"]  # what ran, and when
    # Every peak is one flat maximum (the background is below min_score); pixel by pixel an
    # interior peak gives 2 x 2 window maxima, a border peak 4 x 2, a corner one 4 x 4.
    assert result["upsample"] == "half_pixel"
    assert result["one_per_flat_maximum"]["detections_per_patient"] == 4.0
    assert 4 * 2 + 8 * 2 <= result["every_window_max_pixel"]["detections_per_patient"] <= 4 * 16
    # Upsampled as the model does by default, each peak's top is one pixel: both rules agree.
    result = run("flat_maxima.py", "--patients=6", "--peaks=4")
    assert result["upsample"] == "aligned"
    assert result["one_per_flat_maximum"] == result["every_window_max_pixel"]
    assert result["one_per_flat_maximum"]["detections"] == 24


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
    result = run("flat_maxima.py", f"--predictions={tmp_path}")
    assert (result["cases"], result["patients"]) == (2, 1)
    assert result["one_per_flat_maximum"]["detections"] == 8
    assert result["one_per_flat_maximum"]["detections_per_patient"] == 8.0
    # Pixel by pixel every top is 4 window maxima.
    assert result["every_window_max_pixel"]["detections_per_patient"] == 32.0


def test_store_open_benchmark_opens_every_case_it_wrote():
    result = run("store_open.py", "--cases=30", "--slices=3")
    assert (result["cases"], result["slices"]) == (30, 90)
    assert result["open_seconds"] > 0 and result["target_seconds"] == 3.0


def test_result_line_records_the_commit_of_the_checkout(monkeypatch):
    monkeypatch.delenv("BENCHMARK_COMMIT", raising=False)
    described = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
    )
    expected = described.stdout.strip() if described.returncode == 0 else None
    assert result_line.commit() == expected
    monkeypatch.setenv("BENCHMARK_COMMIT", "0123abc")  # a copy of the tree without .git
    assert result_line.provenance()["commit"] == "0123abc"
