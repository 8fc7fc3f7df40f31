"""preprocess_case refuses inputs it used to take wrongly, naming case, file and reason: files off
the T2w or lost lesions, a blank HBV, a one-slice label or mask, an image or empty mask as a mask,
one file as two inputs, components not led by the T2w; a lesion outside the gland is named."""

from __future__ import annotations

import shutil

import numpy as np
import preprocess_cases
import pytest
import SimpleITK as sitk
from preprocess_cases import OFFSETS, label_with

from focalnet_jax.data import preprocess_case
from focalnet_jax.data.image_writing import write_image
from focalnet_jax.data.io import CaseError

small_case = preprocess_cases.small_case  # a module-scoped fixture


@pytest.mark.parametrize(
    "problem, reason",
    [
        ("component_outside", "adc does not overlap the T2w field of view"),
        ("label_outside", "label does not overlap the T2w field of view"),
        ("bladder_outside", "bladder mask does not overlap the T2w field of view"),
        ("label_values", "outside the allowed set"),
        ("lesion_outside_crop", "lost by resampling onto the crop (label value 3 centred at"),
        ("lesion_outside_crop", "mm: outside the 80 mm crop)"),
        # The label reaches beyond the T2w's slices: the reason said "outside the 80 mm crop or
        # thinner than a crop pixel" of a lesion inside the crop and 10 mm wide.
        ("lesion_beyond_slices", "1 of 2 lesions lost by resampling onto the crop (label value 5"),
        ("lesion_beyond_slices", "mm: beyond the T2w's slices)"),
        ("lesion_between_slices", "mm: between the crop's sample points: between two T2w slices"),
    ],
)
def test_bad_case_raises_naming_case_file_reason(small_case, tmp_path, problem, reason):
    folder, sc = small_case
    components = {"t2w": str(folder / "t2w.mha"), "adc": str(folder / "adc.mha")}
    label, bladder = None, None
    if problem == "bladder_outside":  # it was called "empty" once resampled
        image = sitk.Image(sc.mask)
        image.SetOrigin(tuple(o + 500.0 for o in image.GetOrigin()))
        bladder = bad = str(tmp_path / "bladder.nii.gz")
        write_image(image, bladder)
    elif problem == "component_outside":
        adc = sitk.Image(sc.images["adc"])
        adc.SetOrigin(tuple(o + 500.0 for o in adc.GetOrigin()))
        components["adc"] = str(tmp_path / "adc.mha")
        write_image(adc, components["adc"])
        bad = components["adc"]
    else:
        label = label_with(sc, [(2, OFFSETS[0])], tmp_path)
        image = sitk.ReadImage(str(label))
        if problem == "label_outside":
            image.SetOrigin(tuple(o - 800.0 for o in image.GetOrigin()))
        elif problem == "label_values":
            image = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) * 4)  # 2 -> 8
            image.CopyInformation(sitk.ReadImage(str(label)))
        elif problem == "lesion_outside_crop":  # in the corner of the 96 mm T2w, not the crop
            array = np.zeros_like(sitk.GetArrayFromImage(image))
            array[2, 1:4, 1:4] = 3
            replaced = sitk.GetImageFromArray(array)
            replaced.CopyInformation(image)
            image = replaced
        else:  # the label's slices at half the T2w's spacing, two slices past its last
            spacing = image.GetSpacing()
            array = np.zeros((2 * image.GetSize()[2] + 2, *image.GetSize()[1::-1]), np.uint8)
            array[2 * 2, 40:56, 40:56] = 2  # on a T2w slice
            lesion = -1 if problem == "lesion_beyond_slices" else 2 * 2 + 1  # between two
            array[lesion, 40:56, 40:56] = 5
            replaced = sitk.GetImageFromArray(array)
            replaced.SetSpacing((*spacing[:2], spacing[2] / 2))
            replaced.SetOrigin(image.GetOrigin())
            replaced.SetDirection(image.GetDirection())
            image = replaced
        write_image(image, label)
        bad = str(label)
    with pytest.raises(CaseError) as info:
        preprocess_case(
            components, label, case_id="case-7", mask=folder / "mask.nii.gz", bladder_mask=bladder
        )
    assert info.value.case == "case-7" and info.value.file == bad
    assert reason in info.value.reason and "case-7" in str(info.value) and bad in str(info.value)


