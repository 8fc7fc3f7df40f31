"""Training configs `train`, `cv` and `study run` refuse in one line before training: a missing
store or a batch the devices cannot share, folds that are no integers or outside
data.num_folds, a fold or store given two ways that disagree, a config file that is none, and
settings out of range (`TRAIN_SETTING_ERRORS`)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cli_refusals import DEMO, _run
from test_train_helpers import REPO, TINY, cpu_devices_env


def _train_subprocess(tmp_path, *overrides, devices=1):
    argv = ["train", f"--config={REPO / 'configs' / 'focalnet.py'}", f"--workdir={tmp_path / 'w'}"]
    return subprocess.run(
        [sys.executable, "-m", "focalnet_jax.cli", *argv, *TINY, *overrides],
        capture_output=True,
        text=True,
        env=cpu_devices_env(devices),
        timeout=300,
    )


def _assert_user_error(result, line):
    """Exit 2, no traceback, the error as the last line (the lines before it are the log line
    that names the devices)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == line
    assert all("focalnet_jax" in log for log in result.stderr.splitlines()[:-1])


def test_train_missing_store_and_indivisible_batch(tmp_path):
    missing = tmp_path / "nostore"
    result = _train_subprocess(tmp_path, f"--config.data.store={missing}")
    _assert_user_error(result, f"focalnet train: error: store {missing} does not exist")
    result = _train_subprocess(tmp_path, "--config.train.batch_size=3", devices=2)
    _assert_user_error(
        result,
        "focalnet train: error: train.batch_size=3 is not divisible by the 2 devices of the "
        "'data' mesh (1 processes x 2 local devices); choose a multiple of the device count",
    )
    assert not (tmp_path / "w").exists()


def test_cv_folds_that_are_not_integers(capsys):
    status, err = _run(["cv", "--config", "c.py", "--workdir", "w", "--folds", "1,a"], capsys)
    assert status == 2
    assert err.splitlines()[-1] == (
        "focalnet cv: error: argument --folds: expected comma-separated integers, got '1,a'"
    )
    # `--folds 0,0` trained fold 0, resumed it as done and printed "trained folds [0, 0]".
    status, err = _run(["cv", "--config", "c.py", "--workdir", "w", "--folds", "0,2,0"], capsys)
    assert status == 2
    assert err.splitlines()[-1] == (
        "focalnet cv: error: argument --folds: '0,2,0' names fold(s) [0] more than once"
    )


def test_cv_refuses_a_fold_outside_num_folds_before_training_any(tmp_path, capsys):
    """`cv --folds 0,7` with 5 folds trained fold 0 to the end, then stopped at fold 7."""
    argv = ["cv", "--config", str(REPO / "configs" / "focalnet.py"), "--workdir", str(tmp_path)]
    argv += ["--folds", "0,7", "--config.data.store=nostore"]
    status, err = _run(argv, capsys)
    assert (status, err.splitlines()[-1]) == (
        2,
        "focalnet cv: error: --folds 7: not in [0, data.num_folds=5)",
    )
    assert list(tmp_path.iterdir()) == []


