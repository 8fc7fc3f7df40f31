"""Reading one DICOM series from a folder, refusing folders and series that would be read wrongly.

A folder must hold exactly one series, unless `series` names one (its SeriesInstanceUID, or its
exact SeriesDescription). The chosen series must be a regular stack: one orientation, and slice
positions along the slice normal (ImagePositionPatient . (row x column cosines)) equally spaced to
within `max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_REL * spacing)`, and the same position within
the slice plane to that tolerance. A missing slice, a repeated position, uneven spacing or a sheared
stack would otherwise be read with one wrong z spacing (ITK only warns, or says nothing), and slices
of other pixel spacings, sizes or frames of reference at the first slice's (checks: `dicom_stack`).

A series stored as one multi-frame file (enhanced DICOM) is read and checked frame by frame in
`dicom_multiframe`; a series of several files, any of them multi-frame, is refused.

A series whose slice positions each hold several images (several volumes) is refused, but as the
`hbv` component a DWI series of several b-values gives its highest b-value's volume
(`dicom_bvalues`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from focalnet_jax.data import native_stderr
from focalnet_jax.data.dicom_bvalues import (
    BValueError,
    b_value,
    describe_choice,
    highest_b_files,
    low_b_problem,
)
from focalnet_jax.data.dicom_cosines import cosines_problem, orthonormal_cosines
from focalnet_jax.data.dicom_monochrome1 import gdcm_limit, restore_series
from focalnet_jax.data.dicom_multiframe import (
    MultiFrameError,
    frame_values,
    number_of_frames,
    read_multiframe,
)
from focalnet_jax.data.dicom_seg import NOT_AN_IMAGE, is_seg
from focalnet_jax.data.dicom_stack import SeriesError, SeveralVolumesError, check_slice_positions

_UID, _DESCRIPTION = "0020|000e", "0008|103e"
_IMAGE_TYPE = "0008|0008"
# ImageType (0008,0008) values that say a series is not the component it is given as: scanners
# (Siemens, Philips, GE) mark diffusion series with these. Only contradictions are refused.
_NOT_THE_COMPONENT = {
    "t2w": ("ADC", "DIFFUSION", "TRACEW", "TRACE"),  # a diffusion series
    "adc": ("TRACEW", "TRACE"),  # a trace-weighted DWI (high-b image)
    "hbv": ("ADC",),  # an ADC map
}
# ImageType values that mark a diffusion series or map. A series read as `adc` or `hbv` that is
# an original magnitude image (ORIGINAL and M: a Siemens T2w, a Philips T2w or DWI) with none of
# these must give a b-value above 0 (a Philips DWI does); else it is an anatomical series.
_DIFFUSION_MARKERS = ("DIFFUSION", "ADC", "EADC", "TRACEW", "TRACE", "CALC_BVALUE")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesInfo:
    uid: str
    description: str
    files: tuple[str, ...]
    image_type: str = ""  # ImageType (0008,0008) of its first file

    def __str__(self) -> str:
        return f"{self.uid} ({self.description or 'no description'!r}, {len(self.files)} files)"


@contextlib.contextmanager
def _itk_warnings_off():
    """ITK's own warnings (e.g. 'No Series were found') off in the block: the errors raised here
    say what is wrong in one line."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def list_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """The DICOM series of a folder (not recursive), each with its files in slice order."""
    with _itk_warnings_off():
        return _list_series(folder)


def _list_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    infos = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        reader.ReadImageInformation()
        description, image_type = (
            reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""
            for key in (_DESCRIPTION, _IMAGE_TYPE)
        )
        infos.append(SeriesInfo(uid, description, tuple(files), image_type))
    return infos


def choose_series(
    folder: str | os.PathLike, series: str | None = None, found: list[SeriesInfo] | None = None
) -> SeriesInfo:
    """The one series of `folder`, or the one whose UID or exact description is `series`.
    `found`: `list_series(folder)`, where already listed."""
    found = list_series(folder) if found is None else found
    if not found:
        inner = sorted(p.name for p in Path(folder).iterdir() if p.is_dir())
        hint = f"; it holds folders {', '.join(inner[:5])}: give one series' folder"
        raise SeriesError(folder, "folder holds no DICOM series" + (hint if inner else ""))
    listing = "; ".join(str(s) for s in found)
    if series is None:
        if len(found) > 1:
            raise SeriesError(
                folder,
                f"folder holds {len(found)} DICOM series: {listing}; "
                "choose one (manifest column <component>_series, --<component>-series or "
                "--component-series <component>=UID)",
            )
        return found[0]
    chosen = [s for s in found if s.uid == series] or [s for s in found if s.description == series]
    if len(chosen) != 1:
        problem = "matches no" if not chosen else f"matches {len(chosen)}"
        raise SeriesError(
            folder, f"series {series!r} {problem} series (UID or description) of: {listing}"
        )
    return chosen[0]


def check_component(folder: str | os.PathLike, info: SeriesInfo, component: str) -> None:
    """Refuse a series given as `component` ('t2w', 'adc', 'hbv') whose ImageType names another
    kind of series, e.g. the ADC map given as T2w or the high-b image as ADC."""
    values = {v.strip().upper() for v in info.image_type.split("\\")}
    wrong = [v for v in _NOT_THE_COMPONENT.get(component, ()) if v in values]
    named = f"series {info.description or info.uid!r} has ImageType '{info.image_type}'"
    if wrong:
        raise SeriesError(
            folder,
            f"{named} ({wrong[0]}): it is no {component} series; another component's folder given "
            f"as {component}?",
        )
    if (
        component in ("adc", "hbv")
        and {"ORIGINAL", "M"} <= values
        and not values.intersection(_DIFFUSION_MARKERS)
        and not _series_b_value(info)  # None, or 0: Philips writes b = 0 in its T2w too
    ):
        raise SeriesError(
            folder,
            f"{named} (an original magnitude image, no diffusion marker) and gives no b-value "
            f"above 0: it is no {component} series (a T2w?); a diffusion series whose b-value "
            "tags were removed can be given as an .mha or .nii.gz file",
        )


def _series_b_value(info: SeriesInfo) -> float | None:
    """The b-value (s/mm^2) of `info`: the first above 0 that its files give in order (of a
    multi-frame file, the highest its frames give), else 0 where they give only 0, else None;
    inf where a multi-frame file's header cannot be read (its reader then says why). For a
    single volume, its b-value; the files after one that gives b > 0 are not read."""
    if len(info.files) == 1 and number_of_frames(info.files[0]) > 1:
        header = pydicom.dcmread(info.files[0], stop_before_pixels=True, force=True)
        try:
            known = [b for b in frame_values(header)["b_value"] if b is not None]
        except MultiFrameError:
            return math.inf
        return max(known, default=None)
    found = None
    for file in info.files:
        b = b_value(pydicom.dcmread(file, stop_before_pixels=True, force=True))
        if b:
            return b
        found = b if b is not None else found
    return found


_HEAD_BYTES = 1 << 16  # a slice's header, where its SeriesInstanceUID is


def _damaged_slice(file: Path, series_uid: str, image_class: str | None) -> bool:
    """Whether `file`, which GDCM read into no series, is a damaged slice of the series: its first
    bytes name `series_uid`; or it is a part-10 file whose meta header is cut short or names the
    series' SOP class `image_class` (a slice cut off before its SeriesInstanceUID); or it is named
    `.dcm`/`.ima` without the DICOM part-10 preamble ('DICM' at byte 128: corrupt). A part-10 file
    of another SOP class (a structured report, a presentation state, a raw-data object) is not."""
    try:
        with file.open("rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError as err:
        raise SeriesError(file, f"cannot be read ({err.strerror})") from None
    if series_uid.encode() in head:
        return True
    if head[128:132] == b"DICM":
        return _sop_class(file) in (None, image_class)
    return file.suffix.lower() in (".dcm", ".ima")


_META_START = 144  # preamble (128), 'DICM' (4), the meta group's length element (12 bytes)


def _sop_class(file: str | Path) -> str | None:
    """The MediaStorageSOPClassUID of a part-10 file's meta header; None where that header cannot
    be read or is cut short (pydicom reads what there is of it without a word: the file ends
    before the length its group length element gives)."""
    try:
        meta = pydicom.filereader.read_file_meta_info(file)
    except Exception:  # noqa: BLE001 - any failure to parse the meta header: a damaged file
        return None
    length = meta.get("FileMetaInformationGroupLength")
    if not isinstance(length, int) or os.path.getsize(file) < _META_START + length:
        return None
    return str(meta.get("MediaStorageSOPClassUID", ""))


def _is_part10(file: Path) -> bool:
    with file.open("rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


def _unread_files(folder: Path, found: list[SeriesInfo]) -> list[str]:
    """Names of the files of `folder` in no series of `found` (hidden files, e.g. macOS `._*`
    copies, and a DICOMDIR index left out)."""
    read = {Path(f).name for s in found for f in s.files}
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file()
        and p.name not in read
        and not p.name.startswith(".")
        and p.name.upper() != "DICOMDIR"
    )


def read_series(
    folder: str | os.PathLike, series: str | None = None, component: str | None = None
) -> sitk.Image:
    """One regular DICOM series of `folder` (see the module docstring) as read by SimpleITK;
    given the `component` it is read as, one whose ImageType contradicts it is refused.
    A damaged slice of the series that GDCM cannot read (`_damaged_slice`: truncated, corrupt) is
    refused: at either end of the stack it would leave no gap, and the series would be read one
    slice short. Other DICOM objects of the folder outside any image series are left out, with a
    warning. Read as float32, each slice with its own rescale slope and intercept.

    What is printed on stderr meanwhile (GDCM and ITK print e.g. 'Invalid marker size' for each
    broken JPEG 2000 frame) is captured (`native_stderr`) and passed on in one line: at the end of
    the reason of a refusal, or, after a read that succeeds or fails otherwise, in one warning (it
    may tell of a frame decoded with errors; dropped, it would be lost). It is called what was
    printed on stderr during the read, not the reader's: another thread may have printed some."""
    folder = Path(folder)
    notes: list[str] = []  # warnings, logged once stderr is back
    printed = native_stderr.Captured()  # empty, should the capture itself fail
    try:
        with native_stderr.captured() as printed:
            image = _read_series(folder, series, component, notes)
    except SeriesError as err:
        if not printed.text.strip():
            raise
        reason = f"{err.reason}; printed on stderr during the read: {printed.summary()}"
        raise SeriesError(err.file, reason) from err
    except BaseException:  # not a refusal (a bug, no memory, Ctrl-C): the text goes on too
        if printed.text.strip():
            log.warning("%s: printed on stderr during the read: %s", folder, printed.summary())
        raise
    finally:
        for note in notes:
            log.warning("%s", note)
    if printed.text.strip():
        log.warning("%s: read; printed on stderr during the read: %s", folder, printed.summary())
    return image


