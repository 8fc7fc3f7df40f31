"""preprocess_case and where images lie: the same exam stored flipped or transposed gives one
crop; a crop centre outside the T2w, and labels, masks or images without (all of) their header,
orientation or position, are refused; a bladder mask is placed by its own geometry."""

from __future__ import annotations

import struct

import numpy as np
import preprocess_cases
import pytest
import SimpleITK as sitk
from preprocess_cases import FINDING, OFFSETS, finding_label, label_with, read_series

from focalnet_jax.data import preprocess_case
from focalnet_jax.data.image_writing import write_image
from focalnet_jax.data.io import CaseError, read_image

real_exam = preprocess_cases.real_exam  # a module-scoped fixture
small_case = preprocess_cases.small_case  # a module-scoped fixture


def _reordered(image: sitk.Image, order: str) -> sitk.Image:
    """The same voxels stored y-flipped (as dcm2niix writes an axial series), x- and y-flipped,
    or transposed."""
    if order == "flip_y":
        return sitk.Flip(image, [False, True, False])
    if order == "flip_xy":  # as RAS tools store it
        return sitk.Flip(image, [True, True, False])
    return sitk.PermuteAxes(image, [1, 0, 2])


@pytest.mark.real_data
@pytest.mark.parametrize("order", ["flip_y", "flip_xy", "transpose"])
def test_real_exam_stored_flipped_or_transposed_gives_the_same_crop(
    real_exam, prostatex_case_dir, tmp_path, order
):
    # dcm2niix stores an axial series with rows from posterior to anterior: SimpleITK reads the
    # NIfTI with direction (1, -1, 1) on the diagonal. Same exam, so the same (not upside-down)
    # crop, lesion and world mapping as from the DICOM series, and the same bladder reference
    # (it was 506 instead of 563 for the transposed T2w).
    _, case = real_exam
    dicom_t2w = read_series(prostatex_case_dir / "t2w")
    t2w = _reordered(dicom_t2w, order)
    assert t2w.GetDirection() != dicom_t2w.GetDirection()
    write_image(t2w, tmp_path / "t2w.nii.gz")
    write_image(_reordered(finding_label(dicom_t2w), order), tmp_path / "label.nii.gz")
    components = {"t2w": tmp_path / "t2w.nii.gz", "adc": prostatex_case_dir / "adc"}
    other = preprocess_case(
        components, tmp_path / "label.nii.gz", config={"interpolator": "linear"}, case_id="flip"
    )
    assert other.t2w_reference["bladder"] == case.t2w_reference["bladder"]
    np.testing.assert_allclose(other.images, case.images[..., :2], atol=2e-3)
    np.testing.assert_array_equal(other.classes, case.classes)
    np.testing.assert_allclose(
        other.world_to_pixel(*FINDING), case.world_to_pixel(*FINDING), atol=1e-4
    )


def test_crop_centre_outside_the_t2w_is_refused_naming_mask_or_t2w(small_case, tmp_path):
    # A mask on another patient's grid, or a centre 60 mm above the slab, used to surface as
    # "t2w covers 0.0 % of the crop" or a lost lesion (naming the wrong file), or not at all.
    folder, sc = small_case
    components = {"t2w": str(folder / "t2w.mha"), "adc": str(folder / "adc.mha")}
    mask = sitk.ReadImage(str(folder / "mask.nii.gz"))
    mask.SetOrigin(tuple(o + 300.0 for o in mask.GetOrigin()))
    write_image(mask, tmp_path / "far.nii.gz")
    with pytest.raises(CaseError, match="prostate mask centroid .* outside the T2w") as info:
        preprocess_case(components, case_id="c1", mask=tmp_path / "far.nii.gz")
    assert info.value.file == str(tmp_path / "far.nii.gz")
    top = sc.images["t2w"].TransformContinuousIndexToPhysicalPoint((47.5, 47.5, 5.5))
    above = (top[0], top[1], top[2] + 60.0)
    with pytest.raises(CaseError, match="given crop centre .* outside the T2w") as info:
        preprocess_case(components, case_id="c1", center=above)
    assert info.value.file == components["t2w"]
    inside = (top[0], top[1], top[2] - 1.0)  # within the last slice's thickness
    assert preprocess_case(components, case_id="c1", center=inside).center == inside