def test_cv_refuses_a_fold_run_of_another_config_before_training_any(tmp_path, capsys):
    """`cv --folds 0,1` where fold1 holds a run trained with another learning rate: refused
    before fold 0 starts (fold 0 was trained to the end, then fold 1 refused)."""
    from focalnet_jax.config_loading import load_config
    from focalnet_jax.run import workdir as workdir_lib

    config_file = str(REPO / "configs" / "focalnet.py")
    store = tmp_path / "nostore"
    saved = load_config(config_file, [f"--config.data.store={store}", "--config.optim.lr=0.5"])
    saved.data.fold = 1
    (tmp_path / "cv" / "fold1" / "checkpoints" / "10").mkdir(parents=True)
    workdir_lib.save_config(saved, tmp_path / "cv" / "fold1")
    argv = ["cv", "--config", config_file, "--workdir", str(tmp_path / "cv"), "--folds", "0,1"]
    status, err = _run([*argv, f"--config.data.store={store}"], capsys)
    line = err.splitlines()[-1]
    assert status == 2
    assert line.startswith(
        f"focalnet cv: error: fold 1: workdir {tmp_path / 'cv' / 'fold1'}: it was trained with "
        "another config; config keys differ from its config.json: optim.lr 0.5 -> 0.001 ("
    )
    assert sorted(p.name for p in (tmp_path / "cv").iterdir()) == ["fold1"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cv", "--fold", "2"],
         "--fold 2: cv trains every fold, or those of --folds (e.g. --folds 2)"),
        (["cv", "--config.data.fold=2"],
         "--config.data.fold=2: cv trains every fold, or those of --folds (e.g. --folds 2)"),
        (["train", "--fold", "1", "--config.data.fold=2"],
         "--fold 1 and --config.data.fold=2 disagree"),
    ],
)  # fmt: skip
def test_a_fold_that_would_be_overruled_is_refused(argv, message, tmp_path, capsys):
    """`cv` sets each fold itself and `--fold` would win over `--config.data.fold`: refused, not
    silently ignored."""
    config = str(REPO / "configs" / "focalnet.py")
    command, *rest = argv
    status, err = _run([command, "--config", config, "--workdir", str(tmp_path), *rest], capsys)
    assert (status, err.splitlines()[-1]) == (2, f"focalnet {command}: error: {message}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("command", "rest", "message"),
    [
        ("cv", [], "--config {}: cv trains every fold, or those of --folds (e.g. --folds 2)"),
        ("train", ["--fold", "1"], "--fold 1 and --config {} disagree"),
        ("train", ["--config.data.fold=1"], "--config.data.fold=1 and --config {} disagree"),
        # --fold agreeing with one of the two others overruled the third.
        ("train", ["--fold", "1", "--config.data.fold=1"], "--fold 1 and --config {} disagree"),
        ("train", ["--fold", "2", "--config.data.fold=1"],
         "--fold 2 and --config.data.fold=1 disagree"),
    ],
)  # fmt: skip
def test_a_fold_of_the_config_arg_that_would_be_overruled_is_refused(
    command, rest, message, tmp_path, capsys
):
    """`cv --config configs/focalnet.py:fold=2` trained every fold, `train ...:fold=2 --fold 1`
    fold 1, `train ...:fold=2 --config.data.fold=1` (with or without `--fold 1`) fold 1, the fold
    the config file was asked for silently ignored."""
    config = f"{REPO / 'configs' / 'focalnet.py'}:fold=2"
    status, err = _run([command, "--config", config, "--workdir", str(tmp_path), *rest], capsys)
    expected = f"focalnet {command}: error: {message.format(config)}"
    assert (status, err.splitlines()[-1]) == (2, expected)
    assert list(tmp_path.iterdir()) == []


def test_a_fold_of_the_config_arg_written_with_a_sign_agrees_with_the_same_fold(tmp_path, capsys):
    """`configs/focalnet.py:fold=+1` trains fold 1; with `--fold 1` it was refused as
    disagreeing ('+1' compared as text)."""
    config = f"{REPO / 'configs' / 'focalnet.py'}:fold=+1"
    store = tmp_path / "nostore"
    argv = ["train", "--config", config, "--workdir", str(tmp_path / "w"), "--fold", "1"]
    status, err = _run([*argv, f"--config.data.store={store}"], capsys)
    assert (status, err.splitlines()[-1]) == (
        2,
        f"focalnet train: error: store {store} does not exist",
    )


def test_a_store_of_the_config_arg_that_would_be_overruled_is_refused(tmp_path, capsys):
    """`configs/picai.py:fold=0,store=A --config.data.store=B` trained on B, the store the config
    file was given silently ignored; the same folder written two ways agrees."""
    config = f"{REPO / 'configs' / 'picai.py'}:fold=0,store={tmp_path / 'a'}"
    argv = ["train", "--config", config, "--workdir", str(tmp_path / "w")]
    status, err = _run([*argv, f"--config.data.store={tmp_path / 'b'}"], capsys)
    assert (status, err.splitlines()[-1]) == (
        2,
        f"focalnet train: error: --config {config} and --config.data.store={tmp_path / 'b'} "
        "disagree",
    )
    status, err = _run([*argv, f"--config.data.store={tmp_path / 'x' / '..' / 'a'}"], capsys)
    assert (status, err.splitlines()[-1]) == (
        2,
        f"focalnet train: error: store {tmp_path / 'a'} does not exist",
    )
    assert list(tmp_path.iterdir()) == []


BAD_CONFIG_FILES = [  # (file name, text, the message after "config file <path>: ")
    ("config.txt", "x = 1\n", "not a Python file (expected a .py file with get_config())"),
    ("broken.py", "import ml_collections\n\ndef get_config(:\n", "syntax error at line 3: "),
    ("empty.py", "x = 1\n", "defines no get_config() function"),
    ("number.py", "def get_config():\n    return 3\n",
     "get_config() returned int, not a ConfigDict"),
    # Any other error of the file's own code ended in a traceback.
    ("name_error.py", "import ml_collections\n\nx = undefined_name\n",
     "NameError at {path}:3: name 'undefined_name' is not defined"),
    ("misspelled.py", "import ml_collections\n\ndef get_config():\n"
     "    config = ml_collections.ConfigDict({'train': {'steps': 1}})\n"
     "    return config.train.stepz\n",
     "get_config(): AttributeError at {path}:5: "),
]  # fmt: skip


