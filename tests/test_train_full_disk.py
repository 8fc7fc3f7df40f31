"""A checkpoint save on a full disk ends `focalnet train` in one line naming the checkpoint folder
(Orbax's background threads logged a traceback per array: ~900 lines), and the rerun, with space
again, resumes and finishes."""

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
DISK_KIB = 700  # room for the config, the store record and the events, not for a checkpoint
FILE_LIMIT_KIB = 128  # larger than any file of a run but a checkpoint's data files


@contextlib.contextmanager
def _small_disk(path):
    """A `DISK_KIB` tmpfs mounted at `path` (as root); yields `(errno, enlarge, limit)`: the
    errno a write past it gets, a function that makes room again, and the file size limit a train
    process runs under. Where no tmpfs can be mounted, a file size limit (`ulimit -f`) stands in
    for the disk (`EFBIG`, the same path through Orbax)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_KIB}k", "tmpfs", str(path)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        state = {"limit": FILE_LIMIT_KIB * 1024}
        yield errno.EFBIG, lambda: state.update(limit=None), state
        return
    try:
        enlarge = ["mount", "-o", "remount,size=64m", str(path)]
        yield errno.ENOSPC, lambda: subprocess.run(enlarge, check=True), {"limit": None}
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _train(workdir, store, limit) -> subprocess.CompletedProcess:
    bytes_ = limit["limit"]
    limited = [] if bytes_ is None else ["prlimit", f"--fsize={bytes_}:{bytes_}", "--"]
    argv = ["train", f"--config={REPO / 'configs' / 'focalnet.py'}", f"--workdir={workdir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [*limited, sys.executable, "-m", "focalnet_jax.cli", *argv, *RUN,
         f"--config.data.store={store}"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_rerun_finishes(tmp_path):
    store = small_synthetic_store(tmp_path, cases=4, seed=2)
    with _small_disk(tmp_path / "disk") as (code, enlarge, limit):
        workdir = tmp_path / "disk" / "run"
        failed = _train(workdir, store, limit)
        assert failed.returncode == 2, failed.stderr
        assert "Traceback" not in failed.stderr and "ERROR" not in failed.stderr, failed.stderr
        checkpoints = (workdir / "checkpoints").resolve()
        assert failed.stderr.splitlines()[-1] == (
            f"focalnet train: error: [Errno {code}] {os.strerror(code)} (saving a checkpoint): "
            f"'{checkpoints}'"
        )
        *before, _ = failed.stderr.strip().split("\n")  # log lines and the bar's, the error
        assert all(
            not line or "focalnet_jax" in line or line.startswith("train:") for line in before
        )
        assert not any(p.name.isdigit() for p in checkpoints.iterdir())
        enlarge()
        finished = _train(workdir, store, limit)
        assert finished.returncode == 0, finished.stderr
        assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4"]  # no partial save left


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
