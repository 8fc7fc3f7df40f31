"""`focalnet predict --dicom`: `detections_seg.dcm`, the detection map's candidates as a DICOM SEG
on the T2w source frames of the real ProstateX exam (single-frame slices, and the same series as one
enhanced multi-frame file), read back with highdicom; an image-file T2w refused in one line (one
exam) or as a bad case (many), as are a T2w without the patient attributes the outputs copy and
frames off the maps' grid (naming their file); a resumed batch keeps writing SEGs; a lesion-only
model's outputs are labelled P(lesion); dicom3tools' `dciodvfy` finds no error in either file.
Scores are made by hand
(Gaussians at known LPS points) and go through the real preprocessing and output writers."""

from __future__ import annotations

import csv
import json
import logging
import os
import warnings

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from cli_calls import cli_error, run_cli
from dicom_checks import hand_made_scores, t2w_copy, validator_errors
from pydicom.pixels import apply_windowing

from focalnet_jax.data import preprocess_case
from focalnet_jax.data.image_writing import write_image
from focalnet_jax.data.io import CaseError
from focalnet_jax.data.layouts import CaseSpec
from focalnet_jax.errors import UserError
from focalnet_jax.evaluation.batch_predict import predict_cases
from focalnet_jax.evaluation.dicom_output import (
    SCORE_MAP_FILE,
    SEG_FILE,
    dicom_sources,
    segment_label,
    write_dicom_outputs,
)
from focalnet_jax.evaluation.predict import write_exam_outputs


@pytest.fixture(scope="module")
def exam(prostatex_case_dir):
    return {n: str(prostatex_case_dir / n) for n in ("t2w", "adc", "hbv")}


@pytest.fixture(scope="module")
def t2w_slices(exam):
    """{SOPInstanceUID: T2w slice index k} of the T2w files, and their SeriesInstanceUID."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(exam["t2w"])
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return {h.SOPInstanceUID: k for k, h in enumerate(headers)}, headers[0].SeriesInstanceUID


@pytest.fixture(scope="module")
def written(exam, tmp_path_factory):
    """The output folder of the hand-made scores with the T2w's DICOM sources."""
    out = tmp_path_factory.mktemp("exam")
    case = preprocess_case(exam, case_id="px")
    sources = dicom_sources("px", exam["t2w"])
    write_exam_outputs(case, hand_made_scores(case), out, threshold=0.3, dicom_sources=sources)
    return out


def _blobs(out) -> tuple[np.ndarray, list[float]]:
    """The detection map [k, j, i] read back, and its candidates' values, highest first."""
    detection = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "detection_map.nii.gz")))
    return detection, sorted(np.unique(detection[detection > 0]).tolist(), reverse=True)


def test_seg_segments_are_the_detection_map_blobs_on_the_t2w_frames(written, t2w_slices):
    seg = hd.seg.segread(written / SEG_FILE)
    detection, values = _blobs(written)
    assert len(values) == 2  # one blob per Gaussian, each of one value
    assert seg.SegmentationType == "BINARY" and seg.get_segment_numbers() == [1, 2]
    uids, series_uid = t2w_slices
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    referenced = {
        item.ReferencedSOPInstanceUID
        for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == set(uids)  # every T2w slice, none other
    for number, value in enumerate(values, 1):
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(uids),
            segment_numbers=[number],
            ignore_spatial_locations=False,
            assert_missing_frames_are_empty=True,
        )[..., 0]
        expected = np.stack([detection[k] == value for k in uids.values()])
        assert pixels.sum() == expected.sum() > 100
        np.testing.assert_array_equal(pixels.astype(bool), expected)