@pytest.mark.parametrize("what", ["label", "prostate mask"])
def test_label_or_mask_saved_without_geometry_is_refused(small_case, tmp_path, what):
    # GetImageFromArray without CopyInformation (or a NIfTI written with an identity affine): the
    # T2w's voxel counts at origin 0 with 1 mm voxels. Resampled through that geometry, a lesion
    # was lost ("outside the 80 mm crop") or moved silently.
    folder, sc = small_case
    components = {"t2w": str(folder / "t2w.mha"), "adc": str(folder / "adc.mha")}
    source = label_with(sc, [(3, OFFSETS[4])], tmp_path) if what == "label" else None
    source = source or folder / "mask.nii.gz"
    bare = sitk.GetImageFromArray(sitk.GetArrayFromImage(sitk.ReadImage(str(source))))
    write_image(bare, tmp_path / "bare.nii.gz")
    files = {"label": None, "mask": folder / "mask.nii.gz"}
    files["label" if what == "label" else "mask"] = tmp_path / "bare.nii.gz"
    refused = f"{what} has the T2w's 96 x 96 x 6 voxels but the default origin .0, 0, 0. and "
    refused += r"spacing \(1 mm voxels\) where the T2w's differs"  # its direction is the identity
    with pytest.raises(CaseError, match=refused):
        preprocess_case(components, files["label"], mask=files["mask"], case_id="c2")
    # With its header the same array is fine.
    bare.CopyInformation(sc.images["t2w"])
    write_image(bare, tmp_path / "bare.nii.gz")
    preprocess_case(components, files["label"], mask=files["mask"], case_id="c2")


@pytest.mark.real_data
@pytest.mark.parametrize(
    "copied, lost",
    [
        (("Origin", "Spacing"), "direction (identity)"),
        (("Spacing", "Direction"), "origin (0, 0, 0)"),
    ],
)
def test_a_label_with_part_of_the_t2w_header_is_refused(
    real_exam, prostatex_case_dir, tmp_path, copied, lost
):
    """The T2w is oblique (18 degrees): a label given only part of its header was resampled
    through the rest, its lesion moved by centimetres to other slices without a word, or lost
    with a message blaming the crop."""
    t2w, _ = real_exam
    whole = finding_label(t2w)
    part = sitk.GetImageFromArray(sitk.GetArrayFromImage(whole))
    for field in copied:
        getattr(part, f"Set{field}")(getattr(t2w, f"Get{field}")())
    path = tmp_path / "label.nii.gz"
    write_image(part, path)
    components = {name: prostatex_case_dir / name for name in ("t2w", "adc")}
    with pytest.raises(CaseError) as refused:
        preprocess_case(components, path, case_id="ProstateX-0000")
    assert refused.value.file == str(path)
    assert str(refused.value).endswith(
        f"label has the T2w's 384 x 384 x 19 voxels but the default {lost} where the T2w's "
        "differs: saved without (all of) the image header? Copy the T2w's origin, spacing and "
        "direction into it (SimpleITK CopyInformation)"
    )


def test_a_label_on_the_t2w_grid_up_to_float_noise_is_kept(small_case, tmp_path):
    """A T2w whose direction is the identity but for 1e-6 (float noise in a converted header) and
    a label with the exact identity: one grid (within `io`'s 1e-4), not a lost direction."""
    folder, sc = small_case
    t2w = sitk.ReadImage(str(folder / "t2w.mha"))
    t2w.SetDirection((1.0, -1e-6, 0.0, 1e-6, 1.0, 0.0, 0.0, 0.0, 1.0))
    write_image(t2w, tmp_path / "t2w.mha")
    label = sitk.ReadImage(str(label_with(sc, [(3, OFFSETS[4])], tmp_path)))
    assert label.GetDirection() == tuple(np.eye(3).ravel())
    components = {"t2w": tmp_path / "t2w.mha", "adc": folder / "adc.mha"}
    case = preprocess_case(components, tmp_path / "label.nii.gz", case_id="c3")
    assert list(case.lesion_classes) == [3]


