"""The preprocessed dataset store: one folder of memory-mappable `.npy` arrays and a case table.

Layout (N = slices of all cases, concatenated case after case):

    images.npy       float32 [N, 128, 128, C]   components in `components` order, T2w unclipped
    classes.npy      uint8   [N, 128, 128]      0..5
    grade_known.npy  uint8   [N, 128, 128]      0 on lesions of unknown grade (PI-CAI value 1)
    lesions.npy      int32   [N, 128, 128]      lesion instance ids within the case, 0 background
    annotated.npy    bool    [N]                slice holds a lesion
    slice_index.npy  int32   [N]                T2w slice of each crop slice
    cases.json       {"components", "settings", "fingerprint", "cases": [record, ...]}
    fingerprint.json the settings, their hash, and per-component intensity percentiles
    errors.csv       cases left out by --skip-bad-cases (case, file, reason; written, maybe
                     empty, whenever --skip-bad-cases is given)

Each case record holds case_id, patient_id, start, stop (its slice range), lesion_classes,
lesion_grade_known, index_lesion, spacing (row, col mm), geometry (a `CropGeometry`), and the source
files. The store is written in a temporary sibling folder named after its writer and renamed into
place when complete; a later writer removes the leftovers of writers that died, never a live one's
(`writer_folders`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from focalnet_jax.data.atomic_files import foreign_entries, replaced_atomically, sync_folder
from focalnet_jax.data.deferred_signals import signals_deferred
from focalnet_jax.data.geometry import CropGeometry
from focalnet_jax.data.store_settings import (
    STORE_VERSION,
    VERSION_CHANGE,
    StaleStoreError,
    fingerprint,
    read_settings,
    settings_diff,
)
from focalnet_jax.data.store_table import check_recorded, check_slice_ranges, check_table
from focalnet_jax.data.writer_folders import (
    missing_folders,
    moved_aside_note,
    remove_dead_leftovers,
    remove_empty_folders,
    remove_replaced,
    restore_moved_aside,
    swap_in,
    target_folder,
    writer_folder,
)
from focalnet_jax.errors import Interrupted, Terminated, UserError, naming_the_disk

log = logging.getLogger(__name__)

_HEADER_BYTES = 256  # fixed .npy header room, so arrays can be streamed before N is known
_ARRAYS = {
    "images": np.float32,
    "classes": np.uint8,
    "grade_known": np.uint8,
    "lesions": np.int32,
    "annotated": np.bool_,
    "slice_index": np.int32,
}


_STORE_FILES = {f"{name}.npy" for name in _ARRAYS} | {"cases.json", "fingerprint.json"}


def _other_files(path: Path) -> list[str]:
    """The names in the store folder `path` that are not a store's files (at most 5 named)."""
    others = foreign_entries(path, lambda name: name in _STORE_FILES | {"errors.csv"})
    return others[:5] + ([f"{len(others) - 5} more"] if len(others) > 5 else [])


