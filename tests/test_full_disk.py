"""A full disk is one line naming what was being written, and loses nothing: a checkpoint save ends
`focalnet train` naming the checkpoint folder (Orbax's background threads logged a traceback per
array: ~900 lines) and the rerun, with room again, resumes and finishes; `focalnet predict` names
its --out and leaves nothing there (it was a traceback)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys

import pytest
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
