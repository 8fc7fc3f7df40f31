"""Finding cases on disk: the PI-CAI layout and the manifest CSV layout (docs/data.md).

PI-CAI: `<images>/<patient>/<patient>_<study>_<component>.mha` (one or more image folders, see
`picai_sources`), labels `<labels>/<patient>_<study>.nii.gz` (one or more label folders, the first
holding a case's file winning; 0 background, 2..5 ISUP, 1 csPCa of unknown grade), optional
whole-gland masks
`<masks>/<patient>_<study>.nii.gz`, optional `marksheet.csv` read by column name. A `dataset.json`
beside the labels may declare `{"label_values": "isup"}` (value 1 = GS 3+3, as the synthetic
generator writes); otherwise label value 1 means "csPCa, grade unknown".

Manifest: a CSV with `case_id, patient_id`, one path column per component, `label` (a missing
column or empty cell is an error unless `unlabelled` says otherwise), optional `prostate_mask` and
`center_x, center_y, center_z` (mm; LPS, or RAS where the optional `center_space` cell says RAS),
and optional `<component>_series` columns choosing a series of a DICOM folder that holds several
(SeriesInstanceUID or exact SeriesDescription). Relative paths are relative to the CSV's folder.
Case and patient ids are checked with `check_case_id` (they become file names); two case ids
differing only in letter case, or two spellings of one patient id (letter case, `10003.0` for
`10003`), are refused. Empty rows are skipped.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from focalnet_jax.data.atomic_files import replaced_atomically
from focalnet_jax.data.case_ids import check_case_id, spreadsheet_id
from focalnet_jax.data.csv_tables import csv_rows
from focalnet_jax.data.io import IMAGE_SUFFIXES, CaseError, image_suffix
from focalnet_jax.data.manifest_checks import (
    CENTRE_COLUMNS,
    CENTRE_SPACE_COLUMN,
    ExamsSeen,
    check_components,
    check_manifest_columns,
    known_columns,
    unread_columns,
)
from focalnet_jax.data.picai_sources import (
    LABEL_SUFFIXES,
    check_label_files,
    check_marksheet_cases,
    check_unlabelled_case,
    find_file,
    label_folders,
    missing_component,
    missing_label,
    not_a_folder,
    picai_images,
    read_marksheet,
    warn_marksheet_cannot_tell,
    warn_unmatched_labels,
)
from focalnet_jax.errors import LayoutError, UserError

DEFAULT_COMPONENTS = ("t2w", "adc")
log = logging.getLogger(__name__)


@dataclass
class CaseSpec:
    """Where one case's files are. `components` maps name -> path in the configured order."""

    case_id: str
    patient_id: str
    components: dict[str, str]
    label: str | None = None
    mask: str | None = None
    center: tuple[float, float, float] | None = None
    meta: dict = field(default_factory=dict)
    series: dict[str, str] = field(default_factory=dict)  # component -> DICOM series choice


def check_layout_flags(layout: str, *, manifest=None, **picai_flags) -> None:
    """Refuses a flag of the other layout, which would be ignored: `--manifest` with 'picai', a
    PI-CAI flag (`picai_flags`, e.g. `masks=...`: `--masks`) with 'manifest'."""
    if layout == "picai" and manifest:
        raise LayoutError("--manifest is not read with --layout picai, only with --layout manifest")
    given = [name for name, value in picai_flags.items() if value]
    if layout == "manifest" and given:
        raise LayoutError(
            f"--{given[0]} is not read with --layout manifest, only with --layout picai; a "
            "manifest names each case's files in its columns"
        )


def _check_unlabelled(unlabelled: str) -> None:
    if unlabelled not in ("error", "negative", "skip"):
        raise LayoutError(f"unlabelled={unlabelled!r}: expected 'error', 'negative' or 'skip'")


def _check_labels_folders(labels, unlabelled: str) -> tuple[Path, ...]:
    """The label folders; none is an error unless `unlabelled` says what unlabelled cases mean."""
    folders = label_folders(labels)
    if not folders and unlabelled == "error":
        raise LayoutError(
            "no --labels folder: give it, or pass --unlabelled negative (every case lesion-free) "
            "or --unlabelled skip"
        )
    return folders


