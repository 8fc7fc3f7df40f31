"""Where the files of PI-CAI cases come from: image folders, label folders in order of preference,
and the marksheet's word on whether a case without a label file holds csPCa.

PI-CAI is distributed as five image folders (`picai_public_images_fold0..4/<patient>/...`) and
two lesion-label sets (`human_expert/resampled` for some positive cases, `AI/Bosma22a` for the
others). `picai_images` reads any number of image folders (or a folder holding them) as one
dataset; `label_folders` takes several label folders, the first holding a case's file winning, as
PI-CAI's semi-supervised baseline prefers expert labels and fills in with AI-derived ones.
`find_file` takes a case's one file of a component, label or mask in any accepted format;
`missing_component` and `missing_label` name, where there is none, every file name looked for.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from focalnet_jax.data.case_ids import spreadsheet_id
from focalnet_jax.data.csv_tables import csv_rows
from focalnet_jax.data.io import IMAGE_SUFFIXES, CaseError
from focalnet_jax.errors import LayoutError

log = logging.getLogger(__name__)

PICAI_COMPONENTS = ("t2w", "adc", "hbv", "dce", "sag", "cor")  # last words of image file names
PICAI_NAME = re.compile(r"^(?P<patient>[^_]+)_(?P<study>[^_]+)_(?P<component>[^_.]+)\.")
# Labels and gland masks; `.dcm`: a DICOM SEG (`dicom_seg`; another DICOM file reads as one slice,
# refused as a label of a single slice).
LABEL_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd", ".dcm")
PathArg = str | os.PathLike


def as_folders(paths: PathArg | Sequence[PathArg] | None) -> tuple[Path, ...]:
    """One path, several paths or None -> a tuple of `Path`s (in the given order)."""
    if paths is None:
        return ()
    if isinstance(paths, (str, os.PathLike)):
        return (Path(paths),)
    return tuple(Path(p) for p in paths)


def not_a_folder(what: str, path) -> str:
    """Why `path`, given as the `what` folder, is none: missing, or a file (e.g. an archive)."""
    if not Path(path).exists():
        return f"{what} folder {path} does not exist"
    return f"{what} folder {path} is a file, not a folder (an archive? extract it first)"


def find_file(folder: Path, stem: str, suffixes, case: str) -> Path | None:
    """The one file `<folder>/<stem><suffix>`, its suffix in any letter case (`.MHA`, as
    `_image_files` finds it), or None; two of them (e.g. `.mha` and `.nii.gz`, or `.nii.gz` and
    `.MHA`) are an error naming `case` and both files. Each suffix is looked for in lower and
    upper case; the folder is listed only where neither is there (`.Mha`)."""
    spellings = dict.fromkeys(stem + s for suffix in suffixes for s in (suffix, suffix.upper()))
    found = _distinct([folder / name for name in spellings if (folder / name).exists()])
    if not found and folder.is_dir():
        found = sorted(
            folder / name
            for name in os.listdir(folder)
            if name.startswith(stem) and name[len(stem) :].lower() in suffixes
        )
    if len(found) > 1:
        raise CaseError(case, found[1], f"two files for {stem}: {found[0]} and {found[1]}")
    return found[0] if found else None


def _distinct(paths: list[Path]) -> list[Path]:
    """`paths` less those naming a file named before (one file found under two letter cases on a
    case-insensitive file system)."""
    seen, distinct = set(), []
    for path in paths:
        identity = (path.stat().st_dev, path.stat().st_ino)
        if identity not in seen:
            seen.add(identity)
            distinct.append(path)
    return distinct


def _looked_for(stem: str, suffixes) -> str:
    """'<stem> with suffix .a, .b or .c': the file names `find_file` accepts."""
    return f"{stem} with suffix {', '.join(suffixes[:-1])} or {suffixes[-1]}"


def missing_component(case: str, folder: Path, name: str) -> CaseError:
    """The error for a case whose patient `folder` holds no image file of component `name`
    (e.g. 'adc'): names the folder, the component and the file names looked for."""
    looked_for = _looked_for(f"{case}_{name}", IMAGE_SUFFIXES)
    return CaseError(case, folder, f"{name} image missing: looked for {looked_for} in this folder")


def missing_label(case: str, folders: Sequence[Path]) -> CaseError:
    """The error for a case whose label file is in none of the label `folders`: names the first
    folder, the others and the file names looked for."""
    where = " and ".join(["this folder", *map(str, folders[1:])])
    looked_for = _looked_for(case, LABEL_SUFFIXES)
    return CaseError(case, folders[0], f"label missing: looked for {looked_for} in {where}")


def _visible_entries(folder: Path) -> list[Path]:
    """The entries of `folder` but hidden ones (macOS writes `._<name>` beside each file it
    copies to an exFAT or network drive, and `.DS_Store`; `.Trash`), sorted."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _image_files(patient_dir: Path):
    """(case id, patient id, file) of each PI-CAI image file in a patient folder."""
    for file in _visible_entries(patient_dir):
        match = PICAI_NAME.match(file.name)
        if match and file.name.lower().endswith(IMAGE_SUFFIXES):
            yield f"{match['patient']}_{match['study']}", match["patient"], file


