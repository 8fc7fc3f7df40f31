"""DICOM Segmentation (SEG) objects as lesion labels and whole-gland masks: SEGs made with
highdicom on the real ProstateX-0000 T2w series (../shared/data/prostatex; 19 frames of 384 x 384
pixels, 0.5 mm, 3 mm apart) read at the scanner coordinates of their source pixels, with the label
values of their segment labels, and preprocessed as the equivalent NIfTI label and mask are."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.sr.codedict import codes

from focalnet_jax.cli import main
from focalnet_jax.data import io
from focalnet_jax.data.dicom import read_series
from focalnet_jax.data.store import open_store
from focalnet_jax.errors import UserError

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


def _box(source, frame: int, rows: slice, cols: slice) -> np.ndarray:
    """bool [frames, rows, columns]: the pixels `rows`, `cols` of source frame `frame`."""
    mask = np.zeros((len(source), source[0].Rows, source[0].Columns), bool)
    mask[frame, rows, cols] = True
    return mask


def _seg(path: Path, source, segments, *, fractional: bool = False, labelmap=False) -> Path:
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


def _world(source, frame: int, row: int, col: int) -> np.ndarray:
    """LPS (mm) of pixel (row, col) of source frame `frame`, from its own header."""
    ds = source[frame]
    cosines = np.asarray(ds.ImageOrientationPatient, np.float64)
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
    position = np.asarray(ds.ImagePositionPatient, np.float64)
    return position + col * col_mm * cosines[:3] + row * row_mm * cosines[3:]


def _on_t2w(source, t2w: sitk.Image, frames: np.ndarray) -> np.ndarray:
    """A [frames, rows, columns] array in source-frame order on the T2w series grid [z, y, x]
    (the T2w slice of each frame found by its position)."""
    out = np.zeros(sitk.GetArrayViewFromImage(t2w).shape, frames.dtype)
    for k in range(len(source)):
        out[t2w.TransformPhysicalPointToIndex(tuple(_world(source, k, 0, 0)))[2]] = frames[k]
    return out


def _resampled(image: sitk.Image, t2w: sitk.Image) -> np.ndarray:
    out = sitk.Resample(image, t2w, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out)


def test_segment_labels_give_their_grades_and_overlaps_the_highest(source, t2w, tmp_path):
    boxes = {  # label -> its box (frame, rows, columns); 'GS 3+4' and 'ISUP 4' overlap
        "ISUP 2": (4, slice(150, 160), slice(150, 160)),
        " gleason 4+3 ": (6, slice(170, 180), slice(200, 215)),
        "GS 3+4": (8, slice(200, 220), slice(180, 200)),
        "ISUP 4": (8, slice(210, 230), slice(190, 210)),
        "Gleason 5+4": (10, slice(190, 200), slice(170, 175)),
        "csPCa": (12, slice(160, 170), slice(160, 170)),
    }
    segments = [(label, _box(source, *box), LESION) for label, box in boxes.items()]
    label = io.read_label(_seg(tmp_path / "l.dcm", source, segments), label_values="picai")
    values = {"ISUP 2": 2, " gleason 4+3 ": 3, "GS 3+4": 2, "ISUP 4": 4, "Gleason 5+4": 5}
    expected = np.zeros(np.shape(segments[0][1]), np.uint8)
    for text, mask, _ in segments:
        expected = np.maximum(expected, mask * values.get(text, 1))
    # 'ISUP 4' (400 pixels) takes 100 of 'GS 3+4''s 400 pixels, which keeps 300 at 2.
    assert (expected == 4).sum() == 400 and (expected[segments[2][1]] == 2).sum() == 300
    # On the T2w series grid by scanner coordinates: every voxel where the source pixels are.
    np.testing.assert_array_equal(_resampled(label, t2w), _on_t2w(source, t2w, expected))
    # A known pixel: source frame 8, row 215, column 195 (both segments) at its LPS position.
    point = _world(source, 8, 215, 195)
    index = np.asarray(label.TransformPhysicalPointToContinuousIndex(tuple(point)))
    np.testing.assert_allclose(index, np.round(index), atol=1e-3)
    assert label[tuple(int(i) for i in np.round(index))] == 4
    assert label.GetSpacing() == pytest.approx((0.5, 0.5, 3.0), abs=1e-6)


def test_a_label_map_seg_reads_as_the_binary_seg_of_its_segments(source, tmp_path):
    """A label map SEG (Label Map Segmentation Storage, one segment number a pixel) was not
    recognised as a SEG: a file was refused as an unknown image format."""
    boxes = [
        ("ISUP 3", (6, slice(170, 180), slice(200, 215))),
        ("csPCa", (8, slice(150, 170), slice(150, 160))),
    ]
    segments = [(text, _box(source, *box), LESION) for text, box in boxes]
    labelmap = _seg(tmp_path / "map.dcm", source, segments, labelmap=True)
    assert pydicom.dcmread(labelmap).SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    binary = _seg(tmp_path / "binary.dcm", source, segments)
    read = io.read_label(labelmap, label_values="picai")
    want = io.read_label(binary, label_values="picai")
    assert sitk.GetArrayViewFromImage(read).sum() == 3 * 150 + 1 * 200
    for got, expected in (
        (read.GetOrigin(), want.GetOrigin()),
        (read.GetSpacing(), want.GetSpacing()),
    ):
        np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(want))


def test_isup_convention_gives_isup_1_and_gleason_sums(source, tmp_path):
    boxes = {"isup 1": 3, "GS 3+3": 5, "Gleason 3+5": 7, "GS 5+5": 9, "ISUP 5": 11}
    segments = [
        (text, _box(source, frame, slice(100, 104), slice(100, 104)), LESION)
        for text, frame in boxes.items()
    ]
    label = io.read_label(_seg(tmp_path / "l.dcm", source, segments), label_values="isup")
    found = {
        text: label[label.TransformPhysicalPointToIndex(tuple(_world(source, f, 101, 102)))]
        for text, f in boxes.items()
    }
    assert found == {"isup 1": 1, "GS 3+3": 1, "Gleason 3+5": 4, "GS 5+5": 5, "ISUP 5": 5}
    assert np.bincount(sitk.GetArrayViewFromImage(label).ravel()).tolist()[1:] == [32, 0, 0, 16, 32]


def test_sparse_seg_keeps_its_frames_at_their_positions(source, t2w, tmp_path):
    # Frames 3, 4 and 9 only (5..8 left out, as highdicom and dcmqi write them): 5..8 background.
    mask = _box(source, 3, slice(100, 110), slice(120, 130))
    mask |= _box(source, 4, slice(102, 112), slice(120, 130))
    mask |= _box(source, 9, slice(90, 95), slice(140, 150))
    file = _seg(tmp_path / "sparse.dcm", source, [("ISUP 3", mask, LESION)])
    assert pydicom.dcmread(file).NumberOfFrames == 3
    label = io.read_label(file, label_values="picai")
    # Frames 3..9 at 3 mm (SpacingBetweenSlices), one background slice on either side.
    assert label.GetSize() == (384, 384, 7 + 2)
    np.testing.assert_array_equal(_resampled(label, t2w), _on_t2w(source, t2w, mask * 3))
    # One frame alone: read as three slices (no single-slice label), the T2w's neighbours empty.
    single = _box(source, 12, slice(100, 110), slice(120, 130))
    file = _seg(tmp_path / "single.dcm", source, [("ISUP 5", single, LESION)])
    label = io.read_label(file, label_values="picai")
    assert label.GetSize() == (384, 384, 3)
    np.testing.assert_array_equal(_resampled(label, t2w), _on_t2w(source, t2w, single * 5))


def _refusal_without_slice_spacing(file: Path) -> str:
    """The one-line error of reading SEG `file` as a label once its SpacingBetweenSlices is
    deleted."""
    dataset = pydicom.dcmread(file)
    del dataset.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SpacingBetweenSlices
    dataset.save_as(file)
    with pytest.raises(io.CaseError) as raised:
        io.read_label(file, case="px", label_values="picai")
    return str(raised.value)


def test_sparse_seg_without_its_slice_spacing_is_refused(source, tmp_path):
    # Frames 3, 4 and 9 without SpacingBetweenSlices: highdicom would take 3 mm from the nearest
    # two; with frames 3, 5 and 9 (6 mm, 12 mm) it would take 6 mm and label frame 4 and others.
    mask = _box(source, 3, slice(100, 110), slice(120, 130))
    mask |= _box(source, 5, slice(100, 110), slice(120, 130))
    mask |= _box(source, 9, slice(100, 110), slice(120, 130))
    file = _seg(tmp_path / "sparse.dcm", source, [("ISUP 3", mask, LESION)])
    assert _refusal_without_slice_spacing(file) == (
        f"case 'px', file '{file}': frames at 3 positions 6.00 to 12.00 mm apart along the slice "
        "normal and no SpacingBetweenSlices (0018,0088): the slice spacing is unknown; export the "
        "SEG with it (or with every frame)"
    )


def test_seg_of_two_positions_without_its_slice_spacing_is_refused(source, tmp_path):
    # Two one-frame lesions 12 mm apart (frames 4 and 8): highdicom took 12 mm as the slice
    # spacing, and the two lesions covered seven T2w slices, not two.
    lesions = [
        ("ISUP 3", _box(source, 4, slice(100, 110), slice(120, 130)), LESION),
        ("ISUP 2", _box(source, 8, slice(150, 160), slice(120, 130)), LESION),
    ]
    file = _seg(tmp_path / "two.dcm", source, lesions)
    assert _refusal_without_slice_spacing(file) == (
        f"case 'px', file '{file}': frames at 2 positions 12.00 mm apart along the slice normal "
        "and no SpacingBetweenSlices (0018,0088): whether slices lie between them is unknown; "
        "export the SEG with it (or with every frame)"
    )


@pytest.mark.parametrize("segments", [1, 2])
def test_a_seg_of_one_slice_placed_once_for_all_frames_is_read(source, t2w, tmp_path, segments):
    # Its plane position in the shared functional group (all frames at one position), without
    # SpacingBetweenSlices: an AttributeError traceback, also under --skip-bad-cases.
    lesions = [
        ("ISUP 3", _box(source, 7, slice(100, 110), slice(120, 130)), LESION),
        ("ISUP 2", _box(source, 7, slice(150, 160), slice(120, 130)), LESION),
    ][:segments]
    file = _seg(tmp_path / "one.dcm", source, lesions)
    dataset = pydicom.dcmread(file)
    shared = dataset.SharedFunctionalGroupsSequence[0]
    shared.PlanePositionSequence = dataset.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence
    for frame in dataset.PerFrameFunctionalGroupsSequence:
        del frame.PlanePositionSequence
    del shared.PixelMeasuresSequence[0].SpacingBetweenSlices
    dataset.save_as(file)
    label = io.read_label(file, case="px", label_values="picai")
    expected = sum(mask * (3 - k) for k, (_, mask, _) in enumerate(lesions))
    np.testing.assert_array_equal(_resampled(label, t2w), _on_t2w(source, t2w, expected))


def test_fractional_segments_are_thresholded_at_half_their_maximum(source, t2w, tmp_path):
    fractions = np.zeros((len(source), 384, 384), np.float32)
    for frame, value in ((5, 0.3), (6, 0.45), (7, 0.55), (8, 1.0)):
        fractions[frame, 100:110, 100:110] = value
    file = _seg(tmp_path / "f.dcm", source, [("ISUP 2", fractions, LESION)], fractional=True)
    label = io.read_label(file, label_values="picai")
    expected = (fractions >= 0.5).astype(np.uint8) * 2
    assert expected.sum() == 2 * 200  # frames 7 and 8
    np.testing.assert_array_equal(_resampled(label, t2w), _on_t2w(source, t2w, expected))


def test_gland_mask_is_the_one_segment_or_the_prostate_segments(source, t2w, tmp_path):
    gland = _box(source, 9, slice(140, 220), slice(150, 230))
    gland |= _box(source, 10, slice(140, 220), slice(150, 230))
    bladder = _box(source, 14, slice(100, 140), slice(150, 230))
    lesion = _box(source, 9, slice(180, 190), slice(180, 190))
    one = io.read_mask(_seg(tmp_path / "one.dcm", source, [("WG", gland, PROSTATE)]))
    np.testing.assert_array_equal(_resampled(one, t2w), _on_t2w(source, t2w, gland))
    # Several: the one of property type Prostate and the one labelled 'gland', not the others.
    other = _box(source, 11, slice(140, 200), slice(150, 230))
    segments = [
        ("Bladder", bladder, BLADDER),
        ("Organ", gland, PROSTATE),
        ("ISUP 3", lesion, LESION),
        ("Central Gland", other, LESION),
    ]
    mask = io.read_mask(_seg(tmp_path / "several.dcm", source, segments))
    np.testing.assert_array_equal(_resampled(mask, t2w), _on_t2w(source, t2w, gland | other))


def _error(call) -> str:
    with pytest.raises(UserError) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_bad_segments_are_refused_naming_case_file_and_segment(source, tmp_path):
    lesion = _box(source, 9, slice(180, 190), slice(180, 190))
    unknown = _seg(
        tmp_path / "u.dcm", source, [("ISUP 3", lesion, LESION), ("Lesion A", lesion, LESION)]
    )
    assert _error(lambda: io.read_label(unknown, case="px", label_values="picai")) == (
        f"case 'px', file '{unknown}': segment 2 'Lesion A': unknown segment label: expected "
        "'ISUP k' (k 1..5), 'GS a+b' or 'Gleason a+b' (a, b 3..5), 'csPCa'"
    )
    low = _seg(tmp_path / "low.dcm", source, [("GS 3+3", lesion, LESION)])
    assert _error(lambda: io.read_label(low, case="px", label_values="picai")) == (
        f"case 'px', file '{low}': segment 1 'GS 3+3': no value under --label-values picai (1 = "
        "csPCa of unknown grade) for ISUP 1 (GS 3+3, no csPCa): pass --label-values isup, or "
        "leave the segment out"
    )
    organs = [("Bladder", lesion, BLADDER), ("Rectum", lesion, BLADDER)]
    mask = _seg(tmp_path / "m.dcm", source, organs)
    assert _error(lambda: io.read_mask(mask, case="px")) == (
        f"case 'px', file '{mask}': 2 segments (1 'Bladder' (SCT 89837001), 2 'Rectum' (SCT "
        "89837001)), none the whole gland: a prostate mask SEG needs one segment, or segments of "
        "property type SCT 41216001 (Prostate) or with 'prostate' or 'gland' in their label"
    )
    folder = tmp_path / "two"
    folder.mkdir()
    shutil.copy(low, folder / "b.dcm")
    shutil.copy(unknown, folder / "a.dcm")
    assert _error(lambda: io.read_label(folder, case="px", label_values="isup")) == (
        f"case 'px', file '{folder}': folder holds 2 DICOM SEG files (a.dcm, b.dcm); give one file"
    )


def test_a_lesion_segment_without_a_voxel_is_refused_not_left_out(source, tmp_path):
    # A segment exported but never drawn, or fractional below half its maximum everywhere, was
    # left out without a word: a case of one such segment was stored lesion-free, and a drawn
    # GS 4+3 beside an empty ISUP 5 lost the case's highest grade.
    lesion = _box(source, 9, slice(180, 190), slice(180, 190))
    empty = np.zeros_like(lesion)
    both = _seg(tmp_path / "b.dcm", source, [("GS 4+3", lesion, LESION), ("ISUP 5", empty, LESION)])
    assert _error(lambda: io.read_label(both, case="px", label_values="picai")) == (
        f"case 'px', file '{both}': segment 2 'ISUP 5' has no voxel (empty, or fractional values "
        "all below half their maximum): draw its lesion, or remove the segment"
    )
    faint = _seg(tmp_path / "f.dcm", source, [("GS 4+3", lesion * 0.4, LESION)], fractional=True)
    message = _error(lambda: io.read_label(faint, case="px", label_values="picai"))
    assert message.startswith(f"case 'px', file '{faint}': segment 1 'GS 4+3' has no voxel")
    # An empty anatomy segment beside a drawn lesion is no lesion and stays left out.
    gland = _seg(tmp_path / "g.dcm", source, [("GS 4+3", lesion, LESION), ("WG", empty, PROSTATE)])
    assert sitk.GetArrayFromImage(io.read_label(gland, label_values="picai")).max() == 3


def test_anatomy_as_other_tools_code_it_is_left_out_and_a_graded_one_kept(source, t2w, tmp_path):
    """3D Slicer and dcmqi code Anatomical Structure as SCT 123037004, older files as SNOMED RT
    T-D000A; their gland segment was refused as an unknown lesion label. A segment of that
    category whose label gives a grade was dropped without a word: it is a lesion."""
    from pydicom.sr.coding import Code

    lesion = _box(source, 9, slice(180, 190), slice(180, 190))
    gland = _box(source, 9, slice(140, 220), slice(150, 230))
    slicer = (Code("123037004", "SCT", "Anatomical Structure"), codes.SCT.Prostate)
    older = (Code("T-D000A", "SRT", "Anatomical Structure"), Code("T-9200B", "SRT", "Prostate"))
    for name, kind in (("slicer", slicer), ("older", older)):
        file = _seg(
            tmp_path / f"{name}.dcm", source, [("ISUP 3", lesion, LESION), ("WG", gland, kind)]
        )
        label = io.read_label(file, label_values="picai")
        np.testing.assert_array_equal(_resampled(label, t2w), _on_t2w(source, t2w, lesion * 3))
        mask = io.read_mask(file)  # two segments: the gland by its property type
        np.testing.assert_array_equal(_resampled(mask, t2w), _on_t2w(source, t2w, gland))
    graded = _seg(tmp_path / "graded.dcm", source, [("ISUP 4", lesion, PROSTATE)])
    label = io.read_label(graded, label_values="picai")
    np.testing.assert_array_equal(_resampled(label, t2w), _on_t2w(source, t2w, lesion * 4))


def test_a_seg_of_anatomy_alone_is_refused_as_a_label_unless_it_is_the_mask_too(source, tmp_path):
    """A gland SEG given as the label gave a case without lesions, without a word. Given as both
    label and gland mask (3D Slicer's export of a lesion-free case), it is that case."""
    gland = _box(source, 9, slice(140, 220), slice(150, 230))
    file = _seg(tmp_path / "g.dcm", source, [("Prostate", gland, PROSTATE)])
    assert _error(lambda: io.read_label(file, case="px", label_values="picai")) == (
        f"case 'px', file '{file}': no lesion segment: its 1 segment(s) (1 'Prostate') are "
        "anatomical structures: a gland mask given as the label? give it as the prostate mask, "
        "or as both label and mask for a case without lesions"
    )
    label = io.read_label(file, case="px", label_values="picai", mask=file)
    assert not sitk.GetArrayViewFromImage(label).any()
    for label_path, mask_path in ((file.parent, file), (file, file.parent)):  # its folder
        label = io.read_label(label_path, case="px", label_values="picai", mask=mask_path)
        assert not sitk.GetArrayViewFromImage(label).any()


def test_an_anatomy_coded_lesion_of_no_value_is_refused_not_left_out(source, tmp_path):
    """Tools that code every segment Anatomical Structure: a `csPCa` segment under isup (or
    `GS 3+3` under picai) has no value; it was left out as anatomy, its lesion lost."""
    lesion = _box(source, 9, slice(180, 190), slice(180, 190))
    gland = _box(source, 9, slice(140, 220), slice(150, 230))
    file = _seg(tmp_path / "c.dcm", source, [("csPCa", lesion, PROSTATE), ("WG", gland, PROSTATE)])
    message = _error(lambda: io.read_label(file, case="px", label_values="isup"))
    assert message.startswith(f"case 'px', file '{file}': segment 1 'csPCa': no value under ")


def test_a_seg_file_cut_short_is_a_one_line_error(source, tmp_path):
    """A SEG cut short (an unfinished copy) ended preprocessing in an IndexError or struct.error
    traceback, also with --skip-bad-cases."""
    lesion = _box(source, 9, slice(180, 190), slice(180, 190))
    whole = _seg(tmp_path / "whole.dcm", source, [("ISUP 3", lesion, LESION)]).read_bytes()
    body, header = tmp_path / "body.dcm", tmp_path / "header.dcm"
    body.write_bytes(whole[: len(whole) * 3 // 10])
    header.write_bytes(whole[:153])  # ends inside the 4-byte length of (0002,0001), an OB
    message = _error(lambda: io.read_label(body, case="px", label_values="picai"))
    assert message.startswith(
        f"case 'px', file '{body}': cannot be read as a segmentation volume ("
    )
    assert _error(lambda: io.read_label(header, case="px", label_values="picai")) == (
        f"case 'px', file '{header}': a damaged DICOM file (its header is cut short)"
    )


def test_a_seg_whose_frames_are_no_regular_volume_is_refused(source, tmp_path):
    # The middle of three frames moved 5 mm within its plane (a sheared stack).
    mask = np.zeros((len(source), 384, 384), bool)
    mask[3:6, 1:5, 1:5] = True
    file = _seg(tmp_path / "s.dcm", source, [("ISUP 3", mask, LESION)])
    dataset = pydicom.dcmread(file)
    plane = dataset.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0]
    plane.ImagePositionPatient = [
        float(plane.ImagePositionPatient[0]) + 5.0,
        *plane.ImagePositionPatient[1:],
    ]
    dataset.save_as(file)
    assert _error(lambda: io.read_label(file, case="px", label_values="picai")) == (
        f"case 'px', file '{file}': cannot be read as a segmentation volume (Frame positions do "
        "not form a regularly-spaced volume.)"
    )


def test_a_seg_folder_or_file_given_as_a_component_is_refused(source, tmp_path):
    folder = tmp_path / "seg"
    lesion = _box(source, 9, slice(180, 190), slice(180, 190))
    file = _seg(folder / "s.dcm", source, [("ISUP 3", lesion, LESION)])
    reason = (
        "a DICOM Segmentation (SEG), not an image series: give it as a lesion label or prostate "
        "mask (manifest columns label, prostate_mask)"
    )
    assert _error(lambda: io.read_image(folder, case="px", component="t2w")) == (
        f"case 'px', file '{file}': {reason}"
    )
    # The file itself was refused as an "unknown image format".
    assert _error(lambda: io.read_image(file, case="px", component="adc")) == (
        f"case 'px', file '{file}': {reason}"
    )


def test_a_dicom_file_that_is_no_seg_is_refused_as_label_or_mask_naming_its_class(
    prostatex_case_dir, tmp_path
):
    one_slice = tmp_path / "label.dcm"
    shutil.copy(sorted((prostatex_case_dir / "t2w").iterdir())[0], one_slice)
    mr_image = pydicom.dcmread(one_slice, stop_before_pixels=True).SOPClassUID
    expected = (
        f"case 'px', file '{one_slice}': DICOM file of SOP class {mr_image} is no DICOM SEG: give "
        "a DICOM SEG, or an image file or DICOM series folder"
    )
    assert _error(lambda: io.read_label(one_slice, case="px", label_values="picai")) == expected
    assert _error(lambda: io.read_mask(one_slice, case="px")) == expected


def _user_error(capfd, argv) -> str:
    capfd.readouterr()
    with pytest.raises(SystemExit) as raised:
        main(argv)
    err = re.sub(r"(\rpreprocess:[^\r\n]*)+\n", "", capfd.readouterr().err)  # progress bar
    assert raised.value.code == 2 and err.count("\n") == 1, err
    return err.strip()


def test_manifest_of_seg_label_and_mask_stores_what_nifti_gives(
    source, t2w, prostatex_case_dir, tmp_path, capfd
):
    """`focalnet preprocess --layout manifest` with a SEG label (a folder holding the SEG beside
    the T2w slices) and a SEG gland mask stores the label arrays and crop of the NIfTI ones; so
    does one SEG of the lesions and the gland given as both (its Prostate segment, category
    Anatomical Structure, no lesion: refused before as an unknown segment label, and the one
    file as 'label and prostate mask are the same file')."""
    lesions = [  # ISUP 3 over the ProstateX finding (T2w frame 10 of 19), csPCa elsewhere
        ("ISUP 3", _box(source, 9, slice(190, 200), slice(225, 240)), LESION),
        ("csPCa", _box(source, 8, slice(170, 178), slice(180, 190)), LESION),
    ]
    gland = _box(source, 8, slice(150, 230), slice(150, 250))
    gland |= _box(source, 9, slice(150, 230), slice(150, 250))
    exam = tmp_path / "exam"
    shutil.copytree(prostatex_case_dir / "t2w", exam / "label")  # the SEG among its source
    _seg(exam / "label" / "seg.dcm", source, lesions)
    _seg(exam / "gland.dcm", source, [("Prostate", gland, PROSTATE)])
    _seg(exam / "both.dcm", source, [*lesions, ("Prostate", gland, PROSTATE)])
    for name, frames in (("label", lesions[0][1] * 3 + lesions[1][1]), ("gland", gland)):
        image = sitk.GetImageFromArray(_on_t2w(source, t2w, frames.astype(np.uint8)))
        image.CopyInformation(t2w)
        sitk.WriteImage(image, str(exam / f"{name}.nii.gz"))
    t2w_folder = prostatex_case_dir / "t2w"
    rows = {
        "seg": f"px,p,{t2w_folder},{exam / 'label'},{exam / 'gland.dcm'}",
        "nifti": f"px,p,{t2w_folder},{exam / 'label.nii.gz'},{exam / 'gland.nii.gz'}",
        "both": f"px,p,{t2w_folder},{exam / 'both.dcm'},{exam / 'both.dcm'}",
    }
    stores = {}
    for name, row in rows.items():
        manifest = tmp_path / f"{name}.csv"
        manifest.write_text(f"case_id,patient_id,t2w,label,prostate_mask\n{row}\n")
        stores[name] = tmp_path / f"store_{name}"
        argv = ["preprocess", "--layout", "manifest", "--manifest", str(manifest)]
        argv += ["--components", "t2w", "--out", str(stores[name])]
        if name == "seg":  # a manifest's labels are ISUP maps: csPCa has no value there
            assert _user_error(capfd, argv) == (
                f"focalnet preprocess: error: case 'px', file '{exam / 'label' / 'seg.dcm'}': "
                "segment 2 'csPCa': no value under --label-values isup (1 = ISUP 1, GS 3+3; a "
                "manifest's default) for csPCa of unknown grade: give the segment its grade, or "
                "pass --label-values picai"
            )
        assert main([*argv, "--label-values", "picai"]) == 0
    seg, nifti, both = (open_store(stores[n]) for n in ("seg", "nifti", "both"))
    for array in ("classes", "grade_known", "annotated", "slice_index", "lesions"):
        np.testing.assert_array_equal(getattr(both, array), getattr(seg, array))
    np.testing.assert_allclose(both.case("px")["center"], seg.case("px")["center"], atol=1e-9)
    for array in ("classes", "grade_known", "annotated", "slice_index"):
        np.testing.assert_array_equal(getattr(seg, array), getattr(nifti, array))
    assert sorted(np.unique(seg.classes).tolist()) == [0, 2, 3]  # csPCa: class 2, grade unknown
    assert (seg.classes == 3).sum() == 96 and seg.grade_known.min() == 0
    # The same lesions, numbered in the raster order of each source array (the SEG's frames run
    # the other way along the slice axis): instance 1 of one is instance 2 of the other.
    np.testing.assert_array_equal(seg.lesions, np.array([0, 2, 1])[nifti.lesions])
    record, expected = seg.case("px"), nifti.case("px")
    assert record["lesion_classes"] == expected["lesion_classes"][::-1] == [2, 3]
    assert record["center_source"] == "mask"
    np.testing.assert_allclose(record["center"], expected["center"], atol=1e-4)


def test_picai_layout_takes_seg_labels_and_masks_as_it_takes_nifti_ones(
    source, t2w, prostatex_case_dir, tmp_path
):
    """`focalnet preprocess --layout picai` finds `<labels>/<case>.dcm` and `<masks>/<case>.dcm`
    (DICOM SEGs) as it finds `<case>.nii.gz`, and stores the same classes and crop centre."""
    lesion = _box(source, 9, slice(190, 200), slice(225, 240))  # over the ProstateX finding
    gland = _box(source, 9, slice(150, 230), slice(150, 250))
    images = tmp_path / "images" / "px"
    images.mkdir(parents=True)
    sitk.WriteImage(t2w, str(images / "px_s1_t2w.mha"))
    for kind in ("seg", "nifti"):
        for folder in ("labels", "masks"):
            (tmp_path / f"{folder}_{kind}").mkdir()
    _seg(tmp_path / "labels_seg" / "px_s1.dcm", source, [("ISUP 3", lesion, LESION)])
    _seg(tmp_path / "masks_seg" / "px_s1.dcm", source, [("Prostate", gland, PROSTATE)])
    for folder, frames, value in (("labels", lesion, 3), ("masks", gland, 1)):
        image = sitk.GetImageFromArray(_on_t2w(source, t2w, frames.astype(np.uint8) * value))
        image.CopyInformation(t2w)
        sitk.WriteImage(image, str(tmp_path / f"{folder}_nifti" / "px_s1.nii.gz"))
    stores = {}
    for kind in ("seg", "nifti"):
        stores[kind] = tmp_path / f"store_{kind}"
        argv = ["preprocess", "--layout", "picai", "--images", str(tmp_path / "images")]
        argv += ["--labels", str(tmp_path / f"labels_{kind}")]
        argv += ["--masks", str(tmp_path / f"masks_{kind}")]
        assert main([*argv, "--components", "t2w", "--out", str(stores[kind])]) == 0
    seg, nifti = open_store(stores["seg"]), open_store(stores["nifti"])
    for array in ("classes", "grade_known", "annotated", "slice_index", "lesions"):
        np.testing.assert_array_equal(getattr(seg, array), getattr(nifti, array))
    assert sorted(np.unique(seg.classes).tolist()) == [0, 3] and (seg.classes == 3).sum() > 50
    record, expected = seg.case("px_s1"), nifti.case("px_s1")
    assert record["center_source"] == expected["center_source"] == "mask"
    np.testing.assert_allclose(record["center"], expected["center"], atol=1e-4)
    assert record["files"]["label"].endswith("px_s1.dcm")


def test_a_seg_label_of_another_frame_of_reference_is_refused(source, prostatex_case_dir, tmp_path):
    from focalnet_jax.data.preprocess import preprocess_case

    lesion = _box(source, 9, slice(180, 190), slice(180, 190))
    file = _seg(tmp_path / "l.dcm", source, [("ISUP 3", lesion, LESION)])
    seg = pydicom.dcmread(file)
    seg.FrameOfReferenceUID = "1.2.3.4.5"
    seg.save_as(file)
    components = {"t2w": prostatex_case_dir / "t2w", "adc": prostatex_case_dir / "adc"}
    message = _error(lambda: preprocess_case(components, label=file, case_id="px"))
    assert message.startswith(
        f"case 'px', file '{file}': label is in DICOM frame of reference 1.2.3.4.5, the T2w in "
        f"{source[0].FrameOfReferenceUID}: their positions are not comparable"
    )
