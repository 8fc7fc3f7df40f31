"""One frame of reference per case: a case's DICOM inputs (component series, SEG or DICOM label
and masks) must share the T2w's FrameOfReferenceUID (0020,0052). Positions are comparable only
within one frame of reference (DICOM PS3.3 C.7.4.1), and the components, label and masks are
aligned by their positions alone (the paper's "scanner coordinate information"): a series of
another frame of reference (another exam, a repositioned patient) would be resampled as if it
shared the T2w's coordinates. MHA, NIfTI and NRRD files carry no frame of reference: they are
taken to be in the T2w's scanner coordinates, as before."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from focalnet_jax.data import dicom, dicom_seg
from focalnet_jax.data.io import CaseError

_TAG = (0x0020, 0x0052)


def _dicom_file(path: str | os.PathLike, series: str | None) -> Path | None:
    """The DICOM file that tells `path`'s frame of reference: a SEG (the file, or the one in a
    folder), else the first file of the folder's chosen series; None for other formats."""
    path = Path(path)
    if (seg := dicom_seg.find_seg(path)) is not None:
        return seg
    if not path.is_dir():
        return None
    return Path(dicom.choose_series(path, series).files[0])


def frame_of_reference(path: str | os.PathLike, series: str | None = None) -> str | None:
    """FrameOfReferenceUID of a DICOM input (series folder or SEG); None for an image file, or a
    DICOM file without the tag."""
    file = _dicom_file(path, series)
    if file is None:
        return None
    try:
        header = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=[_TAG])
    except (InvalidDicomError, OSError):  # the input's read names what is wrong
        return None
    uid = str(header.get("FrameOfReferenceUID", "") or "").strip()
    return uid or None


def check_one_frame_of_reference(
    inputs: Mapping[str, str | os.PathLike | None], series: Mapping[str, str], case: str
) -> None:
    """`CaseError` (one line, naming the case and the input) for a DICOM input of `inputs` (name
    -> path or None, the T2w first; `series`: name -> chosen series of a folder) whose frame of
    reference is not the T2w's. Inputs already read (`read_image`, `read_label`): their files
    are known to open."""
    (t2w_name, t2w_path), *others = ((n, p) for n, p in inputs.items() if p is not None)
    reference = frame_of_reference(t2w_path, series.get(t2w_name))
    if reference is None:  # the T2w is no DICOM (or lacks the tag): nothing to compare with
        return
    for name, path in others:
        try:
            uid = frame_of_reference(path, series.get(name))
        except (dicom.SeriesError, dicom_seg.SegError) as err:  # what its read would refuse
            raise CaseError(case, err.file, err.reason) from None
        if uid is not None and uid != reference:
            raise CaseError(
                case,
                path,
                f"{name} is in DICOM frame of reference {uid}, the T2w in {reference}: their "
                "positions are not comparable (another exam or a repositioned patient?); give "
                f"the {name} of the T2w's exam, or, registered to the T2w, as an MHA or NIfTI "
                "file in its scanner coordinates",
            )
