"""The predictions format (docs/evaluation.md): one `<case_id>.npz` per case.

Keys:
- `scores` float32 `[S, H, W, 5]`: P(class >= k), k = 1..5;
- `lesions` int32 `[S, H, W]`: lesion instance ids, 0 background;
- `lesion_classes` int32 `[L]`: class (1..5) of instance id i + 1;
- `spacing` float32 `[2]`: in-plane pixel spacing in mm, rows then columns;
- `patient_id` str (not empty);
- optional `t2w`, `adc` float32 `[S, H, W]` (figures) and `slice_index` int32 `[S]` (the source
  slice of each crop slice; the PI-CAI 3D evaluation needs consecutive slices);
- optional `lesion_grade_known` bool `[L]`: False for a lesion known only as clinically
  significant (PI-CAI label value 1, stored as class 2); absent: every grade is known.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from focalnet_jax.data.atomic_files import replaced_atomically
from focalnet_jax.data.case_ids import check_case_id
from focalnet_jax.errors import UserError

REQUIRED_KEYS = ("scores", "lesions", "lesion_classes", "spacing", "patient_id")
OPTIONAL_KEYS = ("t2w", "adc", "slice_index", "lesion_grade_known")
NUM_SCORES = 5
MAX_NAMED = 10  # missing cases named in one error line
_SPACING_MM = (0.01, 50.0)  # a pixel size outside this is no mm: metres (the window and hit
# radius would cover the slice) or so small that the window size in pixels overflows
MODELS_FILE = "models.json"  # beside the predictions: the runs and steps that made them


class PredictionsError(UserError):
    """A predictions file or folder that does not follow the contract."""


@dataclasses.dataclass(frozen=True)
class CasePredictions:
    """One case of the contract, validated. Arrays as described in the module docstring."""

    case_id: str
    patient_id: str
    scores: np.ndarray
    lesions: np.ndarray
    lesion_classes: np.ndarray
    spacing: np.ndarray
    t2w: np.ndarray | None = None
    adc: np.ndarray | None = None
    slice_index: np.ndarray | None = None
    lesion_grade_known: np.ndarray | None = None
    path: Path | None = None

    @property
    def grade_known(self) -> np.ndarray:
        """bool `[L]`: whether each lesion's grade is known (all True without the key)."""
        if self.lesion_grade_known is None:
            return np.ones(self.lesion_classes.size, bool)
        return self.lesion_grade_known

    @property
    def classes(self) -> np.ndarray:
        """int32 `[S, H, W]` true class per pixel (0 outside lesions)."""
        table = np.concatenate([[0], self.lesion_classes]).astype(np.int32)
        return table[self.lesions]