def _read_series(folder: Path, series: str | None, component: str | None, notes: list[str]):
    """`read_series` with fd 2 captured; its warnings are appended to `notes`."""
    found = list_series(folder)
    chosen = choose_series(folder, series, found)
    if component is not None:
        check_component(folder, chosen, component)
    if is_seg(chosen.files[0]):  # its frames are segments (labels and masks read it)
        raise SeriesError(chosen.files[0], NOT_AN_IMAGE)
    unread = _unread_files(folder, found)
    try:
        files = _stack_files(folder, chosen, component, notes)
    except SeriesError as err:
        if not unread:
            raise
        raise SeriesError(
            err.file, f"{err.reason}; not readable as DICOM: {', '.join(unread)}"
        ) from err
    image_class = _sop_class(chosen.files[0]) if unread else None  # read only where needed
    broken = [name for name in unread if _damaged_slice(folder / name, chosen.uid, image_class)]
    others = [name for name in unread if name not in broken and _is_part10(folder / name)]
    if others:
        notes.append(
            f"{folder}: {len(others)} DICOM file(s) of no image series left out "
            f"({', '.join(others[:5])}): reports, presentation states or raw data; a damaged "
            f"slice of series {chosen.uid} among them would leave it one slice short"
        )
    if broken:  # a regular stack without them: they were its first or last slices
        raise SeriesError(
            folder / broken[0],
            f"not readable as DICOM (truncated or corrupt?): {len(broken)} such file(s) in the "
            f"folder ({', '.join(broken[:5])}); without them series {chosen.uid} would be read "
            f"from {len(chosen.files)} files",
        )
    if len(chosen.files) == 1 and number_of_frames(chosen.files[0]) > 1:
        try:
            return read_multiframe(chosen.files[0], component, notes)
        except MultiFrameError as err:
            raise SeriesError(chosen.files[0], f"multi-frame DICOM: {err}") from None
        except RuntimeError as err:
            raise _undecodable(chosen.files, err) from err
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    # Float32 output: each slice rescaled by its own RescaleSlope/Intercept. Else ITK takes the
    # first slice's pixel type (int16 for slope 1), wrapping or truncating other slices' values.
    reader.SetOutputPixelType(sitk.sitkFloat32)
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's header, for `restore_series`
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise _undecodable(files, err) from err
    return restore_series(_placed_by_headers(image, reader, notes), reader)


