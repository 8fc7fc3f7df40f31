"""A full disk is one line naming what was being written, and loses nothing: a checkpoint save ends
`focalnet train` naming the checkpoint folder (Orbax's background threads logged a traceback per
array: ~900 lines) and the rerun, with room again, resumes and finishes; `focalnet predict` names
its --out and leaves nothing there (it was a traceback)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import sys
import time

import pytest
from file_size_limit import file_size_limit
from test_train_helpers import REPO, TINY, small_synthetic_store

from focalnet_jax.errors import one_line_user_errors
from focalnet_jax.training import save_failures

RUN = [
    *TINY,
    "--config.train.steps=4",
    "--config.train.checkpoint_every=2",
    "--config.loss.mfl=False",
    "--config.data.num_folds=2",
    "--config.data.slices=all",
]
TRAIN_DISK_KIB = 700  # room for the config, the store record and the events, not a checkpoint
TRAIN_FILE_KIB = 128  # larger than any file of a run but a checkpoint's data files
PREDICT_DISK_KIB = PREDICT_FILE_KIB = 16  # less than one exam's outputs (~400 KiB)


@contextlib.contextmanager
def _small_disk(path, disk_kib: int, file_kib: int):
    """A `disk_kib` tmpfs mounted at `path` (as root); yields `(errno, enlarge, limit)`: the
    errno a write past it gets, a function that makes room again, and the state holding the file
    size limit (bytes or None) a command runs under. Where no tmpfs can be mounted, a `file_kib`
    file size limit (`ulimit -f`) stands in for the disk (`EFBIG`, the same paths)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={disk_kib}k", "tmpfs", str(path)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        state = {"limit": file_kib * 1024}
        yield errno.EFBIG, lambda: state.update(limit=None), state
        return
    try:
        enlarge = ["mount", "-o", "remount,size=64m", str(path)]
        yield errno.ENOSPC, lambda: subprocess.run(enlarge, check=True), {"limit": None}
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _focalnet(limit, *args: str) -> subprocess.CompletedProcess:
    """`focalnet ARGS` in a subprocess, under the file size limit of `limit` (if any)."""
    bytes_ = limit["limit"]
    limited = [] if bytes_ is None else ["prlimit", f"--fsize={bytes_}:{bytes_}", "--"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [*limited, sys.executable, "-m", "focalnet_jax.cli", *args],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def _train(workdir, store, limit) -> subprocess.CompletedProcess:
    config = f"--config={REPO / 'configs' / 'focalnet.py'}"
    return _focalnet(
        limit, "train", config, f"--workdir={workdir}", *RUN, f"--config.data.store={store}"
    )


def _only_logs_then(result, command: str, message: str) -> None:
    """Exit 2, no traceback or logged error: log lines and the bar's, then the one-line error
    (`message`, or `message` ending in a file of the folder it names)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "ERROR" not in result.stderr, result.stderr
    *before, last = result.stderr.strip().split("\n")
    expected = f"focalnet {command}: error: {message}"
    assert last == expected or last.startswith(expected[:-1] + "/"), last
    assert all(not line or "focalnet_jax" in line or line.startswith("train:") for line in before)


@pytest.mark.slow
def test_a_full_disk_is_one_line_in_train_and_predict_and_loses_nothing(tmp_path):
    """train: the checkpoint save fails; the rerun with room again resumes and finishes, leaving
    no partial step. predict: its outputs do not fit; nothing is left in --out's disk."""
    store = small_synthetic_store(tmp_path, cases=4, seed=2)
    with _small_disk(tmp_path / "disk", TRAIN_DISK_KIB, TRAIN_FILE_KIB) as (code, enlarge, limit):
        workdir = tmp_path / "disk" / "run"
        checkpoints = (workdir / "checkpoints").resolve()
        reason = f"[Errno {code}] {os.strerror(code)}"
        failed = _train(workdir, store, limit)
        _only_logs_then(failed, "train", f"{reason} (saving a checkpoint): '{checkpoints}'")
        assert not any(p.name.isdigit() for p in checkpoints.iterdir())
        enlarge()
        finished = _train(workdir, store, limit)
        assert finished.returncode == 0, finished.stderr
        assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4"]  # no partial save left

        exam = sorted((tmp_path / "data" / "images").glob("*/*_t2w.mha"))[0]
        adc = exam.with_name(exam.name.replace("_t2w", "_adc"))
        disk = tmp_path / "out_disk"
        with _small_disk(disk, PREDICT_DISK_KIB, PREDICT_FILE_KIB) as (code, _, out_limit):
            out = disk / "pred"
            predicted = _focalnet(
                out_limit, "predict", f"--checkpoint={workdir}", f"--t2w={exam}", f"--adc={adc}",
                f"--out={out}",
            )  # fmt: skip
            _only_logs_then(predicted, "predict", f"[Errno {code}] {os.strerror(code)}: '{out}'")
            assert list(disk.iterdir()) == []


def test_tensorstore_environment_failures_are_named_and_others_pass(tmp_path, capsys):
    """TensorStore's error text of a failed write becomes an `OSError` of its `os_error_code`
    naming the checkpoint folder, printed in one line; a decoding failure passes unchanged."""
    full = ValueError(
        'RESOURCE_EXHAUSTED: Error writing local file "/w/checkpoints/2.orbax-checkpoint-tmp/x": '
        "Failed to write 98950 bytes to file 14: No space left on device [os_error_code='28']"
    )
    with pytest.raises(SystemExit) as exited, one_line_user_errors("focalnet train"):
        with save_failures.naming_the_checkpoint(tmp_path, "saving checkpoint step 2"):
            raise RuntimeError("the save thread failed") from full
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "focalnet train: error: [Errno 28] No space left on device (saving checkpoint step 2): "
        f"'{tmp_path}'\n"
    )
    decoding = ValueError("DATA_LOSS: Error reading ...: Unexpected end of data")
    with pytest.raises(ValueError) as raised:
        with save_failures.naming_the_checkpoint(tmp_path):
            raise decoding
    assert raised.value is decoding
    assert save_failures.environment_errno(OSError(errno.EDQUOT, "Disk quota exceeded")) == (
        errno.EDQUOT
    )
    assert save_failures.environment_errno(OSError(errno.ENOENT, "No such file")) is None