def test_blank_hbv_is_refused(small_case, tmp_path):
    # A constant HBV (a blank export) was stored as 0 everywhere, the value of normal tissue,
    # while a constant T2w or an all-zero ADC map is refused.
    folder, sc = small_case
    write_image(sc.images["hbv"] * 0 + 7.0, tmp_path / "hbv.mha")
    components = {"t2w": folder / "t2w.mha", "adc": folder / "adc.mha", "hbv": tmp_path / "hbv.mha"}
    with pytest.raises(CaseError, match=r"hbv is constant between its percentiles 1 and 99 \(7\)"):
        preprocess_case(components, case_id="c3")
    write_image(sc.images["hbv"], tmp_path / "hbv.mha")
    assert preprocess_case(components, case_id="c3").images.shape[-1] == 3


@pytest.mark.parametrize("suffix", [".mha", ".nii.gz"])
@pytest.mark.parametrize(
    "what, keyword",
    [("label", "label"), ("prostate mask", "mask"), ("bladder mask", "bladder_mask")],
)
def test_a_single_slice_label_or_mask_is_refused(small_case, tmp_path, what, keyword, suffix):
    # One slice of a label exported alone was resampled without a word: a lesion on T2w slices
    # 2..4 (242 crop pixels) was stored on slice 3 only (129 pixels), the other two slices as
    # background. A one-slice gland mask moved the crop centre to its slice (z 1.7 -> 3.0 mm); a
    # one-slice bladder mask was refused as "not on the T2w grid", which did not say why.
    folder, sc = small_case
    components = {"t2w": folder / "t2w.mha", "adc": folder / "adc.mha"}
    args = {"label": label_with(sc, [(3, (0, -4, 0))], tmp_path), "mask": folder / "mask.nii.gz"}
    whole = preprocess_case(components, **args, case_id="c4")
    assert np.flatnonzero(whole.annotated).tolist() == [2, 3, 4]
    source = args["label"] if what == "label" else args["mask"]
    one = tmp_path / f"one{suffix}"
    write_image(sitk.ReadImage(str(source))[:, :, 3:4], one)  # T2w slice 3, its geometry kept
    assert sitk.ReadImage(str(one)).GetSize() == (96, 96, 1)
    with pytest.raises(CaseError) as info:
        preprocess_case(components, **{**args, keyword: one}, case_id="c4")
    assert str(info.value) == (
        f"case 'c4', file '{one}': {what} has a single slice (96 x 96 x 1 voxels) where the T2w "
        "has 6: a broken or partial export (the other T2w slices would read as empty); save the "
        f"{what} over the whole T2w volume"
    )


