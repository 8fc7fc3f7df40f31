"""Bad data-command input is one line on stderr (from Python or from SimpleITK) naming the case,
the file and the reason, exit status 2, and leaves nothing half-written."""

from __future__ import annotations

import csv
import json
import locale
import logging
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from focalnet_jax.cli import main
from focalnet_jax.data.io import read_image
from focalnet_jax.data.layouts import LayoutError, discover_picai, write_manifest
from focalnet_jax.data.store import open_store


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(root), "--cases", "2", "--seed", "1", "--small"]) == 0
    return root


@pytest.fixture(scope="module")
def store(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "store"
    assert main([*_picai(dataset, out), "--labels", str(dataset / "labels")]) == 0
    return out


def _picai(root, out, images=None):
    images = images or root / "images"
    return ["preprocess", "--layout", "picai", "--images", str(images), "--out", str(out)]


def _user_error(capfd, argv) -> str:
    """Runs the CLI expecting a user error: exit status 2 and exactly one line on stderr (file
    descriptor 2, so SimpleITK's own output counts; the progress bar aside), which is returned."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as raised:
        main(argv)
    err = re.sub(r"(\rpreprocess:[^\r\n]*)+\n", "", capfd.readouterr().err)  # progress bar
    assert raised.value.code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_picai_without_labels_needs_unlabelled(dataset, tmp_path, capfd):
    out = tmp_path / "store"
    err = _user_error(capfd, _picai(dataset, out))
    assert "no --labels folder" in err and "--unlabelled negative" in err
    assert not out.exists()
    err = _user_error(capfd, [*_picai(dataset, out), "--labels", str(tmp_path / "nowhere")])
    assert err.endswith(f"labels folder {tmp_path / 'nowhere'} does not exist")
    cases = discover_picai(dataset / "images", unlabelled="negative")
    assert len(cases) == 2 and all(c.label is None for c in cases)


@pytest.mark.parametrize("components", ["adc,t2w", "t2w,adc,adc"])
def test_components_must_start_with_t2w(dataset, tmp_path, capfd, components):
    argv = [*_picai(dataset, tmp_path / "s"), "--labels", str(dataset / "labels")]
    err = _user_error(capfd, [*argv, "--components", components])
    assert err.endswith(f"components {components!r}: expected t2w first (the reference frame), "
                        "then distinct others, e.g. 't2w,adc,hbv'")  # fmt: skip


@pytest.mark.parametrize(
    "name, reason",
    [
        ("label", "a manifest column of another role has that name; name the component otherwise"),
        ("prostate_mask", "a manifest column of another role has that name; name the component "
                          "otherwise"),
        ("hbv_series", "a manifest column of another role has that name; name the component "
                       "otherwise"),
        ("ADC", "name it 'adc' (adc is read by that name only)"),
    ],
)  # fmt: skip
def test_a_component_named_as_another_column_or_adc_in_capitals_is_refused(
    dataset, tmp_path, capfd, name, reason
):
    # `--components t2w,adc,label` stored a case's label file as a model input (a case whose
    # label passed the intensity checks); `ADC` was scaled by its percentiles, not as an ADC map.
    argv = [*_picai(dataset, tmp_path / "s"), "--labels", str(dataset / "labels")]
    err = _user_error(capfd, [*argv, "--components", f"t2w,{name}"])
    assert err.endswith(f"component {name!r}: {reason}")


@pytest.mark.parametrize(
    "components, reason",
    [
        ("adc,t2w", "expected t2w first (the reference frame), then distinct others, e.g. "
                    "'t2w,adc,hbv'"),
        ("t2w,flair", "synthetic cases have only t2w,adc,hbv,dce"),
    ],
)  # fmt: skip
def test_synth_components_are_checked_as_preprocess_checks_them(
    tmp_path, capfd, components, reason
):
    out = tmp_path / "synth"
    err = _user_error(
        capfd, ["synth", "--out", str(out), "--cases", "1", "--components", components]
    )
    assert err == f"focalnet synth: error: components {components!r}: {reason}"
    assert not out.exists()


def test_case_in_two_patient_folders_or_two_formats(dataset, tmp_path, capfd):
    images = tmp_path / "images"
    shutil.copytree(dataset / "images", images)
    first = images / "10000" / "10000_1000000_t2w.mha"
    (images / "99999").mkdir()
    shutil.copy(first, images / "99999" / first.name)
    argv = [*_picai(dataset, tmp_path / "s", images), "--labels", str(dataset / "labels")]
    err = _user_error(capfd, argv)
    adc = images / "10000" / "10000_1000000_adc.mha"  # the case's first file in its first folder
    assert err.endswith(
        f"case '10000_1000000': files in two patient folders: {adc} and "
        f"{images / '99999' / first.name}"
    )
    shutil.rmtree(images / "99999")
    sitk.WriteImage(sitk.ReadImage(str(adc)), str(adc.with_suffix(".nii.gz")))
    err = _user_error(capfd, argv)
    assert err.endswith(f"two files for 10000_1000000_adc: {adc} and {adc.with_suffix('.nii.gz')}")
    assert not (tmp_path / "s").exists()
    # With --skip-bad-cases that case is listed in errors.csv and the others stored (the whole
    # run used to stop).
    assert main([*argv, "--skip-bad-cases"]) == 0
    assert open_store(tmp_path / "s").case_ids == ["10001_1000001"]
    with (tmp_path / "s" / "errors.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["10000_1000000"]
    # The file column names the second of the two (it named the case's first image file).
    assert rows[0]["file"] == str(adc.with_suffix(".nii.gz"))
    assert rows[0]["reason"] == (
        f"two files for 10000_1000000_adc: {adc} and {adc.with_suffix('.nii.gz')}"
    )


@pytest.mark.parametrize(
    ("centre", "reason"),
    [
        (("1", "", "2"), "centre partly given (center_y empty)"),
        (("1", "nan", "2"), "center_y 'nan' is not a finite number (mm)"),
        (("inf", "0", "2"), "center_x 'inf' is not a finite number (mm)"),
    ],
)
def test_bad_manifest_centre_names_line_and_column(dataset, tmp_path, capfd, centre, reason):
    manifest = tmp_path / "cases.csv"
    write_manifest(discover_picai(dataset / "images", dataset / "labels"), manifest)
    with manifest.open() as f:
        rows = list(csv.DictReader(f))
    rows[1].update(zip(("center_x", "center_y", "center_z"), centre, strict=True))
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    argv = ["preprocess", "--layout", "manifest", "--manifest", str(manifest), "--out", "s"]
    assert _user_error(capfd, argv).endswith(f"manifest {manifest}, line 3: {reason}")
    # With --skip-bad-cases the row is listed in errors.csv (it stopped the whole run).
    out = tmp_path / "s"
    assert main([*argv[:-1], str(out), "--skip-bad-cases"]) == 0
    assert open_store(out).case_ids == [rows[0]["case_id"]]
    with (out / "errors.csv").open() as f:
        (error,) = list(csv.DictReader(f))
    assert error["case"] == rows[1]["case_id"] and error["reason"].endswith(reason)


def test_synth_refuses_a_non_empty_out_unless_overwrite(tmp_path, capfd):
    out = tmp_path / "data"
    argv = ["synth", "--out", str(out), "--cases", "2", "--seed", "5", "--small"]
    assert main(argv) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert _user_error(capfd, [*argv[:4], "1", "--seed", "6"]).endswith(
        f"--out {out} is not empty (outputs of an earlier run?); choose a new folder or add "
        "--overwrite to replace it"
    )
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert main([*argv[:4], "1", "--seed", "6", "--small", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["10000"]
    with (out / "marksheet.csv").open() as f:
        assert [r["patient_id"] for r in csv.DictReader(f)] == ["10000"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary folder left
    (tmp_path / "file").write_text("x")
    err = _user_error(capfd, ["synth", "--out", str(tmp_path / "file"), "--cases", "1"])
    assert err.endswith(f"--out {tmp_path / 'file'} exists and is not a folder")
    # --overwrite replaces only a synthetic dataset: a data folder is not deleted whole.
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    err = _user_error(capfd, [*argv[:2], str(mine), *argv[3:], "--overwrite"])
    assert err.endswith(
        f"--out {mine} has no lesions.csv: it is not the output folder of an earlier focalnet "
        "synth, and --overwrite would delete it whole; choose a new folder"
    )
    assert (mine / "images").is_dir()
    # Nor a synthetic dataset holding what synth did not write (a store, notes): deleted whole.
    (out / "store").mkdir()
    (out / "store" / "cases.json").write_text("[]")
    err = _user_error(capfd, [*argv[:4], "1", "--seed", "6", "--small", "--overwrite"])
    assert err.endswith(
        f"--out {out} holds 'store', which focalnet synth did not write: --overwrite would "
        f"delete it; move it out of {out} or choose a new folder"
    )
    assert (out / "store" / "cases.json").read_text() == "[]"


def test_damaged_store_is_one_line(store, tmp_path, capfd):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    images = copy / "images.npy"
    images.write_bytes(images.read_bytes()[:1000])
    err = _user_error(capfd, ["folds", "--store", str(copy)])
    assert err.startswith(f"focalnet folds: error: {images}: unreadable or truncated (")
    table = json.loads((store / "cases.json").read_text())
    (copy / "cases.json").write_text(json.dumps(table["cases"]))
    err = _user_error(capfd, ["folds", "--store", str(copy)])
    assert err.endswith(f"{copy / 'cases.json'}: not a store table (expected an object with "
                        "('components', 'settings', 'fingerprint', 'cases'))")  # fmt: skip
    assert len(open_store(store).cases) == 2


@pytest.mark.parametrize("content", ["{not json", "[1]"])
def test_bad_dataset_json_is_one_line(dataset, tmp_path, capfd, content):
    labels = tmp_path / "labels"
    shutil.copytree(dataset / "labels", labels)
    (labels / "dataset.json").write_text(content)
    err = _user_error(capfd, [*_picai(dataset, tmp_path / "s"), "--labels", str(labels)])
    assert f"{labels / 'dataset.json'}: " in err
    assert ("not readable JSON" if content == "{not json" else "expected a JSON object") in err


def test_marksheet_folder_and_bad_workers_are_one_line(dataset, tmp_path, capfd):
    argv = [*_picai(dataset, tmp_path / "s"), "--labels", str(dataset / "labels")]
    err = _user_error(capfd, [*argv, "--marksheet", str(tmp_path)])
    assert err.endswith(f"marksheet {tmp_path} is not a file")
    for workers in ("0", "-2"):
        err = _user_error(capfd, [*argv, "--workers", workers])
        assert err.endswith(f"--workers {workers}: expected at least 1")


def test_truncated_metaimage_and_empty_dicom_folder_print_nothing_else(dataset, tmp_path, capfd):
    source = dataset / "images" / "10000" / "10000_1000000_t2w.mha"
    short = tmp_path / "short.mha"
    short.write_bytes(source.read_bytes()[:5000])
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.dcm").write_text("not DICOM")
    capfd.readouterr()
    for path, reason in ((short, "bytes of compressed data, header promises"),
                         (junk, "folder holds no DICOM series")):  # fmt: skip
        with pytest.raises(ValueError, match=reason):
            read_image(path, case="c")
    assert capfd.readouterr().err == ""  # SimpleITK's own messages are not shown
    manifest = tmp_path / "cases.csv"  # through the CLI: one line
    manifest.write_text(f"case_id,patient_id,t2w,adc,label\nc1,p1,{short},{short},{short}\n")
    argv = ["preprocess", "--layout", "manifest", "--manifest", str(manifest), "--out", "s"]
    assert "header promises" in _user_error(capfd, argv)


def test_unreadable_dicom_slice_is_named(prostatex_case_dir, tmp_path, capfd):
    folder = tmp_path / "t2w"
    shutil.copytree(prostatex_case_dir / "t2w", folder)
    damaged = folder / "1-05.dcm"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    capfd.readouterr()
    with pytest.raises(ValueError) as raised:
        read_image(folder, case="c")
    assert str(raised.value).endswith("; not readable as DICOM: 1-05.dcm")
    assert "missing slice or uneven spacing" in str(raised.value)
    assert capfd.readouterr().err == ""
    assert np.isfinite(sitk.GetArrayFromImage(read_image(prostatex_case_dir / "t2w"))).all()


@pytest.mark.parametrize(
    "damage", ["truncated", "not_dicom", "cut_in_meta_group", "cut_in_meta", "cut_in_header"]
)
def test_unreadable_dicom_slice_at_the_end_of_the_stack_is_refused(
    prostatex_case_dir, tmp_path, damage
):
    # GDCM leaves an unreadable file out of the series; at either end of the stack that leaves no
    # gap, and the series was read with 18 of its 19 slices, silently.
    folder = tmp_path / "adc"
    shutil.copytree(prostatex_case_dir / "adc", folder)
    last = folder / "1-19.dcm"
    data = last.read_bytes()
    # Cut inside the meta header, or after it but before the series UID (byte ~3060): the
    # 'DICM' preamble is there, so it was left out with a warning as another series' object.
    cut = {"truncated": int(len(data) * 0.97), "cut_in_meta_group": 160, "cut_in_meta": 200,
           "cut_in_header": 3000}  # fmt: skip
    last.write_bytes(data[: cut[damage]] if damage in cut else b"x" * 1000)
    with pytest.raises(ValueError) as raised:
        read_image(folder, case="c")
    assert raised.value.file == str(last)
    assert "not readable as DICOM (truncated or corrupt?): 1 such file(s)" in raised.value.reason
    assert "would be read from 18 files" in raised.value.reason
    # Files that are not DICOM by name or preamble (notes, macOS '._' copies) are not refused.
    last.unlink()
    (folder / "notes.txt").write_text("exported 2011")
    (folder / "._1-01.dcm").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 200)
    assert read_image(folder, case="c").GetSize() == (84, 128, 18)


def _part10_report(series_uid: str) -> bytes:
    """A minimal DICOM part-10 structured report (no pixel data) of series `series_uid`."""

    def element(group, number, vr, value):
        value += b"\x00" * (len(value) % 2)
        return struct.pack("<HH", group, number) + vr + struct.pack("<H", len(value)) + value

    meta = element(0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.1")  # explicit VR little endian
    meta = element(0x0002, 0x0000, b"UL", struct.pack("<I", len(meta))) + meta
    body = element(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR
    body += element(0x0008, 0x0060, b"CS", b"SR") + element(
        0x0020, 0x000E, b"UI", series_uid.encode()
    )
    return b"\x00" * 128 + b"DICM" + meta + body


def test_report_of_another_series_beside_the_slices_is_left_out(prostatex_case_dir, tmp_path,
                                                                caplog):  # fmt: skip
    # GDCM reads a structured report into no image series, as it does a truncated slice; the
    # slices' own series UID is not in it, so it is left out with a warning (it was refused as a
    # truncated or corrupt slice).
    folder = tmp_path / "adc"
    shutil.copytree(prostatex_case_dir / "adc", folder)
    (folder / "report.dcm").write_bytes(_part10_report("1.2.826.0.1.3680043.2.1125.9"))
    assert read_image(folder, case="c").GetSize() == (84, 128, 19)
    assert "1 DICOM file(s) of no image series left out (report.dcm)" in caplog.text


def test_manifest_and_marksheet_from_a_spreadsheet(dataset, tmp_path, capfd):
    # Spreadsheet programs save "CSV UTF-8" with a byte-order mark (it stuck to the first column:
    # "missing column(s) ['case_id']") or in a legacy code page (a UnicodeDecodeError traceback).
    cases = discover_picai(dataset / "images", dataset / "labels")
    write_manifest(cases, tmp_path / "plain.csv")
    text = (tmp_path / "plain.csv").read_text()
    (tmp_path / "bom.csv").write_text(text, encoding="utf-8-sig")
    out = tmp_path / "store"
    argv = ["preprocess", "--layout", "manifest", "--out", str(out), "--label-values", "isup"]
    assert main([*argv, "--manifest", str(tmp_path / "bom.csv")]) == 0
    assert open_store(out).case_ids == [c.case_id for c in cases]
    (tmp_path / "latin.csv").write_bytes((text + "x,Patiënt,a,b,c,,,,\n").encode("cp1252"))
    err = _user_error(capfd, [*argv, "--manifest", str(tmp_path / "latin.csv"), "--overwrite"])
    assert err.endswith(f"manifest {tmp_path / 'latin.csv'}, line 4: not UTF-8 text (byte 0xeb); "
                        "save it as CSV UTF-8")  # fmt: skip
    sheet = (dataset / "marksheet.csv").read_text()
    (tmp_path / "marksheet.csv").write_text(sheet, encoding="utf-8-sig")
    picai = [*_picai(dataset, tmp_path / "s2"), "--labels", str(dataset / "labels")]
    assert main([*picai, "--marksheet", str(tmp_path / "marksheet.csv")]) == 0
    first = open_store(tmp_path / "s2").cases[0]
    assert first["meta"]["patient_id"] == first["patient_id"]


def test_an_empty_component_cell_of_a_manifest_names_the_component(dataset, tmp_path, capfd):
    # The line said "file '': no path given": which of the case's components was missing? Then
    # "case 'x', file '': no adc path given": which manifest, which line?
    cases = discover_picai(dataset / "images", dataset / "labels")
    write_manifest(cases, tmp_path / "all.csv")
    with (tmp_path / "all.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    rows[0]["adc"] = ""
    with (tmp_path / "m.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    argv = ["preprocess", "--layout", "manifest", "--manifest", str(tmp_path / "m.csv")]
    err = _user_error(capfd, [*argv, "--out", str(tmp_path / "store")])
    assert err.endswith(
        f"manifest {tmp_path / 'm.csv'}, line 2: case {cases[0].case_id!r} has an empty adc "
        "cell; give each component's DICOM folder or image file, or leave the case out"
    )


def test_misspelt_masks_folder_is_refused_and_missing_masks_named(dataset, tmp_path, capfd, caplog):
    # A --masks folder that does not exist was ignored: every crop silently centred on the T2w
    # volume centre instead of the gland.
    argv = [*_picai(dataset, tmp_path / "s"), "--labels", str(dataset / "labels")]
    err = _user_error(capfd, [*argv, "--masks", str(dataset / "mask")])
    assert err.endswith(f"masks folder {dataset / 'mask'} does not exist")
    masks = tmp_path / "masks"
    shutil.copytree(dataset / "masks", masks)
    first = sorted(masks.glob("*.nii.gz"))[0]
    first.unlink()
    cases = discover_picai(dataset / "images", dataset / "labels", masks)
    assert sum(c.mask is None for c in cases) == 1
    case_id = first.name.removesuffix(".nii.gz")
    assert f"1 of 2 cases have no mask in {masks} (crop centred on the T2w volume centre): " \
           f"{case_id}" in caplog.text  # fmt: skip


def test_archive_given_as_a_folder_is_named_a_file(dataset, tmp_path, capfd):
    # PI-CAI images come as zip archives: one given as --images was reported as "does not exist".
    archive = shutil.make_archive(str(tmp_path / "images"), "zip", dataset / "images")
    err = _user_error(capfd, [*_picai(dataset, tmp_path / "s", images=archive), "--labels",
                              str(dataset / "labels")])  # fmt: skip
    assert err.endswith(
        f"images folder {archive} is a file, not a folder (an archive? extract it first)"
    )


@pytest.mark.real_data
def test_a_single_slice_component_is_refused_naming_case_and_folder(
    prostatex_case_dir, tmp_path, capfd
):
    # A one-file T2w export (slice 10 of 19) was preprocessed without a word: its ADC and HBV were
    # sampled on its plane as on the whole exam's (to 4e-7), but one slice holds no 10 ml bladder,
    # so the T2w reference fell back to the 99.5th percentile (627 for the bladder's 561) and
    # the T2w channel moved by up to 0.14 (of 1.36); its 3 mm thickness came from a header tag.
    t2w = tmp_path / "t2w"
    t2w.mkdir()
    shutil.copy(prostatex_case_dir / "t2w" / "1-10.dcm", t2w)
    adc = prostatex_case_dir / "adc"
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"case_id,patient_id,t2w,adc\nc1,p1,{t2w},{adc}\n")
    out = tmp_path / "store"
    argv = ["preprocess", "--layout", "manifest", "--manifest", str(manifest), "--out", str(out)]
    err = _user_error(capfd, [*argv, "--unlabelled", "negative"])
    assert err.endswith(
        f"case 'c1', file '{t2w}': t2w has a single slice (384 x 384 x 1 voxels): a broken or "
        "partial export (prostate MRI series hold about 20-30 slices); export the whole series"
    )
    assert not out.exists()
    # Any component: a one-slice ADC image file is named as well.
    one = tmp_path / "adc.mha"
    sitk.WriteImage(read_image(adc)[:, :, 9:10], str(one))
    manifest.write_text(f"case_id,patient_id,t2w,adc\nc1,p1,{prostatex_case_dir / 't2w'},{one}\n")
    err = _user_error(capfd, [*argv, "--unlabelled", "negative"])
    assert f"file '{one}': adc has a single slice (84 x 128 x 1 voxels)" in err


def _jpeg2000_slice(series: Path, k: int = 9) -> Path:
    """Rewrites slice `k` (file order) of the DICOM series folder `series` in JPEG 2000 lossless
    (1.2.840.10008.1.2.4.90), encoded by GDCM through SimpleITK; returns its file."""
    file = sorted(series.iterdir())[k]
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")
    writer.KeepOriginalImageUIDOn()
    writer.SetUseCompression(True)
    writer.SetCompressor("JPEG2000")
    writer.SetFileName(str(file))
    ctype = locale.setlocale(locale.LC_CTYPE)  # GDCM's writer sets the C locale: restored below
    try:
        writer.Execute(sitk.ReadImage(str(file)))
    finally:
        locale.setlocale(locale.LC_CTYPE, ctype)
    return file


@pytest.mark.real_data
def test_a_corrupt_jpeg2000_slice_is_one_line_holding_what_gdcm_printed(
    prostatex_case_dir, tmp_path, capfd
):
    # GDCM printed "Invalid marker size" on stderr 7 times before the one-line error.
    folder = tmp_path / "adc"
    shutil.copytree(prostatex_case_dir / "adc", folder)
    file = _jpeg2000_slice(folder)
    original = sitk.GetArrayFromImage(read_image(prostatex_case_dir / "adc"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(folder)), original)
    data = bytearray(file.read_bytes())
    assert b"1.2.840.10008.1.2.4.90" in data[:1024]
    start = data.find(b"\xff\x4f\xff\x51")  # codestream start, then the SIZ marker segment
    data[start + 4 : start + 6] = b"\x00\x01"  # SIZ length 1 (it is at least 41)
    file.write_bytes(bytes(data))
    manifest = tmp_path / "cases.csv"
    t2w = prostatex_case_dir / "t2w"
    manifest.write_text(f"case_id,patient_id,t2w,adc\nc1,p1,{t2w},{folder}\n")
    argv = ["preprocess", "--layout", "manifest", "--manifest", str(manifest)]
    argv += ["--out", str(tmp_path / "s")]
    err = _user_error(capfd, [*argv, "--unlabelled", "negative"])
    assert f"case 'c1', file '{file}': pixel data in transfer syntax 1.2.840.10008.1.2.4.90 " \
           "(1 of 19 files) cannot be decoded (" in err  # fmt: skip
    assert err.endswith("; printed on stderr during the read: Invalid marker size (x7)")


def _one_slice(path: Path, to: Path) -> str:
    """Writes slice 5 of the image `path` to `to` (its geometry kept); its reason-text size."""
    one = sitk.ReadImage(str(path))[:, :, 5:6]
    sitk.WriteImage(one, str(to))
    return " x ".join(map(str, one.GetSize()))


def test_a_single_slice_label_or_mask_stops_the_run_or_is_listed(dataset, tmp_path, capfd):
    # A one-slice label (PI-CAI labels may be .mha) or gland mask was resampled without a word.
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    first, second = sorted(p.name.removesuffix(".nii.gz") for p in root.glob("labels/*.nii.gz"))
    slices = sitk.ReadImage(str(next(root.glob(f"images/*/{first}_t2w.mha")))).GetSize()[2]
    label, one_label = root / "labels" / f"{first}.nii.gz", root / "labels" / f"{first}.mha"
    kept = label.read_bytes()
    size = _one_slice(label, one_label)
    label.unlink()
    out = tmp_path / "store"
    argv = [*_picai(root, out), "--labels", str(root / "labels"), "--masks", str(root / "masks")]
    reason = (
        f"label has a single slice ({size} voxels) where the T2w has {slices}: a broken or "
        "partial export (the other T2w slices would read as empty); save the label over the "
        "whole T2w volume"
    )
    assert _user_error(capfd, argv).endswith(f"case {first!r}, file '{one_label}': {reason}")
    assert not out.exists()
    assert main([*argv, "--skip-bad-cases"]) == 0
    assert open_store(out).case_ids == [second]
    with (out / "errors.csv").open() as f:
        assert [(r["case"], r["file"], r["reason"]) for r in csv.DictReader(f)] == [
            (first, str(one_label), reason)
        ]
    # The gland mask (NIfTI) of the other case likewise.
    one_label.unlink()
    label.write_bytes(kept)
    mask = root / "masks" / f"{second}.nii.gz"
    size = _one_slice(mask, mask)
    assert main([*argv, "--skip-bad-cases", "--overwrite"]) == 0
    assert open_store(out).case_ids == [first]
    with (out / "errors.csv").open() as f:
        assert [(r["case"], r["file"], r["reason"]) for r in csv.DictReader(f)] == [
            (second, str(mask), f"prostate mask has a single slice ({size} voxels) where the T2w "
             f"has {slices}: a broken or partial export (the other T2w slices would read as "
             "empty); save the prostate mask over the whole T2w volume")
        ]  # fmt: skip


@pytest.mark.real_data
def test_a_series_of_another_frame_of_reference_is_refused(prostatex_case_dir, tmp_path, capfd):
    # An ADC series of another frame of reference (here the exam's own ADC, relabelled) was
    # resampled onto the T2w through scanner coordinates as if the two shared them.
    import pydicom

    adc = tmp_path / "adc"
    shutil.copytree(prostatex_case_dir / "adc", adc)
    for file in adc.iterdir():
        header = pydicom.dcmread(file)
        header.FrameOfReferenceUID = "1.2.3.4.5"
        header.save_as(file)
    t2w_uid = pydicom.dcmread(next((prostatex_case_dir / "t2w").iterdir())).FrameOfReferenceUID
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"case_id,patient_id,t2w,adc\nc1,p1,{prostatex_case_dir / 't2w'},{adc}\n")
    out = tmp_path / "store"
    argv = ["preprocess", "--layout", "manifest", "--manifest", str(manifest), "--out", str(out)]
    err = _user_error(capfd, [*argv, "--unlabelled", "negative"])
    assert err.endswith(
        f"case 'c1', file '{adc}': adc is in DICOM frame of reference 1.2.3.4.5, the T2w in "
        f"{t2w_uid}: their positions are not comparable (another exam or a repositioned "
        "patient?); give the adc of the T2w's exam, or, registered to the T2w, as an MHA or "
        "NIfTI file in its scanner coordinates"
    )
    assert not out.exists()
    # The same voxels as an image file carry no frame of reference: taken as the T2w's.
    image = tmp_path / "adc.mha"
    sitk.WriteImage(read_image(adc), str(image))
    manifest.write_text(f"case_id,patient_id,t2w,adc\nc1,p1,{prostatex_case_dir / 't2w'},{image}\n")
    assert main([*argv, "--unlabelled", "negative"]) in (0, None)
    assert open_store(out).case_ids == ["c1"]


def test_a_flag_of_the_other_layout_is_refused(dataset, tmp_path, capfd):
    # `--masks`, `--labels`, `--marksheet` or `--images` with a manifest, or `--manifest` with
    # the PI-CAI layout, were ignored without a word: no mask-centred crops, no marksheet checks.
    cases = discover_picai(dataset / "images", dataset / "labels")
    write_manifest(cases, tmp_path / "cases.csv")
    out = ["--out", str(tmp_path / "store")]
    manifest = ["preprocess", "--layout", "manifest", "--manifest", str(tmp_path / "cases.csv")]
    err = _user_error(capfd, [*manifest, *out, "--masks", str(dataset / "masks")])
    assert err.endswith(
        "--masks is not read with --layout manifest, only with --layout picai; a manifest names "
        "each case's files in its columns"
    )
    err = _user_error(capfd, [*manifest, *out, "--marksheet", str(dataset / "marksheet.csv")])
    assert "error: --marksheet is not read with --layout manifest, only with --layout picai" in err
    picai = [*_picai(dataset, tmp_path / "store"), "--manifest", str(tmp_path / "cases.csv")]
    err = _user_error(capfd, picai)
    assert err.endswith("--manifest is not read with --layout picai, only with --layout manifest")
    assert not (tmp_path / "store").exists()
    # `focalnet predict` finds its cases the same way.
    from focalnet_jax.evaluation.batch_predict import find_cases

    listed = {"manifest": tmp_path / "cases.csv"}
    with pytest.raises(LayoutError, match="^--masks is not read with --layout manifest"):
        find_cases("manifest", ("t2w", "adc"), **listed, masks=str(dataset / "masks"))
    assert len(find_cases("manifest", ("t2w", "adc"), **listed)) == len(cases)


def test_a_marksheet_with_no_row_for_the_cases_is_refused(dataset, tmp_path, caplog):
    """Rows are matched by <patient_id>_<study_id>: a marksheet of other studies, or of ids a
    float column wrote as `10000.0`, matched no case, and its values and the csPCa check of
    unlabelled cases were dropped without a word. Integral float ids are now read as integers;
    a marksheet matching no case is refused; cases without a row are warned of."""
    text = (dataset / "marksheet.csv").read_text()
    header, *rows = text.splitlines()
    floats = tmp_path / "floats.csv"
    floats.write_text(
        "\n".join([header, *(re.sub(r"^(\d+),(\d+),", r"\1.0,\2.0,", r) for r in rows)]) + "\n"
    )
    images = dataset / "images"
    cases = discover_picai(images, dataset / "labels", marksheet=floats)
    assert all(case.meta for case in cases) and len(cases) == 2
    other = tmp_path / "other.csv"
    other.write_text(f"{header}\n" + "\n".join(re.sub(r"^1", "9", r) for r in rows) + "\n")
    with pytest.raises(LayoutError) as refused:
        discover_picai(images, dataset / "labels", marksheet=other)
    first_case = cases[0].case_id
    first_study = re.sub(r"^1", "9", first_case)
    assert str(refused.value) == (
        f"marksheet {other}: no row for any of the 2 cases (its first study is {first_study!r}, "
        f"the first case {first_case!r}); rows are matched by <patient_id>_<study_id>: is it the "
        "marksheet of these images?"
    )
    empty = tmp_path / "empty.csv"  # a header-only export: no row at all
    empty.write_text(f"{header}\n,,\n")
    with pytest.raises(LayoutError, match=r"no row for any of the 2 cases \(it has no study row,"):
        discover_picai(images, dataset / "labels", marksheet=empty)
    one = tmp_path / "one.csv"
    one.write_text(f"{header}\n{rows[0]}\n")
    with caplog.at_level(logging.WARNING, logger="focalnet_jax"):
        assert len(discover_picai(images, dataset / "labels", marksheet=one)) == 2
    assert f"marksheet {one} has no row for 1 of 2 cases: {cases[1].case_id}" in caplog.text