def _placed_by_headers(image: sitk.Image, reader: sitk.ImageSeriesReader, notes: list[str]):
    """`image` placed by its slices' headers where ITK gave up on the direction cosines (an
    oblique series read as axial, without a word): direction from the first slice's cosines
    made orthonormal (`orthonormal_cosines`), slice axis along their normal
    toward the last slice, origin and slice spacing from the first and last slices' positions."""

    def floats(k: int, tag: str) -> np.ndarray:
        return np.array([float(v) for v in reader.GetMetaData(k, tag).split("\\")])

    last = len(reader.GetFileNames()) - 1
    try:  # checked for a stack of several slices (`check_slice_positions`)
        orientation, first = floats(0, "0020|0037"), floats(0, "0020|0032")
    except (RuntimeError, ValueError):  # a single slice without them: ITK's placement
        return image
    if orientation.shape != (6,) or first.shape != (3,):
        return image
    if problem := cosines_problem(orientation):
        written = f"ImageOrientationPatient {reader.GetMetaData(0, '0020|0037').strip()!r}"
        raise SeriesError(reader.GetFileNames()[0], f"{written}: {problem}")
    row, column = orthonormal_cosines(orientation)
    read = np.reshape(image.GetDirection(), (3, 3))
    if max(np.abs(read[:, 0] - row).max(), np.abs(read[:, 1] - column).max()) < 1e-2:
        return image  # ITK's own placement
    normal = np.cross(row, column)
    step = (floats(last, "0020|0032") - first) @ normal / last if last else image.GetSpacing()[2]
    image.SetDirection(tuple(np.column_stack([row, column, normal * np.sign(step)]).ravel()))
    image.SetOrigin(tuple(first))
    image.SetSpacing((*image.GetSpacing()[:2], abs(step)))
    notes.append(
        f"{Path(reader.GetFileNames()[0]).parent}: direction cosines not orthogonal within 1e-3 "
        f"(row . column = {orientation[:3] @ orientation[3:]:.4g}, e.g. written to 3 decimals), "
        "which the DICOM reader ignores: placed by the slices' own cosines and positions"
    )
    return image


