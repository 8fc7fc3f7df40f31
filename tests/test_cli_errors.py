"""Every user error of every `focalnet` command: one line `focalnet <command>: error: <message>` on
stderr and exit status 2; `--verbose` (before or after the command) adds the traceback; internal
errors keep theirs."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_helpers import REPO, TINY, cpu_devices_env

from focalnet_jax import cli


def _run(argv, capsys):
    """(exit status, stderr) of the CLI in this process."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    return raised.value.code, capsys.readouterr().err


def test_missing_store_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    status, err = _run(["folds", "--store", str(missing)], capsys)
    assert status == 2
    assert err == f"focalnet folds: error: store {missing} does not exist\n"


def test_package_error_classes_are_user_errors():
    """Each module's own bad-input error is a `UserError`, so the CLI prints it as one line."""
    from focalnet_jax.data.dicom import SeriesError
    from focalnet_jax.data.io import CaseError
    from focalnet_jax.errors import UserError, is_user_error
    from focalnet_jax.evaluation.predictions import PredictionsError
    from focalnet_jax.run.workdir import UnreadableCheckpointError

    errors = (
        CaseError("c1", "t2w.mha", "truncated"),
        SeriesError("adc", "two series"),
        PredictionsError("c1.npz: no scores"),
        UnreadableCheckpointError(Path("ckpt/5"), "empty metadata"),
    )
    for error in errors:
        assert isinstance(error, UserError) and is_user_error(error)
    assert is_user_error(FileNotFoundError("x")) and is_user_error(FileExistsError("x"))
    assert is_user_error(PermissionError(13, "Permission denied", "out"))
    assert is_user_error(OSError(errno.EFBIG, "File too large", "out/a.npy"))  # `ulimit -f`
    assert not is_user_error(PermissionError(errno.EPERM, "Operation not permitted"))  # os.kill
    assert is_user_error(OSError(errno.ENOSPC, "No space left on device", "out/a.npy"))
    assert not is_user_error(OSError(errno.EIO, "Input/output error", "out/a.npy"))
    assert not is_user_error(ValueError("a bug")) and not is_user_error(KeyError("k"))


def test_an_unknown_flag_names_the_command_and_shows_its_usage(capsys):
    status, err = _run(["folds", "--store", "s", "--seeed", "1"], capsys)
    lines = err.splitlines()
    assert status == 2 and lines[0].startswith("usage: focalnet folds [-h]")
    assert lines[-1] == "focalnet folds: error: unrecognized arguments: --seeed 1"


class _Cyclic:
    """An object in a reference cycle with itself: only the garbage collector frees it."""

    def __init__(self):
        self.itself = self