def discover_picai(
    images: str | os.PathLike | Sequence[str | os.PathLike],
    labels: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    masks: str | os.PathLike | None = None,
    *,
    components: Sequence[str] = DEFAULT_COMPONENTS,
    marksheet: str | os.PathLike | None = None,
    unlabelled: str = "error",
    errors: list | None = None,
) -> list[CaseSpec]:
    """Cases of one or more PI-CAI image folders (`picai_sources.picai_images`), sorted by id.

    A case is any `<patient>_<study>` with at least one image file; a missing component or label
    file is a `CaseError` naming the folder(s) and the file names looked for. `labels`: one
    label folder or several in order of preference (a case takes its file from the first that
    holds one). `unlabelled`: 'error' (default: the missing label file is that case's error, and
    no `labels` an error), 'negative' (no lesions; refused for a case the `marksheet` calls
    csPCa) or 'skip' (case left out). Components: T2w first. A case whose files lie in two
    patient folders raises `LayoutError` naming both files. A case with a file present in two
    formats, or whose id is not a safe file name (`check_case_id`), raises `UserError`, or,
    where `errors` is a list (--skip-bad-cases), is appended to it as (case, file, reason) and
    left out.
    """
    _check_unlabelled(unlabelled)
    check_components(components)
    folders = _check_labels_folders(labels, unlabelled)
    if masks is not None and not Path(masks).is_dir():  # else every crop centred on the T2w
        raise LayoutError(not_a_folder("masks", masks))
    found = picai_images(images)
    listed = check_label_files(folders)
    sheet = read_marksheet(marksheet) if marksheet else {}
    check_marksheet_cases(sheet, sorted(found), marksheet)
    if unlabelled == "negative":
        warn_marksheet_cannot_tell(sheet, marksheet)
    cases, unlabelled_cases = [], []
    for case, (patient, folder, file) in sorted(found.items()):
        try:
            check_case_id(case, f"PI-CAI image file {file}")
            spec = _picai_case(case, patient, folder, folders, masks, components, unlabelled)
            if spec is not None and spec.label is None and case in sheet:
                check_unlabelled_case(case, sheet[case], marksheet, folders)
        except UserError as error:
            if errors is None:
                raise
            if isinstance(error, CaseError):  # names its own file
                errors.append((error.case, error.file, error.reason))
            else:
                errors.append((case, str(file), str(error)))
            continue
        if spec is None:
            unlabelled_cases.append(case)
            continue
        spec.meta = dict(sheet.get(case, {}))
        cases.append(spec)
    _warn_unmasked(cases, masks)
    warn_unmatched_labels(listed, set(found))
    where = ", ".join(map(str, folders)) or "no --labels folder given"
    _warn_left_out(unlabelled_cases, f"no label file in {where}")
    return cases


def _picai_label(case: str, folders: Sequence[Path], unlabelled: str) -> Path | None:
    """The label file of `case` in the first of `folders` holding one; where none does and
    `unlabelled` is 'error', a `CaseError` (`picai_sources.missing_label`)."""
    for labels in folders:
        label = find_file(labels, case, LABEL_SUFFIXES, case)
        if label is not None:
            return label
    if folders and unlabelled == "error":
        raise missing_label(case, folders)
    return None


def _picai_case(
    case: str, patient: str, folder: Path, folders, masks, components, unlabelled
) -> CaseSpec | None:
    """The files of one PI-CAI case (None where it has no label and `unlabelled` is 'skip');
    a file present in two formats raises `LayoutError` naming both, a missing component file a
    `CaseError` (`picai_sources.missing_component`)."""
    found = {name: find_file(folder, f"{case}_{name}", IMAGE_SUFFIXES, case) for name in components}
    label = _picai_label(case, folders, unlabelled)
    if label is None and unlabelled == "skip":
        return None
    paths = {}
    for name, path in found.items():
        if path is None:
            raise missing_component(case, folder, name)
        paths[name] = os.path.abspath(path)
    mask = find_file(Path(masks), case, LABEL_SUFFIXES, case) if masks is not None else None
    # Absolute, as the manifest layout's: the store records them (`files`), and a later working
    # directory is another.
    return CaseSpec(
        case_id=case,
        patient_id=patient,
        components=paths,
        label=os.path.abspath(label) if label is not None else None,
        mask=os.path.abspath(mask) if mask is not None else None,
    )


