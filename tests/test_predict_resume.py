"""Resumable `focalnet predict --layout picai`: the cases go to `<out>.partial/`, each case folder
whole or absent; a run killed (SIGTERM, SIGKILL) or interrupted keeps the finished cases, and
`--resume` predicts the others, giving the files an uninterrupted run gives; an existing partial
is refused without `--resume` or `--overwrite`, a partial of other models or settings refused
with `--resume`, one being written by another run refused. `--images` may be repeated.

The interrupted child blocks for good on a FIFO put in place of the last case's T2w file, so it is
killed mid-run (earlier cases written, the last not) on any machine speed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import predict_runs
import pytest
import SimpleITK as sitk
from cli_calls import cli_error, run_cli
from predict_runs import (
    CASES,
    _cases,
    _finished,
    _interrupted,
    _overrides,
    _predict,
    assert_same_outputs,
)
from test_train_helpers import tiny_config

from focalnet_jax.errors import plural
from focalnet_jax.evaluation.partial_output import LOCK_FILE, lock_file, partial_folder
from focalnet_jax.file_lock import exclusive_lock

REPO = Path(__file__).resolve().parents[1]
tiny = predict_runs.tiny  # a module-scoped fixture


def _images_with_fifo(tiny, where: Path) -> tuple[Path, Path, Path]:
    """A copy of the image folder whose last case's T2w file is a FIFO (a reader blocks on it):
    (images, the FIFO, the real file)."""
    images = where / "images"
    shutil.copytree(tiny["data"] / "images", images)
    last = _cases(images)[-1]
    t2w = next(images.glob(f"*/{last}_t2w.mha"))
    t2w.unlink()
    os.mkfifo(t2w)
    return images, t2w, next((tiny["data"] / "images").glob(f"*/{last}_t2w.mha"))


def _release_readers(fifo: Path, child: subprocess.Popen, seconds: float = 60) -> None:
    """Opens and closes `fifo` for writing until `child` ends: each open of it for reading then
    returns and reads an empty file."""
    deadline = time.monotonic() + seconds
    while child.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # ENXIO: no reader right now
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_run_resumes_to_the_uninterrupted_output(tiny, tmp_path, signum):
    images, fifo, real = _images_with_fifo(tiny, tmp_path)
    out = tmp_path / "out"
    partial = partial_folder(out)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "focalnet_jax.cli", *_predict(tiny["run"], images, out)]
    child = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    first = _cases(images)[0]
    deadline = time.monotonic() + 240
    while not (partial / first).is_dir() and child.poll() is None:
        assert time.monotonic() < deadline, "no case finished in 240 s"
        time.sleep(0.1)
    time.sleep(0.5)  # the child now blocks on the FIFO of the last case
    child.send_signal(signum)
    _release_readers(fifo, child)  # SIGTERM is handled once the blocked read returns
    stderr = child.communicate(timeout=60)[1]
    assert child.returncode == (128 + signum if signum == signal.SIGTERM else -signum), stderr
    assert not out.exists() and (partial / first / "detections.csv").is_file()
    assert not (partial / _cases(images)[-1]).exists()
    if signum == signal.SIGTERM:
        hint = [line for line in stderr.splitlines() if "--resume" in line]
        assert hint == [
            f"focalnet predict: kept {plural(len(_finished(partial)), 'finished case')} in "
            f"{partial}; run the same command with --resume to predict the others"
        ], stderr
    fifo.unlink()
    shutil.copy(real, fifo)

    message = cli_error(_predict(tiny["run"], images, out))
    assert message.endswith("add --resume to continue it, or --overwrite to start over")
    printed = run_cli([*_predict(tiny["run"], images, out), "--resume"])
    kept = printed.split("(")[1].split()[0]
    assert printed.startswith(f"wrote {CASES} cases to {out} ({kept} finished before the resume")
    assert 1 <= int(kept) < CASES
    assert not partial.exists() and not (out / LOCK_FILE).exists() and not lock_file(out).exists()
    assert_same_outputs(out, tiny["reference"])


def test_resume_refuses_other_settings_and_a_partial_another_run_writes(
    tiny, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    _interrupted(tiny, out, monkeypatch, tiny["data"] / "images")
    predict = _predict(tiny["run"], tiny["data"] / "images", out)
    message = cli_error([*predict, "--resume", "--threshold", "0.3"])
    assert "with other models or settings (threshold: 0.5 in the partial, 0.3 now)" in message
    message = cli_error([*predict, "--resume", "--candidate-min-voxels", "3"])
    assert "(candidates.min_voxels: 10 in the partial, 3 now)" in message
    # Cropped around the T2w volume centre, a finished case would be around its mask now:
    # the resumed output matched neither uninterrupted run.
    masks = tiny["data"] / "masks"
    message = cli_error([*predict, "--resume", "--masks", str(masks)])
    first = _finished(partial_folder(out))[0]
    assert message.endswith(
        f"--resume: case {first} of {partial_folder(out)} was cropped around the T2w volume "
        f"centre, and would be around the prostate mask {masks.resolve() / first}.nii.gz now; "
        "give the same --masks or manifest centres, or add --overwrite (without --resume) to "
        "start over"
    ), message
    # Other images under the same case ids (a series exported again, another --images): the
    # finished cases were kept beside cases of the new images. A copy with its times is taken.
    other = shutil.copytree(tiny["data"] / "images", tmp_path / "other")
    t2w = next((other / first.split("_")[0]).glob(f"{first}_t2w.*"))
    image = sitk.ReadImage(str(t2w))
    sitk.WriteImage(image + 1.0, str(t2w))
    message = cli_error([*_predict(tiny["run"], other, out), "--resume"])
    assert f"--resume: case {first} of {partial_folder(out)} was predicted from another t2w (" in (
        message
    )
    assert message.endswith(
        "resume with the same input files, or add --overwrite (without --resume) to start over"
    )
    with exclusive_lock(lock_file(out)):
        message = cli_error([*predict, "--resume"])
    assert message.endswith(
        f"is being written by another focalnet predict (pid {os.getpid()} on "
        f"{os.uname().nodename}); wait for it to end"
    )
    run_cli([*predict, "--resume", "--batch-size", "3"])  # the batch size may change
    assert_same_outputs(out, tiny["reference"])


def test_resume_refuses_a_store_rebuilt_with_other_settings_for_a_run_without_its_record(
    tiny, tmp_path, monkeypatch
):
    """A run without its own record of the store settings (`store.json`, as before it was
    written) preprocesses as its training store is now: rebuilt between the stop and `--resume`,
    the finished cases (bspline) were kept beside the others (linear) in one output. models.json
    records the input preprocessing now; a partial of an earlier version, without it, resumes."""
    run, store = tmp_path / "run", tmp_path / "store"
    shutil.copytree(tiny["run"], run)
    shutil.copytree(tiny["root"] / "store", store)
    (run / "store.json").unlink()
    config = json.loads((run / "config.json").read_text())
    config["data"]["store"] = str(store)
    (run / "config.json").write_text(json.dumps(config))
    out, images = tmp_path / "out", tiny["data"] / "images"
    _interrupted(tiny, out, monkeypatch, images, run=run)
    recorded = json.loads((partial_folder(out) / "models.json").read_text())
    assert recorded["preprocess"]["interpolator"] == "bspline"
    run_cli(["preprocess", "--layout=picai", f"--images={images}", "--interpolator=linear",
             f"--labels={tiny['data'] / 'labels'}", f"--out={store}", "--overwrite"])  # fmt: skip
    message = cli_error([*_predict(run, images, out), "--resume"])
    assert message.endswith(
        f"--resume: {partial_folder(out)} was made with other models or settings "
        '(preprocess.interpolator: "bspline" in the partial, "linear" now); run with those, or '
        "add --overwrite (without --resume) to start over"
    ), message
    del recorded["preprocess"]  # as an earlier version wrote it
    (partial_folder(out) / "models.json").write_text(json.dumps(recorded))
    run_cli([*_predict(run, images, out), "--resume"])
    assert json.loads((out / "models.json").read_text())["preprocess"]["interpolator"] == "linear"


def test_resume_refuses_a_run_whose_model_config_was_edited(tiny, tmp_path, monkeypatch):
    """`model.output_stride` edited in the run's config.json between the stop and `--resume`:
    the same weights give other scores, and the finished cases of one model were kept beside
    the others' of the other, models.json naming only the second. It now records each run's
    inference config; a partial of an earlier version, without it, resumes."""
    run = shutil.copytree(tiny["run"], tmp_path / "run")
    out, images = tmp_path / "out", tiny["data"] / "images"
    _interrupted(tiny, out, monkeypatch, images, run=run)
    recorded = json.loads((partial_folder(out) / "models.json").read_text())
    stride = recorded["configs"][str(run.resolve())]["model"]["output_stride"]
    config = json.loads((run / "config.json").read_text())
    config["model"]["output_stride"] = 8 if stride != 8 else 16
    (run / "config.json").write_text(json.dumps(config))
    message = cli_error([*_predict(run, images, out), "--resume"])
    assert message.endswith(
        f"--resume: {partial_folder(out)} was made with other models or settings (configs."
        f"{run.resolve()}.model.output_stride: {stride} in the partial, "
        f"{config['model']['output_stride']} now); run with those, or add --overwrite (without "
        "--resume) to start over"
    ), message
    del recorded["configs"]  # as an earlier version wrote it
    (partial_folder(out) / "models.json").write_text(json.dumps(recorded))
    run_cli([*_predict(run, images, out), "--resume"])
    assert str(run.resolve()) in json.loads((out / "models.json").read_text())["configs"]


def test_resume_refuses_a_run_trained_again_to_the_same_step(tiny, tmp_path, monkeypatch):
    """A run folder trained again in place (another seed, the same step) between the stopped run
    and `--resume` passed the check of runs and steps: the finished cases of the old weights
    were kept beside the others' of the new. models.json now records each model's weights."""
    from focalnet_jax.training import train_and_evaluate

    run, other = tmp_path / "run", tmp_path / "other"
    shutil.copytree(tiny["run"], run)
    with contextlib.redirect_stderr(io.StringIO()):
        train_and_evaluate(
            tiny_config(overrides=[*_overrides(tiny["root"]), "--config.seed=1"]), other
        )
    out = tmp_path / "out"
    _interrupted(tiny, out, monkeypatch, tiny["data"] / "images", run=run)
    before = json.loads((partial_folder(out) / "models.json").read_text())["weights"]
    shutil.rmtree(run)
    shutil.copytree(other, run)  # trained again, to the same step
    message = cli_error([*_predict(run, tiny["data"] / "images", out), "--resume"])
    assert "with other models or settings (weights: " in message, message
    now = json.loads(message.split("in the partial, ")[1].split(" now)")[0])
    assert len(before) == len(now) == 1 and before != now


def test_overwrite_starts_over_and_images_may_be_repeated(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _interrupted(tiny, out, monkeypatch, tiny["data"] / "images")
    folds = []
    for k, patient in enumerate(sorted((tiny["data"] / "images").iterdir())):
        folds.append(tmp_path / f"fold{k % 2}")
        shutil.copytree(patient, folds[-1] / patient.name)
    more = [*_predict(tiny["run"], folds[0], out), "--images", folds[1], "--overwrite"]
    printed = run_cli(more)
    assert printed == f"wrote {CASES} cases to {out}\n"
    assert_same_outputs(out, tiny["reference"])
