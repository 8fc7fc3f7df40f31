"""Enhanced (multi-frame) DICOM: a series stored as one file whose frames are its slices (Enhanced
MR Image Storage, as newer scanners export, or a Legacy Converted Enhanced MR image of a classic
series).

SimpleITK (GDCM) reads such a file as one 3D image, its geometry taken from the frames' functional
groups, but checks none of it: frames out of slice order were read with 1 mm pixels and 1 mm
slices, the frames of several volumes (the b-values of a DWI) as one stack, and frames with
rescale values of their own all with the first frame's. `read_multiframe` reads the frames'
position, orientation, pixel spacing, rescale and b-values (pydicom, without the pixel data),
stacks frames out of slice order along the slice normal (placing them by their functional groups),
rescales each frame with its own values, takes the highest b-value's frames of a DWI file read as
`hbv`, and refuses a file whose frames are not one regular stack, or that was read with another
geometry.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from focalnet_jax.data.dicom_bvalues import BValueError, describe_choice, highest_b, low_b_problem
from focalnet_jax.data.dicom_cosines import (
    SHEAR_TOLERANCE_SLOPE,
    cosines_problem,
    orthonormal_cosines,
)
from focalnet_jax.data.dicom_monochrome1 import restore_frames

NUMBER_OF_FRAMES = "0028|0008"
# Slice positions (here and in dicom.py's classic series) within max(0.01 mm, 1 % of the spacing).
SPACING_TOLERANCE_MM, SPACING_TOLERANCE_REL = 0.01, 0.01
ORIENTATION_TOLERANCE = 1e-3  # direction cosines are written to 3-4 decimals
_GROUPS = {  # value -> (functional group sequence, attribute keyword)
    "position": ("PlanePositionSequence", "ImagePositionPatient"),
    "orientation": ("PlaneOrientationSequence", "ImageOrientationPatient"),
    "pixel_spacing": ("PixelMeasuresSequence", "PixelSpacing"),
    "slope": ("PixelValueTransformationSequence", "RescaleSlope"),
    "intercept": ("PixelValueTransformationSequence", "RescaleIntercept"),
    "b_value": ("MRDiffusionSequence", "DiffusionBValue"),
    "directionality": ("MRDiffusionSequence", "DiffusionDirectionality"),
}
_TEXT = ("DiffusionDirectionality",)  # read as upper-case text, not numbers
_VALUE_COUNTS = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2}
_RESCALE = ("RescaleSlope", "RescaleIntercept")
_FRAME_TAGS = "DiffusionBValue (0018,9087) in its own or the shared MRDiffusionSequence (0018,9117)"


class MultiFrameError(ValueError):
    """A multi-frame file that is not one regular stack; the message says why (`dicom` adds the
    file)."""


def number_of_frames(file: str | os.PathLike) -> int:
    """NumberOfFrames (0028,0008) of a DICOM file; 1 for a single-frame image."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(file))
    reader.ReadImageInformation()
    if not reader.HasMetaDataKey(NUMBER_OF_FRAMES):
        return 1
    try:
        return int(reader.GetMetaData(NUMBER_OF_FRAMES).strip() or 1)
    except ValueError:
        return 1


def frame_values(file: str | os.PathLike | pydicom.Dataset) -> dict[str, list]:
    """Per frame (the file's frame order): `position` (x, y, z) mm, `orientation` (6 cosines),
    `pixel_spacing` (row, column spacing) mm, `slope`, `intercept`, `b_value` (s/mm^2),
    `directionality` (upper-case text) (None where absent), each from the frame's own functional
    groups, else the shared ones. `file`: a path, or its header already read."""
    if isinstance(file, pydicom.Dataset):
        dataset = file
    else:
        try:
            dataset = pydicom.dcmread(file, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError) as error:
            raise MultiFrameError(f"its header cannot be read ({error})") from None
    shared_groups = dataset.get("SharedFunctionalGroupsSequence") or [pydicom.Dataset()]
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence") or []
    frames = int(dataset.get("NumberOfFrames", 1))
    if len(per_frame) != frames:
        raise MultiFrameError(
            f"{frames} frames but {len(per_frame)} per-frame functional groups (5200,9230)"
        )
    values: dict[str, list] = {name: [] for name in _GROUPS}
    for k, frame in enumerate(per_frame):
        for name, (sequence, keyword) in _GROUPS.items():
            try:
                value = _frame_value(frame, shared_groups[0], sequence, keyword)
            except MultiFrameError as error:
                raise MultiFrameError(f"frame {k + 1}: {error}") from None
            values[name].append(value)
    return values