def _warn_left_out(case_ids: Sequence[str], why: str) -> None:
    """One warning naming the cases `--unlabelled skip` left out (`why`: for want of what)."""
    if case_ids:
        log.warning(
            "--unlabelled skip: left out %d case(s) (%s): %s%s", len(case_ids), why,
            ", ".join(case_ids[:5]), ", ..." if len(case_ids) > 5 else "",
        )  # fmt: skip


def _warn_unmasked(cases: Sequence[CaseSpec], masks) -> None:
    """One warning naming the cases without a mask in the `masks` folder (if given)."""
    unmasked = [c.case_id for c in cases if c.mask is None]
    if masks is not None and unmasked:
        log.warning(
            "%d of %d cases have no mask in %s (crop centred on the T2w volume centre): %s",
            len(unmasked), len(cases), masks, ", ".join(unmasked[:5]),
        )  # fmt: skip


def _series_choices(row: dict, components: Sequence[str]) -> dict[str, str]:
    """Non-empty `<component>_series` cells of a manifest row -> {component: series}."""
    return {name: row[f"{name}_series"] for name in components if row.get(f"{name}_series")}


def _manifest_rows(
    manifest: Path, required: Sequence[str], known: Sequence[str]
) -> tuple[list[str], list[tuple[int, dict]]]:
    """(columns, (line, row with stripped keys and values) of each case) of a manifest CSV
    (`csv_tables.csv_rows`). Rows of empty cells (a spreadsheet's empty rows) are skipped; a near
    miss of a `known` column, a column named twice, a cell holding a control character, or a row
    with more cells than columns (an unquoted path holding a comma), is an error."""
    if manifest.is_dir():
        raise LayoutError(f"manifest {manifest} is a folder, not a CSV file")
    if not manifest.is_file():
        raise LayoutError(f"manifest {manifest} does not exist")
    hint = "a path holding a comma must be in double quotes"
    columns, rows = csv_rows(manifest, "manifest", required, hint, known)
    if not rows:
        raise LayoutError(f"manifest {manifest} lists no cases")
    return columns, rows


def read_manifest(
    manifest: str | os.PathLike,
    *,
    components: Sequence[str] = DEFAULT_COMPONENTS,
    unlabelled: str = "error",
    labels: bool = True,
    errors: list | None = None,
) -> list[CaseSpec]:
    """Cases of a manifest CSV, in file order. Raises `LayoutError` naming a missing column.

    `unlabelled`: what a missing `label` column or an empty label cell means: 'error' (default;
    the error names the manifest and the line), 'negative' (no lesions) or 'skip' (row left out).
    `labels=False` reads no labels at all (inference manifests). `errors`: where a list is given,
    a row with a bad case id, an empty label cell or a bad centre is appended to it as (case,
    manifest, reason) and left out instead of raising.
    """
    manifest = Path(manifest)
    _check_unlabelled(unlabelled)
    check_components(components)
    required = ["case_id", "patient_id", *components]
    columns, rows = _manifest_rows(manifest, required, known_columns(components))
    centre_columns = check_manifest_columns(manifest, columns, labels, unlabelled)
    # seen, patients: case id, patient id (`_patient_key`) -> (line, id as first written)
    cases, seen, skipped, patients, exams = [], {}, [], {}, ExamsSeen()
    unmasked = []  # lines of the cases without a mask or centre, where the column is there
    for line, row in rows:
        case = row["case_id"]
        where = f"manifest {manifest}, line {line}"
        # Ids become file names, one file on macOS and Windows (an empty id is refused below).
        if case and case.lower() in seen:
            raise LayoutError(
                f"{where}: case_id {case!r} repeats {seen[case.lower()][1]!r} (line "
                f"{seen[case.lower()][0]}); case ids must differ in more than letter case"
            )
        seen[case.lower()] = (line, case)
        patient = row["patient_id"] or case
        first_line, first = patients.setdefault(_patient_key(patient), (line, patient))
        if first != patient:  # folds compare ids exactly: the patient's cases would be split
            raise LayoutError(
                f"{where}: patient_id {patient!r} is {first!r} (line {first_line}) written "
                "another way; write each patient's id the same way on all its rows"
            )
        try:
            _check_manifest_row(row, where, components, labels and unlabelled == "error")
            if labels and not row.get("label") and unlabelled == "skip":
                skipped.append(case)
                continue
            spec = _manifest_case(manifest, row, where, components, centre_columns, labels)
            if labels:
                exams.check(case, spec.components["t2w"], spec.series.get("t2w"), line, where)
            cases.append(spec)
            if "prostate_mask" in columns and spec.mask is None and spec.center is None:
                unmasked.append(line)
        except UserError as error:
            if errors is None:
                raise
            errors.append((case, str(manifest), str(error)))
    _warn_missing_cells(manifest, rows, unmasked)
    _warn_left_out(skipped, f"no label in manifest {manifest}")
    return cases


