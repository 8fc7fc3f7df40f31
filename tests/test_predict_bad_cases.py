"""Cases a resumable `focalnet predict --layout` cannot predict: with `--skip-bad-cases` listed in
errors.csv (kept in the partial, retried on `--resume`), or in `<out>.errors.csv` where every case
was refused; without it the run stops, saying to fix the case before resuming; a case id that
names one of predict's own files is refused."""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
from pathlib import Path

import predict_runs
import pytest
from cli_calls import cli_error, run_cli
from predict_runs import CASES, _cases, _finished, _interrupted, _predict, assert_same_outputs

from focalnet_jax.cli import main
from focalnet_jax.errors import plural
from focalnet_jax.evaluation.partial_output import partial_folder

tiny = predict_runs.tiny  # a module-scoped fixture


def _stopped_after_a_bad_case(tiny, tmp_path, monkeypatch) -> tuple[Path, str, Path, Path]:
    """(images, bad case, its ADC path, out) of a --skip-bad-cases run stopped once it wrote its
    first case, the bad case's ADC moved to `tmp_path/adc.mha` (its failure listed)."""
    images = tmp_path / "images"
    shutil.copytree(tiny["data"] / "images", images)
    bad = _cases(images)[0]
    adc = next(images.glob(f"*/{bad}_adc.mha"))
    adc.rename(tmp_path / "adc.mha")
    out = tmp_path / "out"
    _interrupted(tiny, out, monkeypatch, images, "--skip-bad-cases")
    return images, bad, adc, out


def test_a_case_that_failed_before_is_retried_on_resume(tiny, tmp_path, monkeypatch, caplog):
    images, bad, adc, out = _stopped_after_a_bad_case(tiny, tmp_path, monkeypatch)
    with (partial_folder(out) / "errors.csv").open() as f:  # written at each bad case
        assert [row["case"] for row in csv.DictReader(f)] == [bad]
    (tmp_path / "adc.mha").rename(adc)
    caplog.set_level("INFO", logger="focalnet_jax.evaluation.batch_predict")
    printed = run_cli([*_predict(tiny["run"], images, out), "--skip-bad-cases", "--resume"])
    assert printed == f"wrote {CASES} cases to {out} (1 finished before the resume, skipped)\n"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"retrying 1 case that failed before: {bad}" in warnings  # printed (INFO was not)
    assert f"1 of {CASES} cases already finished, skipped; predicting the other 2" in caplog.text
    assert (out / "errors.csv").read_text() == "case,file,reason\n"
    assert_same_outputs(out, tiny["reference"], extra=("errors.csv",))


def test_a_run_stopped_by_a_bad_case_says_to_fix_it_before_resuming(tiny, tmp_path):
    """A bad case stops a run without --skip-bad-cases; the hint said only to --resume, which
    stopped at the same case again."""
    images = tmp_path / "images"
    shutil.copytree(tiny["data"] / "images", images)
    bad = _cases(images)[-1]
    adc = next(images.glob(f"*/{bad}_adc.mha"))
    adc.write_text("ObjectType = Image\n")
    out = tmp_path / "out"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as stop:
        main([str(a) for a in _predict(tiny["run"], images, out)])
    assert f"case '{bad}', file '{adc}'" in str(stop.value)
    done = len(_finished(partial_folder(out)))
    hint, error = stderr.getvalue().splitlines()[-2:]
    assert error.startswith(f"focalnet predict: error: case '{bad}'")
    assert hint == (
        f"focalnet predict: kept {plural(done, 'finished case')} in {partial_folder(out)}; fix the "
        "case below (or add --skip-bad-cases to list it in errors.csv) and run the same command "
        "with --resume to predict the others"
    )
    assert done == CASES - 1 and not out.exists()


def test_every_case_refused_while_found_is_listed_beside_out(tiny, tmp_path):
    """With --skip-bad-cases, a folder whose cases were all refused while finding them ended in
    "no cases to predict", their reasons nowhere; they are listed in `<out>.errors.csv`, the
    first named, and a later run that writes `out` removes that list."""
    images = tmp_path / "images"
    shutil.copytree(tiny["data"] / "images", images)
    moved = {adc: tmp_path / adc.name for adc in images.glob("*/*_adc.mha")}
    for adc, aside in moved.items():
        adc.rename(aside)
    out = tmp_path / "out"
    predict = [*_predict(tiny["run"], images, out), "--skip-bad-cases"]
    message = cli_error(predict)
    listed = tmp_path / "out.errors.csv"
    first = _cases(images)[0]
    assert message.startswith(
        f"focalnet predict: error: no cases to predict (picai layout); {CASES} refused, listed in "
        f"{listed}, first: case '{first}', file "
    )
    assert "adc image missing" in message and not out.exists()
    with listed.open() as f:
        assert [row["case"] for row in csv.DictReader(f)] == _cases(images)
    for adc, aside in moved.items():
        aside.rename(adc)
    run_cli(predict)
    assert not listed.exists() and sorted(p.name for p in out.glob("*/")) == _cases(images)


