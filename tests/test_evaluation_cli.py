"""`focalnet evaluate`'s flags and output folder: `--cases` lists, `--slices`, the prediction
flags that go with `--workdir` only, the defaults `--help` gives, and an `--out` at a file or
being written by another run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from cli_calls import cli_error, run_cli
from evaluation_cohort import _evaluate_argv, write_blob_case, write_cohort


def test_out_at_or_under_a_file_is_refused_before_any_work(tmp_path):
    predictions = tmp_path / "predictions"
    write_cohort(predictions)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out, where in ((blocker, ""), (blocker / "sub", f": {blocker}")):
        expected = f"--out {out}{where} exists and is not a folder"
        message = cli_error(["evaluate", "--predictions", str(predictions), "--out", str(out)])
        assert message.endswith(expected)
        message = cli_error(["summarize", "--runs", f"A={predictions}", "--out", str(out)])
        assert message.endswith(expected)


@pytest.mark.parametrize("as_json", [True, False])
@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"])
def test_evaluate_cases_evaluates_exactly_the_listed_subset(tmp_path, as_json, encoding):
    """Also saved with a byte-order mark and CRLF, as spreadsheets do (the mark stuck to the
    first id, or made a JSON list one id)."""
    predictions, out = tmp_path / "predictions", tmp_path / "eval"
    write_cohort(predictions)
    listed = tmp_path / ("cases.json" if as_json else "cases.txt")
    text = json.dumps(["c3", "c1"]) if as_json else "c3\r\n\r\nc1\r\n"
    listed.write_text(text, encoding=encoding, newline="")
    run_cli(_evaluate_argv(predictions, out, "--cases", str(listed)))
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["num_patients"], metrics["num_cases"]) == (2, 2)
    # c1's lesion hit at 0.9, c3's blob a FP at 0.3: thresholds 0.9, 0.3 over 2 patients.
    froc = metrics["froc"]["all"]
    assert froc["num_lesions"] == 1
    np.testing.assert_allclose(froc["curve"]["fp"], [0.0, 0.5])
    np.testing.assert_allclose(froc["curve"]["sensitivity"], [1.0, 1.0])


def test_evaluate_cases_picai_subject_list_dict(tmp_path):
    predictions, out = tmp_path / "predictions", tmp_path / "eval"
    write_cohort(predictions)
    listed = tmp_path / "subjects.json"
    listed.write_text(json.dumps({"subject_list": ["c2", "c4", "c5"]}))
    run_cli(_evaluate_argv(predictions, out, "--cases", str(listed)))
    assert json.loads((out / "metrics.json").read_text())["num_patients"] == 3


def test_no_evaluated_slice_is_a_one_line_error_naming_the_setting(tmp_path):
    predictions, out = tmp_path / "predictions", tmp_path / "eval"
    write_blob_case(predictions, "n1", blobs=[((4, 24, 24), 0.3)])
    message = cli_error(_evaluate_argv(predictions, out, "--slices", "annotated"))
    assert f"{predictions}: no slice to evaluate with slices='annotated'" in message
    assert not (out / "metrics.json").exists()


def test_listed_case_without_prediction_is_a_one_line_error_and_writes_nothing(tmp_path):
    predictions, out = tmp_path / "predictions", tmp_path / "eval"
    write_cohort(predictions)
    listed = tmp_path / "cases.txt"
    listed.write_text("c1\nc9\nc2\n")
    done = subprocess.run(
        [sys.executable, "-m", "focalnet_jax.cli", *_evaluate_argv(predictions, out),
         "--cases", str(listed)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "no prediction for 1 of the 3 listed case(s): c9.npz" in lines[0]
    assert str(predictions) in lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "text, reason",
    [
        ('["c1", "../c2"]', "case id '../c2' starts with '.'"),
        ("c1\nsub/c2\n", "case id 'sub/c2' contains '/'"),
        ("c1\nc1\n", "listed twice: ['c1']"),
        ("\n\n", "the case list is empty"),
        ('{"cases": ["c1"]}', "expected a JSON list of case id strings"),
        ('["c1",', "not valid JSON"),
    ],
)
def test_bad_case_list_names_the_file_and_reason(tmp_path, text, reason):
    predictions, out = tmp_path / "predictions", tmp_path / "eval"
    write_cohort(predictions)
    listed = tmp_path / "cases.txt"
    listed.write_text(text)
    message = cli_error(_evaluate_argv(predictions, out, "--cases", str(listed)))
    assert str(listed) in message and reason in message
    assert not out.exists()


def test_evaluate_without_case_list_says_how_many_files_it_found(tmp_path, caplog):
    predictions, out = tmp_path / "predictions", tmp_path / "eval"
    write_cohort(predictions)
    with caplog.at_level(logging.WARNING, logger="focalnet_jax"):
        run_cli(_evaluate_argv(predictions, out))
    assert f"evaluating the 5 <case_id>.npz file(s) found in {predictions}" in caplog.text
    assert json.loads((out / "metrics.json").read_text())["num_patients"] == 5


def test_cases_with_workdir_is_refused(tmp_path):
    listed = tmp_path / "cases.txt"
    listed.write_text("c1\n")
    message = cli_error(["evaluate", "--workdir", str(tmp_path), "--cases", str(listed)])
    assert "--cases goes with --predictions" in message


@pytest.mark.parametrize(
    "flag",
    [
        ["--tta", "flip"],
        ["--step", "5"],
        ["--store", "s"],
        ["--all-cases"],
        ["--batch-size", "8"],
        ["--compilation_cache", "cache"],
    ],  # fmt: skip
)
def test_prediction_flags_with_predictions_are_refused(tmp_path, flag):
    """--predictions evaluates files already predicted: a --tta flip there was ignored, so the
    metrics of plain predictions passed for flip-TTA ones (likewise --step, --store); no model
    runs, so a --batch-size or --compilation_cache there did nothing."""
    import jax

    write_cohort(tmp_path / "p")
    argv = ["evaluate", "--predictions", str(tmp_path / "p"), "--out", str(tmp_path / "o")]
    cache_before = jax.config.jax_compilation_cache_dir
    with contextlib.chdir(tmp_path):
        message = cli_error([*argv, *flag])
    named = f"{flag[0]}{' flip' if flag[0] == '--tta' else ''}"
    assert message.endswith(
        f"{named} goes with --workdir (it makes the predictions); --predictions "
        f"{tmp_path / 'p'} evaluates the files as they were predicted"
    )
    assert "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no out, no cache folder
    assert jax.config.jax_compilation_cache_dir == cache_before


def test_evaluate_flag_defaults_are_the_localisation_defaults():
    """The CLI spells the defaults out (importing localization would load SciPy at parse)."""
    from focalnet_jax.cli import build_parser
    from focalnet_jax.evaluation import localization

    args = build_parser().parse_args(["evaluate", "--predictions", "p", "--out", "o"])
    assert (args.radius_mm, args.min_score) == (localization.RADIUS_MM, localization.MIN_SCORE)


def test_allow_training_cases_without_all_cases_is_refused(tmp_path):
    """--allow-training-cases only loosens --all-cases' held-out check; elsewhere it was ignored
    without a word."""
    write_cohort(tmp_path / "p")
    argv = ["evaluate", "--predictions", str(tmp_path / "p"), "--out", str(tmp_path / "o")]
    message = cli_error([*argv, "--allow-training-cases"])
    assert "--allow-training-cases goes with --all-cases" in message
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["evaluate", "summarize", "predict"])
def test_help_shows_each_default_the_parser_uses(command):
    """A flag with a default says it in its help, and the value said is the one parsed."""
    import argparse

    from focalnet_jax.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in commands.choices[command]._actions:
        if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            continue
        shown = f"{action.default:g}" if isinstance(action.default, float) else action.default
        assert f"default: {shown})" in action.help, (action.option_strings, action.help)


@pytest.mark.parametrize("command", ["evaluate", "summarize", "synth"])
def test_a_second_writer_of_one_folder_is_refused_in_one_line(tmp_path, command):
    """Two evaluate (or summarize) runs into one --out each ended well, one's figures beside the
    other's metrics; two synth runs both passed the check for an empty --out, the later one
    replacing the other's dataset without a word."""
    from focalnet_jax.data.writer_folders import lock_beside, writer_lock

    out = tmp_path / "out"
    argv = {
        "evaluate": ["evaluate", "--predictions", str(tmp_path / "pred"), "--out", str(out)],
        "summarize": ["summarize", "--runs", f"A={tmp_path / 'A'}", "--out", str(out)],
        "synth": ["synth", "--out", str(out), "--cases", "1", "--small"],
    }[command]
    with writer_lock(out, command):
        message = cli_error(argv)
        assert lock_beside(out, command).is_file()
    assert message == (
        f"focalnet {command}: error: {out} is being written by another focalnet {command} (pid "
        f"{os.getpid()} on {socket.gethostname()}); wait for it to end"
    )
    assert not out.exists() and not lock_beside(out, command).exists()