def test_a_ctrl_c_inside_a_garbage_collector_callback_is_raised_once_it_returns():
    """Python prints an exception raised in a gc callback as ignored and drops it: a Ctrl-C that
    came while JAX's ran (late in `evaluate`) was dropped, and the command ended with status 0."""
    import gc
    import os
    import signal
    import time
    import weakref

    from focalnet_jax.errors import ctrl_c_never_dropped

    sent = []

    def callback(phase, info):
        if phase == "start" and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # its handler runs here, inside the callback

    # Only the explicit collections below: an automatic one (after other tests' allocations)
    # outside the blocks would send the interrupt where nothing keeps it.
    was_enabled = gc.isenabled()
    gc.disable()
    gc.callbacks.append(callback)
    try:
        with ctrl_c_never_dropped():
            with pytest.raises(KeyboardInterrupt):
                gc.collect()
                time.sleep(5.0)  # the interrupt comes 0.02 s into it
        sent.clear()
        with pytest.raises(KeyboardInterrupt), ctrl_c_never_dropped():
            gc.collect()  # the block ends before the interrupt's 0.02 s: raised as it ends
        # The collection still runs weakref callbacks of its garbage at 0.02 s: the interrupt
        # waits for the collection's end (raised in one, it was dropped: in a test run after
        # others, whose garbage was collected here).
        sent.clear()
        refs = [weakref.ref(_Cyclic(), lambda ref: time.sleep(0.05)) for _ in range(3)]
        with ctrl_c_never_dropped():
            with pytest.raises(KeyboardInterrupt):
                gc.collect()
                assert [ref() for ref in refs] == [None] * 3
                time.sleep(5.0)
    finally:
        gc.callbacks.remove(callback)
        if was_enabled:
            gc.enable()
    assert sent and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # An alarm of another's is not taken for a Ctrl-C: it goes to the handler there before.
    alarms = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: alarms.append(signum))
    try:
        with ctrl_c_never_dropped():
            os.kill(os.getpid(), signal.SIGALRM)
        assert alarms == [signal.SIGALRM]
    finally:
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict", "--checkpiont", "runs/x", "--t2w", "t2w", "--out", "o"],
         "focalnet predict: error: the following arguments are required: --checkpoint (not "
         "recognized: --checkpiont)"),
        (["evaluate", "--wrkdir=runs/x"],
         "focalnet evaluate: error: one of the arguments --predictions --workdir is required (not "
         "recognized: --wrkdir)"),
        (["study", "status", "--workdr", "w"],
         "focalnet study status: error: the following arguments are required: --workdir (not "
         "recognized: --workdr)"),
        # A required flag missing, nothing misspelt (`--ou`: argparse takes it for `--out`).
        (["predict", "--t2w", "t2w", "--ou", "o"],
         "focalnet predict: error: the following arguments are required: --checkpoint"),
    ],
)  # fmt: skip
def test_a_misspelt_required_flag_is_named(argv, message, capsys):
    """`predict --checkpiont` said only that --checkpoint is required, hiding the typo."""
    status, err = _run(argv, capsys)
    assert (status, err.splitlines()[-1]) == (2, message)


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_shows_the_traceback(tmp_path, capsys, where):
    args = ["folds", "--store", str(tmp_path / "nowhere")]
    argv = ["--verbose", *args] if where == "before" else [*args, "--verbose"]
    status, err = _run(argv, capsys)
    lines = err.splitlines()
    assert status == 2 and lines[0] == "Traceback (most recent call last):"
    assert "FileNotFoundError" in lines[-2]
    missing = tmp_path / "nowhere"
    assert lines[-1] == f"focalnet folds: error: store {missing} does not exist"


