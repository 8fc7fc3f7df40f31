"""The values of MONOCHROME1 DICOM images, which ITK reads inverted.

PhotometricInterpretation (0028,0004) MONOCHROME1 tells a viewer to show an image's lowest value
as white. It does not change what the values are: an ADC map's values (10^-6 mm^2/s) are its
stored values through the modality rescale, whatever the display. ITK (GDCM) inverts the stored
values of such an image when it reads it, as a viewer would: each stored value v becomes its
complement in BitsStored bits (2^bits - 1 - v unsigned, -1 - v signed), and is then rescaled.
An ADC map read that way is upside down, with its lesions (low ADC) bright. `restore_series` and
`restore_frames` undo this: a value s * (C - v) + b read from a slice of complement C, rescale
slope s and intercept b becomes s * v + b = s * C + 2 * b - (s * (C - v) + b). The headers
are those ITK read with the pixels (no second read of the files). GDCM reads no signed
MONOCHROME1 pixels of fewer bits stored than allocated (e.g. 12 of 16): `gdcm_limit` says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import SimpleITK as sitk

MONOCHROME1 = "MONOCHROME1"
_PHOTOMETRIC, _BITS_ALLOCATED, _BITS_STORED = "0028|0004", "0028|0100", "0028|0101"
_REPRESENTATION, _SLOPE, _INTERCEPT = "0028|0103", "0028|1053", "0028|1052"


def _complement(tag: Callable[[str], str]) -> int | None:
    """C such that ITK read stored value v of a slice whose header gives `tag(key)` ('' where
    absent) as C - v; None for a slice that is not MONOCHROME1 (read as stored; GDCM inverts
    'MONOCHROME1' in upper case alone, as the standard spells it, and takes BitsAllocated where
    BitsStored is missing)."""
    if tag(_PHOTOMETRIC) != MONOCHROME1:
        return None
    if tag(_REPRESENTATION) == "1":
        return -1
    return 2 ** int(tag(_BITS_STORED) or tag(_BITS_ALLOCATED) or 16) - 1


def gdcm_limit(file: str) -> str | None:
    """Why GDCM cannot read the pixels of DICOM file `file` where its header says (signed
    MONOCHROME1 of BitsStored < BitsAllocated: GDCM fails its own check), else None."""
    import pydicom

    try:
        header = pydicom.dcmread(file, stop_before_pixels=True)
        photometric, signed = header.PhotometricInterpretation, header.PixelRepresentation == 1
        stored, allocated = int(header.BitsStored), int(header.BitsAllocated)
    except Exception:  # noqa: BLE001 - a header that does not say: no known limit
        return None
    if photometric != MONOCHROME1 or not signed or stored >= allocated:
        return None
    return (
        f"GDCM does not read signed MONOCHROME1 pixels of BitsStored {stored} < BitsAllocated "
        f"{allocated}: export the series as MONOCHROME2, or with BitsStored {allocated}"
    )


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


def restore_series(image: sitk.Image, reader: sitk.ImageSeriesReader) -> sitk.Image:
    """`image` as `reader` read it (one slice per file, in its files' order; float32, each slice
    rescaled with its own slope and intercept; `MetaDataDictionaryArrayUpdateOn`: each slice's
    header kept), with the slices of MONOCHROME1 files given back their values."""
    offsets = []
    for k in range(len(reader.GetFileNames())):

        def tag(key: str, k=k) -> str:
            return reader.GetMetaData(k, key).strip() if reader.HasMetaDataKey(k, key) else ""

        complement = _complement(tag)
        slope, intercept = float(tag(_SLOPE) or 1), float(tag(_INTERCEPT) or 0)
        offsets.append(None if complement is None else slope * complement + 2 * intercept)
    return _restored(image, offsets)


def restore_frames(
    image: sitk.Image, reader: sitk.ImageFileReader, rescales: Sequence[tuple[float, float]]
) -> sitk.Image:
    """`image` as read from a multi-frame file by `reader` (slice k rescaled with rescales[k],
    its (slope, intercept)), given back its values where the file is MONOCHROME1."""
    complement = _complement(
        lambda key: reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""
    )
    if complement is None:
        return image
    return _restored(image, [slope * complement + 2 * b for slope, b in rescales])