def _check_names(patient_dir: Path) -> None:
    """Refuses an image file of a patient folder named as a component's (`..._t2w.mha`,
    `PICAI_COMPONENTS`) that `PICAI_NAME` does not read (`P_1/P_1_1000001_t2w.mha`,
    `10001/10001_1000001_b_t2w.mha`: an id holding '_' left the case out of the store without a
    word); other files (`<case>_t2w_n4.mha`, `<case>.nii.gz`) are left alone."""
    for file in _visible_entries(patient_dir):
        name = file.name.lower()
        suffix = next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)
        if suffix is not None and not PICAI_NAME.match(file.name):
            if name[: -len(suffix)].rpartition("_")[2] in PICAI_COMPONENTS:
                raise LayoutError(
                    f"image file {file} is of no case: not named <patient>_<study>_<component>"
                    ".<suffix> (PI-CAI layout: patient and study ids may not hold '_')"
                )


def _holds_images(folder: Path) -> bool:
    return next(_image_files(folder), None) is not None


def _holds_components(folder: Path) -> bool:
    """Whether `folder` holds an image file of a PI-CAI component (`PICAI_COMPONENTS`), as a
    patient folder does (an nnU-Net `imagesTr` folder's `<case>_0000.nii.gz` files are none)."""
    names = (PICAI_NAME.match(file.name) for _, _, file in _image_files(folder))
    return any(name["component"].lower() in PICAI_COMPONENTS for name in names)


def _patient_dirs(folder: Path, *, of_folds: bool = True) -> list[Path]:
    """The patient folders of an image folder; a folder holding no image files but image folders
    of its own (the five `picai_public_images_fold<k>` archives extracted side by side) gives
    the patient folders of each (`of_folds`). An image folder holding a folder of patient folders
    beside patient folders, or (one of those five) in their place (an archive unpacked into a
    folder of its own name), is an error: that folder was read as a patient folder without
    images, and its cases left out."""
    subdirs = _subdirs(folder)
    holds = {d: _holds_images(d) for d in subdirs}  # each folder listed once
    patients = [d for d in subdirs if holds[d]]
    if of_folds and not patients:
        return [p for d in subdirs for p in _patient_dirs(d, of_folds=False)]
    others = (d for d in subdirs if not holds[d])
    nested = next((d for d in others if any(map(_holds_components, _subdirs(d)))), None)
    if nested is not None:
        held = f"patient folders (e.g. {patients[0].name}) and " if patients else ""
        raise LayoutError(
            f"images folder {folder} holds {held}folders of patient folders (e.g. {nested.name}); "
            "give each image folder with its own --images"
        )
    return subdirs


def _subdirs(folder: Path) -> list[Path]:
    """The folders in `folder` but hidden ones (`.Trash`, `.ipynb_checkpoints`), sorted. A link
    to nothing with a folder's name (no suffix, or digits after its dot: `10001`, `10001.5`, not
    `notes.txt`), such as a folder on a drive not mounted, is an error: its cases would be left
    out without a word."""
    entries = _visible_entries(folder)
    for entry in entries:
        folder_name = not entry.suffix or entry.suffix[1:].isdigit()
        if entry.is_symlink() and not entry.exists() and folder_name:
            raise LayoutError(f"{entry} is a link to {os.readlink(entry)}, which does not exist")
    return [entry for entry in entries if entry.is_dir()]


