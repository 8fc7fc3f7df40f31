"""Two batch `focalnet predict` processes into one `--out`: the lock beside `--out` is held from
the check that `--out` may be written to the rename of the partial, so a run never replaces an
`--out` another run finished after it started, no run starts while another is renaming, and a
run killed right after the rename leaves no lock in `--out`. A lock that earlier versions left in
`--out` or the partial is removed, or refused while its holder runs.

Each run writes two cases, each one file naming the run. The concurrent runs are child processes
(`CHILD`, `batch_predict.predict_cases`) that stop at a named point (print it, wait for a line on
stdin) or are killed there (SIGKILL), so each interleaving is forced, not timed; runs before or
after them, and the holders of the earlier versions' lock, are this process (`_predict_here`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from focalnet_jax.errors import UserError
from focalnet_jax.evaluation.partial_output import (
    LOCK_FILE,
    input_files,
    lock_file,
    partial_folder,
    partial_output,
    record_crop_centres,
    record_inputs,
    write_case_folder,
)
from focalnet_jax.file_lock import exclusive_lock

REPO = Path(__file__).resolve().parents[1]
CHILD = r"""
import os, signal, sys
from focalnet_jax.data.layouts import CaseSpec
from focalnet_jax.errors import UserError
from focalnet_jax.evaluation import batch_predict, partial_output

out, name, stop, *flags = sys.argv[1:]


def pause(point):
    print(point, flush=True)
    sys.stdin.readline()


def predict_into(partial, models, cases, *rest):
    for spec in cases:
        write = lambda folder: (folder / "run.txt").write_text(name)
        partial_output.write_case_folder(partial, spec.case_id, write)
    return [spec.case_id for spec in cases]


def before_lock(real):
    def call(*args, **kwargs):
        pause("checked")
        return real(*args, **kwargs)
    return call


def after_rename(real, then):
    def call(*args, **kwargs):
        moved = real(*args, **kwargs)
        then()
        return moved
    return call


class Models:
    output_encoding = "ordinal"
    input_preprocess = inference_configs = None

    def describe(self):
        return {"models": [{"run": "r", "step": 2}], "tta": "none"}


batch_predict._predict_into = predict_into
if stop == "before-lock":
    batch_predict.partial_output = before_lock(batch_predict.partial_output)
elif stop == "after-rename":
    partial_output.swap_in = after_rename(partial_output.swap_in, lambda: pause("renamed"))
elif stop == "killed-after-rename":
    kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
    partial_output.swap_in = after_rename(partial_output.swap_in, kill)
cases = [CaseSpec(f"case{k}", f"patient{k}", {}) for k in range(2)]
try:
    batch_predict.predict_cases(
        Models(), cases, out, progress=False, overwrite="--overwrite" in flags
    )
except UserError as error:
    sys.exit(f"refused: {error}")