def test_a_refused_evaluate_or_summarize_leaves_no_folder_made_for_its_lock(tmp_path):
    """The lock beside --out made its parent folders before the inputs were read: a typo in an
    input path left them behind."""
    missing = tmp_path / "missing"
    message = cli_error(["evaluate", "--predictions", str(missing), "--out", str(tmp_path / "a/x")])
    assert message.endswith(f"{missing}: predictions folder does not exist")
    message = cli_error(["summarize", "--runs", f"A={missing}", "--out", str(tmp_path / "b/c/x")])
    assert message.endswith(f"{missing}: run folder does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    metrics = tmp_path / "metrics.json"  # the file named instead of its folder
    metrics.write_text("{}")
    message = cli_error(["summarize", "--runs", f"A={metrics}", "--out", str(tmp_path / "b/c/x")])
    assert message.endswith(f"{metrics}: a file, not a run folder: give the folder holding "
                            "metrics.json (the `--out` of `focalnet evaluate`, or a run or "
                            "cross-validation folder above it)")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_lock_file_that_cannot_be_opened_is_named_not_the_output_folder(tmp_path):
    """A lock file beside --out that cannot be opened (another user's; here a folder of its name)
    was reported as the output folder being denied, a folder that did not even exist."""
    from focalnet_jax.data.writer_folders import lock_beside

    out = tmp_path / "out"
    lock_beside(out, "synth").mkdir()
    message = cli_error(["synth", "--out", str(out), "--cases", "1", "--small"])
    assert message == (
        f"focalnet synth: error: [Errno 21] Is a directory: '{lock_beside(out, 'synth')}'"
    )
    assert not out.exists()