def test_seg_labels_give_ids_likelihoods_csv_rows_and_algorithm(written):
    seg = hd.seg.segread(written / SEG_FILE)
    detection, values = _blobs(written)
    with (written / "detections.csv").open() as f:
        rows = list(csv.DictReader(f))
    for number, value in enumerate(values, 1):
        inside = [
            r["detection"]
            for r in rows
            if detection[int(r["t2w_k"]), int(r["t2w_j"]), int(r["t2w_i"])] == value
        ]
        assert inside  # both Gaussians peak above the 0.3 threshold
        description = seg.get_segment_description(number)
        assert (
            description.segment_label == f"lesion {number} (p={value:.2f}) csv {','.join(inside)}"
        )
        assert description.segmented_property_type.value == "108369006"  # SCT Neoplasm
        assert description.segmented_property_category.value == "49755003"
        algorithm = description.algorithm_identification[0]
        assert algorithm.AlgorithmName == "focalnet_jax" and algorithm.AlgorithmVersion == "0.1.0"
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    many = segment_label(12, 0.5, [str(n) for n in range(1, 40)])  # cut to the 64 of LO
    assert len(many) <= 64 and many.startswith("lesion 12 (p=0.50) csv 1,2,") and " +" in many
    cspca = sitk.GetArrayFromImage(sitk.ReadImage(str(written / "cspca_score.nii.gz")))
    assert values[0] == cspca.max() > 0.5  # the peak csPCa score on the T2w grid