FLAG_ERRORS = [  # (argv, the message after "focalnet <command>: error: ")
    (["synth", "--out", "x", "--cases", "0"], "--cases 0: expected at least 1"),
    # A negative seed ended in numpy's traceback "expected non-negative integer".
    (["synth", "--out", "x", "--cases", "1", "--seed", "-1"],
     "--seed -1: expected 0 to 4294967295"),
    # numpy reads a seed of 2**32 or more as words: case 0 of 7 + 2**32 was case 1 of seed 7.
    (["synth", "--out", "x", "--cases", "1", "--seed", str(7 + 2**32)],
     "--seed 4294967303: expected 0 to 4294967295"),
    (["folds", "--store", "s", "--seed", "-1"], "--seed -1: expected 0 or more"),
    # A NaN share passed every comparison: no lesion was visible in T2w or ADC only.
    (["synth", "--out", "x", "--cases", "1", "--t2w-only-share", "nan"],
     "lesion visibility shares (the --*-only-share options) t2w-only nan + adc-only 0.15 = nan: "
     "expected each >= 0, summing to <= 1"),
    (["synth", "--out", "x", "--cases", "1", "--components", "t2w,adc,hbv,dce",
      "--t2w-only-share", "0.5", "--adc-only-share", "0.4"],
     "lesion visibility shares (the --*-only-share options) t2w-only 0.5 + adc-only 0.4 + "
     "dce-only 0.15 = 1.05: expected each >= 0, summing to <= 1"),
    # Taken, and ignored: without DCE no lesion can be shown in DCE only.
    (["synth", "--out", "x", "--cases", "1", "--dce-only-share", "0.3"],
     "--dce-only-share 0.3: --components t2w,adc,hbv has no dce, so no lesion is shown in DCE "
     "only; add dce or leave the flag out"),
    # Taken: the lesions shown only in ADC/HBV were labelled and in no image.
    (["synth", "--out", "x", "--cases", "1", "--components", "t2w,dce", "--adc-only-share", "0.2"],
     "--adc-only-share 0.2: --components t2w,dce has no adc or hbv, so no lesion is shown in ADC "
     "only; add adc or leave the flag out"),
    (["summarize", "--runs", "nodir", "--out", "o"], "--runs expects NAME=DIR, got 'nodir'"),
    (["evaluate", "--predictions", "p"], "--out is required with --predictions"),
    (["predict", "--checkpoint", "c", "--t2w", "t", "--adc", "a", "--out", "o", "--center", "1"],
     "--center expects x,y,z, got '1'"),
    (["predict", "--checkpoint", "c", "--t2w", "t", "--adc", "a", "--out", "o", "--center-ras",
      "1,2"], "--center-ras expects x,y,z, got '1,2'"),
    (["predict", "--checkpoint", "c", "--layout", "picai", "--images", "i", "--out", "o",
      "--center-ras", "1,2,3"], "--center-ras is for one exam; --layout picai reads its exams "
     "from --images"),
    (["preprocess", "--layout", "manifest", "--out", "o"], "--layout manifest needs --manifest"),
    (["predict", "--checkpoint", "c", "--t2w", "t", "--adc", "a", "--out", "o", "--hbv-series",
      "1.2"], "--hbv-series UID names a series of --hbv PATH, which is not given"),
    (["predict", "--checkpoint", "c", "--layout", "picai", "--images", "i", "--out", "o",
      "--adc-series", "1.2"],
     "--adc-series UID is for one exam; a manifest chooses series in its <component>_series "
     "columns"),
    # A file system's root: a ValueError traceback naming the lock beside it.
    (["synth", "--out", "/", "--cases", "1"],
     "--out /: a file system's root cannot be an output folder"),
    (["summarize", "--runs", "A=r", "--out", "/"],
     "--out /: a file system's root cannot be an output folder"),
    (["evaluate", "--predictions", "p", "--out", "/"],
     "--out /: a file system's root cannot be an output folder"),
    # Flags out of range: refused before any model is loaded or file written.
    (["evaluate", "--workdir", "w", "--batch-size", "0"],
     "--batch-size 0: expected 1 to 1024 slices per model call (each case's last batch is padded "
     "to it)"),
    # 100000 padded a 7-slice case to 7.4 GB: XLA aborted, a temporary folder left behind.
    (["evaluate", "--workdir", "w", "--batch-size", "100000"],
     "--batch-size 100000: expected 1 to 1024 slices per model call (each case's last batch is "
     "padded to it)"),
    # Its metrics.json then made the next `evaluate --workdir` refuse the folder as not its own.
    (["evaluate", "--predictions", "p", "--out", "p"],
     "--out p is --predictions p or inside it: its metrics would be read as a file of the "
     "predictions; choose a folder beside it"),
    (["evaluate", "--predictions", "p", "--out", "p/eval"],
     "--out p/eval is --predictions p or inside it: its metrics would be read as a file of the "
     "predictions; choose a folder beside it"),
    (["evaluate", "--predictions", "p", "--out", "o", "--radius-mm", "-1"],
     "--radius-mm -1.0: expected a positive distance in mm, at most 1000"),
    # An infinite radius passed: every lesion was missed (sensitivity 0) and radius_mm was null.
    (["evaluate", "--predictions", "p", "--out", "o", "--radius-mm", "inf"],
     "--radius-mm inf: expected a positive distance in mm, at most 1000"),
    # A finite one too: 1e12 a MemoryError traceback, 1e300 every lesion missed (the window
    # radius overflowed).
    (["evaluate", "--predictions", "p", "--out", "o", "--radius-mm", "1e300"],
     "--radius-mm 1e+300: expected a positive distance in mm, at most 1000"),
    (["evaluate", "--predictions", "p", "--out", "o", "--min-score", "2"],
     "--min-score 2.0: expected a probability in [0, 1)"),
    (["evaluate", "--predictions", "p", "--out", "o", "--min-score", "1"],  # s1 > 1: no detection
     "--min-score 1.0: expected a probability in [0, 1)"),
    (["evaluate", "--predictions", "p", "--out", "o", "--picai-bootstraps", "-1"],
     "--picai-bootstraps -1: expected 0 or more"),
    (["predict", "--checkpoint", "c", "--t2w", "t", "--adc", "a", "--out", "o", "--batch-size",
      "0"], "--batch-size 0: expected 1 to 1024 slices per model call (each case's last batch is "
     "padded to it)"),
    # A threshold above 1 wrote an empty detections.csv without a word; NaN did too, and many
    # exams (--layout) ended in a traceback writing it to models.json.
    (["predict", "--checkpoint", "c", "--t2w", "t", "--adc", "a", "--out", "o", "--threshold",
      "1.5"], "--threshold 1.5: expected a lesion score in [0, 1]"),
    (["predict", "--checkpoint", "c", "--layout", "picai", "--images", "i", "--out", "o",
      "--threshold", "nan"], "--threshold nan: expected a lesion score in [0, 1]"),
    # A NaN or infinite factor passed, and many exams ended in a traceback writing models.json.
    (["predict", "--checkpoint", "c", "--layout", "picai", "--images", "i", "--out", "o",
      "--candidate-factor", "nan"], "candidate settings CandidateSettings(threshold="
     "'dynamic-fast', min_voxels=10, num_lesions=5, dynamic_threshold_factor=nan): expected "
     "min_voxels >= 0, num_lesions >= 1, dynamic_threshold_factor > 1 and finite"),
    (["predict", "--checkpoint", "c", "--t2w", "t", "--adc", "a", "--out", "o",
      "--candidate-factor", "inf"], "candidate settings CandidateSettings(threshold="
     "'dynamic-fast', min_voxels=10, num_lesions=5, dynamic_threshold_factor=inf): expected "
     "min_voxels >= 0, num_lesions >= 1, dynamic_threshold_factor > 1 and finite"),
    # One exam (--t2w/--adc) or many (--layout), never both.
    (["predict", "--checkpoint", "c", "--t2w", "t", "--adc", "a", "--layout", "picai", "--images",
      "i", "--out", "o"], "--t2w is for one exam; --layout picai reads its exams from --images"),
    (["predict", "--checkpoint", "c", "--t2w", "t", "--adc", "a", "--manifest", "m", "--out", "o"],
     "--manifest needs --layout (many exams); one exam is --t2w/--adc"),
    (["predict", "--checkpoint", "c", "--layout", "picai", "--images", "i", "--manifest", "m",
      "--out", "o"], "--manifest does not go with --layout picai"),
    # Many-exam switches and a second crop centre were ignored for one exam without a word.
    (["predict", "--checkpoint", "c", "--t2w", "t", "--adc", "a", "--out", "o",
      "--skip-bad-cases"], "--skip-bad-cases needs --layout (many exams); one exam is --t2w/--adc"),
    (["predict", "--checkpoint", "c", "--t2w", "t", "--adc", "a", "--out", "o", "--overwrite"],
     "--overwrite needs --layout (many exams); one exam is --t2w/--adc"),
    (["predict", "--checkpoint", "c", "--t2w", "t", "--adc", "a", "--out", "o", "--mask", "m",
      "--center", "1,2,3"],
     "--center 1,2,3 does not go with --mask m: the mask's centroid centres the crop"),
    (["predict", "--checkpoint", "c", "--t2w", "t", "--adc", "a", "--out", "o", "--mask", "m",
      "--center-ras", "1,2,3"],
     "--center-ras 1,2,3 does not go with --mask m: the mask's centroid centres the crop"),
    (["summarize", "--runs", "A=d1", "A=d2", "--out", "o"], "--runs names 'A' twice (d1 and d2)"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), FLAG_ERRORS)
