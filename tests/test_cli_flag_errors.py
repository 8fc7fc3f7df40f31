"""Flags and folders each `focalnet` command refuses in one line before any work: values out of
range or that do not go together (`FLAG_ERRORS`), a coordinator address without host and port or
on a port in use, a compilation cache or output folder at or below a file, an output folder that
cannot be written, and a study without picai_eval."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from cli_refusals import DEMO, _run
from test_train_helpers import REPO

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
