"""The unfinished output of a batch `focalnet predict`: `<out>.partial/`, beside `--out`, filled
case by case and renamed to `--out` once every case is done, so that a run stopped by a crash,
Ctrl-C, SIGTERM or a time limit keeps the cases it finished, and `--resume` continues it.

- `<out>.partial/models.json`: the models and settings that make the outputs (checkpoints and
  steps, TTA, detection-map candidate settings, detections threshold; not the batch size: a
  slice's scores depend on its batch neighbours only in float rounding, see docs/evaluation.md).
  `--resume` continues a partial only with the same ones, else it is a one-line error naming
  the first difference.
- `<out>.partial/crop_centres.json`: how each case's crop is centred (its prostate mask, a given
  point, or the T2w volume centre); `--resume` refuses a finished case that would be centred
  otherwise now (other `--masks`).
- `<out>.partial/inputs.json`: the files each case is predicted from (their count, size and
  latest modification time) and the DICOM series chosen in a folder of several; `--resume`
  refuses a finished case whose files or series differ now (other `--images`, a series exported
  again, another `<component>_series`).
- `<out>.partial/<case_id>/`: a finished case. It is written in `.<case_id>.tmp-<pid>/` and
  renamed, so a reader (and `--resume`) never finds half a case; the leftovers of a killed
  writer (those folders, and `.<file>.tmp-<pid>` files of errors.csv or models.json) are removed
  when the next run takes the partial.
- `.<out>.predict.lock`, beside `--out` (`lock_file`): held (`file_lock`) by the one run that
  writes into `--out`, from its check that `--out` may be written until the partial has become
  `--out`, so two runs never write one partial, and a run never replaces an `--out` that another
  run finished after this one started (without `--overwrite`). The system releases it when the
  process ends, also on SIGKILL; the run removes the file when it ends, and one that a killed
  run left is taken by the next run. It is never inside the folder that becomes `--out`.
  Earlier versions held `<out>.partial/.predict.lock` instead, and one killed right after the
  rename left it in `--out`: the next run removes it, or refuses while its holder runs.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from focalnet_jax.data import metaimage_header
from focalnet_jax.data.atomic_files import check_replaceable, sync_folder, write_json_atomic
from focalnet_jax.data.writer_folders import (
    lock_beside,
    remove_dead_leftovers,
    remove_replaced,
    restore_moved_aside,
    swap_in,
    take_writer_lock,
    target_folder,
    writer_folder,
)
from focalnet_jax.errors import UserError, plural
from focalnet_jax.evaluation.detection_map import THRESHOLD_MODES, CandidateSettings
from focalnet_jax.evaluation.predictions import MODELS_FILE
from focalnet_jax.file_lock import LockHeld, acquire_lock, release_lock

log = logging.getLogger(__name__)

LOCK_FILE = ".predict.lock"  # named `.<out>.predict.lock` beside --out (`lock_file`)
ERRORS_FILE = "errors.csv"
CENTRES_FILE = "crop_centres.json"  # case id -> how its crop was centred (`record_crop_centres`)
INPUTS_FILE = "inputs.json"  # case id -> the files it was predicted from (`record_inputs`)
WRITER = "focalnet predict"


def partial_folder(out: str | os.PathLike) -> Path:
    """`<out>.partial`, where a batch prediction into `out` is made (beside the folder a link
    `out` points to)."""
    out = target_folder(out)
    return out.with_name(f"{out.name}.partial")


def lock_file(out: str | os.PathLike) -> Path:
    """`.<out>.predict.lock`, beside `out` (the folder a link `out` points to): the lock of the
    run writing into `out`."""
    return lock_beside(out, "predict")


def resume_hint(out: str | os.PathLike, *, bad_case: bool = False) -> str:
    """The line that says how to continue a run into `out` that was interrupted, or stopped by
    a bad case (`bad_case`: a bare `--resume` would stop at that case again)."""
    partial = partial_folder(out)
    done = len(finished_cases(partial)) if partial.is_dir() else 0
    kept = f"focalnet predict: kept {plural(done, 'finished case')} in {partial}"
    if bad_case:
        return (
            f"{kept}; fix the case below (or add --skip-bad-cases to list it in errors.csv) and "
            "run the same command with --resume to predict the others"
        )
    return f"{kept}; run the same command with --resume to predict the others"


def recorded_settings(
    describe: dict,
    threshold: float,
    candidates: CandidateSettings,
    dicom: bool = False,
    preprocess: dict | None = None,
    configs: dict | None = None,
) -> dict:
    """What `models.json` records: the ensemble's `describe()` (models and steps, TTA), the
    detections threshold and the candidate settings (threshold as text, a score as its float's:
    '0.3', '0.30' and 0.3 agree), `"dicom": true` with `--dicom` (only then: earlier partials
    still resume without it), `preprocess`, the settings that shaped the models' inputs
    (`Ensemble.input_preprocess`; a run without its own record takes them from its training
    store as it is now, which may have been rebuilt between a stop and its resume), and
    `configs`, what each run's config decides of its scores (`Ensemble.inference_configs`)."""
    settings = dataclasses.asdict(candidates)
    settings["threshold"] = _threshold_text(settings["threshold"])
    recorded = {**describe, "threshold": float(threshold), "candidates": settings}
    if preprocess is not None:
        recorded["preprocess"] = preprocess
    if configs:
        recorded["configs"] = configs
    return {**recorded, "dicom": True} if dicom else recorded


