"""`focalnet predict --dicom`: the detection map's lesion candidates as a DICOM Segmentation, and
the csPCa score as a DICOM Parametric Map.

For an exam whose T2w is a DICOM series (a folder of single-frame slices or of one enhanced
multi-frame file), `detections_seg.dcm` is a binary SEG (highdicom) that references the T2w series
and has one frame per segment and T2w source frame that segment covers. Its segments are the blobs
of `detection_map.nii.gz` (each a 26-connected region of one confidence value), numbered 1..N by
falling confidence; segment n is labelled `lesion n (p=0.83)`, p being the blob's value (its peak
csPCa score P(GS >= 3+4)), followed by `csv 1,2` when rows of `detections.csv` (their `detection`
ids) lie in it. The segment voxels are sampled from the map on the T2w grid at each source pixel's
world point, which must fall on a T2w voxel centre (else the source frames are not the T2w grid: an
error). An exam without candidates gets no SEG (a SEG needs a segment; logged). `score_map.dcm` is a
float Parametric Map of `cspca_score.nii.gz` on every source frame (the same sampling), its frames'
anatomy the prostate, an unpaired structure (Frame Anatomy functional group: FrameLaterality U;
without it the IOD's conditional General Series Laterality is missing).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import re
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, TM
from scipy import ndimage

from focalnet_jax.data.dicom import choose_series
from focalnet_jax.data.dicom_cosines import orthonormal_cosines
from focalnet_jax.data.dicom_multiframe import ORIENTATION_TOLERANCE, frame_values
from focalnet_jax.data.io import CaseError
from focalnet_jax.evaluation.dicom_source_headers import slice_spacing, writer_headers

log = logging.getLogger(__name__)

SEG_FILE = "detections_seg.dcm"
SCORE_MAP_FILE = "score_map.dcm"
VERSION = version("focalnet_jax")  # the installed package's
SERIES_NUMBER = 1000
LABEL_LENGTH = 64  # SegmentLabel is an LO value
GRID_TOLERANCE = 0.05  # voxels: a source pixel centre off a T2w voxel centre by more is an error
# The patient and study attributes highdicom copies from the first source into a SEG or Parametric
# Map (Type 2 in an image: present, possibly empty; some anonymisers delete them).
COPIED_ATTRIBUTES = (
    "StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
)  # fmt: skip


# What every T2w slice a SEG or Parametric Map references must share (highdicom's check).
SHARED_ATTRIBUTES = (
    "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "Rows", "Columns",
)  # fmt: skip


def dicom_sources(
    case_id: str,
    t2w: str | os.PathLike,
    series: str | None = None,
    grid: sitk.Image | None = None,
) -> list:
    """The pydicom headers (no pixel data) of the T2w series of folder `t2w` (`series`: its UID
    or description, where the folder holds several): its single-frame slices, or its one
    multi-frame file, as the writer takes them (`dicom_source_headers.writer_headers`). A
    `CaseError` for an image file (no DICOM source to reference), for a first source without the
    attributes the outputs copy from it (`COPIED_ATTRIBUTES`), for a slice that differs from the
    first in one of `SHARED_ATTRIBUTES`, for frames off the T2w grid `grid` of the maps, where
    given (`frame_voxels`), and for headers the writer refuses: both outputs are made of blank
    maps in memory, so that all of this is found before inference."""
    path = Path(t2w)
    if not path.is_dir():
        raise CaseError(
            case_id,
            path,
            "--dicom: the T2w is an image file, not a DICOM series, so there is no DICOM source "
            "for detections_seg.dcm to reference",
        )
    files = choose_series(path, series).files
    sources = [_read_header(case_id, f) for f in files]
    if missing := [name for name in COPIED_ATTRIBUTES if name not in sources[0]]:
        raise CaseError(
            case_id,
            files[0],
            f"--dicom: the T2w lacks {', '.join(missing)}, which score_map.dcm and "
            "detections_seg.dcm copy from it (Type 2: present, possibly empty)",
        )
    if problem := _unusable_value(sources[0]):
        raise CaseError(
            case_id,
            files[0],
            f"--dicom: the T2w's {problem}; score_map.dcm and detections_seg.dcm copy it and "
            "the DICOM writer refuses it (fix the header, or predict without --dicom)",
        )
    _check_one_series(case_id, files, sources)
    if grid is not None:
        frame_voxels(grid, sources, case_id)
    frames = _frames(sources)
    spacing = slice_spacing(np.array([f[0] for f in frames]), frames[0][1])
    sources = writer_headers(sources, spacing)
    _check_writer_takes(case_id, sources)
    return sources


@contextlib.contextmanager
def _writer_refusals(case_id: str, sources: list):
    """A header value the writer (highdicom) refuses, as a `CaseError` naming the first T2w
    file."""
    try:
        yield
    except (ValueError, TypeError, AttributeError) as error:
        reason = " ".join(str(error).split())
        raise CaseError(
            case_id, sources[0].filename, f"--dicom: the DICOM writer refused the T2w: {reason}"
        ) from error


def _check_writer_takes(case_id: str, sources: list) -> None:
    """Both outputs made of `sources` and blank maps (one segment of one pixel), saved in memory:
    the writer's refusals (`_writer_refusals`) before inference, not after."""
    frames = int(sources[0].get("NumberOfFrames", 1)) if len(sources) == 1 else len(sources)
    shape = (frames, int(sources[0].Rows), int(sources[0].Columns))
    labels = np.zeros(shape, np.uint16)
    labels[0, 0, 0] = 1
    with _writer_refusals(case_id, sources), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the real files' writing warns, where it does
        _saved(lambda: _score_map(sources, np.zeros(shape, np.float32)), io.BytesIO())
        descriptions = [_description(1, segment_label(1, 1.0, []))]
        _saved(lambda: _seg(sources, labels, descriptions), io.BytesIO())


