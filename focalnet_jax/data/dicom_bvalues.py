"""The b-value of a DWI slice, and the highest-b volume of a series that holds several b-values.

A scanner's DWI series usually holds every b-value it acquired (b = 0, 50, 800, 1400 s/mm^2, ...)
and often the trace-weighted images of each: several volumes at the same slice positions. Read as
the `hbv` component, such a series gives the volume of its highest b-value (the high-b image of
the paper and of PI-CAI); `dicom.read_series` refuses it as any other component.

A slice's b-value, in s/mm^2, is the first of these that it has:
- DiffusionBValue (0018,9087), the standard tag (Canon, newer GE and Philips, converters);
- Siemens `B_value` (0019,xx0C) of the private block `SIEMENS MR HEADER`;
- GE `Slop_int_6` (0043,xx39) of `GEMS_PARM_01`: its first value, less the 1e9 GE adds to each
  b-value of a multi-b scan;
- Philips `Diffusion_B_Factor` (2001,xx03) of `Philips Imaging DD 001`.
Where the highest b-value holds isotropic (trace) images beside directional ones (Philips stores
both), the isotropic ones are taken.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

# (group, private creator, element offset within the creator's block, how the value is read)
_PRIVATE = (
    (0x0019, "SIEMENS MR HEADER", 0x0C, "text"),
    (0x0043, "GEMS_PARM_01", 0x39, "ge"),
    (0x2001, "Philips Imaging DD 001", 0x03, "float32"),
)
_GE_MULTI_B_BIAS = 1_000_000_000


# The least b-value, s/mm^2, of an image read as the high-b (`hbv`) component: PI-RADS v2.1 asks
# for b >= 1400 (acquired or computed) and b >= 800 for the DWI series; under 400 an image is a
# low-b one (b = 0, 50, 100: the wrong volume or series).
MIN_HIGH_B = 400.0


def low_b_problem(b_values: Sequence[float | None]) -> str | None:
    """Why images of `b_values` (s/mm^2; None where an image gives none) are no high-b image:
    the highest given is under `MIN_HIGH_B`; None where it is not, or where none is given."""
    known = [b for b in b_values if b is not None]
    if not known or max(known) >= MIN_HIGH_B:
        return None
    return (
        f"its highest b-value is {max(known):g} s/mm^2, under {MIN_HIGH_B:g}: no high-b image "
        "(PI-RADS: b >= 1400 s/mm^2, acquired or computed); give the series of the highest "
        "b-value as hbv"
    )


class BValueError(ValueError):
    """The b-values of a series cannot select one volume; the message says why."""


def _number(value, kind: str) -> float:
    """An element's value as a number: raw bytes (an implicit-VR file whose private creator
    pydicom does not know) are text for IS elements and a little-endian float32 for FL ones."""
    if isinstance(value, bytes):
        if kind == "float32" and len(value) == 4:
            return struct.unpack("<f", value)[0]
        value = value.decode("latin-1").strip("\0 ").split("\\")
    if isinstance(value, str):
        value = value.strip().split("\\")
    if not isinstance(value, (int, float)):
        value = list(value)[0]  # a multi-valued element: its first value
    number = float(value)
    if kind == "ge" and number >= _GE_MULTI_B_BIAS:
        number -= _GE_MULTI_B_BIAS
    return number


def _private_element(header: pydicom.Dataset, group: int, creator: str, offset: int):
    """Element `offset` of `creator`'s private block in `group` (creator names compared without
    letter case: older Philips files write `PHILIPS IMAGING DD 001`); None where absent."""
    for block in range(0x10, 0x100):
        name = header.get((group, block))
        value = name.value if name is not None else None
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if isinstance(value, str) and value.strip("\0 ").upper() == creator.upper():
            return header.get((group, (block << 8) | offset))
    return None


def b_value(header: pydicom.Dataset) -> float | None:
    """The b-value (s/mm^2) a slice's header gives (module docstring), or None."""
    standard = header.get((0x0018, 0x9087))
    elements = [(standard, "text")] if standard is not None else []
    for group, creator, offset, kind in _PRIVATE:
        if (element := _private_element(header, group, creator, offset)) is not None:
            elements.append((element, kind))
    for element, kind in elements:
        if element.value in (None, b"", ""):
            continue
        try:
            return _number(element.value, kind)
        except (TypeError, ValueError, IndexError, struct.error):  # unreadable: the next may tell
            continue
    return None


