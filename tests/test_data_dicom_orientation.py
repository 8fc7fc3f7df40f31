"""Direction cosines written to 3 decimals (anonymisers, converters): their row and column are
orthogonal only within about 2e-3. Over 1e-3 GDCM gives up on them and ITK reads the identity
direction: an oblique series read as axial, every world point wrong, without a word. Such a
series is placed by its slices' own cosines and positions (`dicom._placed_by_headers`), and
`predict --dicom` finds its frames on that grid (`dicom_output.frame_voxels`)."""

from __future__ import annotations

import copy
import logging

import highdicom
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from focalnet_jax.data.dicom import read_series
from focalnet_jax.data.dicom_multiframe import MultiFrameError, read_multiframe
from focalnet_jax.data.dicom_stack import SeriesError
from focalnet_jax.evaluation.dicom_output import frame_voxels

# Row . column -0.001146: GDCM reads the identity for it. The other: -0.000983, read by ITK
# (which makes it orthonormal), its row moved by up to 1.16e-3 there.
GIVEN_UP = (0.992, 0.122, -0.014, 0.114, -0.964, -0.241)
READ = (0.983, 0.118, -0.144, 0.129, -0.989, 0.077)
# Row . column 0.001585, the column 0.9996 long: GDCM gives up on it in a multi-frame file too.
GIVEN_UP_IN_FRAMES = (1.0, 0.0, -0.005, 0.0, 0.948, -0.317)
SLICES, SIZE, SPACING = 4, 256, 3.0


def _write_series(folder, orientation) -> list[np.ndarray]:
    """`SLICES` slices of `SIZE`^2 pixels (0.5 mm), `SPACING` mm apart along the normal of
    `orientation` (written to 3 decimals), slice k of value 100 k + its pixel index; their
    positions, file k.dcm's at k."""
    folder.mkdir()
    normal = np.cross(orientation[:3], orientation[3:])
    normal /= np.linalg.norm(normal)
    positions, series = [], generate_uid()
    for k in range(SLICES):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        slice_ = Dataset()
        slice_.file_meta, slice_.preamble = meta, b"\0" * 128
        slice_.SOPClassUID, slice_.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
        slice_.StudyInstanceUID, slice_.SeriesInstanceUID = "1.2.3", series
        slice_.Modality, slice_.InstanceNumber = "MR", k + 1
        positions.append(np.round(normal * SPACING * k + (5.0, -3.0, 20.0), 4))
        slice_.ImageOrientationPatient = [f"{v:.3f}" for v in orientation]
        slice_.ImagePositionPatient = [f"{v:.4f}" for v in positions[-1]]
        slice_.PixelSpacing, slice_.SliceThickness = [0.5, 0.5], SPACING
        slice_.Rows = slice_.Columns = SIZE
        slice_.SamplesPerPixel, slice_.PhotometricInterpretation = 1, "MONOCHROME2"
        slice_.BitsAllocated = slice_.BitsStored = 16
        slice_.HighBit, slice_.PixelRepresentation = 15, 0
        values = 100 * k + np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 97
        slice_.PixelData = values.astype(np.uint16).tobytes()
        slice_.save_as(folder / f"{k}.dcm", enforce_file_format=True)
    return positions


@pytest.mark.parametrize("orientation", [GIVEN_UP, READ], ids=["given_up", "read"])
def test_cosines_written_to_3_decimals_place_every_slice_at_its_position(
    orientation, tmp_path, caplog
):
    positions = _write_series(tmp_path / "s", orientation)
    with caplog.at_level(logging.WARNING):
        image = read_series(tmp_path / "s")
    direction = np.reshape(image.GetDirection(), (3, 3))
    assert np.abs(direction[:, :2].T.ravel() - orientation).max() < 2e-3
    pixels = sitk.GetArrayFromImage(image)  # [k, j, i]
    for k in range(SLICES):
        # The slice whose values are file k's lies at file k's position, pixel (i, j) along the
        # row and column cosines.
        index = int(np.argmax(pixels[:, 0, 0] == 100 * k))
        assert pixels[index, 0, 0] == 100 * k
        np.testing.assert_allclose(
            image.TransformIndexToPhysicalPoint((0, 0, index)), positions[k], atol=1e-3
        )
        far = image.TransformIndexToPhysicalPoint((SIZE - 1, 0, index))
        # Within the cosines' rounding (2e-3 of 127.5 mm): the identity direction was 15 mm off.
        written = positions[k] + (SIZE - 1) * 0.5 * np.array(orientation[:3])
        np.testing.assert_allclose(far, written, atol=0.3)
    ignored = "which the DICOM reader ignores" in caplog.text
    assert ignored == (orientation == GIVEN_UP)
    sources = [
        pydicom.dcmread(tmp_path / "s" / f"{k}.dcm", stop_before_pixels=True) for k in range(SLICES)
    ]
    voxels = frame_voxels(image, sources, "x")  # every frame on the grid: no CaseError
    assert sorted(int(voxels[k, 0, 0, 0]) for k in range(SLICES)) == list(range(SLICES))