def _stack_files(folder: Path, chosen: SeriesInfo, component: str | None, notes: list[str]):
    """The files of `chosen` that form its 3D stack, checked (`check_slice_positions`): all of
    them, or, for `hbv`, those of the highest b-value of a series of several b-values (noted)."""
    try:
        check_slice_positions(chosen.files)
        if component == "hbv" and (problem := low_b_problem([_series_b_value(chosen)])):
            raise SeriesError(folder, f"series {chosen.uid}: {problem}")
        return list(chosen.files)
    except SeveralVolumesError as err:
        if component != "hbv":
            raise
        try:
            files, b_values, directional = highest_b_files(chosen.files)
        except BValueError as why:
            raise SeriesError(err.file, f"{err.reason}; as hbv: {why}") from None
    listed, read, left_out = describe_choice(len(files), "images", b_values, directional)
    if problem := low_b_problem(b_values):
        raise SeriesError(folder, f"series {chosen.uid} holds b-values {listed}: {problem}")
    try:
        check_slice_positions(files)
    except SeriesError as err:
        raise SeriesError(err.file, f"{read}: {err.reason}") from None
    notes.append(
        f"{folder}: series {chosen.uid} holds b-values {listed}; hbv read from {read}{left_out}"
    )
    return files


_UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")


def _transfer_syntax(file: str) -> str:
    """TransferSyntaxUID (0002,0010) of a part-10 file, from its meta header (explicit VR little
    endian in every file), or '' where there is none."""
    with open(file, "rb") as f:
        head = f.read(4096)
    at = head.find(b"\x02\x00\x10\x00UI")
    if at < 0:
        return ""
    length = int.from_bytes(head[at + 6 : at + 8], "little")
    return head[at + 8 : at + 8 + length].rstrip(b"\0 ").decode("ascii", "replace")


def _undecodable(files, err: RuntimeError) -> SeriesError:
    """The error for a series (`files`) whose pixel data ITK cannot read: names the first file
    in a compressed transfer syntax (GDCM lacks a codec for some), else the folder."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    itk = re.sub(r"^ITK ERROR: \w+\(0x[0-9a-f]+\): ", "", lines[-1] if lines else "read error")
    if limit := gdcm_limit(files[0]):  # uncompressed, it would fail the same way
        return SeriesError(files[0], f"pixel data cannot be read ({itk}): {limit}")
    compressed = [(f, ts) for f in files if (ts := _transfer_syntax(f)) not in ("", *_UNCOMPRESSED)]
    if not compressed:
        return SeriesError(Path(files[0]).parent, f"pixel data cannot be read ({itk})")
    file, syntax = compressed[0]
    return SeriesError(
        file,
        f"pixel data in transfer syntax {syntax} ({len(compressed)} of {len(files)} files) cannot "
        f"be decoded ({itk}); convert the series to uncompressed DICOM (e.g. gdcmconv --raw)",
    )
