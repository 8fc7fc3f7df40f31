"""DICOM SEGs refused as labels, masks or components in one line naming the case, the file and the
reason: unknown, ungraded or empty segments, anatomy alone, no slice spacing, frames of no regular
volume, a file cut short, a DICOM file that is no SEG, another frame of reference."""

from __future__ import annotations

import shutil
from pathlib import Path

import dicom_segs
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_segs import BLADDER, LESION, PROSTATE, frame_box, write_seg

from focalnet_jax.data import io
from focalnet_jax.errors import UserError

source = dicom_segs.source  # a module-scoped fixture


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
    mask = frame_box(source, 3, slice(100, 110), slice(120, 130))
    mask |= frame_box(source, 5, slice(100, 110), slice(120, 130))
    mask |= frame_box(source, 9, slice(100, 110), slice(120, 130))
    file = write_seg(tmp_path / "sparse.dcm", source, [("ISUP 3", mask, LESION)])
    assert _refusal_without_slice_spacing(file) == (
        f"case 'px', file '{file}': frames at 3 positions 6.00 to 12.00 mm apart along the slice "
        "normal and no SpacingBetweenSlices (0018,0088): the slice spacing is unknown; export the "
        "SEG with it (or with every frame)"
    )


def test_seg_of_two_positions_without_its_slice_spacing_is_refused(source, tmp_path):
    # Two one-frame lesions 12 mm apart (frames 4 and 8): highdicom took 12 mm as the slice
    # spacing, and the two lesions covered seven T2w slices, not two.
    lesions = [
        ("ISUP 3", frame_box(source, 4, slice(100, 110), slice(120, 130)), LESION),
        ("ISUP 2", frame_box(source, 8, slice(150, 160), slice(120, 130)), LESION),
    ]
    file = write_seg(tmp_path / "two.dcm", source, lesions)
    assert _refusal_without_slice_spacing(file) == (
        f"case 'px', file '{file}': frames at 2 positions 12.00 mm apart along the slice normal "
        "and no SpacingBetweenSlices (0018,0088): whether slices lie between them is unknown; "
        "export the SEG with it (or with every frame)"
    )


def _error(call) -> str:
    with pytest.raises(UserError) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_bad_segments_are_refused_naming_case_file_and_segment(source, tmp_path):
    lesion = frame_box(source, 9, slice(180, 190), slice(180, 190))
    unknown = write_seg(
        tmp_path / "u.dcm", source, [("ISUP 3", lesion, LESION), ("Lesion A", lesion, LESION)]
    )
    assert _error(lambda: io.read_label(unknown, case="px", label_values="picai")) == (
        f"case 'px', file '{unknown}': segment 2 'Lesion A': unknown segment label: expected "
        "'ISUP k' (k 1..5), 'GS a+b' or 'Gleason a+b' (a, b 3..5), 'csPCa'"
    )
    low = write_seg(tmp_path / "low.dcm", source, [("GS 3+3", lesion, LESION)])
    assert _error(lambda: io.read_label(low, case="px", label_values="picai")) == (
        f"case 'px', file '{low}': segment 1 'GS 3+3': no value under --label-values picai (1 = "
        "csPCa of unknown grade) for ISUP 1 (GS 3+3, no csPCa): pass --label-values isup, or "
        "leave the segment out"
    )
    organs = [("Bladder", lesion, BLADDER), ("Rectum", lesion, BLADDER)]
    mask = write_seg(tmp_path / "m.dcm", source, organs)
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
    lesion = frame_box(source, 9, slice(180, 190), slice(180, 190))
    empty = np.zeros_like(lesion)
    both = write_seg(
        tmp_path / "b.dcm", source, [("GS 4+3", lesion, LESION), ("ISUP 5", empty, LESION)]
    )
    assert _error(lambda: io.read_label(both, case="px", label_values="picai")) == (
        f"case 'px', file '{both}': segment 2 'ISUP 5' has no voxel (empty, or fractional values "
        "all below half their maximum): draw its lesion, or remove the segment"
    )
    faint = write_seg(
        tmp_path / "f.dcm", source, [("GS 4+3", lesion * 0.4, LESION)], fractional=True
    )
    message = _error(lambda: io.read_label(faint, case="px", label_values="picai"))
    assert message.startswith(f"case 'px', file '{faint}': segment 1 'GS 4+3' has no voxel")
    # An empty anatomy segment beside a drawn lesion is no lesion and stays left out.
    gland = write_seg(
        tmp_path / "g.dcm", source, [("GS 4+3", lesion, LESION), ("WG", empty, PROSTATE)]
    )
    assert sitk.GetArrayFromImage(io.read_label(gland, label_values="picai")).max() == 3


def test_a_seg_of_anatomy_alone_is_refused_as_a_label_unless_it_is_the_mask_too(source, tmp_path):
    """A gland SEG given as the label gave a case without lesions, without a word. Given as both
    label and gland mask (3D Slicer's export of a lesion-free case), it is that case."""
    gland = frame_box(source, 9, slice(140, 220), slice(150, 230))
    file = write_seg(tmp_path / "g.dcm", source, [("Prostate", gland, PROSTATE)])
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
    lesion = frame_box(source, 9, slice(180, 190), slice(180, 190))
    gland = frame_box(source, 9, slice(140, 220), slice(150, 230))
    file = write_seg(
        tmp_path / "c.dcm", source, [("csPCa", lesion, PROSTATE), ("WG", gland, PROSTATE)]
    )
    message = _error(lambda: io.read_label(file, case="px", label_values="isup"))
    assert message.startswith(f"case 'px', file '{file}': segment 1 'csPCa': no value under ")


def test_a_seg_file_cut_short_is_a_one_line_error(source, tmp_path):
    """A SEG cut short (an unfinished copy) ended preprocessing in an IndexError or struct.error
    traceback, also with --skip-bad-cases."""
    lesion = frame_box(source, 9, slice(180, 190), slice(180, 190))
    whole = write_seg(tmp_path / "whole.dcm", source, [("ISUP 3", lesion, LESION)]).read_bytes()
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
    file = write_seg(tmp_path / "s.dcm", source, [("ISUP 3", mask, LESION)])
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
    lesion = frame_box(source, 9, slice(180, 190), slice(180, 190))
    file = write_seg(folder / "s.dcm", source, [("ISUP 3", lesion, LESION)])
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


def test_a_seg_label_of_another_frame_of_reference_is_refused(source, prostatex_case_dir, tmp_path):
    from focalnet_jax.data.preprocess import preprocess_case

    lesion = frame_box(source, 9, slice(180, 190), slice(180, 190))
    file = write_seg(tmp_path / "l.dcm", source, [("ISUP 3", lesion, LESION)])
    seg = pydicom.dcmread(file)
    seg.FrameOfReferenceUID = "1.2.3.4.5"
    seg.save_as(file)
    components = {"t2w": prostatex_case_dir / "t2w", "adc": prostatex_case_dir / "adc"}
    message = _error(lambda: preprocess_case(components, label=file, case_id="px"))
    assert message.startswith(
        f"case 'px', file '{file}': label is in DICOM frame of reference 1.2.3.4.5, the T2w in "
        f"{source[0].FrameOfReferenceUID}: their positions are not comparable"
    )
