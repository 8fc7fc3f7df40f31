"""Bad cases through `focalnet preprocess --layout manifest`: the first stops the run leaving
nothing, --skip-bad-cases lists each in errors.csv: a component covering part of the crop, an ADC
map in other units, a T2w not axial, a DICOM folder of two series or a gap; the coverage margins."""

from __future__ import annotations

import csv
import shutil

import image_refusals
import numpy as np
import pytest
import SimpleITK as sitk

from focalnet_jax.cli import main
from focalnet_jax.data.io import CaseError, read_image
from focalnet_jax.data.store import open_store

mixed_folder = image_refusals.mixed_folder  # a fixture


_T2W_SPACING = (1.5, 1.5, 3.0)  # x, y, z mm: 64 x 64 x 6 voxels = 96 x 96 x 18 mm


def _write(array_zyx, spacing, origin, path, direction=None):
    image = sitk.GetImageFromArray(np.asarray(array_zyx, np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection([float(v) for v in np.ravel(direction)])
    sitk.WriteImage(image, str(path))
    return str(path)


def _synthetic_case(folder, name, *, adc_shift_z=0.0, adc_scale=1.0, direction=None):
    """T2w 64x64x6 at 1.5x1.5x3 mm; ADC 48x48x6 at 2x2x3 mm over the same 96 mm square, its slice
    k holding 1000 + 100 k (1e-6 mm^2/s, times `adc_scale`), moved `adc_shift_z` mm along its
    slice axis; every image with the given `direction` (3x3, columns: voxel axes in LPS)."""
    rng = np.random.default_rng(len(name))
    t2w = _write(
        rng.uniform(100, 400, (6, 64, 64)),
        _T2W_SPACING,
        (0.0, 0.0, 0.0),
        folder / f"{name}_t2w.mha",
        direction,
    )
    adc = (1000.0 + 100.0 * np.arange(6))[:, None, None] * np.ones((6, 48, 48)) * adc_scale
    shift = (0.25, 0.25, adc_shift_z) @ (
        np.eye(3) if direction is None else np.transpose(direction)
    )
    adc = _write(adc, (2.0, 2.0, 3.0), tuple(shift), folder / f"{name}_adc.mha", direction)
    label = _write(
        np.zeros((6, 64, 64)),
        _T2W_SPACING,
        (0.0, 0.0, 0.0),
        folder / f"{name}_label.nii.gz",
        direction,
    )
    return {"case_id": name, "patient_id": name, "t2w": t2w, "adc": adc, "label": label}


def _write_manifest(path, rows):
    columns = sorted({k for row in rows for k in row}, key=lambda c: (c != "case_id", c))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _preprocess(manifest, out, *extra):
    return main(
        [
            "preprocess",
            "--layout",
            "manifest",
            "--manifest",
            str(manifest),
            "--out",
            str(out),
            *extra,
        ]
    )


def _refusals(tmp_path, rows, bad):
    """Run the manifest twice: the first bad case stops the run leaving nothing; with
    --skip-bad-cases every bad case is in errors.csv with its file and reason, the rest stored."""
    manifest = _write_manifest(tmp_path / "manifest.csv", rows)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    with pytest.raises(SystemExit) as info:
        _preprocess(manifest, outputs / "store")
    message = str(info.value)
    first = next(row["case_id"] for row in rows if row["case_id"] in bad)
    file, reason = bad[first]
    assert "\n" not in message and message.startswith("focalnet preprocess: error: ")
    assert f"case {first!r}, file {file!r}" in message and reason in message, message
    assert list(outputs.iterdir()) == []
    assert _preprocess(manifest, outputs / "store", "--skip-bad-cases") == 0
    with (outputs / "store" / "errors.csv").open() as f:
        errors = {row["case"]: row for row in csv.DictReader(f)}
    assert set(errors) == set(bad)
    for case, (file, reason) in bad.items():
        assert errors[case]["file"] == file and reason in errors[case]["reason"], errors[case]
    store = open_store(outputs / "store")
    assert set(store.case_ids) == {row["case_id"] for row in rows} - set(bad)
    return store


def test_partial_coverage_and_adc_units_refused_through_the_cli(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        _synthetic_case(data, "good"),
        # Slice centres 9..24 mm against the T2w's 0..15 mm: T2w slices at 0 and 3 mm lie more than
        # one ADC voxel (3 mm) below the lowest ADC slice, so 2 of 6 slices are uncovered.
        _synthetic_case(data, "shifted", adc_shift_z=9.0),
        _synthetic_case(data, "within_a_voxel", adc_shift_z=2.0),
        _synthetic_case(data, "adc_in_mm2s", adc_scale=1e-6),
        _synthetic_case(data, "adc_in_um2ms", adc_scale=1e-3),
    ]
    bad = {
        "shifted": (rows[1]["adc"], "adc covers 66.7 % of the crop of the stored slices: 2 of 6"),
        "adc_in_mm2s": (rows[3]["adc"], "ADC map looks like mm^2/s"),
        "adc_in_um2ms": (rows[4]["adc"], "ADC map looks like 1e-3 mm^2/s"),
    }
    store = _refusals(tmp_path, rows, bad)
    # 2 mm beyond the lowest ADC slice: the nearest ADC slice (1000) fills it, not 0.
    start = store.case("within_a_voxel")["start"]
    np.testing.assert_allclose(store.images[start, :, :, 1], 1000.0 / 3000.0, atol=1e-4)
    with (tmp_path / "outputs" / "store" / "errors.csv").open() as f:
        shifted = next(row for row in csv.DictReader(f) if row["case"] == "shifted")
    assert shifted["reason"].endswith(
        "; --slices covered keeps only the slices every component covers"
    )
    # --slices covered stores the 4 T2w slices (2..5) the shifted ADC covers: T2w slice 2 (6 mm)
    # lies one ADC voxel below ADC slice 0 (9 mm), within the margin, and takes its value.
    manifest, out = tmp_path / "manifest.csv", tmp_path / "covered"
    capsys.readouterr()
    assert _preprocess(manifest, out, "--slices", "covered", "--skip-bad-cases") == 0
    assert capsys.readouterr().out.strip() == (
        f"wrote 3 cases (16 slices of t2w, adc) to {out}; 1 case stored without the T2w slices a "
        "component does not cover (--slices covered); 2 bad cases in errors.csv"
    )
    covered = open_store(out)
    assert covered.case_ids == ["good", "shifted", "within_a_voxel"]
    rows = covered.case_slices("shifted")
    assert covered.slice_index[rows].tolist() == [2, 3, 4, 5]
    np.testing.assert_allclose(
        covered.images[rows, 64, 64, 1],
        np.array([1000.0, 1000.0, 1100.0, 1200.0]) / 3000.0,
        atol=1e-4,
    )
    assert covered.slice_index[covered.case_slices("good")].tolist() == list(range(6))


@pytest.mark.real_data
def test_prostatex_t2w_is_an_axial_series_tilted_18_degrees(prostatex_case_dir):
    from focalnet_jax.data.geometry import not_axial

    direction = read_image(prostatex_case_dir / "t2w").GetDirection()
    normal = np.reshape(direction, (3, 3))[:, 2]
    assert round(float(np.degrees(np.arccos(normal[2]))), 1) == 18.5  # docs/data.md
    assert not_axial(direction) is None


def _rotation_about_x(degrees):
    a = np.radians(degrees)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def test_sagittal_or_coronal_t2w_is_refused_oblique_axial_kept(tmp_path):
    # The crop lies in the T2w slice plane: a sagittal or coronal T2w (PI-CAI ships `_sag` and
    # `_cor` series beside `_t2w`) was cropped in its own plane and fed to a model of axial
    # slices without a word. An axial series tilted up to 45 degrees stays axial.
    data = tmp_path / "data"
    data.mkdir()
    sagittal = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]])  # columns: i -> +y, j -> -z, k -> -x
    rows = [
        _synthetic_case(data, "axial"),
        _synthetic_case(data, "tilted_40", direction=_rotation_about_x(40)),
        _synthetic_case(data, "coronal", direction=_rotation_about_x(-90)),
        _synthetic_case(data, "sagittal", direction=sagittal),
    ]
    bad = {
        "coronal": (rows[2]["t2w"], "T2w is not an axial series: slice normal (0.00, 1.00, 0.00)"),
        "sagittal": (rows[3]["t2w"], "slice normal (-1.00, 0.00, 0.00) LPS, 90 degrees"),
    }
    store = _refusals(tmp_path, rows, bad)
    assert store.case_ids == ["axial", "tilted_40"]


