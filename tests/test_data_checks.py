"""Inputs that used to be read wrongly without a word are refused, naming case, file and reason:
a DICOM folder of several series, a series with a missing slice or several b-values, a series of
another component (ImageType), a T2w that is not axial, a component that covers only part of the
crop, an ADC map in other units or none, a truncated .mha (docs/data.md, "What is refused and
why"); and the ProstateX-0000 numbers docs/data.md quotes, measured.
"""

from __future__ import annotations

import csv
import locale
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from focalnet_jax.cli import main
from focalnet_jax.data import preprocess_case
from focalnet_jax.data.intensity import adc_unit_problem
from focalnet_jax.data.io import CaseError, read_image
from focalnet_jax.data.store import open_store

T2W_UID = "1.3.6.1.4.1.14519.5.2.1.7311.5101.160028252338004527274326500702"
ADC_UID = "1.3.6.1.4.1.14519.5.2.1.7311.5101.339319789559896104041345048780"


def _expect(path, reason, **kwargs):
    with pytest.raises(CaseError) as info:
        read_image(path, case="c1", **kwargs)
    assert info.value.case == "c1" and reason in info.value.reason, info.value.reason
    return info.value


# --- DICOM series --------------------------------------------------------------------------------


@pytest.fixture
def mixed_folder(prostatex_case_dir, tmp_path):
    """The T2w and the ADC series of the ProstateX exam in one folder."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("t2w", "adc"):
        for file in (prostatex_case_dir / name).iterdir():
            shutil.copy(file, folder / f"{name}_{file.name}")
    return folder


@pytest.mark.real_data
def test_folder_of_two_series_is_refused_and_either_can_be_chosen(mixed_folder):
    error = _expect(mixed_folder, "folder holds 2 DICOM series")
    assert error.file == str(mixed_folder)
    assert f"{T2W_UID} ('t2_tse_tra', 19 files)" in error.reason
    assert f"{ADC_UID} ('ep2d_diff_tra_DYNDIST_ADC', 19 files)" in error.reason
    assert read_image(mixed_folder, series="t2_tse_tra").GetSize() == (384, 384, 19)
    assert read_image(mixed_folder, series=ADC_UID).GetSize() == (84, 128, 19)
    _expect(mixed_folder, "series 'b800' matches no series", series="b800")


@pytest.mark.real_data
def test_two_components_of_one_folder_need_two_series(mixed_folder):
    components = {"t2w": mixed_folder, "adc": mixed_folder}
    case = preprocess_case(components, series={"t2w": T2W_UID, "adc": ADC_UID}, case_id="c1")
    assert case.images.shape == (19, 128, 128, 2)
    with pytest.raises(CaseError) as info:  # the ADC series also as a DCE (no ImageType rule)
        preprocess_case(
            {**components, "dce": mixed_folder},
            series={"t2w": T2W_UID, "adc": ADC_UID, "dce": "ep2d_diff_tra_DYNDIST_ADC"},
            case_id="c1",
        )
    assert info.value.reason == "adc and dce are the same image (same grid and voxels)"
    with pytest.raises(CaseError) as info:
        preprocess_case(components, series={"t2w": T2W_UID, "adc": T2W_UID}, case_id="c1")
    assert info.value.reason.startswith("series 't2_tse_tra' has ImageType 'ORIGINAL")
    with pytest.raises(CaseError) as info:
        preprocess_case(
            {"t2w": mixed_folder, "dce": mixed_folder},
            series={"t2w": T2W_UID, "dce": T2W_UID},
            case_id="c1",
        )
    assert info.value.reason == "t2w and dce are the same series"


@pytest.mark.real_data
def test_series_with_a_missing_slice_is_refused_naming_the_gap(prostatex_case_dir, tmp_path):
    folder = tmp_path / "adc"
    shutil.copytree(prostatex_case_dir / "adc", folder)
    (folder / "1-07.dcm").unlink()  # instance 7: its neighbours lie 2 x 3 mm apart
    error = _expect(folder, "missing slice or uneven spacing")
    assert "(6.00 mm, median spacing 3.00 mm, tolerance 0.03 mm)" in error.reason
    assert "1-08.dcm (instance 8) and 1-06.dcm (instance 6)" in error.reason
    assert "1 irregular step(s) of 17" in error.reason


@pytest.mark.real_data
def test_series_with_a_repeated_slice_is_refused(prostatex_case_dir, tmp_path):
    folder = tmp_path / "adc"
    shutil.copytree(prostatex_case_dir / "adc", folder)
    shutil.copy(folder / "1-07.dcm", folder / "1-07-copy.dcm")
    error = _expect(folder, "the same image (SOPInstanceUID) as 1-07")
    assert error.file in (str(folder / "1-07.dcm"), str(folder / "1-07-copy.dcm"))
    assert error.reason.endswith("1 file(s) of 20 copy another file of the series (exported "
                                 "twice?); remove the copies")  # fmt: skip


@pytest.mark.real_data
def test_series_exported_twice_into_one_folder_is_not_called_several_volumes(
    prostatex_case_dir, tmp_path
):
    # Every position held two images, so it was refused as "several volumes in one series
    # (b-values, echoes or time points?)".
    folder = tmp_path / "adc"
    shutil.copytree(prostatex_case_dir / "adc", folder)
    for file in list(folder.iterdir()):
        shutil.copy(file, folder / f"copy-{file.name}")
    _expect(folder, "19 file(s) of 38 copy another file of the series")


def _copy_as_another_image(source, target) -> None:
    """Copy a DICOM file with another SOPInstanceUID (its last digit changed), as another image
    at the same position (another b-value) has."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(source))
    reader.ReadImageInformation()
    uid = reader.GetMetaData("0008|0018").strip("\0 ").encode()
    other = uid[:-1] + (b"1" if uid[-1:] != b"1" else b"2")
    target.write_bytes(source.read_bytes().replace(uid, other))