def _along_normal(header: pydicom.Dataset) -> float:
    """A slice's position along its normal, mm; NaN without position or orientation (the
    stack's check then refuses it)."""
    try:
        cosines = np.array(header.ImageOrientationPatient, dtype=float)
        position = np.array(header.ImagePositionPatient, dtype=float)
        return float(position @ np.cross(cosines[:3], cosines[3:]))
    except (AttributeError, TypeError, ValueError):
        return np.nan


_SLICE_TAGS = "DiffusionBValue (0018,9087) or the Siemens, GE or Philips private tag"


def highest_b(
    b_values: Sequence[float | None],
    names: Sequence[str],
    tags: str = _SLICE_TAGS,
    isotropic: Sequence[bool] | None = None,
) -> tuple[list[int], list, int]:
    """The indices of the highest of `b_values` (one per image, None where an image gives none;
    `names` name the images and `tags` the tags read in messages), the distinct b-values in
    ascending order, and how many directional images of the highest were left out: where
    `isotropic` marks some of its images (trace) and not others, only the marked ones are taken.
    An image without a b-value, or one b-value for all (the volumes differ otherwise: echoes,
    directions, time points), is a `BValueError`."""
    missing = [name for name, b in zip(names, b_values, strict=True) if b is None]
    if missing:
        raise BValueError(
            f"{missing[0]} ({len(missing)} of {len(names)}) gives no b-value ({tags}), so the "
            "highest b-value's volume cannot be chosen"
        )
    distinct = sorted(set(b_values))
    if len(distinct) < 2:
        raise BValueError(f"every image has b = {distinct[0]:g} s/mm^2")
    chosen = [k for k, b in enumerate(b_values) if b == distinct[-1]]
    marked = [k for k in chosen if isotropic is not None and isotropic[k]]
    return marked or chosen, distinct, len(chosen) - len(marked) if marked else 0


def describe_choice(count: int, noun: str, b_values: list, directional: int):
    """(the b-values listed, 'the 19 [isotropic] <noun> of b = 1400 s/mm^2', ' (38 directional
    ones left out)' or '') for the messages on a `highest_b` choice of `count` images."""
    kind = f"isotropic {noun}" if directional else noun
    listed = ", ".join(f"{b:g}" for b in b_values)
    left_out = f" ({directional} directional ones left out)" if directional else ""
    return listed, f"the {count} {kind} of b = {b_values[-1]:g} s/mm^2", left_out


def _isotropic(header: pydicom.Dataset) -> bool:
    """Whether a slice is marked as an isotropic (trace) image: DiffusionDirectionality
    (0018,9075) ISOTROPIC, Philips `Diffusion_Direction` (2001,xx04) I, or ImageType TRACEW."""
    directionality = str(header.get("DiffusionDirectionality", "")).strip().upper()
    philips = _private_element(header, 0x2001, "Philips Imaging DD 001", 0x04)
    direction = philips.value if philips is not None else ""
    if isinstance(direction, bytes):
        direction = direction.decode("latin-1")
    image_type = [str(v).strip().upper() for v in header.get("ImageType", [])]
    return (
        directionality == "ISOTROPIC"
        or str(direction).strip("\0 ").upper() == "I"
        or "TRACEW" in image_type
    )


def highest_b_files(files: Sequence[str]) -> tuple[list[str], list[float], int]:
    """The files of the highest b-value among `files` (one series; `highest_b`), in ascending
    order along the slice normal (GDCM's order for a series of one volume; for several it falls
    back to instance numbers); the series' distinct b-values in ascending order; and how many
    directional images of that b-value were left out (`_isotropic` marks the others)."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True, force=True) for f in files]
    names = [Path(f).name for f in files]
    isotropic = [_isotropic(h) for h in headers]
    chosen, distinct, directional = highest_b(
        [b_value(h) for h in headers], names, _SLICE_TAGS, isotropic
    )
    along = [_along_normal(headers[k]) for k in chosen]
    order = np.argsort(along, kind="stable") if np.isfinite(along).all() else range(len(chosen))
    return [files[chosen[i]] for i in order], distinct, directional
