"""The MetaImage (`.mha`, `.mhd`) header read directly, for what ITK's reader passes over without a
word: data shorter than the header promises (ITK's reason is a stale errno), and geometry fields
it cannot parse, which it fills with 0 (`Offset = 10, 20, 30` places the image at (10, 0, 0)).
"""

from __future__ import annotations

import math
import os
import re
import zlib
from pathlib import Path

import numpy as np

# MetaIO's element sizes (metaTypes.h: MET_LONG is 4 bytes, MET_LONG_LONG 8).
_MET_BYTES = {"MET_UCHAR": 1, "MET_CHAR": 1, "MET_USHORT": 2, "MET_SHORT": 2, "MET_UINT": 4}
_MET_BYTES |= {"MET_INT": 4, "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8}
_MET_BYTES |= {"MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}
# The geometry fields of a MetaImage header (MetaIO's synonyms), with how many numbers each holds
# in NDims dimensions.
_GEOMETRY = {
    "Offset": 1, "Origin": 1, "Position": 1, "ElementSpacing": 1, "ElementSize": 1,
    "TransformMatrix": 2, "Rotation": 2, "Orientation": 2,
}  # fmt: skip


# A number as MetaIO reads one (Python's float() also takes '1_0', 'nan', 'inf').
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _finite_number(word: str) -> bool:
    return bool(_NUMBER.fullmatch(word)) and math.isfinite(float(word))


def _is_metaimage(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith((".mha", ".mhd"))


def _read(path: Path) -> tuple[dict[str, str], int | None]:
    """({field: value} of the header up to `ElementDataFile`, the offset of the data after it
    in the file, None where the header has no such line). Read as file names are (MetaIO opens
    the data file named by the header's bytes)."""
    header = {}
    with path.open("rb") as f:
        for raw in f:
            key, _, value = os.fsdecode(raw).partition("=")
            header[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                return header, f.tell()
    return header, None


def geometry_problem(path: Path) -> str | None:
    """Why a MetaImage header's geometry cannot be taken, or None (also for other files and
    headers without NDims: ITK's reason stands): a field of `_GEOMETRY` that is not NDims (a
    matrix: NDims x NDims) finite numbers separated by spaces, a voxel size that is not positive,
    or none (ITK reads 1 mm)."""
    if not _is_metaimage(path):
        return None
    try:
        header, _ = _read(path)
        ndims = int(header["NDims"])
    except (OSError, KeyError, ValueError):
        return None
    for field, power in _GEOMETRY.items():
        if field not in header:
            continue
        words = header[field].split()[: ndims**power]  # ITK reads the first ones
        if len(words) < ndims**power or not all(map(_finite_number, words)):
            return (
                f"MetaImage header field {field} = {header[field]!r} is not {ndims**power} finite "
                "numbers separated by spaces (ITK reads what it cannot parse as 0, placing the "
                "image elsewhere)"
            )
    for field in ("ElementSpacing", "ElementSize"):
        if field in header and any(float(w) <= 0 for w in header[field].split()[:ndims]):
            return (
                f"MetaImage header field {field} = {header[field]!r} gives a voxel size that is "
                "not positive (ITK mirrors the axis of a negative one and places the image "
                "elsewhere; a flip belongs in TransformMatrix)"
            )
    if not {"ElementSpacing", "ElementSize"} & header.keys():
        return (
            "MetaImage header gives no voxel size (no ElementSpacing or ElementSize field): ITK "
            "reads its voxels as 1 mm whatever their extent; save it with its ElementSpacing"
        )
    return None


def unplaced(path: str | os.PathLike) -> bool:
    """Whether `path` is a MetaImage whose header places its voxels nowhere (no `Offset`,
    `Origin` or `Position`): ITK reads it at origin 0, not where the scanner put it."""
    path = Path(path)
    if not _is_metaimage(path):
        return False
    try:
        header, _ = _read(path)
    except OSError:
        return False
    return "NDims" in header and not {"Offset", "Origin", "Position"} & header.keys()


def shortfall(path: Path) -> str | None:
    """Why a `.mha`/`.mhd` file holds fewer bytes than its header promises, or None (also for
    other files and headers too broken to size: ITK's reason stands)."""
    if not _is_metaimage(path):
        return None
    try:
        return _truncation(path)
    except (OSError, ValueError):
        return None


def data_file(path: str | os.PathLike) -> Path | None:
    """The separate data file a `.mhd` header names (`ElementDataFile`); None for another file,
    data in the header's own file (LOCAL), a slice list or pattern, or a header not read."""
    path = Path(path)
    if not path.name.lower().endswith(".mhd"):
        return None
    try:
        header, _ = _read(path)
    except OSError:
        return None
    value = header.get("ElementDataFile", "")
    return None if value in ("", "LOCAL") else _single_data_file(path, value)


def _single_data_file(header: Path, data_file: str) -> Path | None:
    """The one file an `ElementDataFile` value other than LOCAL names beside `header`; None for
    a slice list (`LIST`) or a file-name pattern (MetaIO's: one holding %), which ITK reads
    itself. A name with spaces and no % is one file."""
    if data_file.startswith("LIST") or "%" in data_file:
        return None
    return header.parent / data_file


def _truncation(path: Path) -> str | None:
    """Why a MetaImage (one `.mha`, or a `.mhd` header and the data file or slice files it names)
    holds fewer data bytes than its header promises, or None. ITK reads a short compressed
    stream, or a slice list short of files, as other voxels without an error."""
    size = path.stat().st_size
    header, offset = _read(path)
    if offset is None:
        return "MetaImage header has no ElementDataFile line"
    try:
        dims = [int(v) for v in header["DimSize"].split()]
        channels = int(header.get("ElementNumberOfChannels", "1"))
    except (KeyError, ValueError):
        return None
    itemsize = _MET_BYTES.get(header.get("ElementType", ""))
    expected = None if itemsize is None else int(np.prod(dims)) * channels * itemsize
    data_file = header.get("ElementDataFile", "")
    if data_file.startswith("LIST"):
        return _list_shortfall(path, offset, data_file, dims, expected)
    if data_file != "LOCAL":
        if (data_path := _single_data_file(path, data_file)) is None:
            return None  # file-name patterns: ITK's reason stands
        if not data_path.is_file():
            return f"data file {data_path} named by the header not found"
        skip = int(header.get("HeaderSize", "0") or 0)
        if skip < 0:  # -1: the data are the file's last bytes, after a header of any size
            return None
        path, size, offset = data_path, data_path.stat().st_size, skip
    where = "" if path.name.lower().endswith(".mha") else f" in {path.name}"
    if header.get("CompressedData", "F")[:1] in ("T", "t", "1"):  # MetaIO's reading of a flag
        if "CompressedDataSize" not in header:  # inflated to size it (ITK did not)
            return None if expected is None else _inflated_shortfall(path, offset, expected, where)
        promised = int(header["CompressedDataSize"] or 0)
        if size - offset < promised:
            return f"{size - offset} bytes of compressed data{where}, header promises {promised}"
        return None
    if expected is not None and size - offset < expected:
        return f"{size - offset} bytes of image data{where}, header promises {expected}"
    return None


def _inflated_shortfall(path: Path, offset: int, expected: int, where: str) -> str | None:
    """Why the zlib stream from `offset` in `path` inflates to fewer than `expected` bytes."""
    inflate, inflated = zlib.decompressobj(wbits=47), 0  # a zlib or gzip stream, as MetaIO
    try:
        with path.open("rb") as f:
            f.seek(offset)
            while inflated < expected and (chunk := f.read(1 << 20)):
                inflated += len(inflate.decompress(chunk))
    except zlib.error as error:
        return f"compressed data{where} do not inflate ({error})"
    if inflated < expected:
        return f"compressed data{where} inflate to {inflated} bytes, header promises {expected}"
    return None


def _list_shortfall(header_path: Path, offset: int, value: str, dims, expected) -> str | None:
    """Why the slice files of `ElementDataFile = LIST [nD]` (one name a line after it) are fewer
    than DimSize needs, or hold fewer bytes than it promises; None."""
    words = value.split()
    per_file = int(words[1].rstrip("Dd")) if len(words) > 1 else len(dims) - 1
    with header_path.open("rb") as f:
        f.seek(offset)
        names = [line.strip() for line in f.read().decode("latin-1").splitlines() if line.strip()]
    needed = int(np.prod(dims[per_file:]))
    if len(names) < needed:
        return f"ElementDataFile LIST names {len(names)} files, DimSize needs {needed}"
    if expected is None:
        return None
    size = sum((header_path.parent / name).stat().st_size for name in names[:needed])
    if size < expected:
        return f"{size} bytes of image data in the LIST's files, header promises {expected}"
    return None
