"""`focalnet preprocess` (manifest and PI-CAI layouts) of DICOM SEG labels and gland masks stores
the classes, lesions and crop centre that the equivalent NIfTI label and mask give."""

from __future__ import annotations

import shutil

import dicom_segs
import numpy as np
import SimpleITK as sitk
from dicom_segs import LESION, PROSTATE, frame_box, on_t2w, write_seg
from input_error_calls import user_error

from focalnet_jax.cli import main
from focalnet_jax.data.store import open_store

source = dicom_segs.source  # a module-scoped fixture
t2w = dicom_segs.t2w  # a module-scoped fixture


def test_manifest_of_seg_label_and_mask_stores_what_nifti_gives(
    source, t2w, prostatex_case_dir, tmp_path, capfd
):
    """`focalnet preprocess --layout manifest` with a SEG label (a folder holding the SEG beside
    the T2w slices) and a SEG gland mask stores the label arrays and crop of the NIfTI ones; so
    does one SEG of the lesions and the gland given as both (its Prostate segment, category
    Anatomical Structure, no lesion: refused before as an unknown segment label, and the one
    file as 'label and prostate mask are the same file')."""
    lesions = [  # ISUP 3 over the ProstateX finding (T2w frame 10 of 19), csPCa elsewhere
        ("ISUP 3", frame_box(source, 9, slice(190, 200), slice(225, 240)), LESION),
        ("csPCa", frame_box(source, 8, slice(170, 178), slice(180, 190)), LESION),
    ]
    gland = frame_box(source, 8, slice(150, 230), slice(150, 250))
    gland |= frame_box(source, 9, slice(150, 230), slice(150, 250))
    exam = tmp_path / "exam"
    shutil.copytree(prostatex_case_dir / "t2w", exam / "label")  # the SEG among its source
    write_seg(exam / "label" / "seg.dcm", source, lesions)
    write_seg(exam / "gland.dcm", source, [("Prostate", gland, PROSTATE)])
    write_seg(exam / "both.dcm", source, [*lesions, ("Prostate", gland, PROSTATE)])
    for name, frames in (("label", lesions[0][1] * 3 + lesions[1][1]), ("gland", gland)):
        image = sitk.GetImageFromArray(on_t2w(source, t2w, frames.astype(np.uint8)))
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
            assert user_error(capfd, argv) == (
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
    lesion = frame_box(source, 9, slice(190, 200), slice(225, 240))  # over the ProstateX finding
    gland = frame_box(source, 9, slice(150, 230), slice(150, 250))
    images = tmp_path / "images" / "px"
    images.mkdir(parents=True)
    sitk.WriteImage(t2w, str(images / "px_s1_t2w.mha"))
    for kind in ("seg", "nifti"):
        for folder in ("labels", "masks"):
            (tmp_path / f"{folder}_{kind}").mkdir()
    write_seg(tmp_path / "labels_seg" / "px_s1.dcm", source, [("ISUP 3", lesion, LESION)])
    write_seg(tmp_path / "masks_seg" / "px_s1.dcm", source, [("Prostate", gland, PROSTATE)])
    for folder, frames, value in (("labels", lesion, 3), ("masks", gland, 1)):
        image = sitk.GetImageFromArray(on_t2w(source, t2w, frames.astype(np.uint8) * value))
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