def _check_one_series(case_id: str, files, sources) -> None:
    """A `CaseError` naming the first T2w file whose `SHARED_ATTRIBUTES` differ from the first
    file's: the writer (highdicom) refused such sources only after inference, naming the first
    file and another reason ("must all be part of the same series ...")."""
    first = sources[0]
    for file, source in zip(files[1:], sources[1:], strict=True):
        for name in SHARED_ATTRIBUTES:
            if (value := source.get(name)) != (expected := first.get(name)):
                raise CaseError(
                    case_id,
                    file,
                    f"--dicom: its {name} {value!r} differs from {Path(files[0]).name}'s "
                    f"{expected!r}; score_map.dcm and detections_seg.dcm reference the slices "
                    "of one series of one study (fix the header, or predict without --dicom)",
                )


def _read_header(case_id: str, file) -> pydicom.Dataset:
    """The header of one T2w file, also without the preamble and file meta of DICOM's file
    format (older exports; the series reader, GDCM, takes them); a `CaseError` naming the file
    where pydicom cannot read it."""
    try:
        return pydicom.dcmread(file, stop_before_pixels=True, force=True)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError) as error:
        raise CaseError(case_id, file, f"--dicom: cannot read its DICOM header ({error})") from None


def _unusable_value(source) -> str | None:
    """What of the header `source` the SEG and Parametric Map writer (highdicom) refuses, or
    copies into a non-conformant file, named before inference (anonymised exports hold such
    values): a PatientSex other than M, F, O or empty, a date or time not in DICOM's DA / TM
    form (a DA is YYYYMMDD: pydicom also reads ACR-NEMA's `YYYY.MM.DD`), no
    FrameOfReferenceUID; else None."""
    sex = str(source.get("PatientSex") or "")
    if sex not in ("", "M", "F", "O"):
        return f"PatientSex {sex!r} is not M, F, O or empty"
    for name, kind in (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM)):
        if value := str(source.get(name) or ""):
            try:
                if kind is DA and not re.fullmatch(r"\d{8}", value):
                    raise ValueError("expected YYYYMMDD")
                with warnings.catch_warnings():  # pydicom's "Invalid value" warning: said below
                    warnings.simplefilter("ignore")
                    kind(value)
            except ValueError as error:
                return f"{name} {value!r} is not a DICOM {kind.__name__} value ({error})"
    if not source.get("FrameOfReferenceUID"):
        return "FrameOfReferenceUID is missing or empty"
    return None