def _patient_key(patient: str) -> str:
    """What two spellings of one patient id share: letter case aside, and `10003.0` (a
    spreadsheet's float column) read as `10003`."""
    return spreadsheet_id(patient).lower()


def _warn_missing_cells(manifest: Path, rows, unmasked: Sequence[int]) -> None:
    """Warnings for the rows with an empty `patient_id` (each such case is taken as a patient
    of its own, so two exams of one patient could fall into different folds) and for the lines
    `unmasked`, cases with an empty `prostate_mask` cell and no centre."""
    _warn_rows(
        manifest, [line for line, row in rows if not row["patient_id"]], "without a patient_id",
        "each case is taken as a patient of its own; give the patient id where a patient has "
        "several exams, so that they stay in one fold",
    )  # fmt: skip
    _warn_rows(
        manifest, unmasked, "with an empty prostate_mask cell and no centre",
        "their crops are centred on the T2w volume centre",
    )  # fmt: skip


def _warn_rows(manifest: Path, lines: Sequence[int], what: str, consequence: str) -> None:
    """One warning naming the first lines of `manifest` that are `what`, and the consequence."""
    if lines:
        log.warning(
            "manifest %s: %d row(s) %s (lines %s%s): %s", manifest, len(lines), what,
            ", ".join(map(str, lines[:5])), ", ..." if len(lines) > 5 else "", consequence,
        )  # fmt: skip


def _check_manifest_row(
    row: dict, where: str, components: Sequence[str], label_required: bool
) -> None:
    """Safe case and patient ids; a path in every component cell; a label cell where
    `label_required`."""
    check_case_id(row["case_id"], where)
    if row["patient_id"]:
        check_case_id(row["patient_id"], where, what="patient id")
    empty = [name for name in components if not row[name]]
    if empty:
        cells = (
            f"an empty {empty[0]} cell" if len(empty) == 1 else f"empty {', '.join(empty)} cells"
        )
        raise LayoutError(
            f"{where}: case {row['case_id']!r} has {cells}; give each component's DICOM folder "
            "or image file, or leave the case out"
        )
    if label_required and not row.get("label"):
        raise LayoutError(
            f"{where}: case {row['case_id']!r} has an empty label cell; give its label, or pass "
            "--unlabelled negative (no lesions) or --unlabelled skip"
        )


def _manifest_case(
    manifest: Path,
    row: dict,
    where: str,
    components: Sequence[str],
    centre_columns: Sequence[str],
    labels: bool,
) -> CaseSpec:
    """The `CaseSpec` of a checked manifest row; relative paths taken from the manifest's folder
    and made absolute (the store records them, and a later working directory is another)."""
    return CaseSpec(
        case_id=row["case_id"],
        patient_id=row["patient_id"] or row["case_id"],
        components={name: _manifest_path(manifest, row[name]) or "" for name in components},
        label=_manifest_path(manifest, row.get("label", "")) if labels else None,
        mask=_manifest_path(manifest, row.get("prostate_mask", "")),
        center=_manifest_centre(row, where, centre_columns),
        series=_series_choices(row, components),
    )


def _manifest_path(manifest: Path, value: str) -> str | None:
    """A manifest cell's path: an absolute one as given; a relative one taken from the
    manifest's folder, `..` resolved by the file system, not as text (`link/../x` lies beside
    the link's target), its last part kept as written (a link to a file named by its hash)."""
    if not value or os.path.isabs(value):
        return value or None
    head, tail = os.path.split(os.path.join(manifest.parent, value))
    if tail in ("", ".", ".."):
        return os.path.realpath(os.path.join(head, tail))
    return os.path.join(os.path.realpath(head), tail)


