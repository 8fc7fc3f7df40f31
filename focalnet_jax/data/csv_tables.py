"""Reading the CSV tables users write by hand or in a spreadsheet (PI-CAI marksheets, case
manifests): UTF-8 with or without a byte-order mark, columns found by name, every row checked
against the header."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from focalnet_jax.errors import LayoutError

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # C0 controls and DEL but tab, LF, CR


def csv_text(path: Path, what: str) -> str:
    """The text of a CSV file, UTF-8 with or without the byte-order mark spreadsheet programs
    write (it would otherwise stick to the first column's name); other encodings are refused
    naming the line. `what`: how errors name the file ('marksheet', 'manifest')."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        before = data[: err.start]  # lines end in LF, CR LF or CR (Excel for Mac's CSV)
        line = before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n") + 1
        raise LayoutError(
            f"{what} {path}, line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save it "
            "as CSV UTF-8"
        ) from err


def _near_miss(column: str) -> str:
    """`column` folded to compare it with the known names: letter case, spaces and hyphens (for
    underscores) and British 'centre' (for 'center') aside."""
    folded = column.casefold().replace(" ", "_").replace("-", "_")
    return folded.replace("centre", "center")


def _check_columns(
    path: Path, what: str, columns: list[str], required: Sequence[str], known: Sequence[str]
) -> None:
    """Refuses a near miss of a `known` column that is not there itself (`Label` for `label`,
    `centre_x`: silently not read; `Patient ID` beside `patient_id` is a column of its own), a
    missing `required` column and a column named twice."""
    exact = {_near_miss(name): name for name in known}
    for column in columns:
        expected = exact.get(_near_miss(column))
        if expected is not None and column != expected and expected not in columns:
            raise LayoutError(
                f"{what} {path}: column {column!r} is not read; name it {expected!r} (column "
                "names are matched exactly)"
            )
    missing = [c for c in required if c not in columns]
    if missing:
        raise LayoutError(f"{what} {path}: missing column(s) {missing}; has {columns}")
    repeated = sorted({c for c in columns if c and columns.count(c) > 1})
    if repeated:
        raise LayoutError(f"{what} {path}: column(s) {repeated} named more than once")


def _check_characters(
    path: Path, what: str, line: int, cells: dict[str, str], read: Sequence[str] | None
) -> None:
    """Refuses a cell of a `read` column (None: of any) holding a control character (NUL, ...;
    tab and line breaks aside): no file name or id holds one, and NUL ended the run in a
    traceback. Columns nothing reads (notes) are left as they are."""
    for column, value in cells.items():
        if (read is None or column in read) and (bad := _CONTROL.search(value)):
            raise LayoutError(
                f"{what} {path}, line {line}, column {column!r}: cell holds control character "
                f"U+{ord(bad.group()):04X}; remove it"
            )


def csv_rows(
    path: Path, what: str, required: Sequence[str], extra_cells: str, known: Sequence[str] = ()
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(columns, (line, row with stripped keys and values) of each row) of the CSV file `path`.
    Blank lines and rows of empty cells (a spreadsheet's empty rows) are skipped, also before the
    header. A `LayoutError` names a near miss of a `known` column (`Label` for `label`), a
    missing `required` column, a column named twice (one value would be dropped), a cell holding
    a control character, and a row with more cells than the header has columns (its values
    would shift; `extra_cells`: the likely cause, e.g. 'a path holding a comma must be in double
    quotes'), and a malformed row (`_numbered_rows`). Lines are those a row begins on."""
    with io.StringIO(csv_text(path, what), newline="") as f:
        reader = csv.reader(f, strict=True)
        numbered = _numbered_rows(reader, path, what)
        line, header = next(((n, c) for n, c in numbered if any(x.strip() for x in c)), (1, []))
        columns = [c.strip() for c in header]
        # Every column name; cells of the known and required columns, or of every column of a
        # table naming none known (a marksheet, whose cells the store keeps)
        read = {*required, *known} if known else None
        _check_characters(path, what, line, {c: c for c in columns}, None)
        _check_columns(path, what, columns, required, known)
        rows = []
        for line, cells in numbered:
            if len(cells) > len(columns):
                raise LayoutError(
                    f"{what} {path}, line {line}: {len(cells)} cells, but the header names "
                    f"{len(columns)} columns ({extra_cells})"
                )
            cells += [""] * (len(columns) - len(cells))
            row = {k: v.strip() for k, v in zip(columns, cells, strict=True) if k}
            _check_characters(path, what, line, row, read)
            if any(row.values()):
                rows.append((line, row))
    return columns, rows


def _numbered_rows(reader, path: Path, what: str) -> Iterator[tuple[int, list[str]]]:
    """(line the row begins on, its cells) for each row of `reader` (a strict `csv.reader`). A
    malformed row is a `LayoutError` naming its line: a double quote opening a cell and never
    closed (a lenient reader reads the rest of the file into that cell, and its rows are lost
    without a word), or text after a cell's closing quote."""
    line = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            why = str(error)
            if why == "unexpected end of data":
                why = "a cell opens a double quote that is never closed"
            raise LayoutError(
                f"{what} {path}, line {line}: not a well-formed CSV row: {why}"
            ) from None
        yield line, cells
        line = reader.line_num + 1