def _check_store_replaceable(path: Path, settings: dict, overwrite: bool, when: str = "") -> None:
    """Refuses to replace what is at `path` with a store of `settings`: anything but an empty
    folder or a store; a store folder holding other files too (they would be deleted,
    `--overwrite` or not); a store of other settings or one that cannot be read, unless
    `overwrite`. `when`: 'meanwhile ' where checked again at the commit, for a store another run
    wrote after this one started."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if not (path / "cases.json").exists():
        raise FileExistsError(f"{path} exists and is not a preprocessed store")
    try:
        existing = read_settings(path)
    except UserError as error:  # a damaged store is replaced when asked, no other folder
        store_files = {p.name for p in path.iterdir()} & (_STORE_FILES - {"cases.json"})
        if _other_files(path) or not store_files:
            raise FileExistsError(
                f"{path} exists and is not a preprocessed store ({error})"
            ) from None
        if not overwrite:
            raise StaleStoreError(f"{error}; pass --overwrite to replace it") from None
        return
    if others := _other_files(path):
        raise FileExistsError(
            f"store {path} {when}holds files that are not the store's ({', '.join(others)}): "
            "replacing the store would delete them; move them out of it first"
        )
    diff = settings_diff(existing, settings, ("existing", "new"))
    if diff and not overwrite:
        raise StaleStoreError(
            f"store {path} exists, {when}made with other settings ({'; '.join(diff)}); "
            "pass --overwrite to replace it"
        )


def _npy_header(dtype, shape) -> bytes:
    header = repr({"descr": np.dtype(dtype).str, "fortran_order": False, "shape": tuple(shape)})
    body = header.ljust(_HEADER_BYTES - 10 - 1) + "\n"
    if len(body) + 10 != _HEADER_BYTES:
        raise ValueError(f"npy header for shape {shape} longer than {_HEADER_BYTES} bytes")
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


class DuplicateCase(ValueError):
    """`StoreWriter.add` of a case stored already: its id, or its data under another id."""

    def __init__(self, case_id: str, reason: str):
        self.case_id, self.reason = case_id, reason
        super().__init__(f"case {case_id!r}: {reason}")


class StoreWriter:
    """Streams cases into a temporary folder; `commit()` renames it to `path`, `abort()` removes it.

    Use as a context manager: leaving the block by an exception aborts, so nothing half-written
    stays. A store already at `path` is replaced on commit when made with the same settings;
    with other settings, or a table that cannot be read, only when `overwrite` (else
    `StaleStoreError` naming the settings or the reason); one whose folder holds other files
    too, never (`FileExistsError` naming them). Checked when the writer starts and again at the
    commit, after its files are synced, right before the rename (another run may have committed
    a store there meanwhile). A symbolic link `path` is kept and the store it points to replaced
    (`target_folder`).
    """

    def __init__(self, path: str | os.PathLike, components, settings: dict, *, overwrite=False):
        self.path = target_folder(path)  # a symbolic link is kept, its folder replaced
        restore_moved_aside(self.path)
        self.overwrite = overwrite
        _check_store_replaceable(self.path, settings, overwrite)
        self.components = tuple(components)
        self.settings = settings
        self._created = missing_folders(self.path.parent)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_leftovers(self.path)
        self.tmp = writer_folder(self.path)
        try:
            self.tmp.mkdir(mode=0o755)
        except OSError as error:  # e.g. under /proc, or read-only: named as the folder asked for
            raise OSError(error.errno, error.strerror, str(self.path)) from error
        self._files = {}
        for name in _ARRAYS:
            f = (self.tmp / f"{name}.npy").open("wb")
            f.write(b"\0" * _HEADER_BYTES)
            self._files[name] = f
        self.records: list[dict] = []
        self._case_of_data: dict[str, tuple[str, str]] = {}  # data_sha256 -> (case, patient)
        self._case_ids: set[str] = set()
        self.errors: list[tuple[str, str, str]] = []
        self.num_slices = 0
        self._shape: tuple[int, int, int] | None = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()

    def add(self, case, *, patient_id: str, files: dict | None = None, meta: dict | None = None):
        """Append one `PreprocessedCase`. `DuplicateCase`, nothing written, for a case id stored
        already or data the same as a stored case's (one exam under two ids: in cross-validation
        its copy would be validated by a model trained on it)."""
        if case.case_id in self._case_ids:
            raise DuplicateCase(case.case_id, "the case id is stored already (listed twice)")
        if case.components != self.components:
            raise ValueError(
                f"case {case.case_id}: components {case.components} != {self.components}"
            )
        if not len(case.images):  # its records would hold an empty slice range
            raise ValueError(f"case {case.case_id}: no slice to store")
        shape = case.images.shape[1:]
        if self._shape is None:
            self._shape = shape
        elif shape != self._shape:
            raise ValueError(f"case {case.case_id}: crop shape {shape} != {self._shape}")
        arrays = {
            "images": case.images,
            "classes": case.classes,
            "grade_known": case.grade_known,
            "lesions": case.lesions,
            "annotated": case.annotated,
            "slice_index": case.slice_index,
        }
        data = {n: np.ascontiguousarray(arrays[n], dtype=d).tobytes() for n, d in _ARRAYS.items()}
        digest = hashlib.sha256()  # of the case's stored data: in cases.json, which a study
        for name in _ARRAYS:  # records (a case preprocessed again differs)
            digest.update(data[name])
        if same := self._case_of_data.get(digest.hexdigest()):
            case_id, patient = same
            harm = (
                "it would count twice"
                if patient == str(patient_id)
                else "in cross-validation one copy would be validated by a model trained on the "
                "other"
            )
            raise DuplicateCase(
                case.case_id,
                f"its preprocessed data are those of case {case_id!r} byte for byte: the same "
                f"exam under two ids? ({harm}); list it once",
            )
        self._case_of_data[digest.hexdigest()] = (case.case_id, str(patient_id))
        self._case_ids.add(case.case_id)
        for name in _ARRAYS:
            self._files[name].write(data[name])
        n = len(case.images)
        self.records.append(
            {
                "case_id": case.case_id,
                "patient_id": str(patient_id),
                "start": self.num_slices,
                "stop": self.num_slices + n,
                "lesion_classes": [int(c) for c in case.lesion_classes],
                "lesion_grade_known": [bool(g) for g in case.lesion_grade_known],
                "index_lesion": int(case.index_lesion),
                "max_class": int(max(case.lesion_classes, default=0)),
                "spacing": [float(s) for s in case.spacing],
                "geometry": case.geometry.to_dict(),
                "center": list(case.center),
                "center_source": case.center_source,
                "t2w_reference": case.t2w_reference,
                "files": files or {},
                "meta": meta or {},
                "data_sha256": digest.hexdigest(),
            }
        )
        self.num_slices += n

    def add_error(self, case_id: str, file: str, reason: str) -> None:
        self.errors.append((case_id, file, reason))

    def _statistics(self) -> dict:
        images = np.load(self.tmp / "images.npy", mmap_mode="r")
        sample = np.asarray(images[:: max(1, len(images) // 256)])
        stats = {}
        for c, name in enumerate(self.components):
            p = np.percentile(sample[..., c], [0.5, 50, 99.5]) if len(sample) else [0, 0, 0]
            stats[name] = {"p0.5": float(p[0]), "p50": float(p[1]), "p99.5": float(p[2])}
        return stats

    def commit(self, *, errors_file: bool = False) -> Path:
        """Finish the arrays and tables and move the folder to `path` (replacing an older store).
        errors.csv is written when a case was skipped, or always with `errors_file` (maybe empty:
        a run that was told to skip bad cases says that it skipped none)."""
        if not self.records:
            self.abort()
            raise UserError(f"store {self.path}: no case was preprocessed")
        h, w, c = self._shape
        shapes = {
            "images": (self.num_slices, h, w, c),
            "classes": (self.num_slices, h, w),
            "grade_known": (self.num_slices, h, w),
            "lesions": (self.num_slices, h, w),
            "annotated": (self.num_slices,),
            "slice_index": (self.num_slices,),
        }
        for name, f in self._files.items():
            f.seek(0)
            f.write(_npy_header(_ARRAYS[name], shapes[name]))
            f.close()
        digest = fingerprint(self.settings)
        table = {
            "components": list(self.components),
            "settings": self.settings,
            "fingerprint": digest,
            "cases": self.records,
        }
        finger = {"settings": self.settings, "fingerprint": digest, "num_cases": len(self.records)}
        with naming_the_disk(self.path, self.tmp):  # not the temporary folder, gone by then
            (self.tmp / "cases.json").write_text(json.dumps(table))
            finger.update(
                num_slices=self.num_slices, crop_shape=[h, w], statistics=self._statistics()
            )
            (self.tmp / "fingerprint.json").write_text(json.dumps(finger, indent=1))
            if self.errors or errors_file:
                write_errors(self.tmp / "errors.csv", self.errors)
            sync_folder(self.tmp)
        try:  # another run may have committed a store at `path` since this one started
            _check_store_replaceable(self.path, self.settings, self.overwrite, "meanwhile ")
        except (UserError, FileExistsError):
            self.abort()
            raise
        try:  # once swapped in, the store is written: a stop then says so (it said "interrupted")
            with signals_deferred():
                remove_replaced(swap_in(self.tmp, self.path), self.path)
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM raised as `Terminated`
            kind = Terminated if isinstance(stop, Terminated) else Interrupted
            how = "SIGTERM" if kind is Terminated else "Ctrl-C"
            raise kind(f"interrupted by {how} once store {self.path} was written") from None
        return self.path

    def abort(self) -> None:
        """Removes the temporary folder and the folders above `path` the writer created."""
        for f in self._files.values():
            with contextlib.suppress(OSError):  # a full disk fails the flush of close again
                f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        remove_empty_folders(self._created)


def write_errors(path: str | os.PathLike, errors) -> None:
    """errors.csv with columns case, file, reason (atomically: whole or the previous file), in
    UTF-8; a file name that is no UTF-8 (as Python decodes such names) is written as its bytes."""
    with replaced_atomically(path) as tmp:
        with tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            csv.writer(f).writerows([["case", "file", "reason"], *errors])


def bad_cases_note(errors) -> str:
    """The end of a command's closing line: '; 1 bad case in errors.csv', or '' when none."""
    n = len(errors)
    return f"; {n} bad case{'' if n == 1 else 's'} in errors.csv" if n else ""