def _frame_value(frame, shared, sequence: str, keyword: str):
    """`keyword` of the frame's own `sequence` item, else of the shared one (`_group_value`).
    Rescale values given in both and differing are refused: ITK applies the shared ones."""
    own, common = _group_value(frame, sequence, keyword), _group_value(shared, sequence, keyword)
    if keyword in _RESCALE and None not in (own, common) and own != common:
        raise MultiFrameError(
            f"{keyword} {own:g} in its own {sequence}, {common:g} in the shared one, which ITK "
            "would apply"
        )
    value = common if own is None else own
    count = _VALUE_COUNTS.get(keyword, 1)
    given = len(value) if isinstance(value, list) else 1
    if value is not None and given != count:
        raise MultiFrameError(f"{keyword} has {given} value(s), not {count} (in {sequence})")
    return value


def _group_value(groups, sequence: str, keyword: str):
    """`keyword` of the first item of `groups`' `sequence` (float, a list of floats, or for
    `_TEXT` keywords a string); None where absent or empty."""
    items = groups.get(sequence) or []
    if not items or keyword not in items[0] or items[0][keyword].value in (None, ""):
        return None
    value = items[0][keyword].value
    if keyword in _TEXT:
        return str(value).strip().upper()
    several = isinstance(value, Sequence) and not isinstance(value, str | bytes)
    try:
        floats = [float(v) for v in (value if several else [value])]
    except (TypeError, ValueError):
        raise MultiFrameError(f"{keyword} {value!r} is not a number (in {sequence})") from None
    return floats if several else floats[0]


def read_multiframe(
    file: str | os.PathLike, component: str | None = None, notes: list[str] | None = None
) -> sitk.Image:
    """The frames of `file` as one float32 3D image (rescaled): all of them, or as `hbv`, of a
    file of several b-values, those of the highest (`dicom_bvalues.highest_b`; noted in
    `notes`); in the file's order where it is monotonic along the slice normal, else sorted
    along it. A `MultiFrameError` when those frames are not one regular stack (`check_frames`)
    or the image read has another geometry than its frames."""
    values = frame_values(file)
    check_frames(values)
    frames, chosen, note = _stack_frames(values, component)
    stacked = {name: [value[k] for k in frames] for name, value in values.items()}
    try:
        _check_positions(_along_normal(stacked), [k + 1 for k in frames])
    except MultiFrameError as err:
        if not chosen:
            raise
        raise MultiFrameError(f"{chosen}: {err}") from None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(file))
    reader.SetOutputPixelType(sitk.sitkFloat32)
    image = reader.Execute()
    if image.GetDimension() != 3 or image.GetSize()[2] != len(values["position"]):
        raise MultiFrameError(
            f"{len(values['position'])} frames read as an image of size {image.GetSize()}"
        )
    applied = _rescale_of(values, 0)  # ITK applies frame 1's values to every frame
    own = [_rescale_of(stacked, k) for k in range(len(frames))]
    if frames != list(range(len(values["position"]))) or set(own) != {applied}:
        image = _restacked(image, frames, stacked, own, applied)
    check_image_geometry(image, stacked)
    image = restore_frames(image, reader, own)
    if note and notes is not None:
        notes.append(f"{file}: {note}")
    return image


def _cosines(values: dict[str, list]) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of the first frame's orientation made orthonormal, as ITK reads them."""
    return orthonormal_cosines(np.array(values["orientation"][0]))


def _along_normal(values: dict[str, list]) -> np.ndarray:
    """[frames] positions along the slice normal of the first frame's orientation, mm."""
    return np.array(values["position"]) @ np.cross(*_cosines(values))