def test_score_map_is_the_cspca_map_on_every_t2w_frame(written, t2w_slices):
    pm = pydicom.dcmread(written / SCORE_MAP_FILE)
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    uids, series_uid = t2w_slices
    assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    cspca = sitk.GetArrayFromImage(sitk.ReadImage(str(written / "cspca_score.nii.gz")))
    values = pm.pixel_array  # float32 [frames, rows, columns]
    frames = pm.PerFrameFunctionalGroupsSequence
    assert values.dtype == np.float32 and len(frames) == len(uids) == len(cspca)
    for frame, value in zip(frames, values, strict=True):
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        np.testing.assert_array_equal(value, cspca[uids[source.ReferencedSOPInstanceUID]])
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert (
        mapping.LUTLabel == "csPCa"
        and mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == "111047"
    )
    # The window a viewer applies is a grey ramp over 0..1: under the default LINEAR function
    # (PS3.3 C.11.2.1.2.1, for integers) centre 0.5 / width 1 drew every score above 0 white.
    voi = pm.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    window = pydicom.Dataset()
    window.update(voi)
    window.PhotometricInterpretation, window.BitsStored, window.PixelRepresentation = (
        "MONOCHROME2", 8, 0,
    )  # fmt: skip
    probe = np.array([0.0, 0.01, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(apply_windowing(probe, window), 255 * probe)


@pytest.mark.parametrize(
    "name, iod", [(SEG_FILE, "Segmentation"), (SCORE_MAP_FILE, "ParametricMap")]
)
def test_outputs_pass_the_dicom_validator(written, name, iod):
    assert validator_errors(written / name, iod) == []


def test_seg_on_an_enhanced_multiframe_t2w_follows_its_frames(written, exam, tmp_path):
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(exam["t2w"])
    singles = [pydicom.dcmread(f) for f in files]
    with warnings.catch_warnings():  # its patient name has one component
        warnings.simplefilter("ignore", UserWarning)
        enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(singles, hd.UID(), 501, hd.UID(), 1)
    (tmp_path / "t2w").mkdir()
    enhanced.save_as(tmp_path / "t2w" / "t2w.dcm")
    sources = dicom_sources("px", tmp_path / "t2w")
    assert len(sources) == 1 and int(sources[0].NumberOfFrames) == len(singles)
    # The T2w slice k of each frame, by its position: the frames run head first, opposite to k.
    t2w = sitk.ReadImage(files)
    order = [
        t2w.TransformPhysicalPointToIndex(
            tuple(map(float, f.PlanePositionSequence[0].ImagePositionPatient))
        )[2]
        for f in sources[0].PerFrameFunctionalGroupsSequence
    ]
    assert order == list(range(len(singles)))[::-1]
    maps = {
        n: sitk.ReadImage(str(written / f"{n}.nii.gz")) for n in ("cspca_score", "detection_map")
    }
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "detections.csv").write_text((written / "detections.csv").read_text())
    files = write_dicom_outputs(tmp_path / "out", maps, sources, "px")
    assert [f.name for f in files] == [SCORE_MAP_FILE, SEG_FILE]
    assert validator_errors(files[0], "ParametricMap") == []
    assert validator_errors(files[1], "Segmentation") == []
    seg = hd.seg.segread(files[1])
    detection, values = _blobs(written)
    frames = list(range(1, len(singles) + 1))
    for number, value in enumerate(values, 1):
        pixels = seg.get_pixels_by_source_frame(
            sources[0].SOPInstanceUID,
            frames,
            segment_numbers=[number],
            assert_missing_frames_are_empty=True,
        )[..., 0]
        expected = np.stack([detection[k] == value for k in order])
        assert pixels.sum() == expected.sum() > 100
        np.testing.assert_array_equal(pixels.astype(bool), expected)


def test_no_candidate_writes_no_seg(exam, tmp_path, caplog):
    case = preprocess_case(exam, case_id="px")
    sources = dicom_sources("px", exam["t2w"])
    with caplog.at_level(logging.WARNING):  # printed by `focalnet predict` (INFO was not)
        written = write_exam_outputs(
            case, np.zeros((*case.images.shape[:3], 5), np.float32), tmp_path, dicom_sources=sources
        )
    assert not (tmp_path / SEG_FILE).exists() and (tmp_path / SCORE_MAP_FILE) in written
    assert "px: no lesion candidate, detections_seg.dcm not written" in caplog.text


def test_dicom_with_an_image_file_t2w_is_one_line(tmp_path):
    t2w = tmp_path / "t2w.nii.gz"
    write_image(sitk.Image(8, 8, 4, sitk.sitkFloat32), t2w)
    message = cli_error(["predict", "--checkpoint", tmp_path / "no-run", "--t2w", t2w, "--adc", t2w,
                         "--out", tmp_path / "out", "--dicom"])  # fmt: skip
    assert message == (
        f"focalnet predict: error: --dicom: --t2w {t2w} is an image file, not a DICOM series "
        "folder, so there is no DICOM source for detections_seg.dcm to reference; give the T2w "
        "DICOM folder"
    )


class _Scorer:
    """Stands in for an `Ensemble` of t2w, adc, hbv: the hand-made Gaussian scores of the exam,
    whatever the images; one batch a case (its slices), so each case is written before the next
    is read."""

    components = ("t2w", "adc", "hbv")
    preprocess = input_preprocess = inference_configs = None
    output_encoding = "ordinal"

    def __init__(self, scores: np.ndarray):
        self.scores, self.batch_size = scores, len(scores)

    def describe(self) -> dict:
        return {"models": [{"run": "hand-made", "step": 0}], "tta": "none"}

    def __call__(self, images: np.ndarray) -> np.ndarray:
        assert len(images) == len(self.scores)
        return self.scores


def test_batch_resume_writes_the_seg_of_every_case(exam, tmp_path):
    scorer = _Scorer(hand_made_scores(preprocess_case(exam, case_id="px")))
    nifti = tmp_path / "t2w.nii.gz"
    write_image(sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(exam["t2w"])), nifti)
    good = CaseSpec("a", "p", dict(exam))
    bad = CaseSpec("b", "p", {**exam, "t2w": str(nifti)})
    out = tmp_path / "out"
    with pytest.raises(CaseError, match="'b'.*--dicom: the T2w is an image file"):
        predict_cases(scorer, [good, bad], out, dicom=True, progress=False)
    partial = tmp_path / "out.partial"
    assert (partial / "a" / SEG_FILE).is_file() and not (partial / "b").exists()
    assert json.loads((partial / "models.json").read_text())["dicom"] is True
    fixed = CaseSpec("b", "p", dict(exam))
    with pytest.raises(UserError, match="dicom: true in the partial, null now"):
        predict_cases(scorer, [good, fixed], out, resume=True, progress=False)
    summary = predict_cases(scorer, [good, fixed], out, resume=True, dicom=True, progress=False)
    assert summary.kept == 1 and summary.written == ["a", "b"]
    for case in "ab":
        assert hd.seg.segread(out / case / SEG_FILE).get_segment_numbers() == [1, 2]
        assert (out / case / SCORE_MAP_FILE).is_file()
    # --skip-bad-cases: the image-file T2w is listed in errors.csv with its reason.
    summary = predict_cases(
        scorer, [good, bad], tmp_path / "skip", dicom=True, skip_bad_cases=True, progress=False
    )
    assert [e[0] for e in summary.errors] == ["b"] and "--dicom" in summary.errors[0][2]