def test_flag_errors_of_each_command(argv, message, capsys):
    assert _run(argv, capsys) == (2, f"focalnet {argv[0]}: error: {message}\n")


@pytest.mark.parametrize("address", ["localhost", "localhost:", ":1234", "node01:99999"])
def test_a_coordinator_address_without_host_and_port_is_one_line(address, tmp_path, capsys):
    """Process 0 of a group ended in JAX's IndexError traceback on an address without a port."""
    config = str(REPO / "configs" / "demo.py")
    argv = ["train", "--config", config, "--workdir", str(tmp_path / "run")]
    argv += ["--coordinator_address", address, "--num_processes", "2", "--process_id", "0"]
    assert _run(argv, capsys) == (
        2,
        f"focalnet train: error: --coordinator_address {address!r}: expected HOST:PORT, e.g. "
        "node01:12345 (process 0's host, and a free port there)\n",
    )
    assert not (tmp_path / "run").exists()


def test_a_coordinator_port_in_use_or_a_host_not_found_is_one_line(tmp_path, capsys):
    """Process 0 on a port another process listens on ended in JAX's 'Failed to start RPC server'
    traceback; a host name that resolves nowhere waited JAX's 5 minutes, then aborted."""
    config = str(REPO / "configs" / "demo.py")
    argv = ["train", "--config", config, "--workdir", str(tmp_path / "run"), "--num_processes", "2"]
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, err = _run(
            [*argv, "--coordinator_address", f"localhost:{port}", "--process_id", "0"], capsys
        )
    assert (status, err) == (
        2,
        f"focalnet train: error: --coordinator_address 'localhost:{port}': the coordinator "
        f"(process 0) cannot listen on port {port} here (Address already in use); choose another "
        "port\n",
    )
    absent = "nosuchhost.invalid:12345"
    status, err = _run([*argv, "--coordinator_address", absent, "--process_id", "1"], capsys)
    assert status == 2
    assert err.startswith(f"focalnet train: error: --coordinator_address '{absent}': host ")
    assert "'nosuchhost.invalid' not found (" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_internal_errors_keep_their_traceback(monkeypatch):
    def broken(args):
        raise ValueError("an internal shape mismatch")  # plain ValueError: not a user error

    help_text, add_fn, _ = cli._COMMANDS["folds"]
    monkeypatch.setitem(cli._COMMANDS, "folds", (help_text, add_fn, broken))
    with pytest.raises(ValueError, match="internal shape mismatch"):
        cli.main(["folds", "--store", "s"])


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


