"""DICOM Segmentation (SEG) objects as lesion labels and whole-gland masks: SEGs made with
highdicom on the real ProstateX-0000 T2w series (../shared/data/prostatex; 19 frames of 384 x 384
pixels, 0.5 mm, 3 mm apart) read at the scanner coordinates of their source pixels, with the label
values of their segment labels."""

from __future__ import annotations

import dicom_segs
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_segs import BLADDER, LESION, PROSTATE, frame_box, on_t2w, world, write_seg
from pydicom.sr.codedict import codes

from focalnet_jax.data import io

source = dicom_segs.source  # a module-scoped fixture
t2w = dicom_segs.t2w  # a module-scoped fixture


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
    segments = [(label, frame_box(source, *box), LESION) for label, box in boxes.items()]
    label = io.read_label(write_seg(tmp_path / "l.dcm", source, segments), label_values="picai")
    values = {"ISUP 2": 2, " gleason 4+3 ": 3, "GS 3+4": 2, "ISUP 4": 4, "Gleason 5+4": 5}
    expected = np.zeros(np.shape(segments[0][1]), np.uint8)
    for text, mask, _ in segments:
        expected = np.maximum(expected, mask * values.get(text, 1))
    # 'ISUP 4' (400 pixels) takes 100 of 'GS 3+4''s 400 pixels, which keeps 300 at 2.
    assert (expected == 4).sum() == 400 and (expected[segments[2][1]] == 2).sum() == 300
    # On the T2w series grid by scanner coordinates: every voxel where the source pixels are.
    np.testing.assert_array_equal(_resampled(label, t2w), on_t2w(source, t2w, expected))
    # A known pixel: source frame 8, row 215, column 195 (both segments) at its LPS position.
    point = world(source, 8, 215, 195)
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
    segments = [(text, frame_box(source, *box), LESION) for text, box in boxes]
    labelmap = write_seg(tmp_path / "map.dcm", source, segments, labelmap=True)
    assert pydicom.dcmread(labelmap).SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    binary = write_seg(tmp_path / "binary.dcm", source, segments)
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
        (text, frame_box(source, frame, slice(100, 104), slice(100, 104)), LESION)
        for text, frame in boxes.items()
    ]
    label = io.read_label(write_seg(tmp_path / "l.dcm", source, segments), label_values="isup")
    found = {
        text: label[label.TransformPhysicalPointToIndex(tuple(world(source, f, 101, 102)))]
        for text, f in boxes.items()
    }
    assert found == {"isup 1": 1, "GS 3+3": 1, "Gleason 3+5": 4, "GS 5+5": 5, "ISUP 5": 5}
    assert np.bincount(sitk.GetArrayViewFromImage(label).ravel()).tolist()[1:] == [32, 0, 0, 16, 32]


def test_sparse_seg_keeps_its_frames_at_their_positions(source, t2w, tmp_path):
    # Frames 3, 4 and 9 only (5..8 left out, as highdicom and dcmqi write them): 5..8 background.
    mask = frame_box(source, 3, slice(100, 110), slice(120, 130))
    mask |= frame_box(source, 4, slice(102, 112), slice(120, 130))
    mask |= frame_box(source, 9, slice(90, 95), slice(140, 150))
    file = write_seg(tmp_path / "sparse.dcm", source, [("ISUP 3", mask, LESION)])
    assert pydicom.dcmread(file).NumberOfFrames == 3
    label = io.read_label(file, label_values="picai")
    # Frames 3..9 at 3 mm (SpacingBetweenSlices), one background slice on either side.
    assert label.GetSize() == (384, 384, 7 + 2)
    np.testing.assert_array_equal(_resampled(label, t2w), on_t2w(source, t2w, mask * 3))
    # One frame alone: read as three slices (no single-slice label), the T2w's neighbours empty.
    single = frame_box(source, 12, slice(100, 110), slice(120, 130))
    file = write_seg(tmp_path / "single.dcm", source, [("ISUP 5", single, LESION)])
    label = io.read_label(file, label_values="picai")
    assert label.GetSize() == (384, 384, 3)
    np.testing.assert_array_equal(_resampled(label, t2w), on_t2w(source, t2w, single * 5))