def test_one_exam_cli_writes_the_seg_and_rewrites_its_folder(exam, tmp_path, monkeypatch):
    from focalnet_jax.evaluation import predict, predict_command

    scorer = _Scorer(hand_made_scores(preprocess_case(exam, case_id="px")))
    for module in (predict, predict_command):
        monkeypatch.setattr(module, "load_ensemble", lambda *args, **kwargs: scorer)
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", tmp_path / "run", "--t2w", exam["t2w"], "--adc",
            exam["adc"], "--hbv", exam["hbv"], "--out", out, "--threshold", "0.3",
            "--dicom"]  # fmt: skip
    for _ in range(2):  # again into the folder holding the SEG: replaced, not refused
        printed = run_cli(argv)
        assert str(out / SEG_FILE) in printed and str(out / SCORE_MAP_FILE) in printed
        seg = hd.seg.segread(out / SEG_FILE)
        detection, values = _blobs(out)
        assert seg.get_segment_numbers() == [1, 2] and len(values) == 2
        assert seg.get_segment_description(1).segment_label.startswith(
            f"lesion 1 (p={values[0]:.2f})"
        )


def test_a_t2w_without_the_attributes_the_outputs_copy_is_refused_before_inference(exam, tmp_path):
    """An anonymiser that deletes PatientID or StudyDate (Type 2) left a traceback from highdicom
    after inference; the sources are now refused as they are read, naming the file."""

    def anonymise(k, header):
        del header.PatientID, header.StudyDate

    files = t2w_copy(exam, tmp_path / "t2w", anonymise)
    with pytest.raises(CaseError) as refused:
        dicom_sources("px", tmp_path / "t2w")
    assert (refused.value.case, refused.value.file) == ("px", files[0])
    assert refused.value.reason == (
        "--dicom: the T2w lacks PatientID, StudyDate, which score_map.dcm and detections_seg.dcm "
        "copy from it (Type 2: present, possibly empty)"
    )


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("PatientSex", "U", "PatientSex 'U' is not M, F, O or empty"),
        ("PatientBirthDate", "00000000", "PatientBirthDate '00000000' is not a DICOM DA value"),
        ("StudyDate", "2011.07.07", "StudyDate '2011.07.07' is not a DICOM DA value"),
        ("StudyTime", "11:47:31", "StudyTime '11:47:31' is not a DICOM TM value"),
        ("FrameOfReferenceUID", None, "FrameOfReferenceUID is missing or empty"),
    ],
)
def test_t2w_header_values_the_writer_refuses_are_a_bad_case_before_inference(
    exam, tmp_path, name, value, problem
):
    """Values common in anonymised exports (sex U, a zero birth date, a time with colons, no
    frame of reference) passed `dicom_sources`; highdicom raised a ValueError traceback after
    inference, and `--skip-bad-cases` stopped the batch instead of skipping the case."""

    def edit(k, header):
        if value is None:
            delattr(header, name)
        else:
            setattr(header, name, value)

    with warnings.catch_warnings():  # pydicom warns of the invalid value it is given
        warnings.simplefilter("ignore")
        files = t2w_copy(exam, tmp_path / "t2w", edit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the check says why in its line, without a warning
        with pytest.raises(CaseError) as refused:
            dicom_sources("px", tmp_path / "t2w")
    assert (refused.value.case, refused.value.file) == ("px", files[0])
    assert refused.value.reason.startswith(f"--dicom: the T2w's {problem}")
    if name == "PatientSex":  # the writer itself, should a value pass: a bad case, not a crash
        case = preprocess_case(exam, case_id="px")
        sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        with pytest.raises(CaseError) as written:
            write_exam_outputs(
                case, hand_made_scores(case), tmp_path / "o", threshold=0.3, dicom_sources=sources
            )
        assert written.value.reason.startswith("--dicom: the DICOM writer refused the T2w: ")


def test_a_t2w_slice_of_another_study_is_a_bad_case_before_inference(exam, tmp_path):
    """The series reader takes a slice whose StudyInstanceUID differs (it compares frames of
    reference, not studies); highdicom then refused the sources after inference, naming the
    first file and "must all be part of the same series ..."."""

    def other_study(k, header):
        if k == 5:
            header.StudyInstanceUID = "1.2.3.4"

    files = t2w_copy(exam, tmp_path / "t2w", other_study)
    with pytest.raises(CaseError) as refused:
        dicom_sources("px", tmp_path / "t2w")
    first = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    assert (refused.value.case, refused.value.file) == ("px", files[5])
    assert refused.value.reason == (
        f"--dicom: its StudyInstanceUID '1.2.3.4' differs from {os.path.basename(files[0])}'s "
        f"{first!r}; score_map.dcm and detections_seg.dcm reference the slices of one series "
        "of one study (fix the header, or predict without --dicom)"
    )


@pytest.fixture(scope="module")
def shifted(exam, tmp_path_factory):
    """The T2w series with its 10th file moved 0.04 mm along its rows: the reader takes it (the
    series' in-plane drift is within its tolerance), the T2w grid of the maps is off by 0.08
    voxels there (over `GRID_TOLERANCE`). Its files, in the series' order."""

    def move(k, header):
        if k == 9:
            row = np.asarray(header.ImageOrientationPatient[:3], float)
            moved = np.asarray(header.ImagePositionPatient, float) + 0.04 * row
            header.ImagePositionPatient = [float(v) for v in moved]

    return t2w_copy(exam, tmp_path_factory.mktemp("shifted") / "t2w", move)


def test_frames_off_the_maps_grid_name_the_file_of_the_frame(exam, shifted, tmp_path):
    """The error named the series' first file whichever frame was off the grid. Given the grid,
    the sources are refused as they are read (before inference), as they are when written."""
    case = preprocess_case(exam, case_id="px")
    sources = dicom_sources("px", os.path.dirname(shifted[0]))
    with pytest.raises(CaseError) as refused:
        write_exam_outputs(
            case, hand_made_scores(case), tmp_path, threshold=0.3, dicom_sources=sources
        )
    with pytest.raises(CaseError) as read:
        dicom_sources("px", os.path.dirname(shifted[0]), grid=case.geometry.t2w_reference_image())
    for error in (refused.value, read.value):
        assert (error.case, error.file) == ("px", shifted[9])
        assert error.reason.startswith("--dicom: source frame 10 does not lie on the T2w grid")


def test_a_t2w_of_cosines_written_to_3_decimals_writes_its_seg_on_the_grid(exam, tmp_path):
    """ITK makes such cosines orthonormal as it reads the series: the maps were written, then
    `--dicom` refused every frame as off the grid (0.155 voxels at the far edge, from the cosines
    as written), after inference."""

    def round_cosines(k, header):
        header.ImageOrientationPatient = [f"{float(v):.3f}" for v in header.ImageOrientationPatient]

    files = t2w_copy(exam, tmp_path / "t2w", round_cosines)
    case = preprocess_case({**exam, "t2w": str(tmp_path / "t2w")}, case_id="px")
    out = tmp_path / "out"
    sources = dicom_sources("px", str(tmp_path / "t2w"))
    write_exam_outputs(case, hand_made_scores(case), out, threshold=0.3, dicom_sources=sources)
    seg, (detection, values) = hd.seg.segread(out / SEG_FILE), _blobs(out)
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    for number, value in enumerate(values, 1):
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=[number], ignore_spatial_locations=True
        )[..., 0]
        np.testing.assert_array_equal(pixels.astype(bool), detection == value)


