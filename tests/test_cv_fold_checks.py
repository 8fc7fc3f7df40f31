"""`focalnet cv` checks the start of every fold it is asked for (`run_start.check_run_start`, the
checks of `focalnet train` that need no training) before the first fold trains: a later fold's run
whose recorded store or cases differ, or whose checkpoint lies past the new step count, is refused
in one line, `fold <k>: ` and the message `train` gives for that fold; no fold trains. It was
found only once the earlier folds had trained. So are a fold run outside `--folds` of another
config and a fold another process trains now."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from test_train_helpers import REPO, TINY, FakeStore, small_synthetic_store

from focalnet_jax import cli
from focalnet_jax.config_loading import load_config
from focalnet_jax.data.run_store import record_run_store
from focalnet_jax.data.store import open_store
from focalnet_jax.run import RunSpec
from focalnet_jax.run import workdir as workdir_lib

CONFIG = str(REPO / "configs" / "focalnet.py")
RUN = [*TINY, "--config.data.num_folds=2", "--config.data.slices=all", "--config.train.steps=10"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """4 synthetic cases of 6 slices: 2 folds of 2 cases."""
    return small_synthetic_store(tmp_path_factory.mktemp("cv_checks"), cases=4, seed=3)


def _fold_config(store, fold: int, *extra: str):
    config = load_config(CONFIG, [*RUN, f"--config.data.store={store}", *extra])
    config.data.fold = fold
    return workdir_lib.absolute_paths(config)


def _checkpoint_at(fold_dir, step: int) -> None:
    """A checkpoint at `step` in `fold_dir` (a small tree; the checks read no array)."""
    from focalnet_jax.training import checkpoint

    manager = workdir_lib.make_manager(fold_dir)
    checkpoint.save(manager, step, {"step": np.int32(step)}, newer_than=0)
    manager.wait_until_finished()
    manager.close()


def _past_the_end(fold_dir, store) -> str:
    """A fold run trained to step 20: its config.json and a checkpoint at step 20."""
    workdir_lib.save_config(_fold_config(store, 1, "--config.train.steps=20"), fold_dir)
    _checkpoint_at(fold_dir, 20)
    return (
        f"workdir {fold_dir}: its checkpoint is at step 20, past the 10 steps of this config "
        "(train.steps=10); a resumed run may extend its training, not shorten it: give at least "
        "20 steps, or train this config in another workdir"
    )


def _other_store(fold_dir, store) -> str:
    """A fold run recorded on a store of other settings, with its config.json and a checkpoint (a
    workdir without one starts a new run)."""
    workdir_lib.save_config(_fold_config(store, 1), fold_dir)
    record_run_store(fold_dir, FakeStore())
    _checkpoint_at(fold_dir, 5)
    return (
        f"run {fold_dir} was trained on store memory:/fake-store, made with other settings than "
        f"store {store}: "
    )


def _other_cases(fold_dir, store) -> str:
    """fold1/ holds a run that recorded fold 0's training and validation cases, with its
    config.json and a checkpoint."""
    workdir_lib.save_config(_fold_config(store, 1), fold_dir)
    opened = open_store(store)
    split = RunSpec.from_config(_fold_config(store, 0)).fold_split(opened)
    record_run_store(fold_dir, opened, split=split)
    _checkpoint_at(fold_dir, 5)
    return (
        f"run {fold_dir}: store {store} gives other train cases than the run recorded (2 recorded, "
        "2 now; 4 differ): resume on the store it trained on"
    )


def _error_line(argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    err = capsys.readouterr().err
    assert raised.value.code == 2 and "Traceback" not in err, err
    return err.splitlines()[-1]


def _cv_error(cv: Path, flags: list[str], capsys, monkeypatch, folds: str = "0,1") -> str:
    """`focalnet cv --folds FOLDS`'s error line; no fold may train."""
    import focalnet_jax.training

    def train_and_evaluate(config, workdir):  # nothing may train: it names the fold that did
        raise AssertionError(f"{workdir} trained")

    monkeypatch.setattr(focalnet_jax.training, "train_and_evaluate", train_and_evaluate)
    argv = ["cv", "--config", CONFIG, "--workdir", str(cv), "--folds", folds, *flags]
    return _error_line(argv, capsys)