@dataclass
class Store:
    """An opened store: memory-mapped arrays (see the module docstring) and the case table."""

    path: Path
    images: np.ndarray
    classes: np.ndarray
    grade_known: np.ndarray
    lesions: np.ndarray
    annotated: np.ndarray
    slice_index: np.ndarray
    components: tuple[str, ...]
    cases: list[dict]
    settings: dict
    fingerprint: str

    def __post_init__(self):
        self._by_id = {r["case_id"]: r for r in self.cases}
        self._geometry: dict[str, CropGeometry] = {}

    def __len__(self) -> int:
        return len(self.images)

    @property
    def case_ids(self) -> list[str]:
        return [r["case_id"] for r in self.cases]

    def case(self, case_id: str) -> dict:
        if case_id not in self._by_id:
            raise KeyError(f"case {case_id!r} is not in store {self.path}")
        return self._by_id[case_id]

    def case_slices(self, case_id: str) -> slice:
        """The case's rows of every array."""
        record = self.case(case_id)
        return slice(record["start"], record["stop"])

    def geometry(self, case_id: str) -> CropGeometry:
        if case_id not in self._geometry:
            self._geometry[case_id] = CropGeometry.from_dict(self.case(case_id)["geometry"])
        return self._geometry[case_id]

    def pixel_to_world(self, case_id: str, s, row, col):
        """Crop pixel (s relative to the case, row, col) -> LPS world (x, y, z) mm."""
        return self.geometry(case_id).pixel_to_world(s, row, col)

    def world_to_pixel(self, case_id: str, x, y, z):
        """LPS world (x, y, z) mm -> (s relative to the case, row, col), floats."""
        return self.geometry(case_id).world_to_pixel(x, y, z)

    def patient_max_class(self) -> dict[str, int]:
        """Each patient's highest lesion class over all of their cases."""
        out: dict[str, int] = {}
        for r in self.cases:
            out[r["patient_id"]] = max(out.get(r["patient_id"], 0), int(r["max_class"]))
        return out


