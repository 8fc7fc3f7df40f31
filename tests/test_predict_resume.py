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
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from cli_calls import cli_error, run_cli
from test_train_helpers import tiny_config

from focalnet_jax.cli import main
from focalnet_jax.errors import UserError, plural
from focalnet_jax.evaluation import batch_predict
from focalnet_jax.evaluation.partial_output import LOCK_FILE, lock_file, partial_folder
from focalnet_jax.file_lock import exclusive_lock

REPO = Path(__file__).resolve().parents[1]
CASES = 3
MAPS = ("lesion_score", "cspca_score", "detection_map")


def _overrides(root: Path) -> list[str]:
    """The settings of the fixture's run, trained on the store in `root`."""
    return ["--config.train.steps=2", "--config.data.slices=all", "--config.loss.mfl=False",
            f"--config.data.store={root / 'store'}", "--config.data.num_folds=2"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{'data': synthetic PI-CAI folder of 3 cases, 'run': a 2-step run, 'reference': an
    uninterrupted prediction of every case}."""
    from focalnet_jax.training import train_and_evaluate

    root = tmp_path_factory.mktemp("resume")
    data, store = root / "data", root / "store"
    run_cli(["synth", f"--out={data}", f"--cases={CASES}", "--seed=3", "--small"])
    run_cli(["preprocess", "--layout=picai", f"--images={data / 'images'}",
             f"--labels={data / 'labels'}", f"--out={store}"])  # fmt: skip
    with contextlib.redirect_stderr(io.StringIO()):
        train_and_evaluate(tiny_config(overrides=_overrides(root)), root / "run")
        run_cli([*_predict(root / "run", data / "images", root / "reference")])
    return {"data": data, "run": root / "run", "reference": root / "reference", "root": root}


def _predict(run: Path, images: Path, out: Path, *more) -> list[str]:
    return ["predict", "--checkpoint", str(run), "--layout", "picai", "--images", str(images),
            "--batch-size", "2", "--out", str(out), *map(str, more)]  # fmt: skip


def _cases(images: Path) -> list[str]:
    return sorted(p.name[: -len("_t2w.mha")] for p in images.glob("*/*_t2w.mha"))


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


def _finished(partial: Path) -> list[str]:
    return sorted(p.name for p in partial.iterdir() if p.is_dir() and not p.name.startswith("."))


def _release_readers(fifo: Path, child: subprocess.Popen, seconds: float = 60) -> None:
    """Opens and closes `fifo` for writing until `child` ends: each open of it for reading then
    returns and reads an empty file."""
    deadline = time.monotonic() + seconds
    while child.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # ENXIO: no reader right now
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        time.sleep(0.05)


def assert_same_outputs(out: Path, reference: Path, extra: tuple[str, ...] = ()) -> None:
    """Same files (but `extra` in `out`); maps equal numerically, detections.csv equal within its
    4 decimals, models.json byte for byte."""
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert files == sorted([*extra, *(str(p.relative_to(reference)) for p in reference.rglob("*"))])
    assert (out / "models.json").read_bytes() == (reference / "models.json").read_bytes()
    for case in _finished(reference):
        for name in MAPS:
            got, want = (sitk.ReadImage(str(d / case / f"{name}.nii.gz")) for d in (out, reference))
            assert got.GetSize() == want.GetSize()
            np.testing.assert_allclose(
                sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(want), atol=1e-5
            )
        rows = [list(csv.reader((d / case / "detections.csv").open())) for d in (out, reference)]
        assert rows[0][0] == rows[1][0] and len(rows[0]) == len(rows[1])
        if len(rows[0]) > 1:
            np.testing.assert_allclose(
                np.array(rows[0][1:], float), np.array(rows[1][1:], float), atol=2e-4
            )


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


def _interrupted(
    tiny, out: Path, monkeypatch, images: Path, *more, run: Path | None = None
) -> None:
    """A run into `out` of the models of `run` (default the fixture's) stopped (as by Ctrl-C)
    once it has written its first case."""
    write = batch_predict.write_case_folder

    def once(partial, case_id, writer):
        if _finished(partial):
            raise KeyboardInterrupt
        return write(partial, case_id, writer)

    with monkeypatch.context() as patched:
        patched.setattr(batch_predict, "write_case_folder", once)
        with pytest.raises(SystemExit) as stopped:
            run_cli([*_predict(run or tiny["run"], images, out), *more])
    assert stopped.value.code == 130
    assert len(_finished(partial_folder(out))) == 1


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
    write = batch_predict.write_case_folder

    def once(partial, case_id, writer):
        if _finished(partial):
            raise KeyboardInterrupt
        return write(partial, case_id, writer)

    with monkeypatch.context() as patched:
        patched.setattr(batch_predict, "write_case_folder", once)
        with pytest.raises(SystemExit):
            run_cli(_predict(run, tiny["data"] / "images", out))
    before = json.loads((partial_folder(out) / "models.json").read_text())["weights"]
    shutil.rmtree(run)
    shutil.copytree(other, run)  # trained again, to the same step
    message = cli_error([*_predict(run, tiny["data"] / "images", out), "--resume"])
    assert "with other models or settings (weights: " in message, message
    now = json.loads(message.split("in the partial, ")[1].split(" now)")[0])
    assert len(before) == len(now) == 1 and before != now


def _stopped_after_a_bad_case(tiny, tmp_path, monkeypatch) -> tuple[Path, str, Path, Path]:
    """(images, bad case, its ADC path, out) of a --skip-bad-cases run stopped once it wrote its
    first case, the bad case's ADC moved to `tmp_path/adc.mha` (its failure listed)."""
    images = tmp_path / "images"
    shutil.copytree(tiny["data"] / "images", images)
    bad = _cases(images)[0]
    adc = next(images.glob(f"*/{bad}_adc.mha"))
    adc.rename(tmp_path / "adc.mha")
    out = tmp_path / "out"
    _interrupted(tiny, out, monkeypatch, images, "--skip-bad-cases")
    return images, bad, adc, out


def test_a_case_that_failed_before_is_retried_on_resume(tiny, tmp_path, monkeypatch, caplog):
    images, bad, adc, out = _stopped_after_a_bad_case(tiny, tmp_path, monkeypatch)
    with (partial_folder(out) / "errors.csv").open() as f:  # written at each bad case
        assert [row["case"] for row in csv.DictReader(f)] == [bad]
    (tmp_path / "adc.mha").rename(adc)
    caplog.set_level("INFO", logger="focalnet_jax.evaluation.batch_predict")
    printed = run_cli([*_predict(tiny["run"], images, out), "--skip-bad-cases", "--resume"])
    assert printed == f"wrote {CASES} cases to {out} (1 finished before the resume, skipped)\n"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"retrying 1 case that failed before: {bad}" in warnings  # printed (INFO was not)
    assert f"1 of {CASES} cases already finished, skipped; predicting the other 2" in caplog.text
    assert (out / "errors.csv").read_text() == "case,file,reason\n"
    assert_same_outputs(out, tiny["reference"], extra=("errors.csv",))


def test_a_run_stopped_by_a_bad_case_says_to_fix_it_before_resuming(tiny, tmp_path):
    """A bad case stops a run without --skip-bad-cases; the hint said only to --resume, which
    stopped at the same case again."""
    images = tmp_path / "images"
    shutil.copytree(tiny["data"] / "images", images)
    bad = _cases(images)[-1]
    adc = next(images.glob(f"*/{bad}_adc.mha"))
    adc.write_text("ObjectType = Image\n")
    out = tmp_path / "out"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as stop:
        main([str(a) for a in _predict(tiny["run"], images, out)])
    assert f"case '{bad}', file '{adc}'" in str(stop.value)
    done = len(_finished(partial_folder(out)))
    hint, error = stderr.getvalue().splitlines()[-2:]
    assert error.startswith(f"focalnet predict: error: case '{bad}'")
    assert hint == (
        f"focalnet predict: kept {plural(done, 'finished case')} in {partial_folder(out)}; fix the "
        "case below (or add --skip-bad-cases to list it in errors.csv) and run the same command "
        "with --resume to predict the others"
    )
    assert done == CASES - 1 and not out.exists()


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


def test_an_out_given_by_a_link_is_made_where_the_link_points(tmp_path):
    """`--out results` with `results -> disk/results`: the partial, the lock and the finished
    output are beside and in the folder the link points to, and the link is kept (it became the
    output folder itself, the folder it pointed to left with the earlier output)."""
    from focalnet_jax.evaluation.partial_output import partial_output

    real, link = tmp_path / "disk" / "results", tmp_path / "results"
    real.mkdir(parents=True)
    (real / "models.json").write_text("{}\n")  # an earlier output
    link.symlink_to(real)
    settings = {"models": [{"run": "r", "step": 2}], "tta": "none"}
    with pytest.raises(RuntimeError), partial_output(link, settings, resume=False, overwrite=True):
        raise RuntimeError("stopped")
    assert partial_folder(link) == real.with_name("results.partial")
    assert partial_folder(link).is_dir() and lock_file(link).parent == real.parent
    with partial_output(link, settings, resume=True, overwrite=True) as (partial, _, _):
        (partial / "case0").mkdir()
    assert link.is_symlink() and link.resolve() == real
    assert sorted(p.name for p in real.iterdir()) == ["case0", "models.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "results"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["results"]


def test_an_out_of_dot_is_made_beside_the_working_folder(tmp_path, monkeypatch):
    """`--layout picai ... --out .` ended in a ValueError traceback ('.' has an empty name)."""
    from focalnet_jax.evaluation.partial_output import partial_output

    out = tmp_path / "results"
    out.mkdir()
    monkeypatch.chdir(out)
    settings = {"models": [{"run": "r", "step": 2}], "tta": "none"}
    assert partial_folder(".") == tmp_path / "results.partial"
    with partial_output(Path("."), settings, resume=False, overwrite=False) as (partial, _, _):
        (partial / "case0").mkdir()
    assert sorted(p.name for p in out.iterdir()) == ["case0", "models.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_resume_removes_a_killed_writers_temporary_files_and_folders(tmp_path):
    """A writer killed by SIGKILL leaves `.<case>.tmp-<pid>/` folders and, mid errors.csv or
    models.json, `.<file>.tmp-<pid>` files (and an earlier version its `.predict.lock`); the run
    that resumes removes them, so `--out` ends with none of them."""
    from focalnet_jax.evaluation.partial_output import partial_output

    out, settings = tmp_path / "out", {"models": [{"run": "r", "step": 2}], "tta": "none"}
    with pytest.raises(RuntimeError), partial_output(out, settings, resume=False, overwrite=False):
        raise RuntimeError("stopped")  # the partial is kept for --resume
    partial = partial_folder(out)
    (partial / ".case0.tmp-4242").mkdir()
    (partial / ".errors.csv.tmp-4242").write_text("case,file,reason\n")
    (partial / LOCK_FILE).write_text("pid 4242 on host\n")
    with partial_output(out, settings, resume=True, overwrite=False) as (_, done, failed):
        assert (done, failed) == (set(), [])
        assert sorted(p.name for p in partial.iterdir()) == ["models.json"]
    assert sorted(p.name for p in out.iterdir()) == ["models.json"]


def test_a_partial_killed_while_emptied_or_begun_is_still_predicts(tmp_path, monkeypatch):
    """`--overwrite` empties an earlier partial entry by entry, in the file system's order; a kill
    after its models.json went left case folders without one, which every rerun refused as not
    predict's ("holds c1 but no models.json"): models.json now goes last. A run killed while
    writing its first models.json left only `.models.json.tmp-<pid>`, refused so too; now taken
    as predict's own."""
    from focalnet_jax.evaluation import partial_output as partial_lib

    out, settings = tmp_path / "out", {"models": [{"run": "r", "step": 2}], "tta": "none"}
    with (
        pytest.raises(RuntimeError),
        partial_lib.partial_output(out, settings, resume=False, overwrite=False) as (partial, _, _),
    ):
        for k in range(20):  # models.json among 21 entries in the directory's order
            (partial / f"case{k}").mkdir()
        raise RuntimeError("stopped")
    removed, remove = [], partial_lib._remove
    monkeypatch.setattr(
        partial_lib, "_remove", lambda path: (removed.append(path.name), remove(path))
    )
    with partial_lib.partial_output(out, settings, resume=False, overwrite=True) as (_, done, _):
        assert done == set()
    assert len(removed) == 21 and removed[-1] == "models.json"
    assert sorted(p.name for p in out.iterdir()) == ["models.json"]
    shutil.rmtree(out)
    partial = partial_folder(out)
    partial.mkdir()
    (partial / ".models.json.tmp-4242").write_text("{")
    message = "holds an unfinished run of focalnet predict into this --out: add --resume"
    with pytest.raises(UserError, match=message):
        with partial_lib.partial_output(out, settings, resume=False, overwrite=False):
            pass
    with partial_lib.partial_output(out, settings, resume=True, overwrite=False) as (_, done, _):
        assert done == set()
    assert sorted(p.name for p in out.iterdir()) == ["models.json"]


def test_a_candidate_threshold_written_otherwise_is_the_same_setting(tmp_path):
    """`--candidate-threshold 0.30` then `--resume --candidate-threshold 0.3` was refused
    ('"0.30" in the partial, "0.3" now'), though both are one threshold; a partial of an earlier
    version recorded the text as typed, and resumes with the same number written otherwise."""
    from focalnet_jax.evaluation.detection_map import CandidateSettings
    from focalnet_jax.evaluation.partial_output import _check_resumable, recorded_settings
    from focalnet_jax.evaluation.predictions import MODELS_FILE

    typed, plain = CandidateSettings("0.30"), CandidateSettings("0.3")
    assert recorded_settings({}, 0.5, typed) == recorded_settings({}, 0.5, plain)
    assert recorded_settings({}, 0.5, typed)["candidates"]["threshold"] == "0.3"
    earlier = recorded_settings({}, 0.5, plain)
    earlier["candidates"]["threshold"] = "0.30"  # as typed
    (tmp_path / MODELS_FILE).write_text(json.dumps(earlier))
    _check_resumable(tmp_path, recorded_settings({}, 0.5, plain))  # no error
    with pytest.raises(
        UserError, match=r'candidates\.threshold: "0\.3" in the partial, "0\.4" now'
    ):
        _check_resumable(tmp_path, recorded_settings({}, 0.5, CandidateSettings("0.4")))


def test_every_case_refused_while_found_is_listed_beside_out(tiny, tmp_path):
    """With --skip-bad-cases, a folder whose cases were all refused while finding them ended in
    "no cases to predict", their reasons nowhere; they are listed in `<out>.errors.csv`, the
    first named, and a later run that writes `out` removes that list."""
    images = tmp_path / "images"
    shutil.copytree(tiny["data"] / "images", images)
    moved = {adc: tmp_path / adc.name for adc in images.glob("*/*_adc.mha")}
    for adc, aside in moved.items():
        adc.rename(aside)
    out = tmp_path / "out"
    predict = [*_predict(tiny["run"], images, out), "--skip-bad-cases"]
    message = cli_error(predict)
    listed = tmp_path / "out.errors.csv"
    first = _cases(images)[0]
    assert message.startswith(
        f"focalnet predict: error: no cases to predict (picai layout); {CASES} refused, listed in "
        f"{listed}, first: case '{first}', file "
    )
    assert "adc image missing" in message and not out.exists()
    with listed.open() as f:
        assert [row["case"] for row in csv.DictReader(f)] == _cases(images)
    for adc, aside in moved.items():
        aside.rename(adc)
    run_cli(predict)
    assert not listed.exists() and sorted(p.name for p in out.glob("*/")) == _cases(images)


def test_a_refused_resume_keeps_the_list_of_cases_that_failed(tiny, tmp_path, monkeypatch, caplog):
    """The partial's errors.csv was removed before the resume's checks: a resume refused (here
    for other --masks) left the partial without its only record of the failed cases, and the
    next resume did not say it retried them."""
    images, bad, adc, out = _stopped_after_a_bad_case(tiny, tmp_path, monkeypatch)
    (tmp_path / "adc.mha").rename(adc)
    predict = [*_predict(tiny["run"], images, out), "--skip-bad-cases", "--resume"]
    message = cli_error([*predict, "--masks", tiny["data"] / "masks"])
    assert "was cropped around the T2w volume centre" in message
    with (partial_folder(out) / "errors.csv").open() as f:
        assert [row["case"] for row in csv.DictReader(f)] == [bad]
    run_cli(predict)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"retrying 1 case that failed before: {bad}" in warnings


@pytest.mark.parametrize("case_id", ["models.json", "Errors.csv"])
def test_a_case_named_as_a_file_of_out_is_refused_naming_it(tiny, tmp_path, case_id):
    """Safe names, but those of predict's own files beside the case folders: the run ended in
    an errno line naming no case, or the case folder took the place of errors.csv."""
    images = tiny["data"] / "images"
    rows = ["case_id,patient_id,t2w,adc"]
    for number, case in enumerate(_cases(images)[:2]):
        t2w, adc = (next(images.glob(f"*/{case}_{c}.mha")) for c in ("t2w", "adc"))
        rows.append(f"{case_id if number == 0 else case},p{number},{t2w},{adc}")
    manifest = tmp_path / "cases.csv"
    manifest.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    predict = ["predict", "--checkpoint", tiny["run"], "--layout", "manifest", "--manifest",
               manifest, "--batch-size", "2", "--out", out]  # fmt: skip
    message = cli_error(predict)
    assert message.startswith(f"focalnet predict: error: case '{case_id}', file '")
    assert message.endswith(
        f": case id '{case_id}' is the name of a file predict writes beside the case folders "
        "(models.json, errors.csv, crop_centres.json, inputs.json); give the case another id"
    )
    assert not out.exists()
    run_cli([*predict, "--skip-bad-cases"])
    with (out / "errors.csv").open() as f:
        assert [row["case"] for row in csv.DictReader(f)] == [case_id]
    assert (out / "errors.csv").is_file() and (out / "models.json").is_file()


def test_a_whole_run_into_out_of_dot_ends_well(tiny, tmp_path, monkeypatch):
    """With `--out .` the run wrote every case, then ended in a ValueError traceback looking for
    an earlier run's `<out>.errors.csv` beside '.'; that list is removed from beside the folder."""
    out = tmp_path / "results"
    out.mkdir()
    stale = tmp_path / "results.errors.csv"
    stale.write_text("case,file,reason\n")
    monkeypatch.chdir(out)
    assert run_cli(_predict(tiny["run"], tiny["data"] / "images", Path("."))) == (
        f"wrote {CASES} cases to .\n"
    )
    assert sorted(p.name for p in out.glob("*/")) == _cases(tiny["data"] / "images")
    assert not stale.exists()


def test_resume_refuses_a_finished_case_predicted_from_another_series_of_its_folder(tmp_path):
    """A manifest's `t2w_series` changed between the stopped run and its resume: the case
    finished from the first series was kept beside cases of the second, the folder's files (all
    that was recorded) being the same."""
    from focalnet_jax.data.layouts import CaseSpec
    from focalnet_jax.evaluation.partial_output import case_inputs, input_files, record_inputs

    folder = tmp_path / "t2w"
    folder.mkdir()
    (folder / "1.dcm").write_bytes(b"a slice")
    partial = tmp_path / "out.partial"
    partial.mkdir()

    def spec(series: str) -> CaseSpec:
        return CaseSpec("a", "pa", {"t2w": str(folder)}, series={"t2w": series, "adc": ""})

    record_inputs(partial, set(), {"a": case_inputs(spec("t2_tse_tra"))})
    record_inputs(partial, {"a"}, {"a": case_inputs(spec("t2_tse_tra"))})  # the same: resumed
    with pytest.raises(UserError) as refused:
        record_inputs(partial, {"a"}, {"a": case_inputs(spec("B_flipped"))})
    # ... and a refusal names the file that changed, not the series it did not record.
    (partial / "inputs.json").write_text(json.dumps({"a": input_files({"t2w": str(folder)})}))
    (folder / "2.dcm").write_bytes(b"another slice")
    with pytest.raises(UserError, match=r"was predicted from another t2w \(1 file, "):
        record_inputs(partial, {"a"}, {"a": case_inputs(spec("B_flipped"))})
    assert str(refused.value) == (
        f"--resume: case a of {partial} was predicted from another t2w_series (series t2_tse_tra; "
        "now series B_flipped); resume with the same input files, or add --overwrite (without "
        "--resume) to start over"
    )
    # A partial of an earlier version recorded the files alone: compared on those.
    (partial / "inputs.json").write_text(json.dumps({"a": input_files({"t2w": str(folder)})}))
    record_inputs(partial, {"a"}, {"a": case_inputs(spec("B_flipped"))})


def test_the_failed_cases_of_a_partial_are_read_where_a_file_name_is_no_utf8(tmp_path):
    """errors.csv holds such a name as its bytes; read strictly, `--resume` ended in a
    UnicodeDecodeError traceback."""
    from focalnet_jax.data.store import write_errors
    from focalnet_jax.evaluation.partial_output import ERRORS_FILE, _failed_before

    write_errors(tmp_path / ERRORS_FILE, [("c1", "/x/caf\udce9.raw", "not found")])
    assert b"caf\xe9.raw" in (tmp_path / ERRORS_FILE).read_bytes()
    assert _failed_before(tmp_path) == ["c1"]
