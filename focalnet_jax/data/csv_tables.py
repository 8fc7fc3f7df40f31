"""Reading the CSV tables users write by hand or in a spreadsheet (PI-CAI marksheets, case
manifests): UTF-8 with or without a byte-order mark, columns found by name, every row checked
against the header."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from focalnet_jax.errors import LayoutError


def csv_text(path: Path, what: str) -> str:
    """The text of a CSV file, UTF-8 with or without the byte-order mark spreadsheet programs
    write (it would otherwise stick to the first column's name); other encodings are refused
    naming the line. `what`: how errors name the file ('marksheet', 'manifest')."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise LayoutError(
            f"{what} {path}, line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save it "
            "as CSV UTF-8"
        ) from err


def csv_rows(
    path: Path, what: str, required: Sequence[str], extra_cells: str
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(columns, (line, row with stripped keys and values) of each row) of the CSV file `path`.
    Rows of empty cells (a spreadsheet's empty rows) are skipped. A `LayoutError` names a missing
    `required` column, a column named twice (one value would be dropped), and a row with more
    cells than the header has columns (its values would shift; `extra_cells`: the likely cause,
    e.g. 'a path holding a comma must be in double quotes')."""
    with io.StringIO(csv_text(path, what), newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in required if c not in columns]
        if missing:
            raise LayoutError(f"{what} {path}: missing column(s) {missing}; has {columns}")
        repeated = sorted({c for c in columns if c and columns.count(c) > 1})
        if repeated:
            raise LayoutError(f"{what} {path}: column(s) {repeated} named more than once")
        rows = []
        for row in reader:
            if None in row:  # csv.DictReader's key for the cells beyond the header's
                raise LayoutError(
                    f"{what} {path}, line {reader.line_num}: {len(columns) + len(row[None])} "
                    f"cells, but the header names {len(columns)} columns ({extra_cells})"
                )
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            if any(row.values()):
                rows.append((reader.line_num, row))
    return columns, rows