def _threshold_text(threshold) -> str:
    """A candidate threshold as `models.json` records it: a mode's name, or a score's float as
    text ('0.30' -> '0.3')."""
    text = str(threshold)
    return text if text in THRESHOLD_MODES else str(float(text))


def crop_centre_source(mask, center) -> str:
    """How a case's crop is centred (`CaseSpec.mask` and `.center`), as `CENTRES_FILE` records
    it: its prostate mask (resolved path), a given point (LPS mm), or the T2w volume centre."""
    if mask:
        return f"prostate mask {Path(mask).resolve()}"
    if center is not None:
        return "point " + ",".join(f"{float(v):.4f}" for v in center) + " mm"
    return "T2w volume centre"


def record_crop_centres(partial: Path, done: set[str], centres: dict[str, str]) -> None:
    """Writes `centres` (case id -> `crop_centre_source`) as the partial's `CENTRES_FILE`, after
    refusing (one line) a resume where a finished case of `done` was cropped around another
    centre than it would be now (other --masks, or manifest centres): its outputs would not be
    those of one run. A partial of an earlier version, without the file, is not checked."""

    def refusal(case: str, recorded, now) -> str:
        return (
            f"--resume: case {case} of {partial} was cropped around the "
            f"{recorded or 'centre it did not record'}, and would be around the {now} now; give "
            "the same --masks or manifest centres, or add --overwrite (without --resume) to start "
            "over"
        )

    _record_per_case(partial / CENTRES_FILE, done, centres, refusal)


def input_files(files: dict[str, str | None]) -> dict[str, str]:
    """{name: '<n> file(s), <bytes> bytes, modified <s>'} of a case's input files (`files`:
    component or 'mask' -> path; None left out): a file (with the data file a `.mhd` header
    names), or the files a DICOM folder's reader looks at (its own, not hidden ones such as
    macOS `._*` copies), from their sizes and latest modification time in whole seconds (no file
    is read; data moved or copied keeping its times, also to the second as tar does, is the
    same), as `INPUTS_FILE` records them."""
    found = {}
    for name, path in files.items():
        if not path:
            continue
        path = Path(path)
        if path.is_dir():  # a DICOM series
            read = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
        else:
            read = [
                p for p in (path, metaimage_header.data_file(path)) if p is not None and p.is_file()
            ]
        stats = [p.stat() for p in read]
        size = sum(s.st_size for s in stats)
        modified = max((int(s.st_mtime) for s in stats), default=0)
        found[name] = f"{plural(len(stats), 'file')}, {size} bytes, modified {modified}"
    return found


def case_inputs(spec) -> dict[str, str]:
    """What a resume compares of a case (`layouts.CaseSpec`) against its finished outputs: its
    files (`input_files`) and the series chosen in a DICOM folder of several
    (`<component>_series`: another series of the same folder is other input)."""
    chosen = {f"{name}_series": f"series {value}" for name, value in spec.series.items() if value}
    return {**input_files({**spec.components, "mask": spec.mask}), **chosen}