def test_a_refused_resume_keeps_the_list_of_cases_that_failed(tiny, tmp_path, monkeypatch, caplog):
    """The partial's errors.csv was removed before the resume's checks: a resume refused (here
    for other --masks) left the partial without its only record of the failed cases, and the
    next resume did not say it retried them."""
    images, bad, adc, out = _stopped_after_a_bad_case(tiny, tmp_path, monkeypatch)
    (tmp_path / "adc.mha").rename(adc)
    predict = [*_predict(tiny["run"], images, out), "--skip-bad-cases", "--resume"]
    message = cli_error([*predict, "--masks", tiny["data"] / "masks"])
    assert "was cropped around the T2w volume centre" in message
    with (partial_folder(out) / "errors.csv").open() as f:
        assert [row["case"] for row in csv.DictReader(f)] == [bad]
    run_cli(predict)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"retrying 1 case that failed before: {bad}" in warnings


@pytest.mark.parametrize("case_id", ["models.json", "Errors.csv"])
def test_a_case_named_as_a_file_of_out_is_refused_naming_it(tiny, tmp_path, case_id):
    """Safe names, but those of predict's own files beside the case folders: the run ended in
    an errno line naming no case, or the case folder took the place of errors.csv."""
    images = tiny["data"] / "images"
    rows = ["case_id,patient_id,t2w,adc"]
    for number, case in enumerate(_cases(images)[:2]):
        t2w, adc = (next(images.glob(f"*/{case}_{c}.mha")) for c in ("t2w", "adc"))
        rows.append(f"{case_id if number == 0 else case},p{number},{t2w},{adc}")
    manifest = tmp_path / "cases.csv"
    manifest.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    predict = ["predict", "--checkpoint", tiny["run"], "--layout", "manifest", "--manifest",
               manifest, "--batch-size", "2", "--out", out]  # fmt: skip
    message = cli_error(predict)
    assert message.startswith(f"focalnet predict: error: case '{case_id}', file '")
    assert message.endswith(
        f": case id '{case_id}' is the name of a file predict writes beside the case folders "
        "(models.json, errors.csv, crop_centres.json, inputs.json); give the case another id"
    )
    assert not out.exists()
    run_cli([*predict, "--skip-bad-cases"])
    with (out / "errors.csv").open() as f:
        assert [row["case"] for row in csv.DictReader(f)] == [case_id]
    assert (out / "errors.csv").is_file() and (out / "models.json").is_file()


def test_a_whole_run_into_out_of_dot_ends_well(tiny, tmp_path, monkeypatch):
    """With `--out .` the run wrote every case, then ended in a ValueError traceback looking for
    an earlier run's `<out>.errors.csv` beside '.'; that list is removed from beside the folder."""
    out = tmp_path / "results"
    out.mkdir()
    stale = tmp_path / "results.errors.csv"
    stale.write_text("case,file,reason\n")
    monkeypatch.chdir(out)
    assert run_cli(_predict(tiny["run"], tiny["data"] / "images", Path("."))) == (
        f"wrote {CASES} cases to .\n"
    )
    assert sorted(p.name for p in out.glob("*/")) == _cases(tiny["data"] / "images")
    assert not stale.exists()


def test_the_failed_cases_of_a_partial_are_read_where_a_file_name_is_no_utf8(tmp_path):
    """errors.csv holds such a name as its bytes; read strictly, `--resume` ended in a
    UnicodeDecodeError traceback."""
    from focalnet_jax.data.store import write_errors
    from focalnet_jax.evaluation.partial_output import ERRORS_FILE, _failed_before

    write_errors(tmp_path / ERRORS_FILE, [("c1", "/x/caf\udce9.raw", "not found")])
    assert b"caf\xe9.raw" in (tmp_path / ERRORS_FILE).read_bytes()
    assert _failed_before(tmp_path) == ["c1"]
