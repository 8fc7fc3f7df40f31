"""`preprocess`: a bug met preprocessing a case (an exception other than a user error) is no bad
case: with or without --skip-bad-cases it stops the run with its traceback, from a worker process
too, and is listed nowhere; bad input stays a bad case (also `tests/test_data_cli.py`)."""

from __future__ import annotations

import dataclasses
import errno

import pytest

from focalnet_jax.cli import main
from focalnet_jax.data import build_store
from focalnet_jax.data.dicom_stack import SeriesError
from focalnet_jax.data.io import CaseError
from focalnet_jax.data.layouts import discover_picai
from focalnet_jax.errors import UserError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(root), "--cases", "3", "--seed", "4", "--small"]) == 0
    return root


def _cases(root):
    return discover_picai(root / "images", root / "labels", root / "masks")


def _preprocess(root, out, *extra):
    return [
        "preprocess", "--layout", "picai", "--images", str(root / "images"),
        "--labels", str(root / "labels"), "--masks", str(root / "masks"), "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("skip", [(), ("--skip-bad-cases",)])
def test_a_bug_in_preprocessing_keeps_its_traceback_and_is_no_bad_case(
    dataset, tmp_path, monkeypatch, skip
):
    """A TypeError in `preprocess_case` was a bad case: one line `case ..., file '': TypeError:
    ...` (exit status 2), or with --skip-bad-cases a row of errors.csv, the others stored."""
    real, second = build_store.preprocess_case, _cases(dataset)[1].case_id

    def broken(components, label=None, **kwargs):
        if kwargs["case_id"] == second:
            return kwargs["slices"] + 1  # a bug: TypeError
        return real(components, label, **kwargs)

    monkeypatch.setattr(build_store, "preprocess_case", broken)
    with pytest.raises(TypeError, match=r'can only concatenate str \(not "int"\) to str') as raised:
        main(_preprocess(dataset, tmp_path / "store", *skip))
    assert raised.traceback[-1].name == "broken"  # its own traceback, down to the bug
    assert list(tmp_path.iterdir()) == []  # no store, no errors.csv beside it


@pytest.mark.parametrize("skip_bad_cases", [False, True])
def test_a_bug_in_a_worker_process_keeps_the_worker_s_traceback(dataset, tmp_path, skip_bad_cases):
    """The same from a worker process (--workers 2), its traceback the exception's cause: here a
    label given as a number, not a path, by a caller of `preprocess_cases`."""
    cases = _cases(dataset)
    cases[1] = dataclasses.replace(cases[1], label=7)
    out = tmp_path / "store"
    with pytest.raises(TypeError, match="expected str, bytes or os.PathLike object, not int") as e:
        build_store.preprocess_cases(
            cases, out, workers=2, skip_bad_cases=skip_bad_cases, progress=False
        )
    worker = str(e.value.__cause__)  # multiprocessing's RemoteTraceback: the worker's frames
    assert "in _work" in worker and "in preprocess_case" in worker and "in check_distinct" in worker
    assert list(tmp_path.iterdir()) == []


def test_bad_input_is_a_bad_case_named_by_its_case_file_and_reason(dataset):
    """A `UserError` (e.g. a `SeriesError`) or a file error naming its file is a bad case; a full
    disk or another exception is not (None)."""
    spec = _cases(dataset)[0]
    assert build_store._bad_input(spec, CaseError("c1", "/x/t2w.mha", "file not found")) == (
        "c1", "/x/t2w.mha", "file not found",
    )  # fmt: skip
    assert build_store._bad_input(spec, SeriesError("/x/dcm/1.dcm", "two series")) == (
        spec.case_id, "/x/dcm/1.dcm", "two series",
    )  # fmt: skip
    denied = PermissionError(errno.EACCES, "Permission denied", "/x/adc.mha")
    assert build_store._bad_input(spec, denied) == (spec.case_id, "/x/adc.mha", "Permission denied")
    full = OSError(errno.ENOSPC, "No space left on device", "/tmp/x")
    for error in (full, TypeError("a bug"), KeyError("t2w"), OSError(errno.EIO, "I/O error")):
        assert build_store._bad_input(spec, error) is None, error


def test_an_out_of_dot_is_written_and_its_errors_listed_beside_the_folder(
    dataset, tmp_path, monkeypatch
):
    """`preprocess --out .` wrote the store, then ended in a ValueError traceback ('.' has an
    empty name) looking for an earlier run's `<out>.errors.csv`; with every case refused while
    finding them it raised the same in place of its one-line refusal and listed none."""
    out = tmp_path / "store"
    out.mkdir()
    (tmp_path / "store.errors.csv").write_text("case,file,reason\nold,x,an earlier run's\n")
    monkeypatch.chdir(out)
    assert main(_preprocess(dataset, ".")) == 0  # `out` renamed over the working folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert len(build_store.open_store(out).case_ids) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    manifest = tmp_path / "bad.csv"
    manifest.write_text(f"case_id,patient_id,t2w,adc\nbad id,p1,{tmp_path}/t2w.mha,x.mha\n")
    with pytest.raises(SystemExit) as refused:
        main(["preprocess", "--layout", "manifest", "--manifest", str(manifest), "--out", ".",
              "--unlabelled", "negative", "--skip-bad-cases"])  # fmt: skip
    assert refused.value.code == 2
    listed = (tmp_path / "empty.errors.csv").read_text().splitlines()
    assert listed[0] == "case,file,reason" and listed[1].startswith("bad id,")
    assert list(empty.iterdir()) == []


def test_one_exam_under_two_ids_is_a_bad_case(dataset, tmp_path):
    """A copy of a case under another case and patient id was stored twice and split across
    folds; now it is refused naming it and its T2w, or with skip_bad_cases listed and left out.
    Two cases of one id are refused before any is preprocessed."""
    cases = _cases(dataset)
    copy = dataclasses.replace(cases[0], case_id="copy", patient_id="someone-else")
    with pytest.raises(CaseError) as refused:
        build_store.preprocess_cases([*cases, copy], tmp_path / "store", progress=False)
    assert (refused.value.case, refused.value.file) == ("copy", str(cases[0].components["t2w"]))
    assert refused.value.reason.startswith(
        f"its preprocessed data are those of case '{cases[0].case_id}' byte for byte"
    )
    assert not (tmp_path / "store").exists()
    summary = build_store.preprocess_cases(
        [*cases, copy], tmp_path / "store", progress=False, skip_bad_cases=True
    )
    assert summary.num_cases == len(cases)
    errors = (tmp_path / "store" / "errors.csv").read_text()
    assert "copy," in errors and "byte for byte" in errors
    twice = dataclasses.replace(cases[1], case_id=cases[0].case_id)
    with pytest.raises(UserError, match=f"case ids listed more than once: {cases[0].case_id}$"):
        build_store.preprocess_cases([*cases, twice], tmp_path / "other", progress=False)
    assert not (tmp_path / "other").exists()