def _centre_space(row: dict, where: str) -> str:
    """The row's `center_space`: 'LPS' (also for an empty cell or no column) or 'RAS' (in any
    letter case); another value is an error naming the line, the case and the value."""
    space = row.get(CENTRE_SPACE_COLUMN, "").upper() or "LPS"
    if space not in ("LPS", "RAS"):
        raise LayoutError(
            f"{where}: case {row['case_id']!r}: {CENTRE_SPACE_COLUMN} "
            f"{row[CENTRE_SPACE_COLUMN]!r} is not LPS or RAS (an empty cell means LPS)"
        )
    return space


def _manifest_centre(row: dict, where: str, centre_columns: Sequence[str]):
    """The row's LPS (x, y, z) centre in mm, or None where all three cells are empty; a centre
    given in RAS (`center_space`, as 3D Slicer shows points) has x and y negated. A partly given
    or non-finite centre is an error naming the line and the column."""
    space = _centre_space(row, where)
    given = [c for c in centre_columns if row[c]]
    if not given:
        return None
    if len(given) != len(centre_columns):
        empty = [c for c in centre_columns if not row[c]]
        raise LayoutError(f"{where}: centre partly given ({', '.join(empty)} empty)")
    centre = []
    for column in centre_columns:
        try:
            value = float(row[column])
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise LayoutError(f"{where}: {column} {row[column]!r} is not a finite number (mm)")
        centre.append(value)
    if space == "RAS":
        centre[0], centre[1] = -centre[0], -centre[1]
    return tuple(centre)


def unread_inputs(
    layout: str, cases: Sequence[CaseSpec], components: Sequence[str], manifest=None
) -> list[str]:
    """What the cases offer beyond `components`, sorted: for 'picai' the names of other image
    files `<case>_<name>.<suffix>` beside their T2w (e.g. hbv, dce with components t2w,adc), for
    'manifest' the columns of `manifest` that no setting reads (e.g. an hbv column)."""
    if layout == "manifest":
        return unread_columns(manifest, components)
    names = set()
    for case in cases:
        for file in Path(case.components["t2w"]).parent.glob(f"{case.case_id}_*"):
            if suffix := image_suffix(file.name):
                names.add(file.name[len(case.case_id) + 1 : -len(suffix)])
    return sorted(names - set(components))


def unread_note(layout: str, unread: Sequence[str], reads: str) -> str:
    """The summary's note on `unread_inputs` (`reads`: what reads the components, e.g.
    '--components is t2w,adc'), or "" where all is read."""
    what = "manifest columns" if layout == "manifest" else "images"
    return f"; {what} not read: {', '.join(unread)} ({reads})" if unread else ""


def write_manifest(cases: Sequence[CaseSpec], path: str | os.PathLike) -> None:
    """Write cases as a manifest CSV, atomically (absolute paths, their last part as given, as
    `read_manifest` keeps it: a link to a file named by its hash keeps the name that gives its
    format; a case's centre in LPS, its `center_space` cell saying so)."""
    names = list(cases[0].components) if cases else list(DEFAULT_COMPONENTS)
    columns = ["case_id", "patient_id", *names, "label", "prostate_mask"]
    columns += [*CENTRE_COLUMNS, CENTRE_SPACE_COLUMN]
    chosen = [n for n in names if any(n in c.series for c in cases)]
    columns += [f"{n}_series" for n in chosen]
    with replaced_atomically(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for c in cases:
            centre = [*c.center, "LPS"] if c.center else ["", "", "", ""]
            paths = [_absolute(c.components[n]) for n in names]
            extra = [_absolute(p) if p else "" for p in (c.label, c.mask)]
            series = [c.series.get(n, "") for n in chosen]
            writer.writerow([c.case_id, c.patient_id, *paths, *extra, *centre, *series])


def _absolute(path: str | os.PathLike) -> str:
    """`path` absolute, the folders above it resolved, its last part kept as written."""
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(head), tail)