def _stack_frames(values: dict[str, list], component: str | None) -> tuple[list[int], str, str]:
    """The frames (0-based, file order) that form the stack, in stack order; the b-value chosen
    ('the 19 frames of b = 1400 s/mm^2') and a note on it ('' without one): see
    `read_multiframe`."""
    along = _along_normal(values)
    frames, chosen, note = list(range(len(along))), "", ""
    spacing = float(np.median(np.abs(np.diff(along)))) if len(along) > 1 else 0.0
    tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_REL * spacing)
    per_position = images_per_position(along, tolerance)
    if per_position and component == "hbv":
        names = [f"frame {k + 1}" for k in frames]
        isotropic = [d == "ISOTROPIC" for d in values["directionality"]]
        try:
            frames, b_values, directional = highest_b(
                values["b_value"], names, _FRAME_TAGS, isotropic
            )
        except BValueError as why:
            reason = f"{_several_volumes(len(along), per_position)}; as hbv: {why}"
            raise MultiFrameError(reason) from None
        listed, chosen, left_out = describe_choice(len(frames), "frames", b_values, directional)
        note = f"b-values {listed} s/mm^2; hbv read from {chosen}{left_out}"
    if component == "hbv" and (problem := low_b_problem([values["b_value"][k] for k in frames])):
        raise MultiFrameError(problem)
    steps = np.diff(along[frames])
    if not (np.all(steps > 0) or np.all(steps < 0)):
        frames = [frames[i] for i in np.argsort(along[frames], kind="stable")]
    return frames, chosen, note


def _rescale_of(values: dict[str, list], k: int) -> tuple[float, float]:
    """(slope, intercept) frame `k` gives (1, 0 where it gives none)."""
    slope, intercept = values["slope"][k], values["intercept"][k]
    return (1.0 if slope is None else slope, 0.0 if intercept is None else intercept)


def _restacked(image: sitk.Image, frames: list[int], stacked: dict, own, applied) -> sitk.Image:
    """The `frames` of `image` (as ITK read the file: frame k at slice k, every frame rescaled
    with `applied`, frame 1's values; its geometry, which ITK may have given up on, unused) as
    a stack of their own, placed by their functional groups (`stacked`): pixel spacing and
    orientation, slice axis along the normal, origin at the first frame's position; each frame
    rescaled with its own values (`own`: (slope, intercept) a frame; the stored integers
    recovered from `applied`)."""
    pixels = sitk.GetArrayFromImage(image)[frames].astype(np.float64)  # [frames, rows, cols]
    own = np.array(own)  # [frames, 2]
    if np.any(own != applied):
        if applied[0] == 0:
            raise MultiFrameError("frame 1 has RescaleSlope 0: the other frames' values are lost")
        stored = np.round((pixels - applied[1]) / applied[0])
        pixels = stored * own[:, 0, None, None] + own[:, 1, None, None]
    out = sitk.GetImageFromArray(pixels.astype(np.float32))
    along = _along_normal(stacked)
    step = (along[-1] - along[0]) / (len(frames) - 1) if len(frames) > 1 else 1.0
    row, column = _cosines(stacked)
    columns = np.column_stack([row, column, np.cross(row, column) * np.sign(step)])  # x, y, z
    out.SetDirection(tuple(columns.ravel()))
    row_spacing, column_spacing = stacked["pixel_spacing"][0]
    out.SetSpacing((column_spacing, row_spacing, abs(step)))
    out.SetOrigin(tuple(stacked["position"][0]))
    return out


def _several_volumes(frames: int, per_position: int) -> str:
    return (
        f"each of the {frames // per_position} slice positions holds {per_position} of the "
        f"{frames} frames: several volumes in one file (b-values, echoes or time points?), not "
        "one 3D stack; export the one wanted as a series of its own (as hbv, a file of several "
        "b-values gives its highest)"
    )


def check_frames(values: dict[str, list]) -> None:
    """Refuse frames (`frame_values`) without a position, orientation or pixel spacing, or with
    several orientations or pixel spacings."""
    for name in ("position", "orientation", "pixel_spacing"):
        missing = [k for k, v in enumerate(values[name]) if v is None]
        if missing:
            sequence, keyword = _GROUPS[name]
            raise MultiFrameError(f"frame {missing[0] + 1} has no {keyword} (in {sequence})")
    orientation = np.array(values["orientation"])
    turned = np.flatnonzero(
        np.abs(orientation - orientation[0]).max(axis=1) > ORIENTATION_TOLERANCE
    )
    if len(turned):
        raise MultiFrameError(f"frame {turned[0] + 1} is oriented unlike frame 1")
    if problem := cosines_problem(orientation[0]):
        raise MultiFrameError(f"ImageOrientationPatient {orientation[0].tolist()}: {problem}")
    pixel = np.array(values["pixel_spacing"])
    other = np.flatnonzero(np.abs(pixel - pixel[0]).max(axis=1) > 1e-4 * pixel[0].max())
    if len(other):
        raise MultiFrameError(
            f"frame {other[0] + 1} has pixel spacing {pixel[other[0]].tolist()} mm, frame 1 "
            f"{pixel[0].tolist()} mm"
        )