def _load_array(file: Path) -> np.ndarray:
    """A store array, memory-mapped; a missing, truncated or corrupt file is a `StaleStoreError`
    (the store must be made again)."""
    try:
        return np.load(file, mmap_mode="r")
    except FileNotFoundError as error:
        raise StaleStoreError(f"{file}: missing; run `focalnet preprocess` again") from error
    except (OSError, ValueError, EOFError) as error:  # e.g. mmap length > file size
        raise StaleStoreError(
            f"{file}: unreadable or truncated ({error}); run `focalnet preprocess` again"
        ) from error


def open_store(path: str | os.PathLike, *, expected_settings: dict | None = None) -> Store:
    """Open a store read-only with memory-mapped arrays.

    `expected_settings` (see `store_settings`): raise `StaleStoreError` naming the differing keys
    when the store was made with other settings.
    """
    path = Path(path)
    table_path = path / "cases.json"
    if not path.exists():
        raise FileNotFoundError(f"store {path} does not exist{moved_aside_note(path)}")
    if not table_path.exists():
        raise FileNotFoundError(f"{path} is not a preprocessed store (no cases.json)")
    try:
        table = json.loads(table_path.read_text())
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise StaleStoreError(f"{table_path}: not valid JSON ({error})") from error
    check_table(table, table_path)
    if (version := table["settings"].get("version")) != STORE_VERSION:
        raise StaleStoreError(
            f"store {path} has format version {version}; this code reads version {STORE_VERSION} "
            f"({VERSION_CHANGE}); run `focalnet preprocess` again"
        )
    diff = []  # settings compared as values: a fingerprint tells 80 from 80.0
    if expected_settings is not None:
        diff = settings_diff(table["settings"], expected_settings, ("store", "expected"))
    if diff:
        raise StaleStoreError(
            f"store {path} is stale, made with other settings ({'; '.join(diff)}); "
            "run `focalnet preprocess` again"
        )
    arrays = {name: _load_array(path / f"{name}.npy") for name in _ARRAYS}
    _check_array_layout(arrays, len(table["components"]), path)  # their slice counts too
    check_slice_ranges(table["cases"], arrays["slice_index"], table_path)
    check_recorded(table, table_path)
    return Store(
        path=path,
        components=tuple(table["components"]),
        cases=table["cases"],
        settings=table["settings"],
        fingerprint=table["fingerprint"],
        **arrays,
    )


