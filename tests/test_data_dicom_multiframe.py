"""Enhanced (multi-frame) DICOM (focalnet_jax/data/dicom_multiframe.py): the real ProstateX T2w
series converted to one Legacy Converted Enhanced MR file (highdicom) reads as the same image and
preprocesses to the same case; frames out of order, missing, of several volumes, with rescale values
of their own or without a position, and a multi-frame file inside a series of several files, are
refused in one line naming the file."""

from __future__ import annotations

import copy
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from focalnet_jax.data.dicom import SeriesError, read_series
from focalnet_jax.data.preprocess import preprocess_case

# The ProstateX-0000 finding (GS 4+3), LPS world coordinates (mm): ../shared/data/prostatex.
FINDING_MM = (25.7457, 31.8707, -38.511)


@pytest.fixture(scope="module")
def enhanced_exam(prostatex_case_dir, tmp_path_factory) -> dict[str, Path]:
    """Each series of the exam as one Legacy Converted Enhanced MR file, alone in its folder."""
    highdicom = pytest.importorskip("highdicom")
    root = tmp_path_factory.mktemp("enhanced")
    folders = {}
    for component in ("t2w", "adc", "hbv"):
        slices = [pydicom.dcmread(f) for f in sorted((prostatex_case_dir / component).iterdir())]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # its patient name has one component
            image = highdicom.legacy.LegacyConvertedEnhancedMRImage(
                slices,
                series_instance_uid=pydicom.uid.generate_uid(),
                series_number=100,
                sop_instance_uid=pydicom.uid.generate_uid(),
                instance_number=1,
            )
        folders[component] = root / component
        folders[component].mkdir()
        image.save_as(folders[component] / f"{component}.dcm")
    return folders


@pytest.fixture(scope="module")
def enhanced(enhanced_exam) -> Path:
    """The T2w series as one enhanced file, `t2w.dcm`."""
    return enhanced_exam["t2w"]


def _edited(enhanced: Path, tmp_path: Path, edit) -> Path:
    """A copy of the enhanced file in a folder of its own, `edit(dataset)` applied."""
    dataset = pydicom.dcmread(enhanced / "t2w.dcm")
    edit(dataset)
    folder = tmp_path / "edited"
    folder.mkdir()
    dataset.save_as(folder / "t2w.dcm")
    return folder


def _refusal(folder: Path) -> str:
    with pytest.raises(SeriesError) as raised:
        read_series(folder)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{folder / 't2w.dcm'}: multi-frame DICOM: ")
    return message


def test_enhanced_file_reads_as_the_classic_series(enhanced, prostatex_case_dir):
    classic = read_series(prostatex_case_dir / "t2w")
    frames = read_series(enhanced)
    assert frames.GetSize() == classic.GetSize() == (384, 384, 19)
    np.testing.assert_allclose(frames.GetSpacing(), classic.GetSpacing(), rtol=1e-6)
    # The frames are stored head to foot: the same voxels, the slice axis reversed, at the same
    # world positions (resampled onto the classic grid with nearest neighbour, every value equal).
    on_classic = sitk.Resample(frames, classic, sitk.Transform(), sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(on_classic), sitk.GetArrayFromImage(classic)
    )
    index = classic.TransformPhysicalPointToIndex(FINDING_MM)
    same = frames.TransformPhysicalPointToIndex(FINDING_MM)
    assert classic[index] == frames[same] and same[2] == 18 - index[2]