def picai_images(images: PathArg | Sequence[PathArg]) -> dict[str, tuple[str, Path, Path]]:
    """Case id -> (patient id, patient folder, first image file) of every
    `<patient>/<patient>_<study>_<component>.<suffix>` under the image folder(s). A case whose
    files lie in two patient folders (also of two image folders) raises `LayoutError` naming
    both files."""
    folders = as_folders(images)
    for folder in folders:
        if not folder.is_dir():
            raise LayoutError(not_a_folder("images", folder))
    found: dict[str, tuple[str, Path, Path]] = {}
    spellings: dict[str, tuple[str, Path]] = {}  # patient or case id in lower case -> first
    for patient_dir in (d for folder in folders for d in _patient_dirs(folder)):
        _check_names(patient_dir)
        for case, patient, file in _image_files(patient_dir):
            if case in found and found[case][1] != patient_dir:
                raise LayoutError(
                    f"case {case!r}: files in two patient folders: {found[case][2]} and {file}"
                )
            for kind, name in (("patient", patient), ("case", case)):
                first, first_file = spellings.setdefault(f"{kind} {name.lower()}", (name, file))
                if first != name:  # folds compare ids exactly; one file on macOS and Windows
                    raise LayoutError(
                        f"{kind} {name!r} ({file}) is {first!r} ({first_file}) in another letter "
                        f"case; name each {kind}'s files the same way"
                    )
            found.setdefault(case, (patient, patient_dir, file))
    if not found:
        raise LayoutError(
            f"no cases found in {', '.join(map(str, folders))} (expected "
            "<patient>/<patient>_<study>_<component>.mha, or folders of such patient folders)"
        )
    return found


def label_folders(labels: PathArg | Sequence[PathArg] | None) -> tuple[Path, ...]:
    """The label folders in order of preference, each checked to be a folder."""
    folders = as_folders(labels)
    for folder in folders:
        if not folder.is_dir():
            raise LayoutError(not_a_folder("labels", folder))
    return folders


def check_label_files(folders: Sequence[Path]) -> dict[Path, list[str]]:
    """{folder: `label_ids`} of the label folders. Refuses one that can give no case its label,
    so that each case took the next folder's (the AI-derived labels: every grade unknown)
    without a word: one that holds no label file (a level too high: PI-CAI's `human_expert/`,
    whose files lie in `resampled/`; the error names the subfolders that hold some), and one each
    of whose label files an earlier folder holds too (given after the AI-derived labels, which
    cover every PI-CAI case)."""
    earlier: dict[str, Path] = {}  # case -> the first folder holding its label file
    listed = {}
    for folder in folders:
        ids = listed[folder] = label_ids(folder)
        if not ids:
            inside = sorted(sub.name for sub in folder.iterdir() if sub.is_dir() and label_ids(sub))
            hint = f"; its subfolder(s) {', '.join(inside[:5])} do: give one" if inside else ""
            raise LayoutError(
                f"--labels {folder} holds no label file ({', '.join(LABEL_SUFFIXES)}){hint}"
            )
        if all(case in earlier for case in ids):
            raise LayoutError(
                f"--labels {folder} can give no case its label: the earlier --labels "
                f"{earlier[ids[0]]} holds a label file of each of its {len(ids)} cases too; give "
                "the folders in order of preference (the expert annotations before the "
                "AI-derived ones), or leave this one out"
            )
        for case in ids:
            earlier.setdefault(case, folder)
    return listed


def label_ids(folder: Path) -> list[str]:
    """The case ids of the label files in `folder` (hidden files aside), sorted, each once."""
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    ids = (
        next((n[: -len(s)] for s in LABEL_SUFFIXES if n.lower().endswith(s)), None) for n in names
    )
    return [case for case in dict.fromkeys(ids) if case is not None]


def warn_unmatched_labels(listed: dict[Path, list[str]], case_ids: set[str]) -> None:
    """One warning per label folder of `listed` (`check_label_files`) naming its label files of
    no case of the image folders (an image folder left out, e.g. one of PI-CAI's five fold
    folders, drops its labelled cases)."""
    for folder, ids in listed.items():
        unmatched = [case for case in ids if case not in case_ids]
        if unmatched:
            log.warning(
                "%d label file(s) in %s belong to no case of the image folder(s) (their images "
                "not given?): %s%s", len(unmatched), folder, ", ".join(unmatched[:5]),
                ", ..." if len(unmatched) > 5 else "",
            )  # fmt: skip