def test_an_image_given_as_a_mask_is_refused_and_label_maps_are_kept(small_case, tmp_path):
    # Any image was taken as the prostate mask (its voxels > 0 averaged): the T2w given as the
    # mask centred the crop on the centroid of the whole slab without a word.
    folder, sc = small_case
    components = {"t2w": folder / "t2w.mha", "adc": folder / "adc.mha"}
    gland = sitk.GetArrayFromImage(sc.mask)
    assert sorted(np.unique(gland)) == [0, 1]
    zonal = gland.astype(np.uint8) * 2  # 0 outside, 2 transition zone, 1 peripheral (z above 3)
    zonal[3:][gland[3:] > 0] = 1
    image = sitk.GetImageFromArray(zonal)
    image.CopyInformation(sc.mask)
    write_image(image, tmp_path / "zonal.nii.gz")
    centre = preprocess_case(components, mask=folder / "mask.nii.gz", case_id="c5").center
    zonal_centre = preprocess_case(components, mask=tmp_path / "zonal.nii.gz", case_id="c5").center
    np.testing.assert_allclose(zonal_centre, centre)  # every label counts as gland
    t2w = sitk.GetArrayFromImage(sc.images["t2w"])
    values = np.unique(t2w)
    assert len(values) > 1000 and values[0] >= 0 and values[-1] > 255
    probability = sitk.Cast(sc.mask, sitk.sitkFloat32) * 0.5  # 0 / 0.5
    write_image(probability, tmp_path / "half.nii.gz")
    negative = sitk.Cast(sc.mask, sitk.sitkInt16) - 1  # -1 / 0
    write_image(negative, tmp_path / "negative.nii.gz")
    shutil.copy(folder / "t2w.mha", tmp_path / "t2w_copy.mha")  # the file itself: "same file"
    for keyword, what, path, found in [
        ("mask", "prostate mask", tmp_path / "t2w_copy.mha",
         f"{len(values)} distinct values (min {float(values[0])}, max {float(values[-1])})"),
        ("bladder_mask", "bladder mask", folder / "t2w.mha",
         f"{len(values)} distinct values (min {float(values[0])}, max {float(values[-1])})"),
        ("mask", "prostate mask", tmp_path / "half.nii.gz",
         "2 distinct values (min 0.0, max 0.5), not all integers"),
        ("mask", "prostate mask", tmp_path / "negative.nii.gz",
         "2 distinct values (min -1.0, max 0.0)"),
    ]:  # fmt: skip
        with pytest.raises(CaseError) as info:
            preprocess_case(components, **{keyword: path}, case_id="c5")
        assert str(info.value) == (
            f"case 'c5', file '{path}': {what} holds {found}: an image, not a label map (at most 8 "
            "integer labels in 0..255, 0 the background)"
        )
    with pytest.raises(CaseError, match="t2w and prostate mask are the same file"):
        preprocess_case(components, mask=folder / "t2w.mha", case_id="c5")


def test_an_empty_bladder_mask_or_one_on_air_is_refused(small_case, tmp_path):
    # An all-zero bladder mask was ignored without a word: the bladder was searched for instead
    # (the T2w reference's source 'bladder' or 'fallback', not 'mask').
    folder, sc = small_case
    components = {"t2w": folder / "t2w.mha", "adc": folder / "adc.mha"}
    write_image(sitk.Cast(sc.mask, sitk.sitkUInt8) * 0, tmp_path / "empty.nii.gz")
    with pytest.raises(CaseError) as info:
        preprocess_case(components, bladder_mask=tmp_path / "empty.nii.gz", case_id="c6")
    assert (
        str(info.value) == f"case 'c6', file '{tmp_path / 'empty.nii.gz'}': bladder mask is empty"
    )
    bladder = np.zeros(sitk.GetArrayViewFromImage(sc.mask).shape, np.uint8)
    bladder[:, 5:25, 30:60] = 1
    image = sitk.GetImageFromArray(bladder)
    image.CopyInformation(sc.mask)
    write_image(image, tmp_path / "bladder.nii.gz")
    case = preprocess_case(components, bladder_mask=tmp_path / "bladder.nii.gz", case_id="c6")
    t2w = sitk.GetArrayFromImage(sc.images["t2w"])
    assert case.t2w_reference["source"] == "mask"
    assert case.t2w_reference["bladder"] == float(np.median(t2w[bladder > 0]))
    # A mask on air (not above the 1st percentile) normalised the T2w inverted, without a word.
    air = float(np.percentile(t2w, 1.0))
    image = sitk.GetImageFromArray((t2w <= air).astype(np.uint8))
    image.CopyInformation(sc.mask)
    write_image(image, tmp_path / "on_air.nii.gz")
    with pytest.raises(CaseError) as info:
        preprocess_case(components, bladder_mask=tmp_path / "on_air.nii.gz", case_id="c6")
    median = float(np.median(t2w[t2w <= air]))
    assert str(info.value) == (
        f"case 'c6', file '{tmp_path / 'on_air.nii.gz'}': bladder mask: its median T2w "
        f"{median:g} is not above air {air:g} (percentile 1 of the T2w); does the mask cover the "
        "bladder?"
    )