def test_an_atomic_write_on_a_full_disk_names_its_file(tmp_path):
    """A `write` or `close` names no file; the atomic write names the one it was writing and
    leaves neither it nor its temporary file."""
    from focalnet_jax.data.atomic_files import replaced_atomically

    target = tmp_path / "metrics.json"
    with pytest.raises(OSError) as raised:
        with replaced_atomically(target) as tmp, open("/dev/full", "w") as full:
            tmp.write_text("{}")
            full.write("x")
            full.flush()
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(target))
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_names_the_output_not_its_temporary_name(tmp_path):
    """A write that names its file names it at the output's final path (the temporary folder is
    gone when the user reads the line); another error passes unchanged."""
    from focalnet_jax.data.atomic_files import replaced_folder

    out = tmp_path / "pred"
    with pytest.raises(OSError) as raised:
        with replaced_folder(out) as tmp:
            raise OSError(errno.EFBIG, "File too large", str(tmp / "overlay.png"))
    assert (raised.value.errno, raised.value.filename) == (errno.EFBIG, str(out / "overlay.png"))
    assert list(tmp_path.iterdir()) == []
    elsewhere = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache" / "x"))
    with pytest.raises(OSError) as raised:
        with replaced_folder(out):
            raise elsewhere
    assert raised.value is elsewhere


_EVENTS_ON_A_FULL_DISK = """
import resource, sys
import numpy as np
from focalnet_jax.training.tb_logging import SummaryWriter

writer = SummaryWriter(sys.argv[1], enabled=True)
resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
rng = np.random.default_rng(0)
for step in range(50):
    try:
        writer.image(step, "panel", rng.random((64, 64)))
        writer.flush()
    except OSError as error:
        print("flush", error.errno, error.filename)
        break
try:
    writer.close()
except OSError as error:
    print("close", error.errno, error.filename)
"""


def test_events_past_the_disk_name_their_folder_and_print_no_thread_traceback(tmp_path):
    """The event writer's thread fails on the disk: the next flush and the close raise it naming
    the events folder (they named no file), and the thread's own traceback is not printed."""
    logdir = tmp_path / "tb"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", _EVENTS_ON_A_FULL_DISK, str(logdir)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"flush {errno.EFBIG} {logdir}\nclose {errno.EFBIG} {logdir}\n"
    assert result.stderr == ""