def _folder_scheme(folder: Path) -> str:
    meta = folder / "dataset.json"
    if not meta.exists():
        return "picai"
    try:
        table = json.loads(meta.read_text())
    except (OSError, ValueError) as err:  # a folder, JSONDecodeError, UnicodeDecodeError
        raise LayoutError(f"{meta}: not readable JSON ({err})") from err
    if not isinstance(table, dict):
        raise LayoutError(f'{meta}: expected a JSON object like {{"label_values": "isup"}}')
    value = table.get("label_values", "picai")
    if value not in ("picai", "isup"):
        raise LayoutError(f"{meta}: label_values {value!r}, expected 'picai' or 'isup'")
    return value


def label_scheme(labels: PathArg | Sequence[PathArg] | None) -> str:
    """'isup' when `<labels>/dataset.json` says so, else 'picai' (value 1 = grade unknown); label
    folders that disagree are an error naming two of them."""
    folders = as_folders(labels)
    schemes = [_folder_scheme(folder) for folder in folders]
    for folder, scheme in zip(folders[1:], schemes[1:], strict=True):
        if scheme != schemes[0]:
            raise LayoutError(
                f"labels folders {folders[0]} ({schemes[0]!r}) and {folder} ({scheme!r}) read "
                "label value 1 differently (dataset.json); preprocess them separately"
            )
    return schemes[0] if schemes else "picai"


def marksheet_cspca(row: dict) -> bool | None:
    """Whether a marksheet row says the case holds csPCa (`cspca_evidence`); None where it
    cannot tell."""
    evidence = cspca_evidence(row)
    return None if evidence is None else evidence[0]


def cspca_evidence(row: dict) -> tuple[bool, str] | None:
    """(whether a marksheet row says the case holds csPCa, the column and cell that say so), from
    the first column that can tell: `case_csPCa` (YES/NO), `case_ISUP` >= 2 (an integer, or as a
    spreadsheet writes it `2.0`), then, for the marksheet as first published (without those
    two), `lesion_ISUP` or `lesion_GS` (one entry per lesion, `3+4,N/A`): csPCa where a lesion
    is ISUP >= 2 (GS a+b >= 7), none where every lesion is graded below that (`0+0` benign);
    a lesion without histopathology (`N/A`) among lower grades tells nothing. None where no
    column can tell."""
    flag = row.get("case_csPCa", "").strip().upper()
    if flag in ("YES", "NO"):
        return flag == "YES", f"case_csPCa {row['case_csPCa']!r}"
    for column, grade in (("case_ISUP", _isup), ("lesion_ISUP", _isup), ("lesion_GS", _gs_isup)):
        entries = [entry.strip() for entry in row.get(column, "").split(",")]
        grades = [grade(entry) for entry in entries if entry.upper() != "N/A"]
        if not grades or None in grades or (column == "case_ISUP" and len(entries) > 1):
            continue
        if max(grades) >= 2 or len(grades) == len(entries):
            return max(grades) >= 2, f"{column} {row[column]!r}"
    return None


