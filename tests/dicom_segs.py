"""What the DICOM SEG tests share: SEGs made with highdicom on the real ProstateX-0000 T2w series
(`write_seg` of boxes drawn on its frames, `frame_box`; the segment codes `LESION`, `PROSTATE`,
`BLADDER`), the module-scoped `source` and `t2w` fixtures (a test module takes them as
`source = dicom_segs.source`), and the scanner coordinates of source pixels (`world`, `on_t2w`)."""

from __future__ import annotations

import warnings
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.sr.codedict import codes

from focalnet_jax.data.dicom import read_series

LESION = (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm)
PROSTATE = (codes.SCT.AnatomicalStructure, codes.SCT.Prostate)
BLADDER = (codes.SCT.AnatomicalStructure, codes.SCT.Bladder)


@pytest.fixture(scope="module")
def source(prostatex_case_dir) -> list[pydicom.Dataset]:
    """The T2w slices in instance order: frame k of every SEG below is `source[k]`."""
    files = (prostatex_case_dir / "t2w").iterdir()
    return sorted((pydicom.dcmread(f) for f in files), key=lambda d: int(d.InstanceNumber))


@pytest.fixture(scope="module")
def t2w(prostatex_case_dir) -> sitk.Image:
    return read_series(prostatex_case_dir / "t2w")


def frame_box(source, frame: int, rows: slice, cols: slice) -> np.ndarray:
    """bool [frames, rows, columns]: the pixels `rows`, `cols` of source frame `frame`."""
    mask = np.zeros((len(source), source[0].Rows, source[0].Columns), bool)
    mask[frame, rows, cols] = True
    return mask


def write_seg(path: Path, source, segments, *, fractional: bool = False, labelmap=False) -> Path:
    """A SEG of `segments` [(label, mask [frames, rows, columns], (category, type))] on the
    source frames, empty frames left out (highdicom's default), written to `path`; `labelmap`:
    a label map SEG (segments that do not overlap, as one map of segment numbers)."""
    descriptions = [
        highdicom.seg.SegmentDescription(
            segment_number=k,
            segment_label=label,
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for k, (label, _, (category, kind)) in enumerate(segments, start=1)
    ]
    pixels = np.stack([mask for _, mask, _ in segments], axis=-1)
    kind = highdicom.seg.SegmentationTypeValues.FRACTIONAL if fractional else "BINARY"
    if labelmap:
        kind = highdicom.seg.SegmentationTypeValues.LABELMAP
        pixels = (pixels * np.arange(1, len(segments) + 1)).max(axis=-1).astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # its patient name has one component
        seg = highdicom.seg.Segmentation(
            source_images=source,
            pixel_array=pixels if labelmap else pixels.astype(np.float32 if fractional else bool),
            segmentation_type=kind,
            segment_descriptions=descriptions,
            series_instance_uid=pydicom.uid.generate_uid(),
            series_number=300,
            sop_instance_uid=pydicom.uid.generate_uid(),
            instance_number=1,
            manufacturer="test",
            manufacturer_model_name="test",
            software_versions="1",
            device_serial_number="1",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def world(source, frame: int, row: int, col: int) -> np.ndarray:
    """LPS (mm) of pixel (row, col) of source frame `frame`, from its own header."""
    ds = source[frame]
    cosines = np.asarray(ds.ImageOrientationPatient, np.float64)
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
    position = np.asarray(ds.ImagePositionPatient, np.float64)
    return position + col * col_mm * cosines[:3] + row * row_mm * cosines[3:]


def on_t2w(source, t2w: sitk.Image, frames: np.ndarray) -> np.ndarray:
    """A [frames, rows, columns] array in source-frame order on the T2w series grid [z, y, x]
    (the T2w slice of each frame found by its position)."""
    out = np.zeros(sitk.GetArrayViewFromImage(t2w).shape, frames.dtype)
    for k in range(len(source)):
        out[t2w.TransformPhysicalPointToIndex(tuple(world(source, k, 0, 0)))[2]] = frames[k]
    return out
