"""The values of MONOCHROME1 DICOM images, which ITK reads inverted.

PhotometricInterpretation (0028,0004) MONOCHROME1 tells a viewer to show an image's lowest value
as white. It does not change what the values are: an ADC map's values (10^-6 mm^2/s) are its
stored values through the modality rescale, whatever the display. ITK (GDCM) inverts the stored
values of such an image when it reads it, as a viewer would: each stored value v becomes its
complement in BitsStored bits (2^bits - 1 - v unsigned, -1 - v signed), and is then rescaled.
An ADC map read that way is upside down, with its lesions (low ADC) bright. `restore_series` and
`restore_frames` undo this: a value s * (C - v) + b read from a slice of complement C, rescale
slope s and intercept b becomes s * v + b = s * C + 2 * b - (s * (C - v) + b).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pydicom
import SimpleITK as sitk

MONOCHROME1 = "MONOCHROME1"
_TAGS = ["PhotometricInterpretation", "BitsAllocated", "BitsStored", "PixelRepresentation"]
_RESCALE_TAGS = ["RescaleSlope", "RescaleIntercept"]


def _complement(header: pydicom.Dataset) -> int | None:
    """C such that ITK read stored value v of `header`'s image as C - v: None for an image that
    is not MONOCHROME1 (read as stored; GDCM inverts 'MONOCHROME1' in upper case alone, as the
    standard spells it, and takes BitsAllocated where BitsStored is missing)."""
    if str(header.get("PhotometricInterpretation", "")).strip() != MONOCHROME1:
        return None
    if int(header.get("PixelRepresentation", 0)) == 1:
        return -1
    bits = header.get("BitsStored") or header.get("BitsAllocated") or 16
    return 2 ** int(bits) - 1


def _restored(image: sitk.Image, offsets: Sequence[float | None]) -> sitk.Image:
    """`image` ([z, y, x]) with slice k replaced by offsets[k] - slice k where offsets[k] is
    not None; its geometry kept."""
    if all(offset is None for offset in offsets):
        return image
    pixels = sitk.GetArrayFromImage(image).astype(np.float64)
    for k, offset in enumerate(offsets):
        if offset is not None:
            pixels[k] = offset - pixels[k]
    out = sitk.GetImageFromArray(pixels.astype(np.float32))
    out.CopyInformation(image)
    return out


def restore_series(image: sitk.Image, files: Sequence[str | os.PathLike]) -> sitk.Image:
    """`image` as ITK read it from `files` (one slice each, slice k from files[k]; float32, each
    slice rescaled with its own slope and intercept), with the slices of MONOCHROME1 files
    given back their values."""
    offsets = []
    for file in files:
        header = pydicom.dcmread(
            file, stop_before_pixels=True, specific_tags=_TAGS + _RESCALE_TAGS, force=True
        )
        complement = _complement(header)
        if complement is None:
            offsets.append(None)
            continue
        slope = float(header.get("RescaleSlope", 1) or 1)
        intercept = float(header.get("RescaleIntercept", 0) or 0)
        offsets.append(slope * complement + 2 * intercept)
    return _restored(image, offsets)


def restore_frames(
    image: sitk.Image, file: str | os.PathLike, rescales: Sequence[tuple[float, float]]
) -> sitk.Image:
    """`image` as read from the multi-frame `file` (slice k rescaled with rescales[k], its
    (slope, intercept)), given back its values where the file is MONOCHROME1."""
    header = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=_TAGS, force=True)
    complement = _complement(header)
    if complement is None:
        return image
    return _restored(image, [slope * complement + 2 * b for slope, b in rescales])