DEMO = str(REPO / "configs" / "demo.py")
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


@pytest.mark.parametrize("below", [False, True])
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_compilation_cache_that_is_or_lies_below_a_file_is_refused(
    tmp_path, capsys, command, below
):
    """JAX cached nothing in a file given as the folder, or in a folder below a file, and the
    command ran on without a word."""
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    cache = blocker / "sub" if below else blocker
    argv = ["train", "--config", DEMO] if command == "train" else ["evaluate", "--out", "o"]
    argv += ["--workdir", str(tmp_path / "w"), "--compilation_cache", str(cache)]
    status, err = _run(argv, capsys)
    where = f": {blocker}" if below else ""
    message = (
        f"focalnet {command}: error: --compilation_cache {cache}{where} exists and is not a folder"
    )
    assert (status, err.splitlines()[-1]) == (2, message)
    assert sorted(tmp_path.iterdir()) == [blocker]


@pytest.mark.parametrize(
    ("command", "flag"),
    [("train", "--workdir"), ("cv", "--workdir"), ("preprocess", "--out"), ("synth", "--out"),
     ("folds", "--out"), ("study run", "--workdir")],
)  # fmt: skip
def test_an_output_folder_below_a_file_is_refused(tmp_path, capsys, command, flag):
    """`train --workdir FILE/run` ended in a NotADirectoryError traceback once the store was
    read, `study run` as soon as it wrote; the others in `[Errno 17] File exists: 'FILE'`."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "sub"
    argv = {
        "train": ["train", "--config", DEMO, "--config.data.store=s", "--workdir", str(out)],
        "cv": ["cv", "--config", DEMO, "--config.data.store=s", "--workdir", str(out)],
        "preprocess": ["preprocess", "--layout", "manifest", "--manifest", "m.csv", "--out",
                       str(out)],
        "synth": ["synth", "--cases", "1", "--out", str(out)],
        "folds": ["folds", "--store", "s", "--out", str(out)],
        "study run": ["study", "run", "--spec", DEMO, "--workdir", str(out), "--dry-run"],
    }[command]  # fmt: skip
    status, err = _run(argv, capsys)
    message = f"focalnet {command}: error: {flag} {out}: {blocker} exists and is not a folder"
    assert (status, err.splitlines()[-1]) == (2, message)
    assert sorted(tmp_path.iterdir()) == [blocker]


def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path):
    """A read-only output folder (or a full or read-only disk) is the user's to fix: it ended in
    a PermissionError traceback (synth, preprocess, train, predict, evaluate). Root ignores
    permission bits, so as root the command runs without the capability that lets it."""
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    drop = ["-dac_override", "-dac_read_search"]
    as_user = []
    if os.geteuid() == 0:
        as_user = ["setpriv", "--bounding-set", ",".join(drop), "--inh-caps", ",".join(drop), "--"]
    out = read_only / "syn"
    argv = [sys.executable, "-m", "focalnet_jax.cli", "synth", "--cases", "1", "--small"]
    result = subprocess.run(
        [*as_user, *argv, "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"focalnet synth: error: [Errno 13] Permission denied: '{read_only}/")
    assert list(read_only.iterdir()) == []


def test_study_run_without_picai_eval_is_refused_before_any_cell(tmp_path):
    """Without picai_eval every cell trained, then left out three of the report's four headline
    metrics (NaN, with them every test on them). A picai_eval that cannot be imported (here a
    package that raises on import, ahead of the installed one) is refused in one line."""
    shadow = tmp_path / "shadow" / "picai_eval"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow.parent), str(REPO)])}
    workdir = tmp_path / "s"
    argv = ["study", "run", "--spec", str(REPO / "configs" / "studies" / "bosma22.py"),
            "--workdir", str(workdir), "--dry-run"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "focalnet_jax.cli", *argv], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "focalnet study run: error: picai_eval is not installed (hidden for this test); install "
        "the 'picai' extra: the report compares arms on picai_eval's metrics"
    )
    assert not workdir.exists()


def test_a_reader_that_goes_away_ends_the_command_without_a_traceback(tmp_path):
    """`focalnet ... | head`: printing to a pipe whose reader has gone ended in a BrokenPipeError
    traceback; now status 141 (128 + SIGPIPE, as a shell reports a process SIGPIPE ended)."""
    argv = [sys.executable, "-m", "focalnet_jax.cli", "synth", "--cases", "1", "--small"]
    process = subprocess.Popen(
        [*argv, "--out", str(tmp_path / "syn")], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()  # the reader gone before the command prints its closing line
    _, err = process.communicate(timeout=300)
    assert process.returncode == 141
    assert b"Traceback" not in err and b"BrokenPipeError" not in err
    assert (tmp_path / "syn" / "lesions.csv").is_file()  # its work done and kept


def test_a_path_flag_written_with_equals_and_a_tilde_is_under_home(tmp_path, monkeypatch, capsys):
    """The shell expands `--out ~/x` but not `--out=~/x`: `focalnet train --workdir=~/run` wrote
    into a folder named `~` of the working folder and said `~/run`. Repeated flags too."""
    home, work = tmp_path / "home", tmp_path / "work"
    (home / "l").mkdir(parents=True)
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    status, err = _run(["folds", "--store=~/nowhere"], capsys)
    assert status == 2 and f"{home / 'nowhere'}" in err and "~" not in err, err
    argv = ["preprocess", "--layout=picai", "--images=~/a", "--images=~/b", "--labels=~/l",
            "--out=~/store"]  # fmt: skip
    status, err = _run(argv, capsys)
    assert status == 2 and f"{home / 'a'}" in err and "~" not in err, err
    assert list(work.iterdir()) == []
    status, err = _run(["folds", "--store=~nosuchuser/x"], capsys)  # as the shell: left as is
    assert (status, err) == (2, "focalnet folds: error: store ~nosuchuser/x does not exist\n")
