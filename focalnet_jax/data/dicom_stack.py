"""The checks of a DICOM series of one slice per file that ITK would read as a wrong 3D stack
(`check_slice_positions`), from the slices' headers alone: ITK takes the pixel spacing, size and
frame of reference of one slice for all, and the z spacing from the first two positions.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from focalnet_jax.data.dicom_cosines import SHEAR_TOLERANCE_SLOPE
from focalnet_jax.data.dicom_multiframe import (
    NUMBER_OF_FRAMES,
    SPACING_TOLERANCE_MM,
    SPACING_TOLERANCE_REL,
    images_per_position,
)
from focalnet_jax.errors import UserError

_INSTANCE = "0020|0013"
_POSITION, _ORIENTATION, _SOP_INSTANCE = "0020|0032", "0020|0037", "0008|0018"
_PIXEL_SPACING = "0028|0030"
# Read by ITK from one slice for the whole stack: every slice must agree (`_check_slices_agree`).
_SHARED_TAGS = {
    "0028|0010": "Rows (0028,0010)",
    "0028|0011": "Columns (0028,0011)",
    "0020|0052": "FrameOfReferenceUID (0020,0052)",
}


class SeriesError(UserError):
    """A DICOM folder or series that cannot be read as one regular 3D stack."""

    def __init__(self, file: str | os.PathLike, reason: str):
        self.file, self.reason = str(file), reason
        super().__init__(f"{self.file}: {reason}")


class SeveralVolumesError(SeriesError):
    """A series whose slice positions each hold the same number (> 1) of images."""


def _header(file: str) -> dict[str, str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.ReadImageInformation()
    keys = (_ORIENTATION, _POSITION, _INSTANCE, _SOP_INSTANCE, _PIXEL_SPACING, NUMBER_OF_FRAMES)
    keys += tuple(_SHARED_TAGS)
    return {k: reader.GetMetaData(k).strip() for k in keys if reader.HasMetaDataKey(k)}


def _floats(header: dict, key: str, file: str, count: int) -> np.ndarray:
    """The `count` numbers of tag `key` (e.g. '0020|0032') of a header; else a SeriesError."""
    tag = key.replace("|", ",")
    if key not in header:
        raise SeriesError(file, f"DICOM file lacks tag ({tag})")
    try:
        values = np.array([float(v) for v in header[key].split("\\")])
    except ValueError:
        values = np.array([])
    if values.shape != (count,) or not np.isfinite(values).all():
        raise SeriesError(file, f"DICOM tag ({tag}) {header[key]!r} is not {count} numbers")
    return values


def check_slice_positions(files) -> None:
    """Refuse a stack (`files`, one slice each) without a pixel spacing, with slices of other
    pixel spacings, sizes, frames of reference or orientations, repeated positions, a missing
    slice or uneven spacing. Reads only the headers."""
    if len(files) < 2:
        return
    headers = [_header(f) for f in files]
    _refuse_multiframe_files(headers, files)
    _refuse_copies(headers, files)
    _check_slices_agree(headers, files)
    orientation = [_floats(h, _ORIENTATION, f, 6) for h, f in zip(headers, files, strict=True)]
    position = np.array([_floats(h, _POSITION, f, 3) for h, f in zip(headers, files, strict=True)])
    tilted = [
        f
        for o, f in zip(orientation, files, strict=True)
        if np.abs(o - orientation[0]).max() > 1e-3
    ]
    if tilted:
        raise SeriesError(tilted[0], f"{len(tilted)} slice(s) oriented unlike {files[0]}")
    normal = position @ np.cross(orientation[0][:3], orientation[0][3:])  # [n] mm, file order
    order = np.argsort(normal, kind="stable")
    along = normal[order]
    steps = np.diff(along)
    spacing = float(np.median(steps))
    tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_REL * spacing)
    _check_not_sheared(position @ orientation[0].reshape(2, 3).T, normal, tolerance, files)
    bad = np.flatnonzero((np.abs(steps - spacing) > tolerance) | (steps <= tolerance))
    if len(bad) == 0:
        return
    _refuse_several_volumes(along, tolerance, files)
    i = int(bad[0])

    def name(k):
        j = int(order[k])
        return f"{Path(files[j]).name} (instance {headers[j].get(_INSTANCE, '?')})"

    kind = "repeated slice position" if steps[i] <= tolerance else "missing slice or uneven spacing"
    raise SeriesError(
        Path(files[0]).parent,
        f"{kind}: slice positions along the normal jump from {along[i]:.2f} to "
        f"{along[i + 1]:.2f} mm ({steps[i]:.2f} mm, median spacing {spacing:.2f} mm, tolerance "
        f"{tolerance:.2f} mm) between {name(i)} and {name(i + 1)}; "
        f"{len(bad)} irregular step(s) of {len(steps)}",
    )


def _check_slices_agree(headers: list[dict], files) -> None:
    """Every slice has a pixel spacing, and the first slice's (within 1e-4 relative), rows,
    columns and frame of reference: ITK reads them from one slice for the whole stack, so a slice
    that differs would be scaled or placed wrongly without a word."""
    first = Path(files[0]).name
    spacings = [_pixel_spacing(h, f) for h, f in zip(headers, files, strict=True)]
    off = np.abs(np.array(spacings) - spacings[0]).max(axis=1) > 1e-4 * spacings[0].max()
    if off.any():
        k = int(np.argmax(off))
        raise SeriesError(
            files[k],
            f"PixelSpacing (0028,0030) {headers[k][_PIXEL_SPACING]!r} differs from {first}'s "
            f"{headers[0][_PIXEL_SPACING]!r} ({int(off.sum())} slice(s) of {len(files)}): the "
            "stack would be read at one pixel size",
        )
    for key, name in _SHARED_TAGS.items():
        values = [header.get(key) for header in headers]
        k = next((k for k, value in enumerate(values) if value != values[0]), None)
        if k is not None:
            raise SeriesError(
                files[k], f"{name} {values[k]!r} differs from {first}'s {values[0]!r}"
            )


def _pixel_spacing(header: dict, file: str) -> np.ndarray:
    """The PixelSpacing (0028,0030) of a slice, mm; a slice without one, or with one that is not
    2 positive numbers, is refused: ITK would take 1 mm pixels without a word."""
    if _PIXEL_SPACING not in header:
        raise SeriesError(
            file, "DICOM file lacks PixelSpacing (0028,0030): its pixel size is unknown"
        )
    spacing = _floats(header, _PIXEL_SPACING, file, 2)
    if not (spacing > 0).all():
        raise SeriesError(
            file, f"PixelSpacing (0028,0030) {header[_PIXEL_SPACING]!r} is not positive"
        )
    return spacing


def _refuse_multiframe_files(headers: list[dict], files) -> None:
    """Refuse a series of several files of which one holds several frames: read as one stack of
    slices, its frames would be misplaced."""
    frames = [int(h.get(NUMBER_OF_FRAMES) or 1) for h in headers]
    several = [k for k, n in enumerate(frames) if n > 1]
    if several:
        k = several[0]
        raise SeriesError(
            files[k],
            f"holds {frames[k]} frames, in a series of {len(files)} files ({len(several)} of them "
            "multi-frame), which would be read as one stack of slices; give each multi-frame "
            "file a folder of its own, or export the series as one slice a file",
        )


def _refuse_copies(headers: list[dict], files) -> None:
    """Refuse a series holding one image (SOPInstanceUID) in several files: slices exported
    twice into one folder, which would otherwise be called a repeated position or several
    volumes."""
    first: dict[str, str] = {}
    copies = []
    for header, file in zip(headers, files, strict=True):
        uid = header.get(_SOP_INSTANCE)
        if uid and uid in first:
            copies.append((file, first[uid]))
        elif uid:
            first[uid] = file
    if copies:
        file, original = copies[0]
        raise SeriesError(
            file,
            f"the same image (SOPInstanceUID) as {Path(original).name}: {len(copies)} file(s) of "
            f"{len(files)} copy another file of the series (exported twice?); remove the copies",
        )


def _refuse_several_volumes(along: np.ndarray, tolerance: float, files) -> None:
    """Refuse a series in which every slice position holds the same number (> 1) of images
    (`along`: sorted positions along the normal, mm): several volumes in one series, e.g. the
    b-values of a DWI acquisition, whose repeated positions would otherwise be reported as one
    stray repeated slice."""
    per_position = images_per_position(along, tolerance)
    if not per_position:
        return
    raise SeveralVolumesError(
        Path(files[0]).parent,
        f"each of the {len(along) // per_position} slice positions holds {per_position} images "
        f"({len(along)} files): several volumes in one series (b-values, echoes or time points?), "
        "not one 3D stack; export the one wanted (e.g. the highest b-value) as a series of its own",
    )


def _check_not_sheared(in_plane: np.ndarray, along: np.ndarray, tolerance: float, files) -> None:
    """Refuse slices whose positions move within the slice plane (`in_plane`: [n, 2] mm along
    the row and column cosines; `along`: [n] mm along the normal) by more than `tolerance` plus
    `SHEAR_TOLERANCE_SLOPE` per mm from the first slice: ITK would read a sheared stack as a
    straight one, with the distance between slice corners as its spacing."""
    drift = np.abs(in_plane - in_plane[0]).max(axis=1)
    allowed = tolerance + SHEAR_TOLERANCE_SLOPE * np.abs(along - along[0])
    if np.all(drift <= allowed):
        return
    worst = int(np.argmax(drift - allowed))
    raise SeriesError(
        Path(files[0]).parent,
        f"slice positions move within the slice plane by up to {drift[worst]:.2f} mm "
        f"({Path(files[worst]).name} against {Path(files[0]).name}; tolerance "
        f"{allowed[worst]:.2f} mm): a sheared stack (e.g. gantry tilt), which would be read as a "
        "straight one",
    )
