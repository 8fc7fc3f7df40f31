"""How `focalnet` reports an error: a user error (each module's own error class is one) as one
line `focalnet <command>: error: <message>` on stderr and exit status 2, `--verbose` (before or
after the command) adding the traceback; internal errors keep theirs. A misspelt flag is named, a
Ctrl-C never dropped, a reader gone is status 141, and `--flag=~/x` is under home."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
from cli_refusals import _run

from focalnet_jax import cli


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


def test_internal_errors_keep_their_traceback(monkeypatch):
    def broken(args):
        raise ValueError("an internal shape mismatch")  # plain ValueError: not a user error

    help_text, add_fn, _ = cli._COMMANDS["folds"]
    monkeypatch.setitem(cli._COMMANDS, "folds", (help_text, add_fn, broken))
    with pytest.raises(ValueError, match="internal shape mismatch"):
        cli.main(["folds", "--store", "s"])


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