def candidate_labels(detection: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """The blobs of a detection map `[z, y, x]` (each filled with its confidence) as labels
    uint16 `[z, y, x]` 1..N (0 background), numbered by falling confidence, and their
    confidences."""
    labels = np.zeros(detection.shape, np.uint16)
    confidences: list[float] = []
    for value in sorted(np.unique(detection[detection > 0]), reverse=True):
        blobs, count = ndimage.label(detection == value, structure=np.ones((3, 3, 3)))
        for blob in range(1, count + 1):
            confidences.append(float(value))
            labels[blobs == blob] = len(confidences)
    return labels, confidences


def _frames(sources: list) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per source frame (in highdicom's order): (position (3,) mm, orientation (6,) row then
    column cosines, pixel spacing (2,) row then column mm)."""
    if len(sources) == 1 and int(sources[0].get("NumberOfFrames", 1)) > 1:
        values = frame_values(sources[0])
        return [
            tuple(
                np.asarray(values[k][f], float)
                for k in ("position", "orientation", "pixel_spacing")
            )
            for f in range(len(values["position"]))
        ]
    return [
        (
            np.asarray(s.ImagePositionPatient, float),
            np.asarray(s.ImageOrientationPatient, float),
            np.asarray(s.PixelSpacing, float),
        )
        for s in sources
    ]


def frame_voxels(grid: sitk.Image, sources: list, case_id: str) -> np.ndarray:
    """The T2w voxel (k, j, i) of every pixel of every source frame, int32
    `[frames, rows, columns, 3]`, on the T2w grid `grid`. A `CaseError` naming the frame's file
    where a source pixel's centre is not a T2w voxel centre (within `GRID_TOLERANCE` voxels)."""
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    axes = np.reshape(grid.GetDirection(), (3, 3))
    to_index = np.linalg.inv(axes @ np.diag(grid.GetSpacing()))
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    size = np.array(grid.GetSize())
    frames = []
    for f, (position, orientation, spacing) in enumerate(_frames(sources)):
        cosines = orthonormal_cosines(orientation)
        along_rows, along_columns = (_on_grid_axis(v, axes) for v in cosines)
        world = (
            position
            + c[..., None] * spacing[1] * along_rows
            + r[..., None] * spacing[0] * along_columns
        )
        index = (world - np.asarray(grid.GetOrigin())) @ to_index.T
        voxel = np.rint(index).astype(np.int32)
        off = np.abs(index - voxel).max()
        if off > GRID_TOLERANCE or (voxel < 0).any() or (voxel >= size).any():
            source = sources[f] if len(sources) > 1 else sources[0]  # a file a frame, or one
            raise CaseError(
                case_id,
                source.filename,
                f"--dicom: source frame {f + 1} does not lie on the T2w grid of the maps (off by "
                f"{off:.3g} voxels or outside it)",
            )
        frames.append(voxel[..., ::-1])
    return np.stack(frames)


def _on_grid_axis(cosines: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """The axis of `axes` (columns, unit vectors) that the orthonormal `cosines` of a source frame
    give, where they are it up to the rounding of cosines written to 3 decimals (the series'
    slices agree within `ORIENTATION_TOLERANCE`: a source pixel lies where the grid's axis puts
    it, as viewers place it); else `cosines` (a frame of another orientation, then refused as
    off the grid)."""
    nearest = axes[:, np.argmax(np.abs(cosines @ axes))]
    nearest = nearest * np.sign(cosines @ nearest)
    return nearest if np.abs(cosines - nearest).max() <= 2 * ORIENTATION_TOLERANCE else cosines


def _sampled(volume: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    """`volume` `[z, y, x]` at `voxels` `[..., 3]` (k, j, i)."""
    return volume[voxels[..., 0], voxels[..., 1], voxels[..., 2]]


def _csv_ids(detections_csv: Path, labels: np.ndarray) -> dict[int, list[str]]:
    """Segment number -> the `detection` ids of the rows of `detections_csv` whose T2w voxel
    (t2w_i, t2w_j, t2w_k) lies in it (a point of the crop beyond the T2w grid lies in none)."""
    ids: dict[int, list[str]] = {}
    with detections_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            voxel = np.array([int(row[key]) for key in ("t2w_k", "t2w_j", "t2w_i")])
            if (voxel < 0).any() or (voxel >= labels.shape).any():
                continue
            if segment := int(labels[tuple(voxel)]):
                ids.setdefault(segment, []).append(row["detection"])
    return ids


def segment_label(number: int, confidence: float, csv_ids: list[str]) -> str:
    """`lesion 1 (p=0.83)`, with ` csv 2,5` for its rows of detections.csv (as many as fit in
    `LABEL_LENGTH`, then ` +k` for the k others)."""
    label = f"lesion {number} (p={confidence:.2f})"
    for shown in range(len(csv_ids), 0, -1):
        more = f" +{len(csv_ids) - shown}" if shown < len(csv_ids) else ""
        text = f"{label} csv {','.join(csv_ids[:shown])}{more}"
        if len(text) <= LABEL_LENGTH:
            return text
    return label


def _description(number: int, label: str):
    """Segment `number`'s highdicom SegmentDescription: a lesion candidate of this package."""
    import highdicom as hd

    algorithm = hd.AlgorithmIdentificationSequence(
        name="focalnet_jax", family=codes.DCM.ArtificialIntelligence, version=VERSION
    )
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=hd.UID(),
        tracking_id=f"lesion {number}",
        anatomic_regions=[codes.SCT.Prostate],
    )


def _equipment() -> dict:
    """The arguments naming this software in a SEG or Parametric Map."""
    return {
        "manufacturer": "focalnet_jax",
        "manufacturer_model_name": "focalnet_jax",
        "software_versions": VERSION,
        "device_serial_number": "none",
    }


def _saved(make, path: Path) -> Path:
    """`make()` (a highdicom object) saved to `path`; highdicom's warning that the patient's name
    (copied from the sources as it is) has one component is left out."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The string .* unlikely to represent the intended person")
        make().save_as(path)
    return path


def write_seg(
    out_dir: Path,
    detection_map: sitk.Image,
    sources: list,
    voxels: np.ndarray,
    case_id: str,
    grades: bool = True,
) -> Path | None:
    """`out_dir/detections_seg.dcm` of the candidates of `detection_map` (float32 on the T2w
    grid) on the source frames (`voxels`: `frame_voxels`), labelled with the rows of
    `out_dir/detections.csv` in them; None (logged) when there is no candidate. `grades`: False
    for a model of lesion against no lesion, whose candidates are lesions of any grade."""
    labels, confidences = candidate_labels(sitk.GetArrayFromImage(detection_map))
    if not confidences:
        log.warning(  # printed: the user looks for the file
            "%s: no lesion candidate, %s not written (a SEG needs a segment)", case_id, SEG_FILE
        )
        return None
    csv_ids = _csv_ids(out_dir / "detections.csv", labels)
    descriptions = [
        _description(n, segment_label(n, p, csv_ids.get(n, [])))
        for n, p in enumerate(confidences, 1)
    ]
    return _saved(
        lambda: _seg(sources, _sampled(labels, voxels), descriptions, grades), out_dir / SEG_FILE
    )


def _seg(sources: list, labels: np.ndarray, descriptions: list, grades: bool = True):
    """The highdicom SEG of segment labels uint16 `[frames, rows, columns]` on `sources`."""
    import highdicom as hd  # imported here (0.3 s): needed only with --dicom

    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        content_label="LESIONS",
        content_description="focalnet_jax "
        + ("csPCa lesion candidates" if grades else "lesion candidates, no grade"),
        series_description="focalnet_jax lesion candidates",
        **_equipment(),
    )


def _with_prostate_anatomy(image):
    """`image` (a multi-frame highdicom object) with a shared Frame Anatomy functional group: the
    prostate (SCT 41216001), laterality U (unpaired)."""
    import highdicom as hd

    anatomy = pydicom.Dataset()
    anatomy.FrameLaterality = "U"
    anatomy.AnatomicRegionSequence = [hd.sr.CodedConcept.from_code(codes.SCT.Prostate)]
    image.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [anatomy]
    return image


def write_score_map(
    out_dir: Path, cspca: sitk.Image, sources: list, voxels: np.ndarray, grades: bool = True
) -> Path:
    """`out_dir/score_map.dcm`: the csPCa score P(GS >= 3+4) (float32 on the T2w grid, 0..1) on
    every source frame (`voxels`: `frame_voxels`), a float Parametric Map. `grades`: False for a
    model of lesion against no lesion, whose score is P(lesion) of any grade, and labelled so."""
    values = _sampled(sitk.GetArrayFromImage(cspca).astype(np.float32), voxels)
    return _saved(lambda: _score_map(sources, values, grades), out_dir / SCORE_MAP_FILE)


def _score_map(sources: list, values: np.ndarray, grades: bool = True):
    """The highdicom Parametric Map of scores float32 `[frames, rows, columns]` on `sources`."""
    import highdicom as hd

    label, meaning = ("csPCa", "P(GS >= 3+4)") if grades else ("lesion", "P(lesion), no grade")
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=label,
        lut_explanation=f"{meaning}, focalnet_jax",
        unit=codes.UCUM.NoUnits,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=codes.DCM.ProbabilityOfCancer,
    )
    return _with_prostate_anatomy(
        hd.pm.ParametricMap(
            source_images=sources,
            pixel_array=values,
            series_instance_uid=hd.UID(),
            series_number=SERIES_NUMBER + 1,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[
                hd.VOILUTTransformation(
                    window_center=0.5, window_width=1.0, voi_lut_function="LINEAR_EXACT"
                )
            ],
            content_label=label.upper(),
            content_description=f"focalnet_jax {label} score {meaning}",
            series_description=f"focalnet_jax {label} score",
            **_equipment(),
        )
    )


def write_dicom_outputs(
    out_dir: Path, maps: dict, sources: list, case_id: str, grades: bool = True
) -> list[Path]:
    """`score_map.dcm` and, where `maps["detection_map"]` holds a candidate,
    `detections_seg.dcm` (`maps`: the T2w-grid images of predict.py) on the frames of the T2w
    `sources`. A `CaseError` naming `case_id` when those frames are not the T2w grid. `grades`:
    False for a model of lesion against no lesion (labels say P(lesion), no grade)."""
    voxels = frame_voxels(maps["cspca_score"], sources, case_id)
    with _writer_refusals(case_id, sources):  # found by `dicom_sources` before inference
        written = [write_score_map(out_dir, maps["cspca_score"], sources, voxels, grades)]
        seg = write_seg(out_dir, maps["detection_map"], sources, voxels, case_id, grades)
    return written + ([seg] if seg is not None else [])
