"""Bad input images (truncated, unreadable or JPEG 2000-corrupt DICOM slices, single-slice series,
labels and masks, a series of another frame of reference) are one line naming the case, the file
and the reason, with nothing SimpleITK or GDCM printed; reports beside the slices are left out."""

from __future__ import annotations

import csv
import locale
import shutil
import struct
from pathlib import Path

import input_error_calls
import numpy as np
import pytest
import SimpleITK as sitk
from input_error_calls import picai_cmd, user_error

from focalnet_jax.cli import main
from focalnet_jax.data.io import read_image
from focalnet_jax.data.store import open_store

dataset = input_error_calls.dataset  # a module-scoped fixture


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
    assert "header promises" in user_error(capfd, argv)


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
    err = user_error(capfd, [*argv, "--unlabelled", "negative"])
    assert err.endswith(
        f"case 'c1', file '{t2w}': t2w has a single slice (384 x 384 x 1 voxels): a broken or "
        "partial export (prostate MRI series hold about 20-30 slices); export the whole series"
    )
    assert not out.exists()
    # Any component: a one-slice ADC image file is named as well.
    one = tmp_path / "adc.mha"
    sitk.WriteImage(read_image(adc)[:, :, 9:10], str(one))
    manifest.write_text(f"case_id,patient_id,t2w,adc\nc1,p1,{prostatex_case_dir / 't2w'},{one}\n")
    err = user_error(capfd, [*argv, "--unlabelled", "negative"])
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
    err = user_error(capfd, [*argv, "--unlabelled", "negative"])
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
    argv = [*picai_cmd(root, out), "--labels", str(root / "labels"), "--masks", str(root / "masks")]
    reason = (
        f"label has a single slice ({size} voxels) where the T2w has {slices}: a broken or "
        "partial export (the other T2w slices would read as empty); save the label over the "
        "whole T2w volume"
    )
    assert user_error(capfd, argv).endswith(f"case {first!r}, file '{one_label}': {reason}")
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
    err = user_error(capfd, [*argv, "--unlabelled", "negative"])
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