@pytest.mark.real_data
def test_dicom_refusals_and_series_column_through_the_cli(
    prostatex_case_dir, mixed_folder, tmp_path
):
    t2w = sitk.ReadImage(
        sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(prostatex_case_dir / "t2w"))
    )
    label = sitk.Image(t2w.GetSize(), sitk.sitkUInt8)
    label.CopyInformation(t2w)
    sitk.WriteImage(label, str(tmp_path / "label.nii.gz"))
    gap = tmp_path / "gap"
    shutil.copytree(prostatex_case_dir / "adc", gap)
    (gap / "1-07.dcm").unlink()

    def row(case, adc, **extra):
        t2w_dir = tmp_path / f"{case}_t2w"  # a copy each: one exam on two rows is refused
        shutil.copytree(prostatex_case_dir / "t2w", t2w_dir)
        return {
            "case_id": case,
            "patient_id": case,
            "t2w": str(t2w_dir),
            "adc": str(adc),
            "label": str(tmp_path / "label.nii.gz"),
            **extra,
        }

    rows = [
        row("mixed", mixed_folder, adc_series=""),
        row("chosen", mixed_folder, adc_series="ep2d_diff_tra_DYNDIST_ADC"),
        row("gap", gap, adc_series=""),
    ]
    bad = {
        "mixed": (str(mixed_folder), "folder holds 2 DICOM series"),
        "gap": (str(gap), "missing slice or uneven spacing"),
    }
    store = _refusals(tmp_path, rows, bad)
    assert store.images.shape == (19, 128, 128, 2)
    # The series chosen is recorded with its folder (the folder alone names two).
    assert store.cases[0]["files"]["series"] == {"adc": "ep2d_diff_tra_DYNDIST_ADC"}


