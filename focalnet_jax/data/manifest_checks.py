"""Checks of a manifest CSV (docs/data.md) beyond its cells: the columns read and misspelt, and
one exam listed under two case ids."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from focalnet_jax.data.csv_tables import csv_rows
from focalnet_jax.data.dicom import choose_series, list_series
from focalnet_jax.errors import LayoutError, UserError

CENTRE_COLUMNS = ("center_x", "center_y", "center_z")  # optional manifest crop centre, mm
CENTRE_SPACE_COLUMN = "center_space"  # optional: 'LPS' (empty cell: the default) or 'RAS'
# The manifest columns that are no component (a component's own columns: itself and `<it>_series`).
_OTHER_COLUMNS = (
    "case_id",
    "patient_id",
    "label",
    "prostate_mask",
    *CENTRE_COLUMNS,
    CENTRE_SPACE_COLUMN,
)


def check_components(components: Sequence[str]) -> None:
    """T2w first (the reference frame of every other component), each named once."""
    c = tuple(components)
    if not c or c[0] != "t2w" or len(set(c)) != len(c):
        raise LayoutError(
            f"components {','.join(c)!r}: expected t2w first (the reference frame), then distinct "
            "others, e.g. 't2w,adc,hbv'"
        )


def check_new_component_names(components: Sequence[str]) -> None:
    """Names for the components of a new store: none named as a manifest column of another role
    (`label`: a case's label file read as a model input) or a series choice (`<name>_series`),
    nor as t2w or adc in other letter case (an `ADC` would be scaled by its percentiles, not as
    an ADC map). A model trained on such names before still predicts."""
    for name in components:
        if name in _OTHER_COLUMNS or name.endswith("_series"):
            raise LayoutError(
                f"component {name!r}: a manifest column of another role has that name; name the "
                "component otherwise"
            )
        if name.lower() in ("t2w", "adc") and name != name.lower():
            raise LayoutError(
                f"component {name!r}: name it {name.lower()!r} ({name.lower()} is read by that "
                "name only)"
            )


def known_columns(components: Sequence[str]) -> list[str]:
    """Every column a manifest of `components` may have that some setting reads."""
    series = [f"{name}_series" for name in components]
    ids = ["case_id", "patient_id", *components, "label", "prostate_mask"]
    return [*ids, *CENTRE_COLUMNS, CENTRE_SPACE_COLUMN, *series]


def unread_columns(manifest: str | os.PathLike, components: Sequence[str]) -> list[str]:
    """The columns of `manifest` that no setting reads (e.g. an hbv column), sorted."""
    known = known_columns(components)
    columns, _ = csv_rows(Path(manifest), "manifest", (), "", known)
    return sorted({c for c in columns if c} - set(known))


def check_manifest_columns(
    manifest: Path, columns: Sequence[str], labels: bool, unlabelled: str
) -> list[str]:
    """The manifest's centre columns (all three or none); a missing label column is an error
    unless `unlabelled` says what it means."""
    centre_columns = [c for c in CENTRE_COLUMNS if c in columns]
    if centre_columns and len(centre_columns) != 3:
        raise LayoutError(f"manifest {manifest}: give all of center_x, center_y, center_z")
    if labels and "label" not in columns and unlabelled != "negative":
        raise LayoutError(
            f"manifest {manifest}: no 'label' column (has {columns}); "
            + (
                "--unlabelled skip would leave out every case"
                if unlabelled == "skip"
                else "add each case's label, or pass --unlabelled negative (no lesions)"
            )
        )
    return centre_columns


class ExamsSeen:
    """The T2w of the labelled cases read so far, to refuse one exam under two case ids: it is
    stored as two patients, and one copy could train while the other validates the same fold."""

    def __init__(self):
        self._seen: dict[str, list[tuple[int, str, str | None]]] = {}  # real path -> rows
        self._series: dict[str, list] = {}  # DICOM folder -> its series, listed where needed

    def check(self, case: str, t2w: str, series: str | None, line: int, where: str) -> None:
        """Refuses a row (`where`, `line`) whose T2w `t2w` (and `series` choice) is one read
        before under another case id; one folder's series chosen by UID, by description or by
        an empty cell (its only series) are one."""
        path = os.path.realpath(t2w)
        rows = self._seen.setdefault(path, [])
        for first_line, first, chosen in rows:
            if first != case and self._same_series(path, chosen, series):
                raise LayoutError(
                    f"{where}: case {case!r} reads the T2w of case {first!r} (line "
                    f"{first_line}), {t2w}: one exam listed twice would be stored as two patients"
                )
        rows.append((line, case, series))

    def _same_series(self, path: str, a: str | None, b: str | None) -> bool:
        if a == b or not os.path.isdir(path):  # a file has no series to choose
            return True
        try:
            if path not in self._series:
                self._series[path] = list_series(path)
            found = self._series[path]
            return choose_series(path, a, found).uid == choose_series(path, b, found).uid
        except UserError:  # no such series: the case is refused when it is read
            return False