@pytest.mark.parametrize("make_fold_run", [_past_the_end, _other_store, _other_cases])
def test_cv_refuses_a_later_folds_run_before_any_fold_trains(
    make_fold_run, store, tmp_path, capsys, monkeypatch
):
    cv, flags = tmp_path / "cv", [*RUN, f"--config.data.store={store}"]
    message = make_fold_run(cv / "fold1", store)
    train = ["train", "--config", CONFIG, "--workdir", str(cv / "fold1"), "--fold", "1", *flags]
    assert _error_line(train, capsys).startswith(f"focalnet train: error: {message}")
    error = _cv_error(cv, flags, capsys, monkeypatch)
    assert error.startswith(f"focalnet cv: error: fold 1: {message}")
    assert sorted(p.name for p in cv.iterdir()) == ["fold1"]


def test_cv_refuses_a_fold_run_outside_folds_trained_with_another_config(
    store, tmp_path, capsys, monkeypatch
):
    """`cv --folds 0` beside a fold1 trained with another fold seed: fold 0 was trained into the
    folder, and `summarize` averaged folds whose validation cases overlap."""
    cv, fold1 = tmp_path / "cv", tmp_path / "cv" / "fold1"
    workdir_lib.save_config(_fold_config(store, 1, "--config.data.fold_seed=1"), fold1)
    _checkpoint_at(fold1, 5)
    error = _cv_error(cv, [*RUN, f"--config.data.store={store}"], capsys, monkeypatch, "0")
    assert error.startswith(
        f"focalnet cv: error: fold 1 (already in {cv}): workdir {fold1}: it was trained with "
        "another config; config keys differ from its config.json: data.fold_seed 1 -> 0 "
    )
    assert sorted(p.name for p in cv.iterdir()) == ["fold1"]


@pytest.mark.parametrize("make_fold_run", [_other_store, _other_cases])
def test_cv_refuses_a_fold_run_outside_folds_recorded_on_other_cases_or_store(
    make_fold_run, store, tmp_path, capsys, monkeypatch
):
    """`cv --folds 0` beside a fold1 of the same config recorded on other cases (a rewritten
    `data.splits` folder, another `data.store`: keys a resume may change): fold 0 trained, and
    cases were validated in both folds."""
    cv, flags = tmp_path / "cv", [*RUN, f"--config.data.store={store}"]
    message = make_fold_run(cv / "fold1", store)
    error = _cv_error(cv, flags, capsys, monkeypatch, "0")
    assert error.startswith(f"focalnet cv: error: fold 1 (already in {cv}): {message}")
    assert sorted(p.name for p in cv.iterdir()) == ["fold1"]


def test_cv_trains_beside_a_fold_run_outside_folds_that_saved_no_checkpoint(
    store, tmp_path, capsys, monkeypatch
):
    """A fold1 killed before its first save (its store.json of another store) starts over when it
    is trained, so it does not block `cv --folds 0`; nor does a fold5 of an earlier 6-fold cv."""
    cv, flags = tmp_path / "cv", [*RUN, f"--config.data.store={store}"]
    workdir_lib.save_config(_fold_config(store, 1), cv / "fold1")
    record_run_store(cv / "fold1", FakeStore())
    workdir_lib.save_config(_fold_config(store, 1, "--config.data.num_folds=6"), cv / "fold5")
    with pytest.raises(AssertionError, match=f"^{cv / 'fold0'} trained$"):
        _cv_error(cv, flags, capsys, monkeypatch, "0")


def test_every_fold_refusal_of_cv_names_the_fold_as_the_readme_says(
    store, tmp_path, capsys, monkeypatch
):
    """A fold run trained with another config was refused as `workdir …/fold1: …`, and a fold
    of --folds outside num_folds as `data.fold=5 not in …`, a key the user never set."""
    cv, fold1 = tmp_path / "cv", tmp_path / "cv" / "fold1"
    workdir_lib.save_config(_fold_config(store, 1, "--config.data.fold_seed=1"), fold1)
    _checkpoint_at(fold1, 5)
    flags = [*RUN, f"--config.data.store={store}"]
    assert _cv_error(cv, flags, capsys, monkeypatch, "0,1").startswith(
        f"focalnet cv: error: fold 1: workdir {fold1}: it was trained with another config; "
    )
    num_folds = _fold_config(store, 0).data.num_folds
    assert _cv_error(cv, flags, capsys, monkeypatch, f"0,{num_folds}") == (
        f"focalnet cv: error: --folds {num_folds}: not in [0, data.num_folds={num_folds})"
    )