def test_coverage_margins_the_t2w_by_half_a_voxel_and_tolerate_rounding():
    """A component covers crop pixel centres within 1 of its voxels beyond its outermost centres;
    a T2w slice one whole slice past a DWI slab is at that margin, read at -1.000000053 voxels
    from the DICOM slab and at -1.0 from an MHA copy, kept from one and not the other. The T2w,
    on whose grid predict writes its maps, covers within half a voxel (its voxels' outer face):
    with 1, a detection on the crop's edge row was listed at T2w row -1."""
    from focalnet_jax.data import coverage

    reference = sitk.Image(4, 4, 3, sitk.sitkFloat32)  # crop: 4 x 4 pixels of 1 mm, 3 slices
    reference.SetSpacing((1.0, 1.0, 3.0))
    for shift, expected in ((3.0, [True, True, True]), (3.0 + 1.6e-7, [True, True, True]),
                            (3.0 + 0.01, [False, True, True])):  # fmt: skip
        slab = sitk.Image(4, 4, 2, sitk.sitkFloat32)  # slices 1 and 2 of the crop, then moved
        slab.SetSpacing((1.0, 1.0, 3.0))
        slab.SetOrigin((0.0, 0.0, shift))
        inside = coverage.covered(slab, reference, [0, 1, 2])
        assert inside.all(axis=(1, 2)).tolist() == expected, shift
    t2w = sitk.Image(4, 4, 3, sitk.sitkFloat32)  # rows 0..3; the crop starts 0.7 row before
    t2w.SetSpacing((1.0, 1.0, 3.0))
    t2w.SetOrigin((0.0, 0.7, 0.0))
    images = {"t2w": t2w, "adc": t2w}
    with pytest.raises(CaseError) as refused:  # no `--slices covered` hint: it cannot help
        coverage.check_covered(images, {"t2w": "t2w.mha", "adc": "adc.mha"}, reference,
                               np.arange(3), "c1", hint="; --slices covered ...")  # fmt: skip
    assert refused.value.reason.endswith(
        "(tolerance 0.5 t2w voxel); the crop reaches past the T2w's field of view: centre it "
        "further inside the T2w"
    )
    t2w.SetOrigin((0.0, 0.4, 0.0))  # 0.4 row before: inside the outer face of row 0
    coverage.check_covered(images, {"t2w": "t2w.mha", "adc": "adc.mha"}, reference,
                           np.arange(3), "c1")  # fmt: skip