def validate(case: CasePredictions) -> CasePredictions:
    """Checks shapes, dtypes and value ranges; raises `PredictionsError` naming the file."""
    where = str(case.path) if case.path is not None else case.case_id

    def fail(reason: str):
        raise PredictionsError(f"{where}: {reason}")

    scores, lesions = case.scores, case.lesions
    if not case.patient_id.strip():
        fail("'patient_id' is empty (false positives are counted per patient id: every case "
             "without one would count as one patient)")  # fmt: skip
    if scores.ndim != 4 or scores.shape[-1] != NUM_SCORES:
        fail(f"'scores' must have shape [S, H, W, {NUM_SCORES}], got {scores.shape}")
    if 0 in scores.shape[:3]:
        fail(f"'scores' shape {scores.shape} holds no pixel: nothing to evaluate")
    if scores.dtype.kind != "f" or scores.dtype.itemsize not in (4, 8):  # scipy refuses float16
        fail(f"'scores' must be float32 (or float64), got {scores.dtype}")
    if not np.all(np.isfinite(scores)) or scores.min(initial=0) < 0 or scores.max(initial=0) > 1:
        fail("'scores' must be finite probabilities in [0, 1]")
    if lesions.shape != scores.shape[:3]:
        fail(f"'lesions' shape {lesions.shape} does not match 'scores' shape {scores.shape[:3]}")
    if not np.issubdtype(lesions.dtype, np.integer):
        fail(f"'lesions' must be integer, got {lesions.dtype}")
    if case.lesion_classes.ndim != 1 or not np.issubdtype(case.lesion_classes.dtype, np.integer):
        got = f"{case.lesion_classes.dtype} {case.lesion_classes.shape}"
        fail(f"'lesion_classes' must be a 1-D integer array, got {got}")
    if case.lesion_classes.size and (
        case.lesion_classes.min() < 1 or case.lesion_classes.max() > NUM_SCORES
    ):
        fail(f"'lesion_classes' must lie in 1..{NUM_SCORES}, got {case.lesion_classes.tolist()}")
    if lesions.size and (lesions.min() < 0 or lesions.max() > case.lesion_classes.size):
        fail(
            f"'lesions' ids must lie in 0..{case.lesion_classes.size} (len(lesion_classes)), "
            f"got {lesions.min()}..{lesions.max()}"
        )
    absent = sorted(set(range(1, case.lesion_classes.size + 1)) - set(np.unique(lesions).tolist()))
    if absent:
        fail(f"lesion id(s) {absent} of 'lesion_classes' appear on no slice of 'lesions'")
    spacing = case.spacing
    if spacing.dtype.kind not in "iuf" or spacing.shape != (2,):
        fail(f"'spacing' must be 2 numbers (mm), got {spacing.dtype} {spacing.shape}")
    if not np.all(np.isfinite(spacing) & (spacing > 0)):
        fail(f"'spacing' must be 2 positive numbers (mm), got {spacing.tolist()}")
    if not np.all((spacing >= _SPACING_MM[0]) & (spacing <= _SPACING_MM[1])):
        fail(
            f"'spacing' {spacing.tolist()} is no pixel size in mm (expected "
            f"{_SPACING_MM[0]:g}..{_SPACING_MM[1]:g}; metres or cm?)"
        )
    for name in ("t2w", "adc"):
        image = getattr(case, name)
        if image is not None and image.dtype.kind not in "iuf":
            fail(f"'{name}' must be a numeric image, got {image.dtype}")
        if image is not None and image.shape != lesions.shape:
            fail(f"'{name}' shape {image.shape} does not match 'lesions' shape {lesions.shape}")
    index = case.slice_index
    if index is not None and (index.dtype.kind not in "iu" or index.shape != (lesions.shape[0],)):
        fail(f"'slice_index' must be integers of shape ({lesions.shape[0]},), got {index.dtype} "
             f"{index.shape}")  # fmt: skip
    known = case.lesion_grade_known
    if known is not None and (known.dtype != bool or known.shape != case.lesion_classes.shape):
        fail(
            f"'lesion_grade_known' must be bool of shape {case.lesion_classes.shape} "
            f"(one per lesion), got {known.dtype} {known.shape}"
        )
    if known is not None and np.any(~known & (case.lesion_classes != 2)):
        fail("a lesion of unknown grade ('lesion_grade_known' False) must have class 2")
    return case


