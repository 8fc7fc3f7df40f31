"""Preprocess many cases into a store, in parallel worker processes, with a progress bar.

Cases are handed to a `spawn` process pool (safe with SimpleITK's and JAX's threads) and written in
input order. A bad case either stops the run (its `CaseError` names case, file and reason, and the
temporary store is removed) or, with `skip_bad_cases`, is listed in `errors.csv` and skipped; so
is a case whose worker process died in it. Any other exception (a bug) stops the run with its
traceback, a worker's as its cause (`worker_pool`).
Ctrl-C or SIGTERM stop the pool cleanly (`worker_pool`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from tqdm import tqdm

from focalnet_jax.data.gland_labels import check_gland_labels, labelled_case
from focalnet_jax.data.io import CaseError
from focalnet_jax.data.layouts import (
    CaseSpec,
    LayoutError,
    check_layout_flags,
    discover_picai,
    read_manifest,
    unread_inputs,
    unread_note,
)
from focalnet_jax.data.manifest_checks import check_new_component_names
from focalnet_jax.data.picai_sources import label_scheme, marksheet_disagreements
from focalnet_jax.data.preprocess import preprocess_case
from focalnet_jax.data.preprocess_config import PreprocessConfig
from focalnet_jax.data.store import (
    DuplicateCase,
    StoreWriter,
    bad_cases_note,
    open_store,
    write_errors,
)
from focalnet_jax.data.store_settings import store_settings
from focalnet_jax.data.worker_pool import WorkerDiedError, worker_results
from focalnet_jax.data.writer_folders import writer_lock
from focalnet_jax.errors import DISK_ERRNOS, UserError, is_user_error, naming_the_disk, plural

log = logging.getLogger(__name__)


@dataclass
class PreprocessSummary:
    path: Path
    num_cases: int
    num_slices: int
    errors: list[tuple[str, str, str]] = field(default_factory=list)
    components: tuple[str, ...] = ()  # stored, in channel order
    unread: str = ""  # what the input offers beyond `components` (see `unread_inputs`), or ""
    lesion_free: list[str] = field(default_factory=list)  # left out: no slice to keep
    trimmed: list[str] = field(default_factory=list)  # stored without uncovered T2w slices

    def __str__(self) -> str:
        """`wrote N cases (S slices of t2w, adc) to PATH`, the inputs left unread, the
        lesion-free cases left out by `--slices annotated`, the cases stored without some T2w
        slices by `--slices covered` and the bad cases, if any: a store of fewer components,
        cases or slices than the input offers is said so."""
        slices = f"{plural(self.num_slices, 'slice')} of {', '.join(self.components)}"
        note = self.unread
        if self.lesion_free:
            note += f"; {plural(len(self.lesion_free), 'lesion-free case')} left out "
            note += f"({_ANNOTATED_ONLY})"
        if self.trimmed:
            note += f"; {plural(len(self.trimmed), 'case')} stored without the T2w slices a "
            note += "component does not cover (--slices covered)"
        note += bad_cases_note(self.errors)
        return f"wrote {plural(self.num_cases, 'case')} ({slices}) to {self.path}{note}"


_ANNOTATED_ONLY = "--slices annotated keeps the slices with a lesion"


def _work(job):
    """(spec, preprocessed case, None), or (spec, None, (case, file, reason)) for a bad case
    (`_bad_input`); any other exception, a bug, is raised with its traceback."""
    spec, config, slices = job
    try:
        case = preprocess_case(
            spec.components,
            spec.label,
            center=spec.center,
            mask=spec.mask,
            slices=slices,
            config=config,
            case_id=spec.case_id,
            series=spec.series,
        )
    except Exception as err:
        if (bad := _bad_input(spec, err)) is None:
            raise
        return spec, None, bad
    return spec, case, None


def _bad_input(spec: CaseSpec, err: Exception) -> tuple[str, str, str] | None:
    """(case, file, reason) where `err`, raised preprocessing `spec`, means bad input: a
    `UserError` (`CaseError`, or another naming its file) or a missing or unreadable file that it
    names (`errors.is_user_error`), but not a full or read-only disk (no case's fault); else
    None."""
    if isinstance(err, CaseError):
        return err.case, err.file, err.reason
    if not is_user_error(err) or (isinstance(err, OSError) and err.errno in DISK_ERRNOS):
        return None
    if isinstance(err, OSError):
        return spec.case_id, str(err.filename or ""), err.strerror or str(err)
    return (
        spec.case_id,
        str(getattr(err, "file", "") or ""),
        getattr(err, "reason", None) or str(err),
    )


def _lost_case(jobs, index: int, how: str):
    """`_work`'s result for job `index`, whose worker process died in it (`how`)."""
    spec = jobs[index][0]
    return spec, None, (spec.case_id, "", f"its worker process died ({how})")


def _add_results(
    writer: StoreWriter, results, bar: tqdm, skip_bad_cases: bool
) -> tuple[list, list[str], list[str]]:
    """Store each preprocessed case; a bad one raises its `CaseError`, or with `skip_bad_cases` is
    listed as an error and skipped. A case with no slice to keep (lesion-free, `--slices
    annotated`) is left out. Returns the `LabelledCase` of each stored case with lesions
    (`gland_labels`), the ids of the cases left out and those of the cases stored without some
    T2w slices a component does not cover (`--slices covered`)."""
    labelled, lesion_free, trimmed = [], [], []
    for spec, case, error in results:
        bar.update()
        if error is None and not len(case.images):
            log.info("leaving out case %s: lesion-free, and %s", spec.case_id, _ANNOTATED_ONLY)
            lesion_free.append(spec.case_id)
            continue
        if error is None:
            files = {**spec.components, "label": spec.label, "mask": spec.mask}
            if spec.series:  # the series chosen in a DICOM folder of several (`<component>_series`)
                files["series"] = dict(spec.series)
            try:
                writer.add(case, patient_id=spec.patient_id, files=files, meta=spec.meta)
            except DuplicateCase as duplicate:  # the same exam stored under another id
                error = (spec.case_id, str(spec.components["t2w"]), duplicate.reason)
        if error is not None:
            if not skip_bad_cases:
                raise CaseError(*error)
            log.warning("skipping case %s: %s (%s)", *error[:1], error[2], error[1])
            writer.add_error(*error)
            continue
        if writer.settings["slices"] == "covered" and len(case.images) < case.geometry.t2w_size[2]:
            trimmed.append(spec.case_id)
        if len(case.lesion_classes):
            labelled.append(labelled_case(case))
    return labelled, lesion_free, trimmed


def _errors_beside(out) -> Path:
    """`<out>.errors.csv`: where the bad cases of a run that wrote no `out` are listed (`out` may
    be '.', a folder without a name of its own)."""
    out = Path(os.path.abspath(out))
    return out.with_name(out.name + ".errors.csv")


def remove_stale_errors(out) -> None:
    """Remove `<out>.errors.csv` once `out` (a store, predictions) is written: it lists the bad
    cases of an earlier run that wrote none, and beside the new `out` would read as this run's."""
    stale = _errors_beside(out)
    if stale.exists():
        stale.unlink()
        log.info("removed %s: it listed the cases of an earlier run that wrote none", stale)


def every_case_refused(action: str, layout: str, out, refused) -> LayoutError:
    """The error of a run (`action`: 'preprocess', 'predict') whose cases were all refused while
    finding them (`refused`: (case, file, reason) rows), listed in `<out>.errors.csv` (written
    here: `out` is left as it was)."""
    write_errors(_errors_beside(out), refused)
    case, file, reason = refused[0]
    return LayoutError(
        f"no cases to {action} ({layout} layout); {len(refused)} refused, listed in "
        f"{_errors_beside(out)}, first: case {case!r}, file {file!r}: {reason}"
    )


def _refuse_empty_store(writer: StoreWriter, out, lesion_free: Sequence[str]) -> NoReturn:
    """Every case failed or was lesion-free (`--slices annotated`): drop the temporary store, list
    the errors in `<out>.errors.csv` beside it, and raise."""
    errors = list(writer.errors)
    writer.abort()
    if errors:
        write_errors(_errors_beside(out), errors)
    why = [f"{plural(len(errors), 'case')} failed"] if errors else []
    why += [f"{plural(len(lesion_free), 'case')} lesion-free"] if lesion_free else []
    first = f"; first: {errors[0]}" if errors else f": {_ANNOTATED_ONLY}"
    raise UserError(f"store {out}: no case stored ({', '.join(why)}){first}")


def preprocess_cases(
    cases: Sequence[CaseSpec],
    out: str | os.PathLike,
    *,
    config=None,
    slices: str = "all",
    workers: int = 1,
    skip_bad_cases: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    errors: Sequence[tuple[str, str, str]] = (),
) -> PreprocessSummary:
    """Preprocess `cases` into the store `out` (replaced atomically when complete).

    Raises the first `CaseError` unless `skip_bad_cases`; then every bad case is written to
    `<out>/errors.csv` (written, maybe empty, whenever `skip_bad_cases`) and the others are
    stored. `errors`: cases already refused while finding them, listed first in errors.csv.
    `overwrite`: replace a store at `out` made with other settings (see `StoreWriter`).
    """
    if not cases:
        raise UserError(f"store {out}: no cases to preprocess")
    if twice := sorted(i for i, n in Counter(c.case_id for c in cases).items() if n > 1):
        raise UserError(f"store {out}: case ids listed more than once: {', '.join(twice)}")
    if int(workers) < 1:
        raise UserError(f"--workers {workers}: expected at least 1")
    cfg = PreprocessConfig.from_any(config)
    components = tuple(cases[0].components)
    settings = store_settings(cfg, components, slices)
    jobs = [(spec, cfg, slices) for spec in cases]
    workers = max(1, min(int(workers), len(jobs)))
    beside = Path(os.path.abspath(out))  # `--out .`: taken now, the folder is renamed over
    with (
        naming_the_disk(out),
        writer_lock(out, "preprocess"),  # a second run meanwhile replaced this one's store
        StoreWriter(out, components, settings, overwrite=overwrite) as writer,
    ):
        for error in errors:
            log.warning("skipping case %s: %s", error[0], error[2])
            writer.add_error(*error)
        bar = tqdm(total=len(jobs), desc="preprocess", unit="case", disable=not progress)
        lost = functools.partial(_lost_case, jobs) if skip_bad_cases else None
        # The workers' job notes in the writer's folder: removed with it after a kill -9.
        with bar, worker_results(_work, jobs, workers, lost, writer.tmp) as results:
            try:
                added = _add_results(writer, results, bar, skip_bad_cases)
            except WorkerDiedError as died:
                if died.index is None:  # no case to name or skip: the run stops
                    raise UserError(f"store {out}: {died}") from None
                raise CaseError(*_lost_case(jobs, died.index, died.how)[2]) from None
        labelled, lesion_free, trimmed = added
        if not writer.records:
            _refuse_empty_store(writer, out, lesion_free)
        check_gland_labels(labelled, out)
        path = writer.commit(errors_file=skip_bad_cases)
        remove_stale_errors(beside)
        return PreprocessSummary(
            path, len(writer.records), writer.num_slices, list(writer.errors),
            components=tuple(cases[0].components), lesion_free=lesion_free, trimmed=trimmed,
        )  # fmt: skip


def _find_cases(
    layout: str, *, out, images, labels, masks, marksheet, manifest, components, unlabelled, refused
) -> list[CaseSpec]:
    """The cases of a PI-CAI folder (`layout` 'picai') or a manifest ('manifest'). `refused`: a
    list collecting the cases refused while finding them, or None to raise on the first; where
    every case is refused they are listed in `<out>.errors.csv`. A flag of the other layout is
    refused (`check_layout_flags`)."""
    check_layout_flags(
        layout, manifest=manifest, images=images, labels=labels, masks=masks, marksheet=marksheet
    )
    if layout == "picai":
        if images is None:
            raise LayoutError("--layout picai needs --images")
        cases = discover_picai(
            images,
            labels,
            masks,
            components=components,
            marksheet=marksheet,
            unlabelled=unlabelled,
            errors=refused,
        )
    elif layout == "manifest":
        if manifest is None:
            raise LayoutError("--layout manifest needs --manifest")
        cases = read_manifest(
            manifest, components=components, unlabelled=unlabelled, errors=refused
        )
    else:
        raise LayoutError(f"layout {layout!r}: expected 'picai' or 'manifest'")
    if not cases and refused:
        raise every_case_refused("preprocess", layout, out, refused)
    if not cases:
        raise LayoutError(f"no cases to preprocess ({layout} layout)")
    return cases


def preprocess_layout(
    layout: str,
    *,
    out,
    images=None,
    labels=None,
    masks=None,
    marksheet=None,
    manifest=None,
    components: Sequence[str] = ("t2w", "adc"),
    slices: str = "all",
    workers: int = 1,
    skip_bad_cases: bool = False,
    unlabelled: str = "error",
    label_values: str = "auto",
    interpolator: str = "bspline",
    progress: bool = True,
    overwrite: bool = False,
) -> PreprocessSummary:
    """`focalnet preprocess`: find the cases of a PI-CAI folder or a manifest and store them."""
    if int(workers) < 1:
        raise UserError(f"--workers {workers}: expected at least 1")
    check_new_component_names(components)
    refused = [] if skip_bad_cases else None  # cases refused while finding them (bad ids, labels)
    cases = _find_cases(
        layout,
        out=out,
        images=images,
        labels=labels,
        masks=masks,
        marksheet=marksheet,
        manifest=manifest,
        components=components,
        unlabelled=unlabelled,
        refused=refused,
    )
    if label_values == "auto":  # a manifest's class / ISUP map: value 1 is GS 3+3 (ISUP 1)
        label_values = label_scheme(labels) if layout == "picai" else "isup"
    config = PreprocessConfig(label_values=label_values, interpolator=interpolator)
    log.info("preprocessing %s with %s", plural(len(cases), "case"), plural(workers, "worker"))
    unread = unread_inputs(layout, cases, components, manifest)
    summary = preprocess_cases(
        cases,
        out,
        config=config,
        slices=slices,
        workers=workers,
        skip_bad_cases=skip_bad_cases,
        progress=progress,
        overwrite=overwrite,
        errors=refused or (),
    )
    if marksheet:
        _warn_marksheet_disagreements(summary.path)
    summary.unread = unread_note(layout, unread, f"--components is {','.join(components)}")
    return summary


def _warn_marksheet_disagreements(store_path) -> None:
    """One warning naming the stored cases whose label contradicts their marksheet row's csPCa
    flag (`picai_sources.marksheet_disagreements`), if any."""
    disagreements = marksheet_disagreements(open_store(store_path).cases)
    if disagreements:
        log.warning(
            "%d stored case(s) whose label contradicts the marksheet's csPCa flag (label maps "
            "decide what trains): %s%s", len(disagreements), "; ".join(disagreements[:5]),
            "; ..." if len(disagreements) > 5 else "",
        )  # fmt: skip
