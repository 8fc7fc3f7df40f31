"""Manifest crop centres in LPS (the default) or RAS (`center_space`, as 3D Slicer and NIfTI tools
show points): a RAS centre is the LPS point with x and y negated; both give one crop."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk

from focalnet_jax.cli import main
from focalnet_jax.data import preprocess_case
from focalnet_jax.data.image_writing import write_image
from focalnet_jax.data.layouts import CaseSpec, LayoutError, read_manifest, write_manifest
from focalnet_jax.data.store import open_store

FINDING = (25.7457, 31.8707, -38.511)  # ProstateX-0000 finding 1, LPS mm (README)
HEADER = "case_id,patient_id,t2w,adc,center_x,center_y,center_z,center_space"


def _oblique_exam(folder):
    """T2w and ADC files of a 80 x 96 x 5 noise volume with an oblique direction (20 degrees about
    z, 10 about x) and an origin off zero, and an LPS point inside it away from its centre."""
    rng = np.random.default_rng(3)
    image = sitk.GetImageFromArray(rng.uniform(50, 400, size=(5, 96, 80)).astype(np.float32))
    a, b = np.radians(20.0), np.radians(10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    image.SetDirection(tuple((rz @ rx).ravel()))
    image.SetSpacing((1.5, 1.25, 3.0))
    image.SetOrigin((-41.2, 17.9, -63.4))
    write_image(image, folder / "t2w.mha")
    write_image(image * 5.0, folder / "adc.mha")  # 10^-6 mm^2/s
    return image.TransformContinuousIndexToPhysicalPoint((44.3, 52.7, 2.0))


def _manifest(path, centre, space):
    cells = ",".join(repr(float(v)) for v in centre)
    path.write_text(f"{HEADER}\nc1,p1,t2w.mha,adc.mha,{cells},{space}\n")
    return path


def test_a_ras_manifest_gives_the_crop_of_the_equivalent_lps_manifest(tmp_path, capfd):
    # The centre columns were LPS only: a point copied from 3D Slicer (RAS) centred the crop
    # on the mirrored point, or was refused as outside the T2w.
    lps = _oblique_exam(tmp_path)
    ras = (-lps[0], -lps[1], lps[2])
    stores = {}
    for space, centre in (("LPS", lps), ("RAS", ras), ("", lps)):
        manifest = _manifest(tmp_path / f"cases_{space}.csv", centre, space)
        out = tmp_path / f"store_{space}"
        argv = ["preprocess", "--layout", "manifest", "--manifest", str(manifest)]
        assert main([*argv, "--out", str(out), "--unlabelled", "negative"]) == 0
        stores[space] = open_store(out)
    assert "center_space" not in capfd.readouterr().out  # not listed as a column left unread
    for store in stores.values():
        assert store.case("c1")["center"] == list(lps)
        assert store.case("c1")["center_source"] == "given"
        _, row, col = store.world_to_pixel("c1", *lps)  # the crop is centred on that point
        np.testing.assert_allclose((row, col), (63.5, 63.5), atol=1e-6)
    np.testing.assert_array_equal(stores["RAS"].images, stores["LPS"].images)
    np.testing.assert_array_equal(stores[""].images, stores["LPS"].images)


@pytest.mark.real_data
def test_ras_centre_of_the_real_exam_centres_the_crop_on_the_finding(prostatex_case_dir, tmp_path):
    # The finding as 3D Slicer shows it (RAS) on the real ProstateX exam, read from DICOM.
    manifest = tmp_path / "cases.csv"
    t2w, adc = prostatex_case_dir / "t2w", prostatex_case_dir / "adc"
    manifest.write_text(f"{HEADER}\nc1,p1,{t2w},{adc},-25.7457,-31.8707,-38.511,RAS\n")
    (spec,) = read_manifest(manifest, labels=False)
    assert spec.center == FINDING
    case = preprocess_case(spec.components, case_id="c1", center=spec.center)
    _, row, col = case.world_to_pixel(*FINDING)
    np.testing.assert_allclose((row, col), (63.5, 63.5), atol=1e-6)


def test_centre_space_cells_empty_lps_or_ras_in_any_case_and_others_refused(tmp_path):
    rows = ["c1,p1,t,a,1,2,3,", "c2,p1,t,a,1,2,3,ras", "c3,p1,t,a,1,2,3,LPS", "c4,p1,t,a,,,,RAS"]
    path = tmp_path / "cases.csv"
    path.write_text("\n".join([HEADER, *rows, "c5,p1,t,a,1,2,3,RSA", ""]))
    with pytest.raises(LayoutError) as info:
        read_manifest(path, labels=False)
    assert str(info.value) == (
        f"manifest {path}, line 6: case 'c5': center_space 'RSA' is not LPS or RAS (an empty "
        "cell means LPS)"
    )
    errors = []
    cases = read_manifest(path, labels=False, errors=errors)
    assert [c.center for c in cases] == [(1.0, 2.0, 3.0), (-1.0, -2.0, 3.0), (1.0, 2.0, 3.0), None]
    assert errors == [("c5", str(path), str(info.value))]


def test_written_manifest_says_its_centres_are_lps_and_reads_back(tmp_path):
    cases = [
        CaseSpec("c1", "p1", {"t2w": "/t", "adc": "/a"}, center=(-12.5, 30.25, -40.0)),
        CaseSpec("c2", "p2", {"t2w": "/t2", "adc": "/a2"}),
    ]
    path = tmp_path / "cases.csv"
    write_manifest(cases, path)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["center_space"] for r in rows] == ["LPS", ""]
    assert [r["center_x"] for r in rows] == ["-12.5", ""]
    assert [c.center for c in read_manifest(path, labels=False)] == [(-12.5, 30.25, -40.0), None]
    assert [p.name for p in tmp_path.iterdir()] == ["cases.csv"]  # no temporary file left


def test_a_written_manifest_keeps_the_names_of_linked_files(tmp_path):
    # A data tree of links to files named by their hash (DVC, git-annex): the manifest named
    # the suffix-less blobs, and reading it back refused each as "unknown image format".
    blobs, tree = tmp_path / "cache", tmp_path / "exams"
    blobs.mkdir()
    tree.mkdir()
    for name in ("t2w.mha", "adc.mha", "label.nii.gz"):
        (blobs / f"{name}-hash").write_bytes(b"")
        (tree / name).symlink_to(blobs / f"{name}-hash")
    (tmp_path / "linked").symlink_to(tree)  # a linked folder above them is resolved
    given = tmp_path / "linked"
    case = CaseSpec("c1", "p1", {"t2w": str(given / "t2w.mha"), "adc": str(given / "adc.mha")},
                    label=str(given / "label.nii.gz"))  # fmt: skip
    write_manifest([case], tmp_path / "cases.csv")
    back = read_manifest(tmp_path / "cases.csv")[0]
    assert back.components == {"t2w": str(tree / "t2w.mha"), "adc": str(tree / "adc.mha")}
    assert back.label == str(tree / "label.nii.gz")