def test_cv_refuses_a_fold_being_trained_before_any_fold_trains(
    store, tmp_path, capsys, monkeypatch
):
    """A fold another job trains (a `slurm_folds.sh` task) was refused once the folds before it
    had trained, hours later."""
    from focalnet_jax.file_lock import acquire_lock, release_lock
    from focalnet_jax.training.run_start import LOCK_FILE

    cv, fold1 = tmp_path / "cv", tmp_path / "cv" / "fold1"
    fold1.mkdir(parents=True)
    lock = acquire_lock(fold1 / LOCK_FILE)
    try:
        error = _cv_error(cv, [*RUN, f"--config.data.store={store}"], capsys, monkeypatch)
    finally:
        release_lock(lock)
    assert error == (
        f"focalnet cv: error: workdir {fold1} is being trained by pid {os.getpid()} on "
        f"{socket.gethostname()}: wait for that run to end, or train in another --workdir"
    )
    assert sorted(p.name for p in cv.iterdir()) == ["fold1"]


def test_cv_refuses_a_later_fold_whose_automatic_lambda_is_undefined(
    store, tmp_path, capsys, monkeypatch
):
    """`loss.mfl_weight='auto'` over fold 1's training slices, none with a lesion: lambda = 1 / 0.
    It was computed when fold 1 started, after fold 0 had trained."""
    lesion_free = tmp_path / "store"
    shutil.copytree(store, lesion_free)
    rows = RunSpec.from_config(_fold_config(lesion_free, 1)).fold_split(open_store(lesion_free))
    for name in ("classes", "lesions"):
        array = np.load(lesion_free / f"{name}.npy", mmap_mode="r+")
        array[rows.train_rows] = 0
        array.flush()
    cv = tmp_path / "cv"
    error = _cv_error(cv, [*RUN, f"--config.data.store={lesion_free}"], capsys, monkeypatch)
    assert error == (
        f"focalnet cv: error: fold 1: loss.mfl_weight='auto': the {len(rows.train_rows)} training "
        f"slices of data.fold=1 in store {lesion_free}: labels: no positive target bits, so "
        "lambda = 1 / ratio is undefined; set loss.mfl_weight to a number"
    )
    assert not cv.exists()


@pytest.mark.parametrize("missing", [False, True])
def test_cv_store_errors_name_no_fold(missing, tmp_path, capsys):
    """The store is every fold's: its error was led by `fold 0: `."""
    absent = tmp_path / "nostore"
    flags = [f"--config.data.store={absent}"] if missing else []
    argv = ["cv", "--config", CONFIG, "--workdir", str(tmp_path / "cv"), "--folds", "0,1"]
    message = (
        f"store {absent} does not exist"
        if missing
        else "data.store is not set: give the preprocessed store with --config.data.store=STORE"
    )
    assert _error_line([*argv, *RUN, *flags], capsys) == f"focalnet cv: error: {message}"
    assert not (tmp_path / "cv").exists()


def test_all_slices_of_a_store_of_the_annotated_slices_alone_are_refused(tmp_path):
    """A store made with `--slices annotated` has no lesion-free slice or case: a run of
    `data.slices=all` on it trained on the annotated slices alone, its config.json and start line
    saying "all"."""
    from focalnet_jax.errors import UserError
    from focalnet_jax.training import sharding
    from focalnet_jax.training.run_start import check_run_start

    store = FakeStore()
    store.settings = {**store.settings, "slices": "annotated"}
    overrides = ["--config.loss.mfl=false", "--config.data.store=unused"]
    config = load_config(str(REPO / "configs" / "focalnet.py"), [*TINY, *overrides])
    config.data.slices = "annotated"
    check_run_start(config, tmp_path / "annotated", sharding.make_mesh(), store=store)
    config.data.slices = "all"
    with pytest.raises(UserError) as refused:
        check_run_start(config, tmp_path / "all", sharding.make_mesh(), store=store)
    assert str(refused.value) == (
        f"store {store.path} holds only the annotated slices (preprocess --slices annotated; no "
        "lesion-free case): data.slices=all would train on those alone; preprocess with --slices "
        "all, or set data.slices=annotated"
    )