@pytest.mark.parametrize("segments", [1, 2])
def test_a_seg_of_one_slice_placed_once_for_all_frames_is_read(source, t2w, tmp_path, segments):
    # Its plane position in the shared functional group (all frames at one position), without
    # SpacingBetweenSlices: an AttributeError traceback, also under --skip-bad-cases.
    lesions = [
        ("ISUP 3", frame_box(source, 7, slice(100, 110), slice(120, 130)), LESION),
        ("ISUP 2", frame_box(source, 7, slice(150, 160), slice(120, 130)), LESION),
    ][:segments]
    file = write_seg(tmp_path / "one.dcm", source, lesions)
    dataset = pydicom.dcmread(file)
    shared = dataset.SharedFunctionalGroupsSequence[0]
    shared.PlanePositionSequence = dataset.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence
    for frame in dataset.PerFrameFunctionalGroupsSequence:
        del frame.PlanePositionSequence
    del shared.PixelMeasuresSequence[0].SpacingBetweenSlices
    dataset.save_as(file)
    label = io.read_label(file, case="px", label_values="picai")
    expected = sum(mask * (3 - k) for k, (_, mask, _) in enumerate(lesions))
    np.testing.assert_array_equal(_resampled(label, t2w), on_t2w(source, t2w, expected))


def test_fractional_segments_are_thresholded_at_half_their_maximum(source, t2w, tmp_path):
    fractions = np.zeros((len(source), 384, 384), np.float32)
    for frame, value in ((5, 0.3), (6, 0.45), (7, 0.55), (8, 1.0)):
        fractions[frame, 100:110, 100:110] = value
    file = write_seg(tmp_path / "f.dcm", source, [("ISUP 2", fractions, LESION)], fractional=True)
    label = io.read_label(file, label_values="picai")
    expected = (fractions >= 0.5).astype(np.uint8) * 2
    assert expected.sum() == 2 * 200  # frames 7 and 8
    np.testing.assert_array_equal(_resampled(label, t2w), on_t2w(source, t2w, expected))


def test_gland_mask_is_the_one_segment_or_the_prostate_segments(source, t2w, tmp_path):
    gland = frame_box(source, 9, slice(140, 220), slice(150, 230))
    gland |= frame_box(source, 10, slice(140, 220), slice(150, 230))
    bladder = frame_box(source, 14, slice(100, 140), slice(150, 230))
    lesion = frame_box(source, 9, slice(180, 190), slice(180, 190))
    one = io.read_mask(write_seg(tmp_path / "one.dcm", source, [("WG", gland, PROSTATE)]))
    np.testing.assert_array_equal(_resampled(one, t2w), on_t2w(source, t2w, gland))
    # Several: the one of property type Prostate and the one labelled 'gland', not the others.
    other = frame_box(source, 11, slice(140, 200), slice(150, 230))
    segments = [
        ("Bladder", bladder, BLADDER),
        ("Organ", gland, PROSTATE),
        ("ISUP 3", lesion, LESION),
        ("Central Gland", other, LESION),
    ]
    mask = io.read_mask(write_seg(tmp_path / "several.dcm", source, segments))
    np.testing.assert_array_equal(_resampled(mask, t2w), on_t2w(source, t2w, gland | other))


def test_anatomy_as_other_tools_code_it_is_left_out_and_a_graded_one_kept(source, t2w, tmp_path):
    """3D Slicer and dcmqi code Anatomical Structure as SCT 123037004, older files as SNOMED RT
    T-D000A; their gland segment was refused as an unknown lesion label. A segment of that
    category whose label gives a grade was dropped without a word: it is a lesion."""
    from pydicom.sr.coding import Code

    lesion = frame_box(source, 9, slice(180, 190), slice(180, 190))
    gland = frame_box(source, 9, slice(140, 220), slice(150, 230))
    slicer = (Code("123037004", "SCT", "Anatomical Structure"), codes.SCT.Prostate)
    older = (Code("T-D000A", "SRT", "Anatomical Structure"), Code("T-9200B", "SRT", "Prostate"))
    for name, kind in (("slicer", slicer), ("older", older)):
        file = write_seg(
            tmp_path / f"{name}.dcm", source, [("ISUP 3", lesion, LESION), ("WG", gland, kind)]
        )
        label = io.read_label(file, label_values="picai")
        np.testing.assert_array_equal(_resampled(label, t2w), on_t2w(source, t2w, lesion * 3))
        mask = io.read_mask(file)  # two segments: the gland by its property type
        np.testing.assert_array_equal(_resampled(mask, t2w), on_t2w(source, t2w, gland))
    graded = write_seg(tmp_path / "graded.dcm", source, [("ISUP 4", lesion, PROSTATE)])
    label = io.read_label(graded, label_values="picai")
    np.testing.assert_array_equal(_resampled(label, t2w), on_t2w(source, t2w, lesion * 4))
