"""The NRRD (`.nrrd`, `.nhdr`) header read directly, for what ITK's reader passes over without a
word: a header without a usable `space origin`, whose voxels ITK places at origin 0 with identity
direction (a hand-written header with `spacings` only), and a header without a voxel size
(pynrrd's `nrrd.write(path, array)`), whose voxels ITK reads as 1 mm."""

from __future__ import annotations

import math
import os
from pathlib import Path

_MAX_HEADER_BYTES = 1 << 20  # a header is a few hundred bytes; the data follow a blank line


def _fields(path: str | os.PathLike) -> dict[str, str] | None:
    """{field: value} of the NRRD header of `path` (up to its blank line; comments and
    `key:=value` pairs left out), or None for another file, one that cannot be read (the
    reader's own reason then stands) or one that does not start with the NRRD magic. Field
    names are lower case without spaces, as teem (ITK's reader) matches them: `Space Origin` is
    `spaceorigin`."""
    path = Path(path)
    if not (path.is_file() and path.name.lower().endswith((".nrrd", ".nhdr"))):
        return None
    try:
        with path.open("rb") as f:
            text = f.read(_MAX_HEADER_BYTES).decode("latin-1")
    except OSError:
        return None
    lines = text.split("\n\n", 1)[0].splitlines()
    if not lines or not lines[0].startswith("NRRD"):
        return None
    fields = {}
    for line in lines[1:]:
        if line.startswith("#") or ":=" in line.partition(": ")[0]:
            continue
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip().lower().replace(" ", "")] = value.strip()
    return fields


def unplaced(path: str | os.PathLike) -> bool:
    """Whether `path` is an NRRD whose header places its voxels nowhere ITK takes an origin from,
    so that ITK reads it at origin 0 with identity direction, not where the scanner put it:
    with a `space` (or `space dimension`), a `space origin` of finite numbers is needed (`none`
    or NaN read as 0); without one, finite `axis mins` and `spacings` for every axis (ITK reads
    the origin as 0 for a NaN in either, a missing `spacings` or its voxel size as 1 mm beside
    `axis maxs`, and as NaN for a NaN in one axis min)."""
    fields = _fields(path)
    if fields is None:
        return False
    if "space" in fields or "spacedimension" in fields:
        return not _finite(fields.get("spaceorigin", "").strip("()").replace(",", " "))
    return not (_finite(fields.get("axismins", "")) and _finite(fields.get("spacings", "")))


def geometry_problem(path: str | os.PathLike) -> str | None:
    """Why ITK would read an NRRD `path` with voxels of another size than its header gives, or
    None: a header without a voxel size (`space directions` where it gives a `space`, else
    `spacings`), whose voxels ITK reads as 1 mm, also beside `axis mins` and `axis maxs`."""
    fields = _fields(path)
    if fields is None:
        return None
    field = "space directions" if "space" in fields or "spacedimension" in fields else "spacings"
    if field.replace(" ", "") in fields:
        return None
    extent = {"axismins", "axismaxs"} <= fields.keys() and field == "spacings"
    return (
        f"NRRD header gives no voxel size (no `{field}`"
        f"{'; `axis mins` and `axis maxs` give only an extent' if extent else ''}): ITK reads "
        f"its voxels as 1 mm whatever their extent; save it with its `{field}`"
    )


def _finite(values: str) -> bool:
    """Whether `values` (an NRRD field's numbers, blank-separated) are some numbers, all finite."""
    try:
        numbers = [float(v) for v in values.split()]
    except ValueError:  # `none`, or text
        return False
    return bool(numbers) and all(math.isfinite(v) for v in numbers)
