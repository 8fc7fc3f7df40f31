"""DICOM Segmentation (SEG) objects as lesion labels and whole-gland masks, read with highdicom.

A SEG (SOP Class 1.2.840.10008.5.1.4.1.1.66.4, as 3D Slicer, OHIF and most annotation tools export,
or the label map SEG, 66.7) holds binary, fractional or label-map segments on frames placed in
scanner coordinates. `read_lesions` and `read_gland` turn one into a uint8 SimpleITK image on
the grid of its frames (origin, spacing and direction from their plane positions, orientation and
pixel measures; frames a segment leaves out are background), with one background slice added on
either side, so that a SEG of one frame is no single-slice label and nearest-neighbour
resampling onto the T2w leaves its neighbours empty. A fractional segment covers the voxels of
at least 0.5 of its maximum fractional value.

Lesion labels: each segment's SegmentLabel (letter case and surrounding spaces ignored) says its
grade: `ISUP k` (k 1..5), `GS a+b` or `Gleason a+b` (a, b 3..5; 3+3 ISUP 1, 3+4 2, 4+3 3, sum 8
4, sum 9-10 5), or `csPCa` (grade unknown). Its value follows the label convention (`picai`: 2..5
ISUP, 1 csPCa of unknown grade, so ISUP 1 has none; `isup`: 1..5 ISUP, so csPCa has none). A
voxel of overlapping segments takes the highest value. Segments of category Anatomical Structure
(the gland, zones or organs of a SEG that also holds the lesions; SCT 91723000, as 3D Slicer and
dcmqi write it SCT 123037004, or SNOMED RT's T-D000A) whose label gives no grade are no lesions
and left out; one SEG may then be both a case's label and its gland mask. A SEG all of whose
segments are left out so is refused as a label (a gland mask given as one), unless it is the
case's gland mask too (a lesion-free case).

Whole-gland masks: the one segment of a SEG, else the union of those whose segmented property
type is Prostate (SCT 41216001, SNOMED RT T-9200B or T-92000) or whose SegmentLabel contains
'prostate' or 'gland'.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from focalnet_jax.data.dicom_multiframe import SPACING_TOLERANCE_MM, SPACING_TOLERANCE_REL
from focalnet_jax.errors import UserError

# Segmentation Storage, and Label Map Segmentation Storage (one segment number a pixel)
SEG_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")
PROSTATE_CODES = (("SCT", "41216001"), ("SRT", "T-9200B"), ("SRT", "T-92000"))
# Anatomical Structure (SCT 91723000; SCT 123037004 "Body structure" as 3D Slicer and dcmqi code
# it; SNOMED RT T-D000A in older files): no lesion unless its label gives a grade
ANATOMY_CATEGORIES = (("SCT", "91723000"), ("SCT", "123037004"), ("SRT", "T-D000A"))
FRACTION_THRESHOLD = 0.5  # of the maximum fractional value
_NONE = "unknown"  # `segment_value`'s reason for a label of no lesion form (the others: 'no value')
ACCEPTED_LABELS = "'ISUP k' (k 1..5), 'GS a+b' or 'Gleason a+b' (a, b 3..5), 'csPCa'"
_ISUP = re.compile(r"isup\s*([1-5])")
_GLEASON = re.compile(r"(?:gs|gleason)\s*([3-5])\s*\+\s*([3-5])")
# What highdicom raises for a SEG it cannot read as a volume (e.g. frames at irregular positions,
# a file cut short)
_HIGHDICOM_ERRORS = (
    AttributeError,
    IndexError,
    EOFError,
    OSError,
    struct.error,
    KeyError,
    ValueError,
    RuntimeError,
    TypeError,
    NotImplementedError,
)


class SegError(UserError):
    """A SEG that cannot be read as a label or mask: names the file and the reason."""

    def __init__(self, file: str | os.PathLike, reason: str):
        self.file, self.reason = str(file), reason
        super().__init__(f"{self.file}: {reason}")


def sop_class(file: str | os.PathLike) -> str | None:
    """The SOPClassUID of the DICOM file `file` ('' where it has none); None for a file that is
    not DICOM. A DICOM file whose header is cut short is a `SegError`."""
    try:
        header = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None
    except struct.error:  # a DICOM element whose bytes the file ends before
        raise SegError(file, "a damaged DICOM file (its header is cut short)") from None
    return str(header.get("SOPClassUID", ""))


NOT_AN_IMAGE = (
    "a DICOM Segmentation (SEG), not an image series: give it as a lesion label or prostate mask "
    "(manifest columns label, prostate_mask)"
)  # the reason a SEG given as a component (or bladder mask) is refused


def is_seg(file: str | os.PathLike) -> bool:
    """Whether `file` is a DICOM SEG (its SOPClassUID); False for a file that is not DICOM."""
    return sop_class(file) in SEG_SOP_CLASSES


def find_seg(path: str | os.PathLike) -> Path | None:
    """The SEG file that `path` gives: the file itself if it is a SEG, or the one SEG among the
    files of a folder (other DICOM files, e.g. the source series, beside it are left alone);
    None where there is none. A folder holding several SEGs is a `SegError` naming them."""
    path = Path(path)
    if path.is_file():
        return path if is_seg(path) else None
    if not path.is_dir():
        return None
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    segs = [p for p in files if is_seg(p)]
    if len(segs) > 1:
        names = ", ".join(p.name for p in segs[:5])
        raise SegError(path, f"folder holds {len(segs)} DICOM SEG files ({names}); give one file")
    return segs[0] if segs else None


def _read(file: Path):
    """The highdicom `Segmentation` of `file`, its volume (segments stacked last:
    [slices, rows, columns, segments], values 0/1 or fractions 0..1) and its segment numbers."""
    import highdicom  # imported here (0.3 s): needed only for SEG input

    try:
        seg = highdicom.seg.segread(file)
        numbers = list(seg.segment_numbers)
        volume = seg.get_volume(combine_segments=False, rescale_fractional=True)
    except _HIGHDICOM_ERRORS as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SegError(file, f"cannot be read as a segmentation volume ({reason})") from None
    _check_spacing(seg, volume, file)
    return seg, volume, numbers


def _check_spacing(seg, volume, file: Path) -> None:
    """Refuses a SEG whose slice spacing is a guess: no SpacingBetweenSlices (0018,0088) in its
    pixel measures and frames at two positions only, or at unequal steps along the normal (frames
    left out), from which highdicom would take the one or the smallest step (two frames 6 mm
    apart on a 3 mm series read as neighbours, the slice between them labelled)."""
    frames = seg.get("PerFrameFunctionalGroupsSequence") or []
    shared = (seg.get("SharedFunctionalGroupsSequence") or [pydicom.Dataset()])[0]
    for groups in [shared, *frames[:1]]:
        measures = groups.get("PixelMeasuresSequence") or [pydicom.Dataset()]
        if measures[0].get("SpacingBetweenSlices") not in (None, ""):
            return
    if shared.get("PlanePositionSequence"):  # one position for all frames (one slice)
        return
    positions = [f.PlanePositionSequence[0].ImagePositionPatient for f in frames]
    along = np.sort(np.asarray(positions, np.float64) @ volume.direction[:, 0])
    along = along[np.r_[True, np.diff(along) > SPACING_TOLERANCE_MM]]  # one per position (segments)
    steps = np.diff(along)
    if len(steps) == 1:
        raise SegError(
            file,
            f"frames at 2 positions {steps[0]:.2f} mm apart along the slice normal and no "
            "SpacingBetweenSlices (0018,0088): whether slices lie between them is unknown; export "
            "the SEG with it (or with every frame)",
        )
    if len(steps) < 2:
        return
    tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_REL * float(steps.min()))
    if np.ptp(steps) > tolerance:
        raise SegError(
            file,
            f"frames at {len(along)} positions {steps.min():.2f} to {steps.max():.2f} mm apart "
            "along the slice normal and no SpacingBetweenSlices (0018,0088): the slice spacing "
            "is unknown; export the SEG with it (or with every frame)",
        )


def _description(seg, number: int) -> tuple[str, tuple[str, str], tuple[str, str]]:
    """SegmentLabel and (coding scheme, code value) of the segmented property type and of the
    category of segment `number`."""
    description = seg.get_segment_description(number)
    kind, category = description.segmented_property_type, description.segmented_property_category
    return (
        str(description.segment_label),
        (str(kind.scheme_designator), str(kind.value)),
        (str(category.scheme_designator), str(category.value)),
    )


def _image(masks: np.ndarray, volume) -> sitk.Image:
    """uint8 `masks` [slices, rows, columns] on `volume`'s grid, as a SimpleITK image with one
    background slice added on either side (see the module docstring)."""
    padded = np.pad(masks.astype(np.uint8), ((1, 1), (0, 0), (0, 0)))
    image = sitk.GetImageFromArray(padded)
    affine = volume.affine  # index (slice, row, column) -> LPS mm
    image.SetOrigin(tuple(float(v) for v in affine[:3, 3] - affine[:3, 0]))
    image.SetSpacing(tuple(float(v) for v in volume.spacing[::-1]))
    image.SetDirection(tuple(float(v) for v in volume.direction[:, ::-1].ravel()))
    return image


def _segment_masks(volume) -> np.ndarray:
    """bool [slices, rows, columns, segments]: binary segments, fractional ones thresholded."""
    return np.asarray(volume.array) >= FRACTION_THRESHOLD


def segment_value(label: str, label_values: str) -> int | str:
    """The label value (1..5) of a SegmentLabel under `label_values` ('picai' or 'isup'), or the
    reason it has none: a string starting 'no value' or 'unknown'."""
    text = label.strip().lower()
    if isup := _ISUP.fullmatch(text):
        grade = int(isup.group(1))
    elif gleason := _GLEASON.fullmatch(text):
        a, b = int(gleason.group(1)), int(gleason.group(2))
        grade = {6: 1, 7: 2 if a == 3 else 3, 8: 4}.get(a + b, 5)
    elif text == "cspca":
        if label_values == "isup":
            return (
                "no value under --label-values isup (1 = ISUP 1, GS 3+3; a manifest's default) "
                "for csPCa of unknown grade: give the segment its grade, or pass "
                "--label-values picai"
            )
        return 1
    else:
        return f"{_NONE} segment label: expected {ACCEPTED_LABELS}"
    if grade == 1 and label_values == "picai":
        return (
            "no value under --label-values picai (1 = csPCa of unknown grade) for ISUP 1 (GS "
            "3+3, no csPCa): pass --label-values isup, or leave the segment out"
        )
    return grade


def read_lesions(
    file: str | os.PathLike, label_values: str, *, also_gland: bool = False
) -> sitk.Image:
    """A SEG file's segments as a label map (uint8, 0 background, 1..5 by `segment_value`
    under `label_values`; the highest where segments overlap) on the grid of its frames;
    segments of category Anatomical Structure (SCT 91723000: the gland, zones, organs) are left
    out unless their label is one of a lesion. A segment label of no value is a `SegError`
    naming the segment and why, and so is a lesion segment without a voxel (it would be left out
    without a word: a case stored lesion-free, or without its highest grade) and a SEG of
    anatomy alone (a gland mask given as a label) unless `also_gland` (the file is the case's
    gland mask too: a lesion-free case)."""
    file = Path(file)
    seg, volume, numbers = _read(file)
    masks = _segment_masks(volume)
    label = np.zeros(masks.shape[:3], np.uint8)
    anatomy = []
    for k, number in enumerate(numbers):
        text, _, category = _description(seg, number)
        value = segment_value(text, label_values)
        if category in ANATOMY_CATEGORIES and isinstance(value, str) and value.startswith(_NONE):
            anatomy.append(f"{number} {text!r}")  # e.g. the gland of a SEG that holds both
            continue
        if isinstance(value, str):
            raise SegError(file, f"segment {number} {text!r}: {value}")
        if not masks[..., k].any():  # an exported segment never drawn: its lesion is missing
            raise SegError(
                file,
                f"segment {number} {text!r} has no voxel (empty, or fractional values all below "
                "half their maximum): draw its lesion, or remove the segment",
            )
        label = np.maximum(label, np.where(masks[..., k], value, 0).astype(np.uint8))
    if len(anatomy) == len(numbers) and not also_gland:
        raise SegError(
            file,
            f"no lesion segment: its {len(numbers)} segment(s) ({', '.join(anatomy)}) are "
            "anatomical structures: a gland mask given as the label? give it as the prostate "
            "mask, or as both label and mask for a case without lesions",
        )
    return _image(label, volume)


def read_gland(file: str | os.PathLike) -> sitk.Image:
    """A SEG file's whole-gland segment (see the module docstring) as a 0/1 uint8 mask on the
    grid of its frames; a SEG of several segments none of which is the gland is a `SegError`
    naming them."""
    file = Path(file)
    seg, volume, numbers = _read(file)
    masks = _segment_masks(volume)
    described = [(number, *_description(seg, number)[:2]) for number in numbers]
    chosen = [
        k
        for k, (_, text, code) in enumerate(described)
        if len(numbers) == 1
        or code in PROSTATE_CODES
        or any(word in text.lower() for word in ("prostate", "gland"))
    ]
    if not chosen:
        listing = ", ".join(f"{n} {text!r} ({code[0]} {code[1]})" for n, text, code in described)
        raise SegError(
            file,
            f"{len(numbers)} segments ({listing}), none the whole gland: a prostate mask SEG "
            "needs one segment, or segments of property type SCT 41216001 (Prostate) or with "
            "'prostate' or 'gland' in their label",
        )
    return _image(masks[..., chosen].any(axis=-1), volume)