def _isup(text: str) -> int | None:
    """An ISUP grade group 0..5 written as an integer (or `2.0`); None for anything else."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() and 0 <= value <= 5 else None


def _gs_isup(text: str) -> int | None:
    """The ISUP grade group of a Gleason score `a+b` (0 for `0+0`, benign; 1 up to 6; 2 for 3+4
    and up: only >= 2, csPCa, is told apart); None for anything else."""
    match = re.fullmatch(r"(\d)\s*\+\s*(\d)", text)
    if match is None:
        return None
    total = int(match[1]) + int(match[2])
    return 0 if total == 0 else 1 if total <= 6 else 2


def check_unlabelled_case(case: str, row: dict, marksheet, folders: Sequence[Path]) -> None:
    """A case without a label file that `--unlabelled negative` would store lesion-free: an error
    where the marksheet says it holds csPCa (its lesions would train and score as background)."""
    evidence = cspca_evidence(row)
    if evidence is not None and evidence[0]:
        where = ", ".join(map(str, folders)) or "no --labels folder"
        raise CaseError(
            case,
            marksheet,
            f"the marksheet says csPCa ({evidence[1]}) but no label file is in {where}; "
            "--unlabelled negative would store it lesion-free. Add a label folder that holds it "
            "(e.g. a second --labels with AI-derived labels) or pass --unlabelled skip",
        )


def warn_marksheet_cannot_tell(sheet: dict, marksheet) -> None:
    """One warning where no row of the marksheet says whether its case holds csPCa (no column
    `cspca_evidence` reads): the check of the cases `--unlabelled negative` stores lesion-free
    cannot be made."""
    if sheet and all(cspca_evidence(row) is None for row in sheet.values()):
        log.warning(
            "marksheet %s: no row says whether its case holds csPCa (case_csPCa, case_ISUP, "
            "lesion_ISUP, lesion_GS), so the cases --unlabelled negative stores lesion-free are "
            "not checked against it", marksheet,
        )  # fmt: skip


def marksheet_disagreements(records) -> list[str]:
    """'<case> (marksheet says ..., label max class k)' for each stored case (store record with
    `meta` and `max_class`) whose marksheet csPCa flag contradicts its label: csPCa without a
    lesion of class >= 2, or no csPCa with one."""
    found = []
    for record in records:
        says = marksheet_cspca(record.get("meta") or {})
        if says is not None and says != (record["max_class"] >= 2):
            flag = "csPCa" if says else "no csPCa"
            found.append(
                f"{record['case_id']} (marksheet: {flag}, label max class {record['max_class']})"
            )
    return found


def read_marksheet(path: str | os.PathLike) -> dict[str, dict]:
    """PI-CAI marksheet -> {'<patient>_<study>': {column: value}}; columns found by name. A row
    of empty cells (a spreadsheet's empty row) is skipped; a row with an empty `patient_id` or
    `study_id` is an error naming its line (it matched no case: the study's values were lost),
    as is a column named twice or a row with more cells than columns (`csv_rows`). Ids a
    spreadsheet or pandas wrote as floats (`10000.0`) are read as the integers they are."""
    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"marksheet {path} is not a file")
    hint = "a value holding a comma, e.g. lesion_GS '3+3,4+3', must be in double quotes"
    _, table = csv_rows(path, "marksheet", ("patient_id", "study_id"), hint)
    rows, lines = {}, {}
    for line, row in table:
        empty = [c for c in ("patient_id", "study_id") if not row[c]]
        if empty:
            raise LayoutError(f"marksheet {path}, line {line}: empty {' and '.join(empty)}")
        row = {**row, **{c: spreadsheet_id(row[c]) for c in ("patient_id", "study_id")}}
        key = f"{row['patient_id']}_{row['study_id']}"
        if key in rows and rows[key] != row:  # which one holds the truth is not ours to pick
            raise LayoutError(
                f"marksheet {path}, line {line}: study {key} is also on line {lines[key]}, "
                "with other values; keep one row per study"
            )
        rows[key], lines[key] = row, lines.get(key, line)
    return rows


def check_marksheet_cases(sheet: dict, case_ids: Sequence[str], marksheet) -> None:
    """A `--marksheet` that has a row for none of `case_ids` is refused (one line naming its first
    study and the first case): its values, and the csPCa check of unlabelled cases
    (`check_unlabelled_case`), were dropped without a word. Cases without a row are warned of
    (an image folder may hold only some of a marksheet's studies; a case it lacks loses both)."""
    if marksheet is None or not case_ids:
        return
    missing = [case for case in case_ids if case not in sheet]
    if len(missing) == len(case_ids):
        first = f"its first study is {next(iter(sheet))!r}" if sheet else "it has no study row"
        raise LayoutError(
            f"marksheet {marksheet}: no row for any of the {len(case_ids)} cases ({first}, the "
            f"first case {case_ids[0]!r}); rows are matched by <patient_id>_<study_id>: is it "
            "the marksheet of these images?"
        )
    if missing:
        log.warning(
            "marksheet %s has no row for %d of %d cases: %s%s", marksheet, len(missing),
            len(case_ids), ", ".join(missing[:5]), ", ..." if len(missing) > 5 else "",
        )  # fmt: skip