@pytest.mark.real_data
def test_series_of_several_b_values_is_refused_as_several_volumes(prostatex_case_dir, tmp_path):
    # A DWI series holding two b-values: every position twice. It was reported as one repeated
    # slice with "median spacing 0.00 mm".
    folder = tmp_path / "dwi"
    folder.mkdir()
    for file in (prostatex_case_dir / "hbv").iterdir():
        shutil.copy(file, folder / f"b50_{file.name}")
        _copy_as_another_image(file, folder / f"b800_{file.name}")
    error = _expect(folder, "each of the 19 slice positions holds 2 images (38 files)")
    assert "several volumes in one series (b-values" in error.reason
    assert error.file == str(folder) and "median spacing" not in error.reason


def _slice_positions(folder):
    """[n, 3] ImagePositionPatient and the 6 direction cosines of a DICOM series, from its
    headers (SimpleITK, independently of focalnet_jax.data.dicom)."""
    positions, cosines = [], set()
    for file in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)):
        reader = sitk.ImageFileReader()
        reader.SetFileName(file)
        reader.ReadImageInformation()
        positions.append([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
        cosines.add(tuple(float(v) for v in reader.GetMetaData("0020|0037").split("\\")))
    assert len(cosines) == 1
    return np.array(positions), np.array(cosines.pop()).reshape(2, 3)


@pytest.mark.real_data
@pytest.mark.parametrize("component", ["t2w", "adc", "hbv"])
def test_prostatex_slice_positions_are_regular_to_the_bounds_docs_quote(
    prostatex_case_dir, component
):
    # docs/data.md quotes these bounds for ProstateX-0000, 4 to 5 orders of magnitude below the
    # tolerances of the stack check (0.03 mm; 0.03 mm + 0.001 mm per mm in the plane).
    positions, cosines = _slice_positions(prostatex_case_dir / component)
    along = np.sort(positions @ np.cross(cosines[0], cosines[1]))
    steps = np.diff(along)
    assert len(steps) == 18 and abs(np.median(steps) - 3.0) < 1e-6
    assert np.abs(steps - np.median(steps)).max() < 4e-7  # 3.5e-7 mm measured
    in_plane = positions @ cosines.T
    assert np.abs(in_plane - in_plane[0]).max() < 4e-6  # 3.1e-6 mm measured


@pytest.mark.real_data
def test_prostatex_99th_percentiles_are_the_values_docs_quote(prostatex_case_dir):
    adc = sitk.GetArrayFromImage(read_image(prostatex_case_dir / "adc"))
    assert np.percentile(adc[adc != 0], 99) == 2919.0  # docs/data.md, ADC units
    assert adc_unit_problem(adc) is None
    # The T2w's values pass as an ADC map too (docs/data.md: why ImageType is checked).
    t2w = sitk.GetArrayFromImage(read_image(prostatex_case_dir / "t2w"))
    assert np.percentile(t2w[t2w != 0], 99) == 638.0 and adc_unit_problem(t2w) is None
    hbv = sitk.GetArrayFromImage(read_image(prostatex_case_dir / "hbv"))
    assert np.percentile(hbv[hbv != 0], 99) == 55.0 and "not an ADC map" in adc_unit_problem(hbv)


# --- truncated files and ADC units ---------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True])
def test_truncated_mha_says_how_much_is_missing(tmp_path, compressed):
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((6, 64, 64), np.float32))
    path = tmp_path / "x.mha"
    sitk.WriteImage(image, str(path), useCompression=compressed)
    data = path.read_bytes()
    offset = data.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    path.write_bytes(data[: len(data) // 3])
    kept = len(data) // 3 - offset
    promised = len(data) - offset if compressed else 6 * 64 * 64 * 4
    kind = "compressed data" if compressed else "image data"
    error = _expect(path, f"unreadable or truncated image ({kept} bytes of {kind}, header promises")
    assert f"promises {promised})" in error.reason and "No such file" not in error.reason


def test_adc_unit_is_judged_by_a_high_percentile():
    adc = np.random.default_rng(0).uniform(500, 3000, (4, 32, 32))
    adc[:, :8] = 0  # background
    assert adc_unit_problem(adc) is None
    assert "looks like 1e-3 mm^2/s" in adc_unit_problem(adc / 1e3)
    problem = adc_unit_problem(adc / 1e6)
    assert "looks like mm^2/s" in problem and "percentile of non-zero voxels 0.00297" in problem
    assert adc_unit_problem(np.zeros((2, 4, 4))) == "ADC map is zero everywhere"


def test_adc_map_in_no_unit_is_not_called_rescalable():
    # A 99th percentile of 55 is neither 1e-3 mm^2/s (about 3: 55e-3 mm^2/s is 18x free water)
    # nor 1e-6 mm^2/s (about 3000): a DWI given as ADC. It used to be called "1e-3 mm^2/s:
    # rescale it", and a DWI x 1000 then passed as an ADC map.
    adc = np.random.default_rng(0).uniform(500, 3000, (4, 32, 32))
    dwi = adc / 3000 * 55
    problem = adc_unit_problem(dwi)
    assert "not an ADC map in 1e-6, 1e-3 or 1 mm^2/s" in problem and "rescale" not in problem
    assert f"non-zero voxels {np.percentile(dwi, 99):.4g};" in problem and "DWI" in problem
    assert "looks like 1e-3 mm^2/s" in adc_unit_problem(adc / 3000 * 9)


@pytest.mark.real_data
def test_high_b_image_given_as_adc_is_refused_as_no_adc_map(prostatex_case_dir, tmp_path):
    from focalnet_jax.data import preprocess_case

    hbv = str(tmp_path / "hbv.mha")  # an image file: no DICOM ImageType to tell what it is
    sitk.WriteImage(read_image(prostatex_case_dir / "hbv"), hbv)
    with pytest.raises(CaseError) as info:
        preprocess_case({"t2w": str(prostatex_case_dir / "t2w"), "adc": hbv}, case_id="px")
    assert info.value.file == hbv and "not an ADC map" in info.value.reason


@pytest.mark.real_data
@pytest.mark.parametrize(
    "given, folders, wrong, image_type",
    [
        ("t2w", ("adc", "t2w"), "adc", "DERIVED\\PRIMARY\\DIFFUSION\\ADC\\DIS2D"),  # swapped
        ("adc", ("t2w", "hbv"), "hbv", "DERIVED\\PRIMARY\\DIFFUSION\\TRACEW\\DIS2D"),
        ("hbv", ("t2w", "adc", "adc"), "adc", "DERIVED\\PRIMARY\\DIFFUSION\\ADC\\DIS2D"),
    ],
)
def test_dicom_series_of_another_component_is_refused_by_its_image_type(
    prostatex_case_dir, given, folders, wrong, image_type
):
    # The ADC folder given as T2w (and T2w as ADC: its 99th percentile, 638, passes the unit
    # check) was predicted on without a word; so was the ADC map given as HBV.
    from focalnet_jax.data import preprocess_case

    components = {
        name: str(prostatex_case_dir / folder)
        for name, folder in zip(("t2w", "adc", "hbv"), folders, strict=False)
    }
    with pytest.raises(CaseError) as info:
        preprocess_case(components, case_id="px")
    assert info.value.file == str(prostatex_case_dir / wrong)
    assert f"ImageType '{image_type}'" in info.value.reason
    assert f"it is no {given} series" in info.value.reason


# --- through `focalnet preprocess --layout manifest` ---------------------------------------------

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


def _write_series(
    folder, shift_x_mm: float, slices: int = 6, spacing: float = 3.0, values=None, tags=None
) -> None:
    """`slices` 16 x 16 axial DICOM slices `spacing` mm apart, slice k shifted by k * shift_x_mm
    along x; `values`: int16 [slices, 16, 16] stored pixel values; `tags`: more tags of each."""
    folder.mkdir()
    shape = (slices, 16, 16)
    values = (np.arange(np.prod(shape)) % 97).reshape(shape) if values is None else values
    volume = sitk.GetImageFromArray(np.asarray(values, "i2"))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    ctype = locale.setlocale(locale.LC_CTYPE)  # GDCM's writer sets the C locale: restored below
    try:
        for k in range(slices):
            image = volume[:, :, k]
            slice_tags = {"0008|0060": "MR", "0020|000d": "1.2.826.0.1.3680043.2.1125.1.43",
                    "0020|000e": "1.2.826.0.1.3680043.2.1125.1.42",
                    "0020|0037": "1\\0\\0\\0\\1\\0",
                    "0020|0032": f"{shift_x_mm * k:.6f}\\0\\{spacing * k:.6f}",
                    "0020|0013": str(k + 1), **(tags or {})}  # fmt: skip
            for tag, value in slice_tags.items():
                image.SetMetaData(tag, value)
            writer.SetFileName(str(folder / f"{k}.dcm"))
            writer.Execute(image)
    finally:
        locale.setlocale(locale.LC_CTYPE, ctype)


def test_sheared_dicom_stack_is_refused(tmp_path):
    # Slice positions moving 2 mm along x per slice: ITK read it as a straight stack with a
    # 3.61 mm z spacing, every slice but the first misplaced.
    _write_series(tmp_path / "straight", 0.0)
    assert read_image(tmp_path / "straight").GetSpacing()[2] == pytest.approx(3.0)
    _write_series(tmp_path / "sheared", 2.0)
    error = _expect(tmp_path / "sheared", "slice positions move within the slice plane by up to")
    assert "10.00 mm (5.dcm against 0.dcm; tolerance 0.04 mm): a sheared stack" in error.reason
    assert error.file == str(tmp_path / "sheared")


def test_long_thin_stack_with_rounded_cosines_is_not_sheared(tmp_path):
    # 60 slices 1 mm apart drifting 0.0005 mm per mm (direction cosines rounded to 4 decimals):
    # 0.03 mm over the stack, over the 0.01 mm spacing tolerance; it was refused as sheared.
    _write_series(tmp_path / "thin", 0.0005, slices=60, spacing=1.0)
    assert read_image(tmp_path / "thin").GetSize() == (16, 16, 60)
    _write_series(tmp_path / "tilted", 0.02, slices=60, spacing=1.0)  # a 1.1 degree tilt
    _expect(tmp_path / "tilted", "slice positions move within the slice plane by up to 1.18 mm")


def _set_rescale_slope(file, slope: bytes) -> None:
    """Overwrite RescaleSlope (0028,1053), written as '1 ' in implicit VR, with 2-byte `slope`."""
    element = b"\x28\x00\x53\x10\x02\x00\x00\x00"
    data = file.read_bytes()
    assert data.count(element + b"1 ") == 1
    file.write_bytes(data.replace(element + b"1 ", element + slope))


def test_rescale_slope_varying_per_slice_is_applied_per_slice(tmp_path):
    # Slopes that vary per slice (as some scanners write them): ITK chose the pixel type of the
    # first slice (slope 1: int16), so stored 20000 x slope 2 wrapped to -25536 and 97 x 0.5
    # was truncated to 48.
    values = np.stack([np.full((16, 16), v) for v in (20000, 20000, 97, 20000, 97, 20000)])
    _write_series(tmp_path / "s", 0.0, values=values, tags={"0028|1053": "1", "0028|1052": "0"})
    for k, slope in ((3, b"2 "), (4, b".5")):
        _set_rescale_slope(tmp_path / "s" / f"{k}.dcm", slope)
    volume = sitk.GetArrayFromImage(read_image(tmp_path / "s"))
    np.testing.assert_array_equal(volume[:, 0, 0], [20000, 20000, 97, 40000, 48.5, 20000])
    assert np.ptp(volume, axis=(1, 2)).max() == 0


def _compress_in_name_only(file, syntax: str = "1.2.840.10008.1.2.4.90") -> None:
    """Give a part-10 file (explicit VR little endian) transfer syntax `syntax` and encapsulated
    pixel data that no codec decodes: a JPEG 2000 codestream start, then zeros."""
    data = bytearray(file.read_bytes())
    at = data.find(b"\x02\x00\x10\x00UI")
    length = int.from_bytes(data[at + 6 : at + 8], "little")
    value = syntax.encode() + b"\0" * (len(syntax) % 2)
    data[at + 6 : at + 8 + length] = len(value).to_bytes(2, "little") + value
    group = data.find(b"\x02\x00\x00\x00UL")  # meta group length, after the new value's size
    size = int.from_bytes(data[group + 8 : group + 12], "little") + len(value) - length
    data[group + 8 : group + 12] = size.to_bytes(4, "little")
    pixels = data.rfind(b"\xe0\x7f\x10\x00OW\x00\x00")
    fragment = b"\xff\x4f\xff\x51" + bytes(60)
    item = b"\xfe\xff\x00\xe0"
    data[pixels:] = (
        b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff" + item + bytes(4)
        + item + len(fragment).to_bytes(4, "little") + fragment + b"\xfe\xff\xdd\xe0" + bytes(4)
    )  # fmt: skip
    file.write_bytes(bytes(data))


@pytest.mark.real_data
def test_slice_in_a_transfer_syntax_no_codec_decodes_is_named(prostatex_case_dir, tmp_path):
    # It was "file '<folder>': unreadable or truncated image (ITK ERROR: GDCMImageIO(0x55..):
    # Failed to change to Implicit Transfer Syntax)": neither the file nor the compression.
    folder = tmp_path / "adc"
    shutil.copytree(prostatex_case_dir / "adc", folder)
    broken = sorted(folder.iterdir())[9]
    _compress_in_name_only(broken)
    error = _expect(folder, "pixel data in transfer syntax 1.2.840.10008.1.2.4.90 (1 of 19 files)")
    assert error.file == str(broken)
    assert "cannot be decoded (" in error.reason and "GDCMImageIO(0x" not in error.reason
    assert error.reason.endswith(
        "; convert the series to uncompressed DICOM (e.g. gdcmconv --raw); printed on stderr "
        "during the read: Invalid marker size (x6)"
    )


@pytest.mark.real_data
def test_exam_folder_given_for_a_series_names_its_series_folders(prostatex_case_dir):
    # DICOM exports nest patient/study/series folders; the exam folder given as T2w said only
    # "folder holds no DICOM series".
    error = _expect(prostatex_case_dir, "folder holds no DICOM series; it holds folders ")
    assert error.reason.endswith("adc, hbv, t2w: give one series' folder")


@pytest.mark.parametrize(
    "position, shown", [(b"0\\x\\3 ", "'0\\\\x\\\\3'"), (b"0\\3   ", "'0\\\\3'")]
)
def test_malformed_slice_position_is_one_line(tmp_path, position, shown):
    # A position that is no number, or has 2 values, ended in a ValueError traceback.
    _write_series(tmp_path / "s", 0.0)
    file = tmp_path / "s" / "1.dcm"
    data = file.read_bytes()
    assert data.count(b"0\\0\\3 ") == 1  # as GDCM writes (0, 0, 3.000000)
    file.write_bytes(data.replace(b"0\\0\\3 ", position))
    error = _expect(tmp_path / "s", f"DICOM tag (0020,0032) {shown} is not 3 numbers")
    assert error.file == str(file)


def test_slices_without_pixel_spacing_are_refused(tmp_path):
    # Without PixelSpacing (0028,0030) ITK took 1 mm pixels without a word.
    _write_series(tmp_path / "s", 0.0)
    for file in (tmp_path / "s").iterdir():
        data = file.read_bytes()
        assert data.count(b"\x28\x00\x30\x00") == 1  # implicit VR little endian, as GDCM writes
        file.write_bytes(data.replace(b"\x28\x00\x30\x00", b"\x28\x00\x31\x00"))  # another tag
    error = _expect(tmp_path / "s", "DICOM file lacks PixelSpacing (0028,0030)")
    assert error.file.endswith(".dcm")


@pytest.mark.parametrize(
    "tag, value, reason",
    [
        ("PixelSpacing", [1.1, 1.1], "PixelSpacing (0028,0030) '1.1\\\\1.1' differs from 0.dcm's"),
        (
            "FrameOfReferenceUID",
            "1.2.826.0.1.3680043.2.1125.1.77",
            "FrameOfReferenceUID (0020,0052) '1.2.826.0.1.3680043.2.1125.1.77' differs from 0.dcm",
        ),
    ],
)
def test_a_slice_unlike_the_others_is_refused_naming_it(tmp_path, tag, value, reason):
    # ITK reads the pixel spacing and the frame of reference of a stack from one slice: a slice
    # with other values was read at the first's (an ADC misregistered by up to 0.92 of its range
    # when the slice sorted first had the odd PixelSpacing).
    import pydicom

    _write_series(tmp_path / "s", 0.0, tags={"0020|0052": "1.2.826.0.1.3680043.2.1125.1.44"})
    file = tmp_path / "s" / "3.dcm"
    header = pydicom.dcmread(file)
    setattr(header, tag, value)
    header.save_as(file)
    error = _expect(tmp_path / "s", reason)
    assert error.file == str(file)


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
