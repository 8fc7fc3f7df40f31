"""The case table of a preprocessed store (`cases.json`, see `store`) as `open_store` reads it:
its form, each case record's keys and types, and its slice ranges against the arrays. Each
refusal is a `StaleStoreError` naming the file (and the case): the store must be made again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from focalnet_jax.data.case_ids import check_case_id
from focalnet_jax.data.geometry import CropGeometry, display_axes
from focalnet_jax.data.store_settings import StaleStoreError, fingerprint

# The keys every case record holds, with their types (the reader relies on them).
_RECORD_KEYS = {
    "case_id": str,
    "patient_id": str,
    "start": int,
    "stop": int,
    "max_class": int,
    "geometry": dict,
}


def check_table(table, table_path: Path) -> None:
    """A store table is an object with components, settings, fingerprint and case records, each
    with the keys `_RECORD_KEYS` and a safe case id, none cropped by an older version the wrong way
    round (`_check_orientation`)."""
    keys = ("components", "settings", "fingerprint", "cases")
    if not isinstance(table, dict) or not all(k in table for k in keys):
        raise StaleStoreError(f"{table_path}: not a store table (expected an object with {keys})")
    if not isinstance(table["settings"], dict) or not isinstance(table["cases"], list):
        raise StaleStoreError(f"{table_path}: malformed settings or case records")
    for number, record in enumerate(table["cases"]):
        if problem := _record_problem(record):
            case = record.get("case_id") if isinstance(record, dict) else None
            named = f" ({case!r})" if isinstance(case, str) else ""
            raise StaleStoreError(
                f"{table_path}: case record {number}{named} {problem}; run `focalnet preprocess` "
                "again"
            )
        check_case_id(record["case_id"], f"store {table_path}")
    _check_orientation(table["cases"], table_path.parent)


def _record_problem(record) -> str | None:
    """What makes `record` no case record of a store (`StoreWriter.add`), or None."""
    if not isinstance(record, dict):
        return f"is {type(record).__name__}, not an object"
    for key, kind in _RECORD_KEYS.items():
        value = record.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"has {key} {value!r}, expected {'a string' if kind is str else kind.__name__}"
    direction = record["geometry"].get("t2w_direction")
    numbers = isinstance(direction, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in direction
    )
    if not (numbers and len(direction) == 9):
        return f"has geometry.t2w_direction {direction!r}, expected 9 numbers"
    try:  # what reading its positions needs (a missing key was a KeyError at its first use)
        CropGeometry.from_dict(record["geometry"])
    except (KeyError, TypeError, ValueError) as error:
        return f"has a geometry that cannot be read ({type(error).__name__}: {error})"
    return None


def check_recorded(table, table_path: Path) -> None:
    """The table's fingerprint is that of its settings, its components those the settings name,
    and `fingerprint.json` beside it (written with it) names the same fingerprint and counts:
    a table edited by hand, or copied from another store, is refused (a store made with other
    settings passed `expected_settings`, reversed components read the T2w channel as ADC)."""
    why = None
    if table["fingerprint"] != fingerprint(table["settings"]):
        why = "its fingerprint is not that of its settings"
    elif list(table["components"]) != list(table["settings"].get("components") or []):
        why = f"its components {table['components']} are not its settings' components"
    else:
        recorded = _read_fingerprint(table_path.parent / "fingerprint.json")
        counts = {"fingerprint": table["fingerprint"], "num_cases": len(table["cases"])}
        if recorded is None or any(recorded.get(k) != v for k, v in counts.items()):
            why = "fingerprint.json, written with it, names another fingerprint or case count"
    if why:
        raise StaleStoreError(
            f"{table_path}: {why} (edited, or copied from another store?); run `focalnet "
            "preprocess` again"
        )


def _read_fingerprint(path: Path) -> dict | None:
    """The object in `fingerprint.json`, None where it is missing or no JSON object."""
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def check_slice_ranges(cases, slice_index, table_path: Path) -> None:
    """The case records' `start`/`stop` must tile the arrays' rows (`slice_index` [N], the
    source slice of each row): each case starting where the previous one stopped (the first at
    row 0), at least one slice each, the last stopping at the last row, each case id once, and
    each case's source slices rising: a `cases.json` of another store (or hand-edited) would
    otherwise give cases other cases' slices, or none, without a word."""
    stop, seen = 0, set()
    for record in cases:
        case = record["case_id"]
        if case in seen:
            raise StaleStoreError(f"{table_path}: case {case!r} is listed twice")
        seen.add(case)
        start, end = record.get("start"), record.get("stop")
        if not (isinstance(start, int) and isinstance(end, int) and stop == start <= end):
            raise StaleStoreError(
                f"{table_path}: case {case!r} has slices {start}..{end}, expected to start at "
                f"{stop}; the table does not fit the arrays, run `focalnet preprocess` again"
            )
        if end == start:  # made by `--slices annotated` before lesion-free cases were left out
            raise StaleStoreError(
                f"{table_path}: case {case!r} has no slice (a lesion-free case of `--slices "
                "annotated`); nothing could be evaluated on it, run `focalnet preprocess` again"
            )
        if end > len(slice_index) or not np.all(np.diff(slice_index[start:end]) > 0):
            raise StaleStoreError(
                f"{table_path}: case {case!r} has slices {start}..{end}, not one exam's slices "
                f"in order among the arrays' {len(slice_index)}; the table does not fit the "
                "arrays, run `focalnet preprocess` again"
            )
        stop = end
    if stop != len(slice_index):
        raise StaleStoreError(
            f"{table_path}: the cases end at slice {stop}, the arrays hold {len(slice_index)}; the "
            "table does not fit the arrays, run `focalnet preprocess` again"
        )


def _check_orientation(cases, path: Path) -> None:
    """Refuses cases cropped before the crop's in-plane axes were recorded whose T2w voxels are
    stored flipped or transposed: their crops are mirrored or upside down relative to the ones
    preprocessing makes now (`geometry.display_axes`)."""
    old = [
        r["case_id"]
        for r in cases
        if "in_plane_axes" not in r["geometry"]
        and display_axes(r["geometry"]["t2w_direction"]) != (1, 0, 0, 1)
    ]
    if old:
        raise StaleStoreError(
            f"store {path}: {len(old)} case(s) ({', '.join(old[:5])}) have a T2w stored flipped "
            "or transposed and were cropped mirrored or upside down by an older version; run "
            "`focalnet preprocess ... --overwrite` again"
        )