def write_case(
    out_dir: str | Path,
    case_id: str,
    *,
    scores: np.ndarray,
    lesions: np.ndarray,
    lesion_classes: np.ndarray,
    spacing,
    patient_id: str,
    t2w: np.ndarray | None = None,
    adc: np.ndarray | None = None,
    slice_index: np.ndarray | None = None,
    lesion_grade_known: np.ndarray | None = None,
) -> Path:
    """Validates one case and writes `out_dir/<case_id>.npz` (uncompressed: reads are fast)."""
    path = Path(out_dir) / f"{check_case_id(case_id, f'predictions folder {out_dir}')}.npz"
    if patient_id is None:  # str(None) would make every such case patient 'None'
        raise PredictionsError(f"{path}: 'patient_id' is None; give the case's patient id")
    case = CasePredictions(
        case_id=case_id,
        patient_id=str(patient_id),
        scores=np.asarray(scores, np.float32),
        lesions=np.asarray(lesions, np.int32),
        lesion_classes=np.asarray(lesion_classes, np.int32).reshape(-1),
        spacing=np.asarray(spacing, np.float32),
        t2w=None if t2w is None else np.asarray(t2w, np.float32),
        adc=None if adc is None else np.asarray(adc, np.float32),
        slice_index=None if slice_index is None else np.asarray(slice_index, np.int32),
        lesion_grade_known=None
        if lesion_grade_known is None
        else np.asarray(lesion_grade_known, bool).reshape(-1),
        path=path,
    )
    validate(case)
    arrays = {
        "scores": case.scores,
        "lesions": case.lesions,
        "lesion_classes": case.lesion_classes,
        "spacing": case.spacing,
        "patient_id": np.asarray(case.patient_id),
    }
    for name in OPTIONAL_KEYS:
        if getattr(case, name) is not None:
            arrays[name] = getattr(case, name)
    with replaced_atomically(path) as tmp, tmp.open("wb") as f:  # a file: savez adds no suffix
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())  # whole on disk before the rename, as `write_json_atomic`
    return path