@pytest.mark.parametrize(("name", "text", "reason"), BAD_CONFIG_FILES)
def test_train_and_study_with_a_bad_config_file(tmp_path, capsys, name, text, reason):
    path = tmp_path / name
    path.write_text(text)
    reason = reason.format(path=path)
    status, err = _run(["train", "--config", str(path), "--workdir", str(tmp_path / "w")], capsys)
    assert status == 2 and err.splitlines()[-1].startswith(
        f"focalnet train: error: config file {path}: {reason}"
    )
    argv = ["study", "run", "--spec", str(path), "--workdir", str(tmp_path / "s"), "--dry-run"]
    status, err = _run(argv, capsys)
    assert status == 2 and err.splitlines()[-1].startswith(
        f"focalnet study run: error: spec {path}: {reason}"
    )
    assert not (tmp_path / "w").exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize("command", ["train", "cv"])
def test_a_study_spec_or_another_config_given_to_train_is_a_one_line_error(
    command, tmp_path, capsys
):
    """`train --config configs/studies/bosma22.py` (study specs sit beside the training configs)
    ended in an AttributeError traceback ("'seed'"), and with `--config.data.store=S` said only
    "unknown config key 'data'"; a config of none of the sections training reads did the same."""
    spec = str(REPO / "configs" / "studies" / "bosma22.py")
    workdir = str(tmp_path / "w")
    for extra in ([], ["--config.data.store=s"]):
        status, err = _run([command, "--config", spec, "--workdir", workdir, *extra], capsys)
        assert (status, err.splitlines()[-1]) == (
            2,
            f"focalnet {command}: error: config file {spec}: a study spec (it names a base config "
            f"and arms), not a training config: run it with `focalnet study run --spec {spec}`",
        )
    other = tmp_path / "other.py"
    other.write_text(
        "import ml_collections\n\ndef get_config():\n"
        "    return ml_collections.ConfigDict({'seed': 0, 'model': {}})\n"
    )
    status, err = _run([command, "--config", str(other), "--workdir", workdir], capsys)
    assert (status, err.splitlines()[-1]) == (
        2,
        f"focalnet {command}: error: not a training config: it has no data, loss, train, augment, "
        "optim (a training config starts from configs/default.py)",
    )
    assert not (tmp_path / "w").exists()


def test_a_config_folder_is_not_said_to_be_missing(tmp_path, capsys):
    """`--config configs` read 'config file configs does not exist'."""
    status, err = _run(["train", "--config", str(tmp_path), "--workdir", "w"], capsys)
    expected = f"focalnet train: error: config file {tmp_path}: a folder, not a Python file with "
    assert (status, err.splitlines()[-1]) == (2, expected + "get_config()")


DEFAULT = str(REPO / "configs" / "default.py")
TRAIN_SETTING_ERRORS = [  # (arguments after `train --workdir W`, the message)
    (["--config", f"{DEMO}:fold=abc"],
     f"config file {DEMO}: get_config('fold=abc'): config arg fold='abc': expected an integer"),
    # Its arg was ignored: `default.py:fold=2` trained fold 0.
    (["--config", f"{DEFAULT}:fold=2", "--config.data.store=s"],
     f"config file {DEFAULT}: get_config('fold=2'): config arg 'fold' unknown; this file takes "
     "none"),
    (["--config", DEMO, "--config.train.stepz=3"],
     "--config.train.stepz: unknown config key 'train.stepz'"),
    (["--config", DEMO, "--config.data.store=s", "--config.train.batch_size=0"],
     "train.batch_size=0: must be positive"),
    (["--config", DEMO, "--config.data.store=s", "--config.train.batch_size=-2"],
     "train.batch_size=-2: must be positive"),
    # Ended in numpy's traceback "expected non-negative integer" once the store was read.
    (["--config", DEMO, "--config.data.store=s", "--config.data.fold_seed=-1"],
     "data.fold_seed: expected an int >= 0, got -1"),
    (["--config", DEMO],
     "data.store is not set: give the preprocessed store with --config.data.store=STORE"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), TRAIN_SETTING_ERRORS)
def test_train_setting_errors(tmp_path, capsys, args, message):
    status, err = _run(["train", "--workdir", str(tmp_path / "w"), *args], capsys)
    assert (status, err.splitlines()[-1]) == (2, f"focalnet train: error: {message}")
    assert not (tmp_path / "w").exists()