def _check_positions(along: np.ndarray, numbers: list[int]) -> None:
    """Refuse frame positions along the slice normal (`along`: [frames] mm, stack order; frame
    `numbers` as the file counts them) that are not equally spaced."""
    steps = np.diff(along)
    if not len(steps):
        return
    spacing = float(np.median(np.abs(steps)))
    tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_REL * spacing)
    per_position = images_per_position(along, tolerance)
    if per_position:
        raise MultiFrameError(_several_volumes(len(along), per_position))
    if np.ptp(along) <= tolerance:
        raise MultiFrameError(
            f"all {len(along)} frames lie at one slice position ({along[0]:.2f} mm along the "
            "slice normal): images of one slice (a time series?), not a 3D stack"
        )
    step = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - step) > tolerance)
    if len(bad) or spacing <= tolerance:
        k = int(bad[0]) if len(bad) else 0
        raise MultiFrameError(
            f"frame positions along the slice normal go from {along[k]:.2f} mm (frame "
            f"{numbers[k]}) to {along[k + 1]:.2f} mm (frame {numbers[k + 1]}), a step of "
            f"{steps[k]:.2f} mm against the median {step:.2f} mm (tolerance {tolerance:.2f} mm): "
            f"a missing frame or uneven spacing; {len(bad)} irregular step(s) of {len(steps)}"
        )


def images_per_position(along: np.ndarray, tolerance: float) -> int:
    """How many images each slice position holds (`along`: positions along the slice normal, mm,
    any order) when every one of two or more positions holds the same number (> 1): several
    volumes in one series (b-values, echoes, time points); else 0."""
    ordered = np.sort(along)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ordered) > tolerance) + 1, [len(along)]])
    counts = np.diff(starts)
    if len(counts) < 2 or counts[0] < 2 or np.any(counts != counts[0]):
        return 0
    return int(counts[0])


def check_image_geometry(image: sitk.Image, values: dict[str, list]) -> None:
    """Refuse an image (as ITK read it) whose pixel spacing, orientation or slice positions are
    not those of its frames: frame k must lie at the image's index (0, 0, k)."""
    spacing = values["pixel_spacing"][0]  # (row spacing, column spacing): ITK's (y, x)
    read = image.GetSpacing()
    if not np.allclose(read[:2], spacing[::-1], rtol=1e-4, atol=1e-4):
        raise MultiFrameError(
            f"read with {read[0]:g} x {read[1]:g} mm pixels, but its frames have "
            f"{spacing[1]:g} x {spacing[0]:g} mm"
        )
    direction = np.array(image.GetDirection()).reshape(3, 3)
    cosines = np.array(_cosines(values))
    if np.abs(direction[:, :2].T - cosines).max() > ORIENTATION_TOLERANCE:
        raise MultiFrameError("read with an orientation other than its frames'")
    position = np.array(values["position"])
    placed = np.array(
        [image.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(len(position))]
    )
    spacing_z = (
        float(np.median(np.abs(np.diff(position @ direction[:, 2])))) if len(position) > 1 else 0.0
    )
    # Rounded cosines move the far frames off their positions within the slice plane.
    along = np.abs((position - position[0]) @ direction[:, 2])
    tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_REL * spacing_z)
    tolerance = tolerance + SHEAR_TOLERANCE_SLOPE * along
    off = np.linalg.norm(placed - position, axis=1)
    if np.any(off > tolerance):
        k = int(np.argmax(off - tolerance))
        raise MultiFrameError(
            f"read with frame {k + 1} at {_mm(placed[k])}, {off[k]:.2f} mm from its position "
            f"{_mm(position[k])} (tolerance {tolerance[k]:.2f} mm)"
        )


def _mm(point) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in point) + ") mm"