def record_inputs(partial: Path, done: set[str], inputs: dict[str, dict[str, str]]) -> None:
    """Writes `inputs` (case id -> `input_files`) as the partial's `INPUTS_FILE`, after refusing
    (one line) a resume where a finished case of `done` was predicted from other files than it
    would be now (other --images, a series exported again): its outputs would not be those of
    one run. A partial of an earlier version, without the file, is not checked."""

    def refusal(case: str, recorded, now) -> str:
        now = _comparable(recorded, now)
        recorded = recorded or {}
        name = next(n for n in sorted({*recorded, *now}) if recorded.get(n) != now.get(n))
        return (
            f"--resume: case {case} of {partial} was predicted from another {name} "
            f"({recorded.get(name, 'none')}; now {now.get(name, 'none')}); resume with the same "
            "input files, or add --overwrite (without --resume) to start over"
        )

    _record_per_case(partial / INPUTS_FILE, done, inputs, refusal, _same_inputs)


def _comparable(recorded, now: dict) -> dict:
    """The inputs `now` to compare with a finished case's `recorded` ones: a record of an earlier
    version, without the series chosen (`case_inputs`), is compared on its files alone."""
    if isinstance(recorded, dict) and not any(k.endswith("_series") for k in recorded):
        return {k: v for k, v in now.items() if not k.endswith("_series")}
    return now


def _same_inputs(recorded, now: dict) -> bool:
    return recorded == _comparable(recorded, now)


def _record_per_case(
    path: Path, done: set[str], values: dict, refusal, same=lambda recorded, now: recorded == now
) -> None:
    """Writes `values` (case id -> what a finished case was made with) to `path`, after refusing
    the first finished case of `done` whose recorded value differs (not `same(recorded, now)`;
    `refusal(case, recorded, now)` -> the line), where `path` exists."""
    if done and path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"--resume: {path} cannot be read ({error})") from None
        for case in sorted(done & set(values)):
            if not same(recorded.get(case), values[case]):
                raise UserError(refusal(case, recorded.get(case), values[case]))
    write_json_atomic(values, path)


def finished_cases(partial: Path) -> set[str]:
    """The case ids with a finished folder in `partial`."""
    return {p.name for p in partial.iterdir() if p.is_dir() and not p.name.startswith(".")}


def write_case_folder(partial: Path, case_id: str, write) -> Path:
    """Calls `write(folder)` on a new temporary folder in `partial`, then renames it to
    `partial/<case_id>`; returns that."""
    final = partial / case_id
    tmp = partial / f".{case_id}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        write(tmp)
        sync_folder(tmp)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _difference(recorded: dict, current: dict, prefix: str = "") -> str | None:
    """The first setting in which `recorded` and `current` differ, as 'KEY: A (partial) vs B'."""
    for key in sorted(set(recorded) | set(current)):
        was, now = recorded.get(key), current.get(key)
        if isinstance(was, dict) and isinstance(now, dict):
            if found := _difference(was, now, f"{prefix}{key}."):
                return found
        elif was != now:
            return f"{prefix}{key}: {json.dumps(was)} in the partial, {json.dumps(now)} now"
    return None


def _check_resumable(partial: Path, settings: dict) -> None:
    """Refuses (one line) a partial made with other models or settings than `settings`. A partial
    of an earlier version, without the models' "weights" (or "preprocess", "configs"), has its
    models checked by run and step alone (its preprocessing and configs not at all), as then."""
    try:
        recorded = json.loads((partial / MODELS_FILE).read_text())
    except (OSError, ValueError) as error:
        raise UserError(
            f"{partial} has no readable {MODELS_FILE} ({error}): it is not the partial output "
            f"of {WRITER}; remove it or add --overwrite to start over"
        ) from None
    unrecorded = {"weights", "preprocess", "configs"} - set(recorded)
    settings = {key: value for key, value in settings.items() if key not in unrecorded}
    if isinstance(candidates := recorded.get("candidates"), dict) and "threshold" in candidates:
        with contextlib.suppress(ValueError):  # recorded as typed before ('0.30'); else compared
            candidates["threshold"] = _threshold_text(candidates["threshold"])
    if difference := _difference(recorded, settings):
        raise UserError(
            f"--resume: {partial} was made with other models or settings ({difference}); run with "
            "those, or add --overwrite (without --resume) to start over"
        )


def _failed_before(partial: Path) -> list[str]:
    """The cases of the partial's `errors.csv` (skipped as bad by the run that made it). The
    file is kept until the resume's checks pass (`batch_predict.predict_cases` removes it): a
    refused resume leaves the partial as it was."""
    path = partial / ERRORS_FILE
    try:
        with path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:  # as written
            failed = [row["case"] for row in csv.DictReader(f) if row.get("case")]
    except (OSError, KeyError, csv.Error):
        failed = []
    return failed