def _without_orientation(image: sitk.Image, path):
    """`image` written as a NIfTI whose header places it nowhere (qform_code and sform_code 0,
    as an array saved without an affine); ITK reads it at origin 0, identity direction."""
    write_image(image, path)
    data = bytearray(path.read_bytes())
    assert struct.unpack("<i", data[:4])[0] == 348 and struct.unpack("<2h", data[252:256]) != (0, 0)
    data[252:256] = struct.pack("<2h", 0, 0)
    path.write_bytes(data)
    return path


def test_components_without_orientation_on_other_grids_are_refused(small_case, tmp_path):
    # T2w (1 mm voxels) and ADC (2 mm) saved without orientation were both read with their first
    # voxel at origin 0 and resampled onto each other there, off by the difference of their real
    # origins (here about 1 mm; 38 mm for an ADC of 256 mm beside a T2w of 180 mm), without a word.
    folder, sc = small_case
    t2w, adc = sc.images["t2w"], sc.images["adc"]
    components = {
        "t2w": _without_orientation(t2w, tmp_path / "t2w.nii"),
        "adc": _without_orientation(adc, tmp_path / "adc.nii"),
    }
    assert sitk.ReadImage(str(components["adc"])).GetOrigin() == (0.0, 0.0, 0.0)
    with pytest.raises(CaseError) as info:
        preprocess_case(components, mask=folder / "mask.nii.gz", case_id="c4")
    assert info.value.file == str(components["t2w"])
    assert info.value.reason.startswith(
        "t2w is a NIfTI without orientation (qform_code and sform_code 0): read at origin 0, not "
        "where the scanner put it, and adc lies on another grid"
    )
    # Given with its header, the ADC is still refused beside the T2w read at origin 0.
    components["adc"] = folder / "adc.mha"
    with pytest.raises(CaseError, match="t2w is a NIfTI without orientation"):
        preprocess_case(components, case_id="c4")
    # On one grid (the ADC resampled onto the T2w's) the voxels correspond: kept.
    on_t2w = sitk.Resample(adc, t2w, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    components["adc"] = _without_orientation(on_t2w, tmp_path / "adc_on_t2w.nii")
    assert preprocess_case(components, case_id="c4").images.shape[-1] == 2


@pytest.mark.parametrize("what", ["label", "prostate mask", "bladder mask"])
def test_label_or_mask_without_orientation_off_the_t2w_grid_is_refused(small_case, tmp_path, what):
    # A label or mask with the T2w's voxels and spacing, saved without orientation, was read at
    # origin 0 and resampled onto the crop from there: refused for another reason (a lesion
    # "lost by resampling", a mask centroid "outside the T2w"), or, near origin 0, taken moved.
    folder, sc = small_case
    components = {"t2w": folder / "t2w.mha", "adc": folder / "adc.mha"}
    source = label_with(sc, [(3, OFFSETS[4])], tmp_path) if what == "label" else None
    image = sitk.ReadImage(str(source or folder / "mask.nii.gz"))
    unplaced = _without_orientation(image, tmp_path / "unplaced.nii")
    files = {"label": None, "prostate mask": folder / "mask.nii.gz", "bladder mask": None}
    files[what] = unplaced
    run = dict(mask=files["prostate mask"], bladder_mask=files["bladder mask"], case_id="c7")
    with pytest.raises(CaseError) as info:
        preprocess_case(components, files["label"], **run)
    assert info.value.file == str(unplaced)
    assert info.value.reason.startswith(
        f"{what} is a NIfTI without orientation (qform_code and sform_code 0): read at origin 0, "
        "not where the scanner put it, and the T2w lies on another grid"
    )
    # Beside a T2w (and an ADC on its grid) saved without orientation too, voxels correspond.
    on_t2w = sitk.Resample(sc.images["adc"], sc.images["t2w"], sitk.Transform(), sitk.sitkLinear)
    components = {
        "t2w": _without_orientation(sc.images["t2w"], tmp_path / "t2w.nii"),
        "adc": _without_orientation(on_t2w, tmp_path / "adc.nii"),
    }
    if what == "prostate mask":
        run["mask"] = unplaced
    else:
        run["mask"] = _without_orientation(sc.mask, tmp_path / "mask.nii")
    assert preprocess_case(components, files["label"], **run).images.shape[-1] == 2


def _without_position(image: sitk.Image, path):
    """`image` written as an NRRD or MetaImage whose header gives no position (`space` fields
    dropped, `spacings` kept; no `Offset`), as pynrrd's `nrrd.write(path, array)` or a
    hand-written header: ITK reads it at origin 0."""
    write_image(image, path)
    head, data = path.read_bytes().split(b"\n\n", 1) if path.suffix == ".nrrd" else (None, None)
    if head is not None:
        lines = [line for line in head.decode().splitlines() if not line.startswith("space")]
        lines.append("spacings: " + " ".join(f"{s:g}" for s in image.GetSpacing()))
        path.write_bytes("\n".join(lines).encode() + b"\n\n" + data)
    else:
        text = path.read_bytes()
        start = text.index(b"Offset = ")
        path.write_bytes(text[:start] + text[text.index(b"\n", start) + 1 :])
    assert sitk.ReadImage(str(path)).GetOrigin() == (0.0, 0.0, 0.0)
    return path


@pytest.mark.parametrize("suffix, how", [
    (".nrrd", "an NRRD without position (no finite `space origin`, or `axis mins` and "
              "`spacings`)"),
    (".mha", "a MetaImage without position (no Offset, Origin or Position field)"),
])  # fmt: skip
def test_nrrd_or_metaimage_without_position_is_refused(small_case, tmp_path, suffix, how):
    """A bare NRRD (pynrrd's default) or a MetaImage without Offset was read at origin 0 and
    resampled from there: an ADC beside the T2w, or a label with the T2w's voxels, lay 20 mm and
    more from where it was, without a word (only NIfTI files were checked)."""
    folder, sc = small_case
    t2w = folder / "t2w.mha"
    adc = _without_position(sc.images["adc"], tmp_path / f"adc{suffix}")
    with pytest.raises(CaseError) as info:
        preprocess_case({"t2w": t2w, "adc": adc}, mask=folder / "mask.nii.gz", case_id="c8")
    assert info.value.file == str(adc)
    assert info.value.reason.startswith(f"adc is {how}: read at origin 0")
    label = _without_position(
        sitk.ReadImage(str(label_with(sc, [(3, OFFSETS[4])], tmp_path))),
        tmp_path / f"label{suffix}",
    )
    components = {"t2w": t2w, "adc": folder / "adc.mha"}
    with pytest.raises(CaseError) as info:
        preprocess_case(components, label, mask=folder / "mask.nii.gz", case_id="c8")
    assert info.value.file == str(label)
    assert info.value.reason.startswith(f"label is {how}: read at origin 0")


def test_nrrd_placed_as_itk_reads_it_is_not_unplaced(tmp_path):
    """teem (ITK's NRRD reader) matches field names in any case and without spaces, and takes
    the origin from `axis mins` too: such files were refused as unplaced."""
    from focalnet_jax.data import nrrd_header

    head = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
    placed = {
        "Space Origin: (10,20,30)": (10.0, 20.0, 30.0),
        "spaceorigin: (10,20,30)": (10.0, 20.0, 30.0),
        "space origin: (10,20,30)": (10.0, 20.0, 30.0),
        "spacings: 1 1 2\naxis mins: 10 20 30": (10.5, 20.5, 31.0),
        "spacings: 1 1 2": None,
        # Fields ITK takes no origin from: it read these at origin 0.
        "space origin: (nan,nan,nan)": None,
        "space origin: none": None,
        "spacings: 1 1 2\naxis mins: nan nan nan": None,
        "spacings: 1 nan 2\naxis mins: 10 20 30": None,
        "axis mins: 10 20 30": None,
    }
    for field, origin in placed.items():
        path = tmp_path / "a.nrrd"
        if "axis" in field or "spacings" in field:
            path.write_bytes((head + field + "\n\n").encode() + bytes(8))
        else:
            space = "space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,2)\n"
            path.write_bytes((head + space + field + "\n\n").encode() + bytes(8))
        read = sitk.ReadImage(str(path)).GetOrigin()
        assert read == pytest.approx(origin or (0.0, 0.0, 0.0)), field
        assert nrrd_header.unplaced(path) == (origin is None), field
    # No voxel size: ITK reads 1 mm voxels (beside `axis maxs` too, though it takes an origin).
    space = "space: left-posterior-superior\nspace origin: (10,20,30)\n"
    for field, missing in [
        ("axis mins: 10 20 30\naxis maxs: 12 22 34\n", "`spacings`; `axis mins` and `axis maxs` "
                                                       "give only an extent"),
        ("axis mins: 10 20 30\n", "`spacings`"),
        ("", "`spacings`"),  # pynrrd's `nrrd.write(path, array)`
        (space, "`space directions`"),
    ]:  # fmt: skip
        path.write_bytes((head + field + "\n").encode() + bytes(8))
        assert sitk.ReadImage(str(path)).GetSpacing() == (1.0, 1.0, 1.0)
        with pytest.raises(CaseError, match=rf"NRRD header gives no voxel size \(no {missing}\): "
                                            r"ITK reads its voxels as 1 mm whatever"):  # fmt: skip
            read_image(path, case="c")
    # A NaN in one axis min: ITK places that axis at NaN; refused when read.
    path.write_bytes((head + "spacings: 1 1 2\naxis mins: 10 nan 30\n\n").encode() + bytes(8))
    assert nrrd_header.unplaced(path)
    with pytest.raises(CaseError, match=r"placement holds NaN or Inf \(origin \(10\.5, nan, "
                                        r"31\), spacing \(1, 1, 2\)\)$"):  # fmt: skip
        read_image(path, case="c")


def test_a_bladder_mask_stored_in_another_orientation_marks_the_same_voxels(small_case, tmp_path):
    # The bladder mask was taken voxel for voxel on the T2w grid whatever its geometry (only its
    # shape was checked): the same region stored flipped in x and y (as RAS tools store it)
    # marked the mirrored voxels, and the T2w upper reference fell from 542 to 234.
    folder, sc = small_case
    components = {"t2w": folder / "t2w.mha", "adc": folder / "adc.mha"}
    bladder = np.zeros(sitk.GetArrayViewFromImage(sc.mask).shape, np.uint8)
    bladder[:, 5:25, 30:60] = 1
    image = sitk.GetImageFromArray(bladder)
    image.CopyInformation(sc.mask)
    write_image(image, tmp_path / "bladder.nii.gz")
    write_image(sitk.Flip(image, [True, True, False]), tmp_path / "flipped.nii.gz")
    t2w = sitk.GetArrayFromImage(sc.images["t2w"])
    for name in ("bladder.nii.gz", "flipped.nii.gz"):
        case = preprocess_case(components, bladder_mask=tmp_path / name, case_id="c7")
        assert case.t2w_reference["bladder"] == float(np.median(t2w[bladder > 0]))
    # Without its header (origin 0, 1 mm voxels) it would be taken through that geometry.
    write_image(sitk.GetImageFromArray(bladder), tmp_path / "bare.nii.gz")
    with pytest.raises(
        CaseError, match="bladder mask has the T2w's 96 x 96 x 6 voxels but the default origin"
    ):
        preprocess_case(components, bladder_mask=tmp_path / "bare.nii.gz", case_id="c7")
