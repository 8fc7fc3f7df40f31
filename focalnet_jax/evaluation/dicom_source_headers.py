"""The T2w headers of `focalnet predict --dicom` as its DICOM writer (highdicom) takes them.

The series reader accepts T2w series that highdicom refuses or copies into non-conformant files,
though they state one grid: slices whose direction cosines differ by rounding (within
`ORIENTATION_TOLERANCE`), an enhanced multi-frame file that repeats its pixel measures or
orientation in every frame's functional groups instead of the shared ones, an empty or absent
SliceThickness (Type 2 in an MR image, Type 1C in a SEG's pixel measures), and a Specific
Character Set of code extensions whose first value is empty (the default repertoire, PS3.3
C.12.1.1.2). `writer_headers` gives copies that state the same: the first slice's cosines, the
measures and orientation in the shared group, the slice spacing (to 0.1 um) as SliceThickness (a
header without it says nothing of it), `ISO 2022 IR 6` for the empty value. The files are not
changed.
"""

from __future__ import annotations

import copy

import numpy as np
import pydicom
from pydicom.charset import python_encoding
from pydicom.valuerep import format_number_as_ds

from focalnet_jax.data.dicom_multiframe import ORIENTATION_TOLERANCE

SHAREABLE_GROUPS = ("PixelMeasuresSequence", "PlaneOrientationSequence")


def writer_headers(sources: list, slice_spacing: float | None) -> list:
    """Copies of the T2w `sources` (single-frame slices, or one multi-frame file) as the writer
    takes them (module docstring). `slice_spacing`: mm between neighbouring slices, given as
    SliceThickness where the header has none (None: left as it is)."""
    headers = [copy.deepcopy(s) for s in sources]
    for header in headers:
        _set_character_set(header)
    if len(headers) == 1 and int(headers[0].get("NumberOfFrames", 1)) > 1:
        measures = _shared_groups(headers[0])
    else:
        _share_orientation(headers)
        measures = headers
    if slice_spacing is not None:
        for dataset in measures:
            if dataset.get("SliceThickness") in (None, ""):
                dataset.SliceThickness = format_number_as_ds(round(float(slice_spacing), 4))
    return headers


def slice_spacing(positions: np.ndarray, orientation: np.ndarray) -> float | None:
    """The median distance (mm) between neighbouring slice positions `[frames, 3]` along the
    normal of `orientation` (6 cosines); None for one slice."""
    normal = np.cross(orientation[:3], orientation[3:])
    steps = np.diff(np.sort(positions @ normal))
    return float(np.median(steps)) if len(steps) else None


def _set_character_set(header: pydicom.Dataset) -> None:
    """An empty first value of code extensions as `ISO 2022 IR 6` (the default repertoire, as the
    standard reads it), and one value that names a code extension alone as the term without
    extensions (`ISO 2022 IR 100` as `ISO_IR 100`)."""
    values = header.get("SpecificCharacterSet")
    if values is None:
        return
    values = [values] if isinstance(values, str) else list(values)
    if len(values) > 1 and values[0] == "":
        header.SpecificCharacterSet = ["ISO 2022 IR 6", *values[1:]]
    elif len(values) == 1 and values[0].startswith("ISO 2022 IR "):
        plain = values[0].replace("ISO 2022 IR ", "ISO_IR ")
        if plain == "ISO_IR 6":
            del header.SpecificCharacterSet  # the default repertoire
        elif plain in python_encoding:
            header.SpecificCharacterSet = plain


def _share_orientation(slices: list) -> None:
    """Every slice given the first slice's ImageOrientationPatient where its own differs by no
    more than `ORIENTATION_TOLERANCE` (rounding: the reader took them as one grid)."""
    for header in slices[1:]:
        if _same_orientation(slices[0], header):
            header.ImageOrientationPatient = list(slices[0].ImageOrientationPatient)


def _shared_groups(header: pydicom.Dataset) -> list:
    """Moves each of `SHAREABLE_GROUPS` that every frame of the multi-frame `header` holds alike
    (orientation within `ORIENTATION_TOLERANCE`) into the shared functional group; the pixel
    measures datasets it then holds, shared or per frame."""
    if not header.get("SharedFunctionalGroupsSequence"):
        header.SharedFunctionalGroupsSequence = [pydicom.Dataset()]
    shared = header.SharedFunctionalGroupsSequence[0]
    frames = header.get("PerFrameFunctionalGroupsSequence") or []
    for name in SHAREABLE_GROUPS:
        if name in shared or not frames or not all(name in frame for frame in frames):
            continue
        items = [frame[name].value[0] for frame in frames if len(frame[name].value) == 1]
        if len(items) == len(frames) and all(_alike(items[0], item) for item in items[1:]):
            shared[name] = copy.deepcopy(frames[0][name])
            for frame in frames:
                del frame[name]
    if "PixelMeasuresSequence" in shared:
        return list(shared.PixelMeasuresSequence)
    return [m for frame in frames for m in frame.get("PixelMeasuresSequence") or []]


def _alike(first: pydicom.Dataset, other: pydicom.Dataset) -> bool:
    """The same pixel measures, or orientations within `ORIENTATION_TOLERANCE`."""
    if "ImageOrientationPatient" in first or "ImageOrientationPatient" in other:
        return _same_orientation(first, other)
    return first == other


def _same_orientation(first: pydicom.Dataset, other: pydicom.Dataset) -> bool:
    """Both hold an ImageOrientationPatient, within `ORIENTATION_TOLERANCE` of each other."""
    a, b = first.get("ImageOrientationPatient"), other.get("ImageOrientationPatient")
    if a is None or b is None:
        return False
    return bool(np.abs(np.subtract(a, b, dtype=float)).max() <= ORIENTATION_TOLERANCE)