def test_closing_a_failing_run_raises_nothing_over_its_error(tmp_path):
    """A run ending on an error closes its checkpoint manager and event file without raising
    their own failure (a full disk fails the event file's flush again) over that error; a run
    ending well raises the first failure after closing everything."""
    import types

    from tqdm import tqdm

    from focalnet_jax.run import workdir as workdir_lib
    from focalnet_jax.training import loop, sharding
    from focalnet_jax.training.tb_logging import SummaryWriter

    spec, mesh = types.SimpleNamespace(global_batch=4, subsets=()), sharding.make_mesh()
    for failing in (True, False):
        run = tmp_path / f"failing_{failing}"
        manager = workdir_lib.make_manager(run)
        writer = SummaryWriter(run / "tb", enabled=True)
        logger = loop._Logger(spec, run, manager, tqdm(disable=True), 0, mesh, writer)
        with file_size_limit(0):
            writer.scalars(1, {"train/loss": 0.5})  # its thread fails writing it
            if failing:
                loop._close(logger, failing=True)
            else:
                with pytest.raises(OSError) as raised:
                    loop._close(logger, failing=False)
                assert (raised.value.errno, raised.value.filename) == (
                    errno.EFBIG,
                    str(run / "tb"),
                )
        assert writer.close() is None  # closed: left as it is, even on the full disk


def test_only_an_environment_failure_or_its_explicit_cause_is_renamed_or_hidden(caplog):
    """A bug raised while handling an environment failure is not that failure; TensorStore's
    status text counts only as such (not any text naming an `os_error_code`), and only error
    records of one are kept off the console."""
    denied = PermissionError(errno.EACCES, "Permission denied")
    try:
        try:
            raise denied
        except PermissionError:
            raise KeyError("a bug while handling it")  # noqa: B904
    except KeyError as error:
        bug = error
    assert save_failures.environment_errno(bug) is None
    try:
        raise RuntimeError("the save thread failed") from denied
    except RuntimeError as error:
        assert save_failures.environment_errno(error) == errno.EACCES
    unrelated = ValueError("the config says os_error_code='13'")
    assert save_failures.environment_errno(unrelated) is None

    full = (
        'RESOURCE_EXHAUSTED: Error writing local file "/w/x": Failed to write 98 bytes to file '
        "14: No space left on device [os_error_code='28']"
    )
    save_failures.quiet_background_failures()
    absl = logging.getLogger("absl")
    with caplog.at_level(logging.DEBUG, logger="absl"):
        absl.error("thread raised an exception: %s", full)
        absl.warning("retrying: %s", full)
        absl.error("%s", unrelated)
        absl.error("the commit failed", exc_info=bug)
    assert [r.getMessage() for r in caplog.records] == [
        f"retrying: {full}",
        str(unrelated),
        "the commit failed",
    ]


def test_a_figure_past_the_disk_names_its_file_and_leaves_none(tmp_path):
    """`study report`'s figures are written atomically; a full disk names the figure."""
    from focalnet_jax.study import figures

    path = tmp_path / "report" / "metrics.png"
    with file_size_limit(1024), pytest.raises(OSError) as raised:
        figures.box_strip(path, {"auroc": {"fl": [0.7, 0.8], "ce": [0.6, 0.65]}})
    assert (raised.value.errno, raised.value.filename) == (errno.EFBIG, str(path))
    assert list(path.parent.iterdir()) == []


@pytest.mark.slow
def test_a_checkpoint_folder_that_cannot_be_created_ends_train_at_once(tmp_path):
    """No inode left for the checkpoint's folder: the one-line error was printed, then the
    process waited 5 minutes for Orbax's threads (which wait for that folder) and printed their
    tracebacks. Now it exits at once with the error alone."""
    store = small_synthetic_store(tmp_path, cases=4, seed=2)
    disk = tmp_path / "disk"
    disk.mkdir()
    # Inodes: the mount, the run folder, its training lock, config.json, store.json, tb/, its
    # event file, checkpoints/; none for the step's folder.
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m,nr_inodes=8", "tmpfs", str(disk)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"no tmpfs can be mounted here: {mounted.stderr.decode().strip()}")
    try:
        started = time.monotonic()
        failed = _train(disk / "run", store, {"limit": None})
        took = time.monotonic() - started
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)
    assert failed.returncode == 2, failed.stderr
    assert "Traceback" not in failed.stderr and "ERROR" not in failed.stderr, failed.stderr
    last = failed.stderr.strip().split("\n")[-1]
    error = "focalnet train: error: [Errno 28] No space left on device: "
    assert last.startswith(f"{error}'{(disk / 'run' / 'checkpoints').resolve()}/"), last
    assert took < 120, took  # Orbax's wait alone was 300 s