def test_a_lesion_wholly_outside_the_gland_mask_is_named_in_a_warning(small_case, tmp_path, caplog):
    # A lesion sharing no voxel with the gland mask (a label or mask of another exam, or one
    # stored mirrored) was stored without a word; it is still stored, and now named.
    folder, sc = small_case
    components = {"t2w": folder / "t2w.mha", "adc": folder / "adc.mha"}
    mask = folder / "mask.nii.gz"
    inside = label_with(sc, [(3, (0, -4, 0))], tmp_path, "inside.nii.gz")
    assert preprocess_case(components, inside, mask=mask, case_id="c8").lesion_classes.tolist() == [
        3
    ]
    assert "outside the prostate mask" not in caplog.text
    both = label_with(sc, [(3, (0, -4, 0)), (4, (-30, -30, 0))], tmp_path, "both.nii.gz")
    case = preprocess_case(components, both, mask=mask, case_id="c8")
    outside = int(case.lesions[case.classes == 4][0])
    assert sorted(case.lesion_classes.tolist()) == [3, 4]
    assert (
        f"case c8: 1 of 2 lesions of label {both} (instances [{outside}]) lie wholly outside the "
        f"prostate mask {mask}: a label or mask of another exam, or one stored mirrored?"
    ) in caplog.text


def test_one_file_given_as_two_components_is_refused(small_case, tmp_path):
    # A manifest column pasted twice: the T2w given as the ADC map too passed the ADC unit check
    # (its values reach a few hundred) and was stored as a second channel without a word.
    folder, _ = small_case
    (tmp_path / "link.mha").symlink_to(folder / "t2w.mha")
    for adc in (folder / "t2w.mha", tmp_path / "link.mha"):
        with pytest.raises(CaseError) as info:
            preprocess_case({"t2w": folder / "t2w.mha", "adc": adc}, case_id="c9")
        assert str(info.value) == (f"case 'c9', file '{adc}': t2w and adc are the same file")
    components = {"t2w": folder / "t2w.mha", "adc": folder / "adc.mha", "hbv": folder / "adc.mha"}
    with pytest.raises(CaseError, match="adc and hbv are the same file"):
        preprocess_case(components, case_id="c9")


def test_components_not_led_by_t2w_are_refused(small_case):
    # The first component is the reference grid and is normalised as T2w: given ADC first, the
    # ADC map was cropped on its own grid and scaled by "air" and "bladder", the T2w by its
    # percentiles, without a word.
    folder, _ = small_case
    with pytest.raises(CaseError) as info:
        preprocess_case({"adc": folder / "adc.mha", "t2w": folder / "t2w.mha"}, case_id="c9")
    assert str(info.value) == (
        f"case 'c9', file '{folder / 'adc.mha'}': components 'adc,t2w': expected t2w first (the "
        "reference grid), "
        "e.g. {'t2w': ..., 'adc': ...}"
    )


def test_a_label_given_as_the_gland_mask_too_is_refused(small_case, tmp_path):
    # `--masks` pointed at the labels folder (or a manifest's label path pasted as its
    # prostate_mask): the crop was centred on the lesions' centroid, not the gland's, without a
    # word (a lesion-free case's empty label was refused as an empty mask).
    folder, sc = small_case
    components = {"t2w": folder / "t2w.mha", "adc": folder / "adc.mha"}
    label = label_with(sc, [(3, (-16, 8, 0))], tmp_path)
    with pytest.raises(CaseError) as info:
        preprocess_case(components, label, mask=label, case_id="c10")
    assert (
        str(info.value) == f"case 'c10', file '{label}': label and prostate mask are the same file"
    )
    gland = preprocess_case(components, label, mask=folder / "mask.nii.gz", case_id="c10")
    assert gland.center_source == "mask"
    # The label file given as a component too (pasted into its manifest column): stored as a
    # model input where it passed the intensity checks.
    with pytest.raises(CaseError) as info:
        preprocess_case({**components, "hbv": label}, label, case_id="c10")
    assert str(info.value) == f"case 'c10', file '{label}': hbv and label are the same file"