def read_case(path: str | Path) -> CasePredictions:
    """Reads and validates one `<case_id>.npz`; errors name the file and the reason."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # one .npy array under an .npz name
            raise PredictionsError(
                f"{path}: not a valid predictions .npz file (one .npy array, not a zip archive "
                "of arrays)"
            )
        with data:
            missing = [key for key in REQUIRED_KEYS if key not in data.files]
            if missing:
                raise PredictionsError(f"{path}: missing contract key(s) {missing}")
            arrays = {
                key: _load_key(data, key, path)
                for key in REQUIRED_KEYS + OPTIONAL_KEYS
                if key in data.files
            }
    # EOF: an empty file; zlib: a damaged compressed member
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        if isinstance(error, PredictionsError):
            raise
        if "allow_pickle" in str(error):  # not a zip: numpy took it for a pickle
            raise PredictionsError(
                f"{path}: not a valid predictions .npz file (not a zip archive of arrays)"
            ) from error
        raise PredictionsError(f"{path}: not a readable .npz file ({error})") from error
    case = CasePredictions(
        case_id=path.name[: -len(".npz")],
        patient_id=_patient_id(arrays["patient_id"], path),
        scores=arrays["scores"],
        lesions=arrays["lesions"],
        lesion_classes=arrays["lesion_classes"].reshape(-1),
        spacing=_as_float64(arrays["spacing"]).reshape(-1),
        t2w=_as_float32(arrays.get("t2w")),
        adc=_as_float32(arrays.get("adc")),
        slice_index=arrays.get("slice_index"),
        lesion_grade_known=arrays.get("lesion_grade_known"),
        path=path,
    )
    return validate(case)


def _load_key(data, key: str, path: Path) -> np.ndarray:
    """One array of an open `.npz`; an array of Python objects (e.g. pandas strings saved with
    dtype=object) is named, as it cannot be read without unpickling, and so is a member that is
    no `.npy` array (numpy gives its bytes)."""
    try:
        array = data[key]
    except ValueError as error:
        if "Object arrays" not in str(error):
            raise
        raise PredictionsError(
            f"{path}: '{key}' holds Python objects (dtype=object); save it as str or numbers"
        ) from error
    if not isinstance(array, np.ndarray):
        raise PredictionsError(f"{path}: '{key}' is no .npy array in the archive")
    return array


def _patient_id(patient_id: np.ndarray, path: Path) -> str:
    """A case's 0-d `patient_id` as a str; bytes (as h5py-based tools save strings) decoded as
    UTF-8: read with `str`, b'P1' became the patient "b'P1'", another than 'P1'."""
    if patient_id.ndim == 0 and patient_id.dtype.kind == "U":
        return str(patient_id)
    if patient_id.ndim == 0 and patient_id.dtype.kind == "S":
        with contextlib.suppress(UnicodeDecodeError):
            return patient_id.item().decode()
    raise PredictionsError(f"{path}: 'patient_id' must be a string, got {patient_id!r}")


def _as_float64(array: np.ndarray) -> np.ndarray:
    """A numeric array as float64; any other is left for `validate` to name."""
    return array.astype(np.float64) if array.dtype.kind in "iuf" else array


def _as_float32(image: np.ndarray | None) -> np.ndarray | None:
    """An integer image (a figure's T2w or ADC) as float32; others as given (`validate`)."""
    return image.astype(np.float32) if image is not None and image.dtype.kind in "iu" else image


def checked_case_ids(ids: Sequence[str], where: str) -> list[str]:
    """`ids` as a list, each a safe case id (`data.case_ids.check_case_id`) listed once;
    errors name `where`."""
    if isinstance(ids, str):
        raise PredictionsError(f"{where}: expected a list of case ids, got the string {ids!r}")
    ids = list(ids)
    if not ids:
        raise PredictionsError(f"{where}: the case list is empty")
    for case_id in ids:
        check_case_id(case_id, where)
    repeated = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
    if repeated:
        raise PredictionsError(f"{where}: case id(s) listed twice: {repeated}")
    return ids


def read_case_list(path: str | Path) -> list[str]:
    """Case ids of a `--cases` file: a JSON list, a JSON object with a `subject_list` list (as
    picai_eval's subject list), or one id a line (blank lines ignored). Errors name the file."""
    path = Path(path)
    try:  # a byte-order mark ("UTF-8 with BOM", as spreadsheets save) is no part of the text
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise PredictionsError(f"{path}: cannot read the case list ({error})") from error
    if text.lstrip().startswith(("[", "{")):
        try:
            ids = json.loads(text)
        except json.JSONDecodeError as error:
            raise PredictionsError(f"{path}: case list is not valid JSON ({error})") from error
        if isinstance(ids, dict):
            ids = ids.get("subject_list")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise PredictionsError(
                f"{path}: expected a JSON list of case id strings (or {{'subject_list': [...]}})"
            )
    else:
        ids = [line.strip() for line in text.splitlines() if line.strip()]
    return checked_case_ids(ids, f"{path}")


def list_cases(directory: str | Path, case_ids: Sequence[str] | None = None) -> list[Path]:
    """`<case_id>.npz` files of a predictions folder, sorted by case id.

    With `case_ids`, exactly those cases, and an error naming every listed case without a file;
    without, every `*.npz` of the folder (an error when there is none, or when a file name is not
    a safe case id: `data.case_ids.check_case_id`).
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise PredictionsError(f"{directory}: not a folder (a predictions folder of .npz files)")
    if not directory.is_dir():
        raise PredictionsError(f"{directory}: predictions folder does not exist")
    if case_ids is None:
        paths = sorted(directory.glob("*.npz"), key=lambda path: path.stem)  # by case id
        for path in paths:
            check_case_id(path.stem, f"{directory}", what=f"case id of {path.name}")
        if not paths:
            raise PredictionsError(f"{directory}: no <case_id>.npz prediction files in the folder")
        return paths
    case_ids = checked_case_ids(case_ids, f"case list for {directory}")
    paths = [directory / f"{case_id}.npz" for case_id in sorted(case_ids)]
    missing = [path.stem for path in paths if not path.is_file()]
    if missing:
        named = ", ".join(f"{case_id}.npz" for case_id in missing[:MAX_NAMED])
        more = f" and {len(missing) - MAX_NAMED} more" if len(missing) > MAX_NAMED else ""
        raise PredictionsError(
            f"{directory}: no prediction for {len(missing)} of the {len(paths)} listed case(s): "
            f"{named}{more}"
        )
    return paths