@pytest.mark.parametrize("enhanced_components", [("t2w",), ("t2w", "adc", "hbv")])
def test_enhanced_exam_preprocesses_to_the_same_case(
    enhanced_exam, prostatex_case_dir, enhanced_components
):
    """The same crop slices in reverse order (the T2w slice order of the file), each at the same
    world position; ADC and HBV, stored head to foot too, resampled onto them alike."""
    paths = {c: prostatex_case_dir / c for c in ("t2w", "adc", "hbv")}
    classic = preprocess_case(paths, case_id="ProstateX-0000")
    given = {**paths, **{c: enhanced_exam[c] for c in enhanced_components}}
    frames = preprocess_case(given, case_id="ProstateX-0000")
    last = len(classic.slice_index) - 1
    np.testing.assert_allclose(frames.images[::-1], classic.images, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(frames.classes[::-1], classic.classes)
    for s in (0, 7, last):
        np.testing.assert_allclose(
            frames.pixel_to_world(last - s, 5, 7), classic.pixel_to_world(s, 5, 7), atol=1e-6
        )


def _swap_frames(dataset, a: int = 3, b: int = 4) -> None:
    pixels = dataset.pixel_array.copy()
    pixels[[a, b]] = pixels[[b, a]]
    groups = dataset.PerFrameFunctionalGroupsSequence
    groups[a], groups[b] = copy.deepcopy(groups[b]), copy.deepcopy(groups[a])
    dataset.PixelData = pixels.tobytes()


def _assert_same_image(read: sitk.Image, want: sitk.Image, pixels=None) -> None:
    """`read` has `want`'s geometry and voxels (or `pixels` [z, y, x])."""
    assert read.GetSize() == want.GetSize()
    for got, expected in (
        (read.GetOrigin(), want.GetOrigin()),
        (read.GetSpacing(), want.GetSpacing()),
        (read.GetDirection(), want.GetDirection()),
    ):
        np.testing.assert_allclose(got, expected, atol=1e-5)
    expected = sitk.GetArrayFromImage(want) if pixels is None else pixels
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), expected)


def _interleave(dataset) -> None:
    """Frames in the order 1, 3, 5, ..., 2, 4, ... (as an interleaved acquisition stores them)."""
    order = list(range(0, 19, 2)) + list(range(1, 19, 2))
    pixels = dataset.pixel_array[order]
    groups = dataset.PerFrameFunctionalGroupsSequence
    dataset.PerFrameFunctionalGroupsSequence = pydicom.Sequence(
        [copy.deepcopy(groups[k]) for k in order]
    )
    dataset.PixelData = pixels.tobytes()


@pytest.mark.parametrize("edit", [_swap_frames, _interleave], ids=["two_swapped", "interleaved"])
def test_frames_out_of_slice_order_are_read_in_it(enhanced, prostatex_case_dir, tmp_path, edit):
    """ITK read them with 1 x 1 x 1 mm voxels, without a word (they were refused since): now
    sorted along the slice normal, foot to head, as GDCM sorts the classic series."""
    read = read_series(_edited(enhanced, tmp_path, edit))
    _assert_same_image(read, read_series(prostatex_case_dir / "t2w"))


def _drop_frame(dataset, k: int = 9) -> None:
    pixels = np.delete(dataset.pixel_array, k, axis=0)
    del dataset.PerFrameFunctionalGroupsSequence[k]
    dataset.NumberOfFrames = len(pixels)
    dataset.PixelData = pixels.tobytes()


def test_a_missing_frame_is_refused(enhanced, tmp_path):
    message = _refusal(_edited(enhanced, tmp_path, _drop_frame))
    assert "a step of -6.00 mm against the median -3.00 mm" in message
    assert "1 irregular step(s) of 17" in message