def test_cosines_that_are_no_orthogonal_pair_are_refused(tmp_path):
    _write_series(tmp_path / "s", (1.0, 0.0, 0.0, 0.1, 0.995, 0.0))
    with pytest.raises(
        SeriesError, match=r"its row and column are not orthogonal \(row \. column = 0\.1\)"
    ):
        read_series(tmp_path / "s")
    _write_series(tmp_path / "short", (0.4, 0.0, 0.0, 0.0, 1.0, 0.0))
    with pytest.raises(SeriesError, match=r"no direction cosines \(lengths 0\.4 and 1, want 1\)"):
        read_series(tmp_path / "short")


def test_cosines_written_to_1_decimal_are_read_as_the_reader_normalises_them(tmp_path):
    """A 45 degree in-plane rotation written as 0.7 (lengths 0.99): read before, not refused."""
    _write_series(tmp_path / "s", (0.7, 0.7, 0.0, -0.7, 0.7, 0.0))
    direction = np.reshape(read_series(tmp_path / "s").GetDirection(), (3, 3))
    np.testing.assert_allclose(direction[:, 0], [0.5**0.5, 0.5**0.5, 0.0], atol=1e-6)


def _enhanced(tmp_path, orientation, frames=None):
    """`_write_series(tmp_path / "s", orientation)`, and those slices as one Legacy Converted
    Enhanced MR file `tmp_path / "e" / "t2w.dcm"` (its frames in the order `frames`); its path."""
    _write_series(tmp_path / "s", orientation)
    slices = [pydicom.dcmread(tmp_path / "s" / f"{k}.dcm") for k in range(SLICES)]
    for slice_ in slices:  # what the converter needs of a patient, a study and a series
        slice_.PatientName, slice_.PatientID, slice_.PatientBirthDate = "A^B", "p", ""
        slice_.PatientSex, slice_.StudyDate, slice_.StudyTime = "O", "20200101", "120000"
        slice_.AccessionNumber, slice_.ReferringPhysicianName, slice_.StudyID = "", "", "1"
        slice_.SeriesNumber, slice_.Manufacturer = 1, "x"
        slice_.ScanningSequence, slice_.SequenceVariant, slice_.ScanOptions = "SE", "NONE", ""
        slice_.MRAcquisitionType, slice_.EchoTime, slice_.EchoTrainLength = "2D", 100.0, 1
        slice_.RepetitionTime, slice_.FrameOfReferenceUID = 3000.0, "1.2.3.4"
        slice_.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    enhanced = highdicom.legacy.LegacyConvertedEnhancedMRImage(
        slices,
        series_instance_uid=generate_uid(),
        series_number=100,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    if frames is not None:
        groups, pixels = enhanced.PerFrameFunctionalGroupsSequence, enhanced.pixel_array[frames]
        enhanced.PerFrameFunctionalGroupsSequence = pydicom.Sequence(
            [copy.deepcopy(groups[k]) for k in frames]
        )
        enhanced.PixelData = pixels.tobytes()
    (tmp_path / "e").mkdir()
    enhanced.save_as(tmp_path / "e" / "t2w.dcm")
    return tmp_path / "e" / "t2w.dcm"


@pytest.mark.parametrize("frames", [None, [0, 2, 1, 3]], ids=["stored", "interleaved"])
def test_an_enhanced_file_of_cosines_written_to_3_decimals_reads_as_its_slices(frames, tmp_path):
    """The series as one Legacy Converted Enhanced MR file was refused ("read with an orientation
    other than its frames'": ITK's orthonormal axes were compared with the cosines as written;
    frames out of order were placed along the normal of those, off their positions), while its
    slices read."""
    image = read_multiframe(_enhanced(tmp_path, GIVEN_UP_IN_FRAMES, frames))
    series = read_series(tmp_path / "s")
    pixels, expected = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(series)
    for k in range(SLICES):  # file k's slice at the series' world points of that slice
        index, at = (int(np.argmax(a[:, 0, 0] == 100 * k)) for a in (pixels, expected))
        np.testing.assert_array_equal(pixels[index], expected[at])
        for corner in ((0, 0), (SIZE - 1, SIZE - 1)):
            np.testing.assert_allclose(
                image.TransformIndexToPhysicalPoint((*corner, index)),
                series.TransformIndexToPhysicalPoint((*corner, at)),
                atol=1e-4,
            )


def test_an_enhanced_file_of_cosines_that_are_no_orthogonal_pair_is_refused(tmp_path):
    """As a series of such slices is (`test_cosines_that_are_no_orthogonal_pair_are_refused`)."""
    with pytest.raises(
        MultiFrameError, match=r"its row and column are not orthogonal \(row \. column = 0\.1\)"
    ):
        read_multiframe(_enhanced(tmp_path, (1.0, 0.0, 0.0, 0.1, 0.995, 0.0), [0, 2, 1, 3]))
