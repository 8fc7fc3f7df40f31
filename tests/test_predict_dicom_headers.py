"""`focalnet predict --dicom` on T2w headers that state one grid in forms the DICOM writer
(highdicom) refused after inference or copied into non-conformant files: slice cosines that differ
by rounding, an enhanced multi-frame file whose pixel measures or orientation sit in every frame's
functional groups, an empty or absent SliceThickness, a character set of code extensions whose
first value is empty. Each now gives both outputs, which dicom3tools' `dciodvfy` passes; a header
the writer still refuses is refused as the sources are read, before inference."""

from __future__ import annotations

import warnings

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_checks import hand_made_scores, t2w_copy, validator_errors

from focalnet_jax.data import preprocess_case
from focalnet_jax.data.io import CaseError
from focalnet_jax.evaluation.dicom_output import SCORE_MAP_FILE, SEG_FILE, dicom_sources
from focalnet_jax.evaluation.predict import write_exam_outputs


@pytest.fixture(scope="module")
def exam(prostatex_case_dir):
    return {n: str(prostatex_case_dir / n) for n in ("t2w", "adc", "hbv")}


@pytest.fixture(scope="module")
def case(exam):
    return preprocess_case(exam, case_id="px")


def _written(case, t2w_folder, out):
    """Both outputs of the hand-made scores of `case` on the T2w series in `t2w_folder`, checked
    by dciodvfy; the SEG and the map read back."""
    sources = dicom_sources("px", t2w_folder, grid=case.geometry.t2w_reference_image())
    write_exam_outputs(case, hand_made_scores(case), out, threshold=0.3, dicom_sources=sources)
    assert validator_errors(out / SEG_FILE, "Segmentation") == []
    assert validator_errors(out / SCORE_MAP_FILE, "ParametricMap") == []
    return pydicom.dcmread(out / SEG_FILE), pydicom.dcmread(out / SCORE_MAP_FILE)


def _frame_values(image, group: str, keyword: str) -> list:
    """`keyword` of functional group `group` of every frame of `image` (shared or its own)."""
    shared = image.SharedFunctionalGroupsSequence[0]
    return [
        (frame if group in frame else shared)[group][0][keyword].value
        for frame in image.PerFrameFunctionalGroupsSequence
    ]


def test_slices_whose_cosines_differ_by_rounding_give_both_outputs(exam, case, tmp_path):
    """The reader takes cosines within 1e-3 as one orientation; highdicom wants them equal and
    refused after inference ("Source images must have a shared orientation")."""

    def nudge(k, header):
        if k % 2:
            cosines = [float(v) for v in header.ImageOrientationPatient]
            header.ImageOrientationPatient = [cosines[0] - 2e-4, *cosines[1:]]

    files = t2w_copy(exam, tmp_path / "t2w", nudge)
    first = [float(v) for v in pydicom.dcmread(files[0]).ImageOrientationPatient]
    assert first != [float(v) for v in pydicom.dcmread(files[1]).ImageOrientationPatient]
    seg, score_map = _written(case, tmp_path / "t2w", tmp_path / "out")
    for image in (seg, score_map):
        orientations = _frame_values(image, "PlaneOrientationSequence", "ImageOrientationPatient")
        np.testing.assert_allclose(
            np.array(orientations, float), [first] * len(orientations), atol=1e-9
        )


@pytest.mark.parametrize("group", ["PixelMeasuresSequence", "PlaneOrientationSequence"])
def test_an_enhanced_t2w_of_per_frame_measures_or_orientation_gives_both_outputs(
    exam, case, tmp_path, group
):
    """highdicom reads a multi-frame source's measures and orientation from its shared group
    only: it refused such a legal file after inference ("'Dataset' object has no attribute
    'PixelMeasuresSequence'", "Source images must have a shared orientation")."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(exam["t2w"])
    with warnings.catch_warnings():  # its patient name has one component
        warnings.simplefilter("ignore", UserWarning)
        enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
            [pydicom.dcmread(f) for f in files], hd.UID(), 501, hd.UID(), 1
        )
    shared = enhanced.SharedFunctionalGroupsSequence[0]
    for frame in enhanced.PerFrameFunctionalGroupsSequence:
        frame[group] = shared[group]
    del shared[group]
    (tmp_path / "t2w").mkdir()
    enhanced.save_as(tmp_path / "t2w" / "t2w.dcm")
    seg, score_map = _written(case, tmp_path / "t2w", tmp_path / "out")
    keyword = {"PixelMeasuresSequence": "PixelSpacing"}.get(group, "ImageOrientationPatient")
    expected = list(pydicom.dcmread(files[0])[keyword].value)
    for image in (seg, score_map):
        np.testing.assert_allclose(list(_frame_values(image, group, keyword)[0]), expected)


@pytest.mark.parametrize("thickness", ["", None])
def test_an_empty_or_absent_slice_thickness_gives_the_slice_spacing(
    exam, case, tmp_path, thickness
):
    """SliceThickness is Type 2 in an MR image (empty or, in exports, absent) but Type 1C in the
    outputs' pixel measures: an empty one gave a SEG that dciodvfy failed, an absent one a
    refusal after inference. The outputs state the spacing of the slices instead."""

    def edit(k, header):
        if thickness is None:
            del header.SliceThickness
        else:
            header.SliceThickness = thickness

    t2w_copy(exam, tmp_path / "t2w", edit)
    spacing = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(exam["t2w"]))
    for image in _written(case, tmp_path / "t2w", tmp_path / "out"):
        measures = _frame_values(image, "PixelMeasuresSequence", "SliceThickness")
        expected = [spacing.GetSpacing()[2]] * len(measures)
        assert [float(m) for m in measures] == pytest.approx(expected, abs=1e-4)


def test_a_character_set_whose_first_value_is_empty_gives_both_outputs(exam, case, tmp_path):
    """An empty first value is the default repertoire (PS3.3 C.12.1.1.2); highdicom refused it
    after inference ("'' is not a valid SpecificCharacterSetValues")."""
    name = "Yamada^Tarou=山田^太郎"

    def japanese(k, header):
        header.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        header.PatientName = name

    t2w_copy(exam, tmp_path / "t2w", japanese)
    for image in _written(case, tmp_path / "t2w", tmp_path / "out"):
        assert list(image.SpecificCharacterSet) == ["ISO 2022 IR 6", "ISO 2022 IR 87"]
        assert str(image.PatientName) == name


def test_a_header_the_writer_refuses_is_refused_before_inference(exam, tmp_path):
    """A value no check names (a Japanese character set without code extensions' first value)
    is refused as the sources are read, by the writer itself on blank maps, naming the file."""

    def japanese_alone(k, header):
        header.SpecificCharacterSet = "ISO 2022 IR 87"

    with warnings.catch_warnings():  # pydicom cannot encode the name so: it writes "?"
        warnings.simplefilter("ignore", UserWarning)
        files = t2w_copy(exam, tmp_path / "t2w", japanese_alone)
    with pytest.raises(CaseError) as refused:
        dicom_sources("px", tmp_path / "t2w")
    assert (refused.value.case, refused.value.file) == ("px", files[0])
    assert refused.value.reason == (
        "--dicom: the DICOM writer refused the T2w: Encodings with code extensions should not be "
        "used when only a single encoding is included."
    )