print("done", flush=True)
"""
ENV = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
HOST = socket.gethostname()


def _start(out: Path, name: str, stop: str = "none", *flags: str) -> subprocess.Popen:
    """A run named `name` into `out`, stopping at `stop` (see `CHILD`)."""
    command = [sys.executable, "-c", CHILD, str(out), name, stop, *flags]
    return subprocess.Popen(command, env=ENV, text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _reached(child: subprocess.Popen, point: str) -> None:
    line = child.stdout.readline()
    assert line == f"{point}\n", child.communicate(timeout=60)[1]


def _go_on(child: subprocess.Popen) -> tuple[int, str, str]:
    """Lets a stopped `child` go on; (its exit status, the last line of stderr, of stdout)."""
    stdout, stderr = child.communicate("go\n", timeout=120)
    return child.returncode, (stderr.splitlines() or [""])[-1], (stdout.splitlines() or [""])[-1]


def _run(out: Path, name: str, *more: str) -> tuple[int, str, str]:
    return _go_on(_start(out, name, *more))


def _predict_here(out: Path, name: str, overwrite: bool = False) -> None:
    """A run named `name` into `out` in this process, as `CHILD` writes it."""
    settings = {"models": [{"run": "r", "step": 2}], "tta": "none"}
    with partial_output(out, settings, resume=False, overwrite=overwrite) as (partial, _, _):
        record_crop_centres(partial, set(), dict.fromkeys(("case0", "case1"), "T2w volume centre"))
        record_inputs(partial, set(), dict.fromkeys(("case0", "case1"), {}))
        for case in ("case0", "case1"):
            write_case_folder(partial, case, lambda folder: (folder / "run.txt").write_text(name))


def _written_by(out: Path) -> dict[str, str]:
    """{entry of `out`: the run named in it} ("" for models.json, crop_centres.json and
    inputs.json)."""
    return {
        p.name: (p / "run.txt").read_text() if p.is_dir() else "" for p in sorted(out.iterdir())
    }


def _by(name: str) -> dict[str, str]:
    return {
        "case0": name, "case1": name, "crop_centres.json": "", "inputs.json": "", "models.json": ""
    }  # fmt: skip


def _no_lock_left(out: Path) -> None:
    assert not lock_file(out).exists() and not partial_folder(out).exists()
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_a_run_that_checked_before_another_finished_does_not_replace_its_out(tmp_path):
    out = tmp_path / "out"
    late = _start(out, "late", "before-lock")
    _reached(late, "checked")  # `--out` is absent: the early check passed
    assert _run(out, "first")[::2] == (0, "done")
    status, error, _ = _go_on(late)
    assert status == 1
    assert error == (
        f"refused: --out {out} is not empty (outputs of an earlier run?); choose a new folder "
        "or add --overwrite to replace it"
    )
    assert _written_by(out) == _by("first")
    _no_lock_left(out)


def test_a_run_started_while_another_renames_is_refused_until_it_has_ended(tmp_path):
    out = tmp_path / "out"
    first = _start(out, "first", "after-rename")
    _reached(first, "renamed")  # the partial is `--out` now; the run has not ended
    status, error, _ = _run(out, "second", "none", "--overwrite")
    assert status == 1
    assert error == (
        f"refused: {out} is being written by another focalnet predict (pid {first.pid} on "
        f"{HOST}); wait for it to end"
    )
    assert _go_on(first)[::2] == (0, "done")
    assert _written_by(out) == _by("first")
    _no_lock_left(out)
    _predict_here(out, "second", overwrite=True)
    assert _written_by(out) == _by("second")
    _no_lock_left(out)


def test_a_run_killed_right_after_the_rename_leaves_no_lock_in_out(tmp_path):
    out = tmp_path / "out"
    killed = _start(out, "killed", "killed-after-rename")
    assert _go_on(killed)[0] == -signal.SIGKILL
    assert _written_by(out) == _by("killed")  # no .predict.lock in it
    assert lock_file(out).read_text() == f"pid {killed.pid} on {HOST}\n"  # beside it, free
    _predict_here(out, "next", overwrite=True)
    assert _written_by(out) == _by("next")
    _no_lock_left(out)


def test_the_lock_an_earlier_version_left_in_out_is_refused_while_held_then_removed(
    tmp_path, caplog
):
    """Earlier versions held `<out>.partial/.predict.lock`, and one killed between the rename
    and the removal of the lock left it in `--out`."""
    out = tmp_path / "out"
    _predict_here(out, "first")
    earlier = out / LOCK_FILE
    with exclusive_lock(earlier), pytest.raises(UserError) as refused:
        _predict_here(out, "second", overwrite=True)  # while an earlier version ends
    assert str(refused.value) == (
        f"{earlier} is held by pid {os.getpid()} on {HOST}: a focalnet predict of an earlier "
        f"version is writing {out}; wait for it to end"
    )
    assert _written_by(out) == {**_by("first"), LOCK_FILE: ""}
    with pytest.raises(UserError, match=r"^--out .* is not empty"):
        _predict_here(out, "second")  # the lock, no longer held, is removed first
    assert f"removed {earlier}, left by a focalnet predict of an earlier version" in caplog.text
    assert _written_by(out) == _by("first")
    _no_lock_left(out)


def test_the_lock_an_earlier_version_left_in_the_partial_is_refused_while_held(tmp_path):
    out, partial = tmp_path / "out", partial_folder(tmp_path / "out")
    partial.mkdir()
    (partial / "models.json").write_text('{"models": [{"run": "r", "step": 2}], "tta": "none"}')
    with exclusive_lock(partial / LOCK_FILE), pytest.raises(UserError) as refused:
        _predict_here(out, "second", overwrite=True)  # while an earlier version writes it
    assert str(refused.value) == (
        f"{partial / LOCK_FILE} is held by pid {os.getpid()} on {HOST}: a focalnet predict of an "
        f"earlier version is writing {out}; wait for it to end"
    )
    assert sorted(p.name for p in partial.iterdir()) == [LOCK_FILE, "models.json"]
    _predict_here(out, "second", overwrite=True)
    assert _written_by(out) == _by("second")
    _no_lock_left(out)


def test_the_input_record_is_of_the_files_the_readers_read(tmp_path):
    """`--resume` compares each finished case's `input_files`: a hidden file in a DICOM folder
    (a macOS `._*` copy, `.DS_Store`) or a copy keeping times to the second (tar) refused an
    unchanged case, and the pixels of a `.mhd` header's data file exported again went unseen."""
    series = tmp_path / "t2w"
    series.mkdir()
    for name in ("1.dcm", "2.dcm"):
        (series / name).write_bytes(b"x" * 100)
    os.utime(series / "2.dcm", ns=(1_700_000_000_250_000_000, 1_700_000_000_250_000_000))
    os.utime(series / "1.dcm", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    before = input_files({"t2w": str(series), "mask": None})
    assert before == {"t2w": "2 files, 200 bytes, modified 1700000000"}
    (series / "._1.dcm").write_bytes(b"AppleDouble")
    (series / "sub").mkdir()
    (series / "sub" / "3.dcm").write_bytes(b"y")
    os.utime(series / "2.dcm", ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    assert input_files({"t2w": str(series)}) == before
    header = tmp_path / "adc.mhd"
    header.write_text(
        "NDims = 3\nDimSize = 2 2 1\nElementType = MET_UCHAR\nElementDataFile = adc.raw\n"
    )
    (tmp_path / "adc.raw").write_bytes(bytes(4))
    first = input_files({"adc": str(header)})
    assert first["adc"].startswith("2 files, ")
    os.utime(tmp_path / "adc.raw", (2_000_000_000, 2_000_000_000))  # the data exported again
    assert input_files({"adc": str(header)})["adc"].endswith("modified 2000000000")