def _check_array_layout(arrays: dict, num_components: int, path: Path) -> None:
    """Each array has its dtype and shape: images `[N, H, W, C]` (C: the table's components),
    classes, grade_known, lesions `[N, H, W]`, annotated and slice_index `[N]`."""
    frame = arrays["images"].shape[:3]
    shapes = {"images": (*frame, num_components), "annotated": frame[:1], "slice_index": frame[:1]}
    for name, array in arrays.items():
        dtype, shape = np.dtype(_ARRAYS[name]), shapes.get(name, frame)
        if array.dtype != dtype or array.shape != shape:
            raise StaleStoreError(
                f"{path / f'{name}.npy'}: {array.dtype} {list(array.shape)}, expected {dtype} "
                f"{list(shape)} (cases.json lists {num_components} components); the arrays do "
                "not fit the table, run `focalnet preprocess` again"
            )


def component_channels(store, components) -> list[int]:
    """Store channel of each named component; a component the store lacks is an error."""
    missing = [c for c in components if c not in store.components]
    if missing:
        raise UserError(
            f"data.components {tuple(components)}: {missing} not in store {store.path} "
            f"(it holds {store.components})"
        )
    return [store.components.index(c) for c in components]


def t2w_lower_ratios(store) -> np.ndarray:
    """Per store row, float32 `[N]`: the case's T2w air / bladder intensity ratio, exact (below 1;
    negative for a negative air value), 0 where not recorded.

    The store keeps T2w as (x - air) / (bladder - air), unclipped; this ratio is all that the
    intensity augmentation needs to move the upper (bladder) threshold (`training.augment`).
    """
    ratios = np.zeros(len(store.images), np.float32)
    for record in store.cases:
        reference = record.get("t2w_reference") or {}
        air, bladder = reference.get("air"), reference.get("bladder")
        if air is not None and bladder and bladder > air:
            ratios[record["start"] : record["stop"]] = air / bladder
    return ratios


def preprocess_settings(path) -> dict | None:
    """The preprocessing settings a store was made with (None when `path` holds no store)."""
    try:
        return open_store(path).settings.get("preprocess")
    except FileNotFoundError:
        return None