def _two_volumes(dataset) -> None:
    pixels = dataset.pixel_array
    groups = dataset.PerFrameFunctionalGroupsSequence
    dataset.PerFrameFunctionalGroupsSequence = pydicom.Sequence(
        [copy.deepcopy(g) for g in groups] * 2
    )
    dataset.NumberOfFrames = 2 * len(pixels)
    dataset.PixelData = np.concatenate([pixels, pixels // 2]).tobytes()


def test_frames_of_several_volumes_are_refused(enhanced, tmp_path):
    message = _refusal(_edited(enhanced, tmp_path, _two_volumes))
    assert "each of the 19 slice positions holds 2 of the 38 frames: several volumes" in message


def _dwi(b_values, slopes, directions=None) -> callable:
    """Volumes of the T2w frames, b-value `b_values[v]` (None: no MRDiffusionSequence), rescale
    slope `slopes[v]` (intercept -5) and DiffusionDirectionality `directions[v]` (None: none) in
    each frame's own groups: volume 0 the stored pixels, volume v those // (v + 1); the frames
    interleaved by position (volume 0, 1, ... at each), as scanners store a DWI."""
    directions = directions or [None] * len(b_values)

    def edit(dataset) -> None:
        pixels = dataset.pixel_array
        shared = dataset.SharedFunctionalGroupsSequence[0]
        template = shared.PixelValueTransformationSequence
        del shared.PixelValueTransformationSequence
        groups, frames = [], []
        for k, group in enumerate(dataset.PerFrameFunctionalGroupsSequence):
            volumes = zip(b_values, slopes, directions, strict=True)
            for volume, (b, slope, direction) in enumerate(volumes):
                own = copy.deepcopy(group)
                rescale = copy.deepcopy(template)
                rescale[0].RescaleSlope, rescale[0].RescaleIntercept = slope, -5
                own.PixelValueTransformationSequence = rescale
                if b is not None:
                    diffusion = pydicom.Dataset()
                    diffusion.DiffusionBValue = float(b)
                    if direction is not None:
                        diffusion.DiffusionDirectionality = direction
                    own.MRDiffusionSequence = pydicom.Sequence([diffusion])
                groups.append(own)
                frames.append(pixels[k] // (volume + 1))
        dataset.PerFrameFunctionalGroupsSequence = pydicom.Sequence(groups)
        dataset.NumberOfFrames = len(frames)
        dataset.PixelData = np.stack(frames).tobytes()

    return edit


def test_hbv_of_a_file_of_several_b_values_is_its_highest(enhanced, tmp_path, caplog):
    """b = 1400 (slope 2) and b = 50 (slope 1) interleaved: as hbv, the b = 1400 frames, with
    their own slope although ITK applied frame 1's (the b = 50 one) to every frame."""
    edited = _edited(enhanced, tmp_path, _dwi([50, 1400], [1.0, 2.0]))
    with caplog.at_level("WARNING"):
        read = read_series(edited, component="hbv")
    stored = sitk.GetArrayFromImage(read_series(enhanced))  # slope 1, intercept 0
    _assert_same_image(read, read_series(enhanced), pixels=2 * (stored // 2) - 5)
    file = edited / "t2w.dcm"  # the warning names it (a batch logs many cases)
    assert f"{file}: b-values 50, 1400 s/mm^2; hbv read from the 19 frames of b = 1400" in (
        caplog.text
    )
    message = _refusal(edited)  # as no component, or another one: several volumes
    assert "holds 2 of the 38 frames: several volumes" in message


def test_two_volumes_of_the_highest_b_value_of_a_file_are_refused_naming_it(enhanced, tmp_path):
    """b = 50, 1400, 1400 (e.g. two directions, no trace): the message says which 38 frames of
    the 57 hold two volumes, as for a classic series."""
    edited = _edited(enhanced, tmp_path, _dwi([50, 1400, 1400], [1.0, 1.0, 1.0]))
    with pytest.raises(SeriesError) as raised:
        read_series(edited, component="hbv")
    assert str(raised.value).startswith(
        f"{edited / 't2w.dcm'}: multi-frame DICOM: the 38 frames of b = 1400 s/mm^2: each of the "
        "19 slice positions holds 2 of the 38 frames: several volumes"
    )


def test_hbv_of_a_file_takes_the_isotropic_frames_of_its_highest_b_value(
    enhanced, tmp_path, caplog
):
    """Directional and isotropic (trace) frames of b = 1400 beside b = 50 (as Philips stores a
    DWI): as hbv, the isotropic ones (volume 1: the stored pixels // 2)."""
    dwi = _dwi([1400, 1400, 50], [1.0] * 3, ["DIRECTIONAL", "ISOTROPIC", None])
    edited = _edited(enhanced, tmp_path, dwi)
    with caplog.at_level("WARNING"):
        read = read_series(edited, component="hbv")
    stored = sitk.GetArrayFromImage(read_series(enhanced))
    _assert_same_image(read, read_series(enhanced), pixels=stored // 2 - 5)
    assert "hbv read from the 19 isotropic frames of b = 1400 s/mm^2 (19 directional" in (
        caplog.text
    )


@pytest.mark.parametrize(
    ("b_values", "reason"),
    [
        (
            [None, 1400],
            "as hbv: frame 1 (19 of 38) gives no b-value (DiffusionBValue (0018,9087) in its own "
            "or the shared MRDiffusionSequence (0018,9117)), so",
        ),
        ([800, 800], "as hbv: every image has b = 800 s/mm^2"),
    ],
)
def test_b_values_of_a_file_that_choose_no_volume_are_refused(enhanced, tmp_path, b_values, reason):
    edited = _edited(enhanced, tmp_path, _dwi(b_values, [1.0, 1.0]))
    with pytest.raises(SeriesError) as raised:
        read_series(edited, component="hbv")
    message = str(raised.value)
    assert "holds 2 of the 38 frames: several volumes" in message and reason in message


def _rescale(slopes) -> callable:
    """Rescale values in each frame's own group (slope `slopes[k]`, intercept -5)."""

    def edit(dataset) -> None:
        shared = dataset.SharedFunctionalGroupsSequence[0]
        template = shared.PixelValueTransformationSequence
        del shared.PixelValueTransformationSequence
        for slope, group in zip(slopes, dataset.PerFrameFunctionalGroupsSequence, strict=True):
            own = copy.deepcopy(template)
            own[0].RescaleSlope, own[0].RescaleIntercept = slope, -5
            group.PixelValueTransformationSequence = own
        return None

    return edit


def test_frames_with_rescale_values_of_their_own_are_each_rescaled_with_theirs(enhanced, tmp_path):
    """ITK applied frame 1's values to every frame (such files were refused since)."""
    stored = sitk.GetArrayFromImage(read_series(enhanced))
    slopes = np.array([1 + 0.25 * k for k in range(19)])
    read = read_series(_edited(enhanced, tmp_path, _rescale(slopes.tolist())))
    _assert_same_image(read, read_series(enhanced), pixels=stored * slopes[:, None, None] - 5)


def test_the_same_rescale_in_every_frame_is_applied(enhanced, tmp_path):
    stored = sitk.GetArrayFromImage(read_series(enhanced))
    rescaled = read_series(_edited(enhanced, tmp_path, _rescale([2.0] * 19)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(rescaled), 2 * stored - 5)


def test_a_frame_without_a_position_is_refused(enhanced, tmp_path):
    def edit(dataset) -> None:
        del dataset.PerFrameFunctionalGroupsSequence[6].PlanePositionSequence

    message = _refusal(_edited(enhanced, tmp_path, edit))
    assert message.endswith("frame 7 has no ImagePositionPatient (in PlanePositionSequence)")


def test_a_multiframe_file_in_a_series_of_several_files_is_refused(enhanced, tmp_path):
    """Two exports of the enhanced file in one folder (one series UID): ITK would stack them."""
    folder = tmp_path / "two"
    shutil.copytree(enhanced, folder)
    dataset = pydicom.dcmread(folder / "t2w.dcm")
    dataset.SOPInstanceUID = pydicom.uid.generate_uid()
    dataset.save_as(folder / "t2w_again.dcm")
    with pytest.raises(SeriesError) as raised:
        read_series(folder)
    message = str(raised.value)
    assert message.startswith(f"{folder / 't2w.dcm'}: holds 19 frames, in a series of 2 files")
    assert "(2 of them multi-frame)" in message


def _frame_spacing(spacings) -> callable:
    """Each frame's own PixelMeasuresSequence, pixel spacing `spacings[k]` mm (the shared one
    kept: a file that contradicts itself)."""

    def edit(dataset) -> None:
        shared = dataset.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
        for spacing, group in zip(spacings, dataset.PerFrameFunctionalGroupsSequence, strict=True):
            own = copy.deepcopy(shared)
            own[0].PixelSpacing = [spacing, spacing]
            group.PixelMeasuresSequence = own

    return edit


def test_frames_of_other_pixel_spacings_are_refused(enhanced, tmp_path):
    message = _refusal(_edited(enhanced, tmp_path, _frame_spacing([0.5] * 18 + [0.6])))
    assert message.endswith("frame 19 has pixel spacing [0.6, 0.6] mm, frame 1 [0.5, 0.5] mm")


def test_an_image_read_with_other_pixels_than_its_frames_is_refused(enhanced, tmp_path):
    """Every frame's own pixel spacing 0.6 mm, the shared one 0.5 mm: ITK reads 0.5 mm pixels."""
    message = _refusal(_edited(enhanced, tmp_path, _frame_spacing([0.6] * 19)))
    assert message.endswith("read with 0.5 x 0.5 mm pixels, but its frames have 0.6 x 0.6 mm")


def _rescale_in_both(dataset) -> None:
    """Slope 2 in each frame's own group, the shared group's slope 1 kept (a file that
    contradicts itself): ITK applied the shared one."""
    shared = dataset.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    for group in dataset.PerFrameFunctionalGroupsSequence:
        own = copy.deepcopy(shared)
        own[0].RescaleSlope = 2
        group.PixelValueTransformationSequence = own


def test_rescale_values_of_the_frames_and_the_shared_group_that_differ_are_refused(
    enhanced, tmp_path
):
    """Read before with slope 1 (the shared one), although every frame says 2."""
    message = _refusal(_edited(enhanced, tmp_path, _rescale_in_both))
    assert message.endswith(
        "frame 1: RescaleSlope 2 in its own PixelValueTransformationSequence, 1 in the shared "
        "one, which ITK would apply"
    )


def test_a_frame_with_three_orientation_cosines_is_refused_in_one_line(enhanced, tmp_path):
    """numpy's ValueError (an inhomogeneous array) came out before, not a refusal."""

    def edit(dataset) -> None:
        orientation = copy.deepcopy(
            dataset.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
        )
        orientation[0].ImageOrientationPatient = [1, 0, 0]
        dataset.PerFrameFunctionalGroupsSequence[4].PlaneOrientationSequence = orientation

    message = _refusal(_edited(enhanced, tmp_path, edit))
    assert message.endswith(
        "frame 5: ImageOrientationPatient has 3 value(s), not 6 (in PlaneOrientationSequence)"
    )


def test_several_volumes_with_rescale_values_of_their_own_are_named_as_several_volumes(
    enhanced, tmp_path
):
    """Each volume its own slope (as b-values may have): refused as several volumes, not for
    the rescale values (which exporting one volume would not change)."""

    def edit(dataset) -> None:
        _two_volumes(dataset)  # each frame's group is also the other volume's: copied apart
        groups = [copy.deepcopy(g) for g in dataset.PerFrameFunctionalGroupsSequence]
        dataset.PerFrameFunctionalGroupsSequence = pydicom.Sequence(groups)
        _rescale([1.0] * 19 + [2.0] * 19)(dataset)

    message = _refusal(_edited(enhanced, tmp_path, edit))
    assert "each of the 19 slice positions holds 2 of the 38 frames: several volumes" in message


def test_frames_all_at_one_position_are_refused_as_one_slice(enhanced, tmp_path):
    """A single-slice time series: before, 'frames out of slice order ... 0 irregular step(s)'."""

    def edit(dataset) -> None:
        first = dataset.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
        for group in dataset.PerFrameFunctionalGroupsSequence:
            group.PlanePositionSequence[0].ImagePositionPatient = list(first.ImagePositionPatient)

    message = _refusal(_edited(enhanced, tmp_path, edit))
    assert message.endswith(
        "all 19 frames lie at one slice position (2.12 mm along the slice normal): images of one "
        "slice (a time series?), not a 3D stack"
    )


@pytest.mark.parametrize("b_values", [[50], [0, 50]], ids=["one_volume", "two_volumes"])
def test_a_file_of_low_b_values_only_is_no_hbv(enhanced, tmp_path, b_values):
    edited = _edited(enhanced, tmp_path, _dwi(b_values, [1.0] * len(b_values)))
    with pytest.raises(SeriesError, match="highest b-value is 50 s/mm.2, under 400: no high-b"):
        read_series(edited, component="hbv")


def test_an_enhanced_t2w_without_b_values_is_no_adc_or_hbv(enhanced):
    for component in ("adc", "hbv"):
        with pytest.raises(SeriesError, match=f"no diffusion marker.*it is no {component} series"):
            read_series(enhanced, component=component)