def _others(partial: Path) -> list[str]:
    """The names in `partial` other than the lock file of earlier versions and what a run killed
    while writing its `models.json` left of it."""
    leftover = f".{MODELS_FILE}.tmp-"
    return sorted(
        p.name for p in partial.iterdir() if p.name != LOCK_FILE and not p.name.startswith(leftover)
    )


def _remove(path: Path) -> None:
    """Removes the folder (whole) or file `path`."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _remove_earlier_lock(folder: Path, out: Path) -> None:
    """Removes `folder/.predict.lock`, the lock that earlier versions held in the partial (and
    left in `--out` when killed right after the rename), once no process holds it (logged); while
    one does, that earlier run still writes into `out`, and this one is refused in one line."""
    path = folder / LOCK_FILE
    if not path.is_file():
        return
    try:
        lock = acquire_lock(path)
    except FileNotFoundError:  # its folder was moved meanwhile: nothing left to remove here
        return
    except LockHeld as held:
        raise UserError(
            f"{path} is held by {held.holder}: a {WRITER} of an earlier version is writing {out}; "
            "wait for it to end"
        ) from None
    release_lock(lock, remove=True)
    log.warning("removed %s, left by a %s of an earlier version that ended", path, WRITER)


def _take(partial: Path, out: Path, resume: bool, overwrite: bool) -> None:
    """Makes `partial` ready for this run, which holds the lock beside `out`. An existing
    partial is refused without `resume` or `overwrite` (one line saying which continues and
    which starts over), or while a run of an earlier version holds its lock."""
    exists = partial.exists()
    if exists and not partial.is_dir():
        raise UserError(f"{partial} exists and is not a folder; move it away")
    if exists and not (partial / MODELS_FILE).is_file() and _others(partial):
        raise UserError(
            f"{partial} holds {_others(partial)[0]} but no {MODELS_FILE}: it is not the partial "
            f"output of {WRITER}, and would be deleted; move it away or choose another --out"
        )
    if exists:
        _remove_earlier_lock(partial, out)
    if exists and not resume and not overwrite:
        raise UserError(
            f"{partial} holds an unfinished run of {WRITER} into this --out: add --resume to "
            "continue it, or --overwrite to start over"
        )
    partial.mkdir(mode=0o755, exist_ok=True)


@contextlib.contextmanager
def partial_output(out: Path, settings: dict, *, resume: bool, overwrite: bool) -> Iterator:
    """Yields `(partial, finished case ids, case ids that failed before)` for this run to fill;
    when the block ends without an error the partial becomes `out` (an existing `out` replaced
    whole, as `atomic_files.replaced_folder` does), else it is kept for `--resume`. All of it,
    from the check that a non-empty `out` is replaced only with `overwrite` (and is an earlier
    output) to the rename, holds the lock beside `out` (`lock_file`). Without `resume` an
    existing partial is refused, or with `overwrite` emptied; with `resume` its recorded
    settings must equal `settings` (its `models.json`, written here for a new partial). A
    symbolic link `out` is kept and the folder it points to replaced (`target_folder`)."""
    out = target_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = take_writer_lock(out, "predict")
    try:
        restore_moved_aside(out, WRITER)
        remove_dead_leftovers(out, WRITER)  # temporary folders of runs before partials were kept
        if (out / MODELS_FILE).is_file():
            _remove_earlier_lock(out, out)
        check_replaceable(out, overwrite, MODELS_FILE, WRITER)
        partial = partial_folder(out)
        _take(partial, out, resume, overwrite)
        if resume and (partial / MODELS_FILE).exists():
            _check_resumable(partial, settings)
            for leftover in partial.glob(".*.tmp-*"):  # of a killed writer: the lock is ours
                _remove(leftover)
            failed = _failed_before(partial)
        else:  # `models.json` last: a run killed meanwhile leaves a partial that is predict's
            for path in sorted(partial.iterdir(), key=lambda path: path.name == MODELS_FILE):
                _remove(path)
            failed = []
        write_json_atomic(settings, partial / MODELS_FILE)
        yield partial, finished_cases(partial), failed
        aside = writer_folder(out)
        moved = swap_in(partial, out, aside=aside.with_name(f"{aside.name}.old"))
        remove_replaced(moved, out)
    finally:
        release_lock(lock, remove=True)
