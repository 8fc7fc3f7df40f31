"""`focalnet predict --layout picai|manifest`: every exam of a folder or a manifest.

Cases are found by the preprocessing's readers (data/layouts.py; labels are not needed and not
read) and preprocessed with its checks and the models' settings. The slices of consecutive cases
are pooled into full inference batches (`inference.pooled_predictions`), so the accelerator sees
`batch_size` slices at a time whatever the exams' lengths: only the run's last batch is padded.
The run's outputs (each case's, predict.py) are written, case folder by case folder, to
`<out>.partial/` (partial_output.py), which becomes `<out>` when complete, so `<out>` never mixes
two runs; a non-empty `<out>` is refused unless `overwrite`. A run stopped before the end (a
crash, Ctrl-C, SIGTERM, SIGKILL) keeps its finished cases there, and `resume` predicts the others
with the same models and settings. With `dicom` each case's folder also holds its
DICOM outputs (predict.py), written with the other files; a case whose T2w is an image file or
lacks the patient and study attributes the outputs copy is a bad case
(`dicom_output.dicom_sources`), and so is one whose T2w frames are not the maps' grid (found as its
outputs are written). A bad case stops the run with its error, or, with `skip_bad_cases`, is
listed in `<out>/errors.csv` (case, file, reason; written, maybe empty, whenever bad cases are
skipped) and skipped. A run that predicts no case fails and leaves `<out>` as it was.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from focalnet_jax.data.atomic_files import check_replaceable
from focalnet_jax.data.build_store import every_case_refused, remove_stale_errors
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
from focalnet_jax.data.picai_sources import as_folders
from focalnet_jax.data.preprocess import PreprocessedCase, preprocess_case
from focalnet_jax.data.store import bad_cases_note, write_errors
from focalnet_jax.errors import UserError, plural
from focalnet_jax.evaluation.detection_map import CandidateSettings
from focalnet_jax.evaluation.dicom_output import dicom_sources
from focalnet_jax.evaluation.ensemble import Ensemble
from focalnet_jax.evaluation.inference import check_scores, pooled_predictions
from focalnet_jax.evaluation.partial_output import (
    CENTRES_FILE,
    ERRORS_FILE,
    INPUTS_FILE,
    case_inputs,
    crop_centre_source,
    partial_output,
    record_crop_centres,
    record_inputs,
    recorded_settings,
    write_case_folder,
)
from focalnet_jax.evaluation.predict import grade_outputs, write_exam_outputs
from focalnet_jax.evaluation.predictions import MODELS_FILE

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BatchSummary:
    """The cases in `out` (`kept` of them finished by the interrupted run that was resumed) and
    the bad cases skipped, as (case, file, reason); `unread`: the manifest columns the models do
    not read (`layouts.unread_note`), or ""."""

    out: Path
    written: list[str]
    errors: list[tuple[str, str, str]]
    kept: int = 0
    unread: str = ""

    def describe(self) -> str:
        resumed = f" ({self.kept} finished before the resume, skipped)" if self.kept else ""
        return (
            f"wrote {plural(len(self.written), 'case')} to {self.out}{resumed}{self.unread}"
            f"{bad_cases_note(self.errors)}"
        )


def find_cases(
    layout: str,
    components: Sequence[str],
    *,
    images: str | Path | Sequence[str | Path] | None = None,
    masks: str | Path | None = None,
    manifest: str | Path | None = None,
    errors: list | None = None,
) -> list[CaseSpec]:
    """The cases of PI-CAI image folders (`images`: one or several, `picai_sources.picai_images`;
    optional gland `masks` for centring) or of a manifest CSV (its label column, if any, is
    ignored). A case id that is not a safe folder
    name raises, or, where `errors` is a list, is appended to it as (case, file, reason). A flag
    of the other layout is refused (`check_layout_flags`)."""
    check_layout_flags(layout, manifest=manifest, images=images, masks=masks)
    if layout == "picai":
        if images is None:
            raise LayoutError("--layout picai needs --images")
        cases = discover_picai(
            images, None, masks, components=components, unlabelled="negative", errors=errors
        )
    elif layout == "manifest":
        if manifest is None:
            raise LayoutError("--layout manifest needs --manifest")
        cases = read_manifest(manifest, components=components, labels=False, errors=errors)
    else:
        raise LayoutError(f"layout {layout!r}: expected 'picai' or 'manifest'")
    return _without_reserved_ids(cases, errors)


# The files predict writes beside the case folders of OUT: a case of such an id (a safe name)
# ended the run in an errno line naming neither, or its folder stood in for the file.
_RESERVED = (MODELS_FILE, ERRORS_FILE, CENTRES_FILE, INPUTS_FILE)
_RESERVED_FOLDED = {name.casefold() for name in _RESERVED}


def _without_reserved_ids(cases: list[CaseSpec], errors: list | None) -> list[CaseSpec]:
    """`cases` but those whose id is the name of a file of OUT (`_RESERVED`, in any letter
    case): each raises a CaseError naming it, or where `errors` is a list is appended to it."""
    kept = []
    for spec in cases:
        if spec.case_id.casefold() not in _RESERVED_FOLDED:
            kept.append(spec)
            continue
        error = CaseError(
            spec.case_id,
            next(iter(spec.components.values())),
            f"case id {spec.case_id!r} is the name of a file predict writes beside the case "
            f"folders ({', '.join(_RESERVED)}); give the case another id",
        )
        if errors is None:
            raise error
        errors.append((error.case, error.file, error.reason))
    return kept


def _preprocess(
    spec: CaseSpec, models: Ensemble, dicom: bool
) -> tuple[PreprocessedCase, list | None]:
    """One case through the models' preprocessing, and with `dicom` its T2w series' datasets
    (else None); every failure is a CaseError naming it."""
    try:
        case = preprocess_case(
            spec.components,
            center=spec.center,
            mask=spec.mask,
            slices="covered",
            series=spec.series,
            config=models.preprocess,
            case_id=spec.case_id,
        )
        if not dicom:
            return case, None
        t2w, grid = spec.components["t2w"], case.geometry.t2w_reference_image()
        return case, dicom_sources(spec.case_id, t2w, spec.series.get("t2w"), grid)
    except CaseError:
        raise
    except Exception as error:  # an unexpected failure still names the case
        raise CaseError(spec.case_id, "", f"{type(error).__name__}: {error}") from error


def _preprocess_or_skip(
    spec: CaseSpec, models: Ensemble, errors: list | None, dicom: bool
) -> tuple[PreprocessedCase, list | None] | None:
    """`_preprocess`; where `errors` is a list (bad cases skipped), a CaseError is logged,
    appended to it as (case, file, reason) and gives None; otherwise it is raised."""
    try:
        return _preprocess(spec, models, dicom)
    except CaseError as error:
        if errors is None:
            raise
        _skipped(error, errors)
        return None


def _skipped(error: CaseError, errors: list) -> None:
    """A bad case skipped: logged and appended to `errors` as (case, file, reason)."""
    log.warning("skipping case %s: %s (%s)", error.case, error.reason, error.file)
    errors.append((error.case, error.file, error.reason))


def predict_cases(
    models: Ensemble,
    cases: Sequence[CaseSpec],
    out: str | Path,
    *,
    skip_bad_cases: bool = False,
    threshold: float = 0.5,
    candidates: CandidateSettings | None = None,
    progress: bool = True,
    errors: list | None = None,
    overwrite: bool = False,
    resume: bool = False,
    dicom: bool = False,
) -> BatchSummary:
    """Predicts every case into `out/<case_id>/` (and `out/models.json`: the models and settings,
    `partial_output.recorded_settings`); returns what was written and the bad cases (those of
    `errors`, found before, first). The outputs are made in `<out>.partial/`
    (`partial_output.partial_output`), which becomes `out` at the end; a non-empty `out` is
    refused unless `overwrite` (then replaced whole), also one that another run finished after
    this one started (checked under the lock beside `out`). With `resume` the cases already finished
    in the partial are skipped and the others (also those that failed before) predicted. `dicom`:
    each case's DICOM outputs too (recorded in models.json, so a resume writes them too).

    Raises the first CaseError unless `skip_bad_cases`; `out` is then left as it was and the
    partial kept for `resume`.
    """
    candidates = candidates or CandidateSettings()
    if not cases:
        raise LayoutError("no cases to predict")
    out = Path(out)
    errors = list(errors or [])
    options = {"threshold": threshold, "candidates": candidates, "grades": grade_outputs(models)}
    settings = recorded_settings(
        models.describe(),
        threshold,
        candidates,
        dicom=dicom,
        preprocess=models.input_preprocess,
        configs=models.inference_configs,
    )
    centres = {spec.case_id: crop_centre_source(spec.mask, spec.center) for spec in cases}
    inputs = {spec.case_id: case_inputs(spec) for spec in cases}
    with partial_output(out, settings, resume=resume, overwrite=overwrite) as taken:
        partial, done, failed = taken
        kept = _check_finished(partial, done, cases)
        record_crop_centres(partial, done, centres)
        record_inputs(partial, done, inputs)
        (partial / ERRORS_FILE).unlink(missing_ok=True)  # retried now; this run lists its own
        if failed:  # a warning: printed without a logging setup, as docs/evaluation.md says
            log.warning(
                "retrying %s that failed before: %s", plural(len(failed), "case"), ", ".join(failed)
            )
        todo = [spec for spec in cases if spec.case_id not in done]
        try:
            written = _predict_into(
                partial, models, todo, errors, skip_bad_cases, options, progress, dicom
            )
        finally:
            if skip_bad_cases:
                write_errors(partial / ERRORS_FILE, errors)
        if not kept + written:  # raised here, the partial is kept and `out` left as it was
            raise UserError(
                f"{out}: no case predicted ({plural(len(errors), 'case')} failed); see "
                f"{partial / ERRORS_FILE}"
            )
    return BatchSummary(out, kept + written, errors, kept=len(kept))


def _check_finished(partial: Path, done: set[str], cases: Sequence[CaseSpec]) -> list[str]:
    """The finished cases of a resumed `partial`, in the order of `cases` (how many, logged). A
    finished case that is not among `cases` is
    an error: the inputs changed, and the output would not be that of one run."""
    ids = [spec.case_id for spec in cases]
    if stray := sorted(done - set(ids)):
        raise UserError(
            f"--resume: {partial} holds case {stray[0]}, which is not among the "
            f"{plural(len(ids), 'case')} to predict now; resume with the same inputs, or add "
            "--overwrite (without --resume) to start over"
        )
    kept = [case for case in ids if case in done]
    if done:
        log.info(
            "resuming %s: %d of %s already finished, skipped; predicting the other %d",
            partial, len(kept), plural(len(ids), "case"), len(ids) - len(kept),
        )  # fmt: skip
    return kept


def _predict_into(
    out: Path, models: Ensemble, cases, errors, skip_bad_cases, options, progress, dicom
):
    """The loop of `predict_cases`: cases preprocessed, their slices pooled into whole inference
    batches (`pooled_predictions`), predicted and written to `out` (each case's folder whole or
    absent: `write_case_folder`; errors.csv rewritten at each bad case skipped); returns the
    case ids written."""
    written: list[str] = []
    with tqdm(total=len(cases), desc="predict", unit="case", disable=not progress) as bar:

        def preprocessed():
            for spec in cases:
                taken = _preprocess_or_skip(spec, models, errors if skip_bad_cases else None, dicom)
                if taken is None:
                    write_errors(out / ERRORS_FILE, errors)
                    bar.update()
                else:
                    yield taken, taken[0].images

        for (case, sources), scores in pooled_predictions(
            models, preprocessed(), models.batch_size
        ):
            check_scores(models, case.case_id, case.images, scores)
            write = functools.partial(
                write_exam_outputs, case, scores, dicom_sources=sources, **options
            )
            try:
                write_case_folder(out, case.case_id, write)
                written.append(case.case_id)
            except CaseError as error:  # e.g. --dicom: its T2w frames are not the maps' grid
                if not skip_bad_cases:
                    raise
                _skipped(error, errors)
                write_errors(out / ERRORS_FILE, errors)
            bar.update()
    return written


def predict_layout(
    models: Ensemble,
    layout: str,
    out: str | Path,
    *,
    images: str | Path | Sequence[str | Path] | None = None,
    masks: str | Path | None = None,
    manifest: str | Path | None = None,
    **options,
) -> BatchSummary:
    """`find_cases` + `predict_cases` with the models' components (a manifest's columns they do
    not read named in the summary, as preprocess names them). Where every case was refused
    while finding them (`skip_bad_cases`), they are listed in `<out>.errors.csv` and the run is
    refused naming the first (`out` has nothing to hold); a later run that writes `out` removes
    that file."""
    errors = [] if options.get("skip_bad_cases") else None
    beside = Path(os.path.abspath(out))  # `--out .`: taken now, the folder is renamed over
    check_replaceable(Path(out), options.get("overwrite", False), MODELS_FILE, "focalnet predict",
                      (*as_folders(images), masks, manifest))  # fmt: skip
    cases = find_cases(
        layout, models.components, images=images, masks=masks, manifest=manifest, errors=errors
    )
    if not cases and errors:  # OUT left as it was: the reasons beside it
        raise every_case_refused("predict", layout, beside, errors)
    log.info("predicting %s into %s", plural(len(cases), f"{layout} case"), out)
    reads = f"the models read {','.join(models.components)}"
    unread = (
        unread_inputs(layout, cases, models.components, manifest) if layout == "manifest" else []
    )
    summary = predict_cases(models, cases, out, errors=errors, **options)
    summary.unread = unread_note(layout, unread, reads)
    remove_stale_errors(beside)
    return summary
