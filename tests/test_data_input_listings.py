"""Bad case listings (a case in two folders or formats, a manifest's cells or encoding, a bad
dataset.json, a marksheet of other studies) and a damaged store: one line naming the file, the line
or case, and the reason; with --skip-bad-cases a bad case is listed in errors.csv."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil

import input_error_calls
import pytest
import SimpleITK as sitk
from input_error_calls import picai_cmd, user_error

from focalnet_jax.cli import main
from focalnet_jax.data.layouts import LayoutError, discover_picai, write_manifest
from focalnet_jax.data.store import open_store

dataset = input_error_calls.dataset  # a module-scoped fixture


@pytest.fixture(scope="module")
def store(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "store"
    assert main([*picai_cmd(dataset, out), "--labels", str(dataset / "labels")]) == 0
    return out


def test_case_in_two_patient_folders_or_two_formats(dataset, tmp_path, capfd):
    images = tmp_path / "images"
    shutil.copytree(dataset / "images", images)
    first = images / "10000" / "10000_1000000_t2w.mha"
    (images / "99999").mkdir()
    shutil.copy(first, images / "99999" / first.name)
    argv = [*picai_cmd(dataset, tmp_path / "s", images), "--labels", str(dataset / "labels")]
    err = user_error(capfd, argv)
    adc = images / "10000" / "10000_1000000_adc.mha"  # the case's first file in its first folder
    assert err.endswith(
        f"case '10000_1000000': files in two patient folders: {adc} and "
        f"{images / '99999' / first.name}"
    )
    shutil.rmtree(images / "99999")
    sitk.WriteImage(sitk.ReadImage(str(adc)), str(adc.with_suffix(".nii.gz")))
    err = user_error(capfd, argv)
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
    assert user_error(capfd, argv).endswith(f"manifest {manifest}, line 3: {reason}")
    # With --skip-bad-cases the row is listed in errors.csv (it stopped the whole run).
    out = tmp_path / "s"
    assert main([*argv[:-1], str(out), "--skip-bad-cases"]) == 0
    assert open_store(out).case_ids == [rows[0]["case_id"]]
    with (out / "errors.csv").open() as f:
        (error,) = list(csv.DictReader(f))
    assert error["case"] == rows[1]["case_id"] and error["reason"].endswith(reason)


def test_damaged_store_is_one_line(store, tmp_path, capfd):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    images = copy / "images.npy"
    images.write_bytes(images.read_bytes()[:1000])
    err = user_error(capfd, ["folds", "--store", str(copy)])
    assert err.startswith(f"focalnet folds: error: {images}: unreadable or truncated (")
    table = json.loads((store / "cases.json").read_text())
    (copy / "cases.json").write_text(json.dumps(table["cases"]))
    err = user_error(capfd, ["folds", "--store", str(copy)])
    assert err.endswith(f"{copy / 'cases.json'}: not a store table (expected an object with "
                        "('components', 'settings', 'fingerprint', 'cases'))")  # fmt: skip
    assert len(open_store(store).cases) == 2


@pytest.mark.parametrize("content", ["{not json", "[1]"])
def test_bad_dataset_json_is_one_line(dataset, tmp_path, capfd, content):
    labels = tmp_path / "labels"
    shutil.copytree(dataset / "labels", labels)
    (labels / "dataset.json").write_text(content)
    err = user_error(capfd, [*picai_cmd(dataset, tmp_path / "s"), "--labels", str(labels)])
    assert f"{labels / 'dataset.json'}: " in err
    assert ("not readable JSON" if content == "{not json" else "expected a JSON object") in err


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
    err = user_error(capfd, [*argv, "--manifest", str(tmp_path / "latin.csv"), "--overwrite"])
    assert err.endswith(f"manifest {tmp_path / 'latin.csv'}, line 4: not UTF-8 text (byte 0xeb); "
                        "save it as CSV UTF-8")  # fmt: skip
    sheet = (dataset / "marksheet.csv").read_text()
    (tmp_path / "marksheet.csv").write_text(sheet, encoding="utf-8-sig")
    picai = [*picai_cmd(dataset, tmp_path / "s2"), "--labels", str(dataset / "labels")]
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
    err = user_error(capfd, [*argv, "--out", str(tmp_path / "store")])
    assert err.endswith(
        f"manifest {tmp_path / 'm.csv'}, line 2: case {cases[0].case_id!r} has an empty adc "
        "cell; give each component's DICOM folder or image file, or leave the case out"
    )


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