def test_a_t2w_without_the_dicom_file_header_writes_its_outputs(exam, tmp_path):
    """Slices without the 128-byte preamble and file meta (older exports) are read by the series
    reader, then `--dicom` ended in pydicom's InvalidDicomError traceback after inference (in a
    batch: a bad case without its file, 'Use force=True to force reading')."""

    files = t2w_copy(exam, tmp_path / "t2w", lambda k, header: None)
    for file in files:
        dataset = pydicom.dcmread(file)
        dataset.preamble = None
        del dataset.file_meta
        dataset.save_as(file, implicit_vr=False, little_endian=True)
    with open(files[0], "rb") as f:
        assert b"DICM" not in f.read(200)
    case = preprocess_case({**exam, "t2w": str(tmp_path / "t2w")}, case_id="px")
    out = tmp_path / "out"
    sources = dicom_sources("px", str(tmp_path / "t2w"))
    write_exam_outputs(case, hand_made_scores(case), out, threshold=0.3, dicom_sources=sources)
    seg = hd.seg.segread(out / SEG_FILE)
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    score_map = pydicom.dcmread(out / SCORE_MAP_FILE)
    assert score_map.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID


def test_batch_skips_a_case_whose_outputs_fail_and_a_run_of_none_keeps_out(exam, shifted, tmp_path):
    """--skip-bad-cases skipped cases that failed as they were read, but a case refused as its
    DICOM outputs were written stopped the run; and a run that predicted no case replaced the
    complete `out` of an earlier run with its empty partial."""
    scorer = _Scorer(hand_made_scores(preprocess_case(exam, case_id="px")))
    good = CaseSpec("a", "p", dict(exam))
    off_grid = CaseSpec("b", "p", {**exam, "t2w": os.path.dirname(shifted[0])})
    out = tmp_path / "out"
    summary = predict_cases(
        scorer, [good, off_grid], out, dicom=True, skip_bad_cases=True, progress=False
    )
    assert summary.written == ["a"] and [e[:2] for e in summary.errors] == [("b", shifted[9])]
    with open(out / "errors.csv", newline="") as f:
        assert [row["case"] for row in csv.DictReader(f)] == ["b"]
    assert (out / "a" / SEG_FILE).is_file() and not (out / "b").exists()
    # Again with only a bad case, over `out`: refused, and `out` keeps the earlier run's case.
    nifti = tmp_path / "t2w.nii.gz"
    write_image(sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(exam["t2w"])), nifti)
    image_file = CaseSpec("c", "p", {**exam, "t2w": str(nifti)})
    with pytest.raises(UserError, match=r"no case predicted \(1 case failed\); see .*errors.csv"):
        predict_cases(
            scorer, [image_file], out, dicom=True, skip_bad_cases=True, overwrite=True,
            progress=False,
        )  # fmt: skip
    assert (out / "a" / SEG_FILE).is_file()


def test_dicom_outputs_of_a_lesion_model_say_lesion_not_cspca(exam, tmp_path):
    """A model of lesion against no lesion (output encoding 'binary') wrote its P(lesion) as
    'csPCa', 'P(GS >= 3+4)' into score_map.dcm and the SEG: labels that travel into a PACS."""
    case = preprocess_case(exam, case_id="px")
    sources = dicom_sources("px", exam["t2w"])
    write_exam_outputs(
        case, hand_made_scores(case), tmp_path, grades=False, threshold=0.3, dicom_sources=sources
    )
    pm = pydicom.dcmread(tmp_path / SCORE_MAP_FILE)
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert (mapping.LUTLabel, mapping.LUTExplanation) == (
        "lesion",
        "P(lesion), no grade, focalnet_jax",
    )
    assert pm.ContentDescription == "focalnet_jax lesion score P(lesion), no grade"
    assert pm.ContentLabel == "LESION" and pm.SeriesDescription == "focalnet_jax lesion score"
    seg = pydicom.dcmread(tmp_path / SEG_FILE, stop_before_pixels=True)
    assert seg.ContentDescription == "focalnet_jax lesion candidates, no grade"
