"""`focalnet synth | preprocess | folds` end to end; every bad input named by case, file, reason."""

from __future__ import annotations

import csv
import shutil

import data_cli_calls
import numpy as np
import pytest
import SimpleITK as sitk
from data_cli_calls import picai_args

from focalnet_jax.cli import main
from focalnet_jax.data.layouts import discover_picai, read_manifest, write_manifest
from focalnet_jax.data.store import open_store

dataset = data_cli_calls.dataset  # a module-scoped fixture


def test_synth_preprocess_folds_end_to_end(dataset, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(picai_args(dataset, out, "--workers", "2", "--components", "t2w,adc,hbv")) == 0
    store = open_store(out)
    assert store.components == ("t2w", "adc", "hbv") and len(store.cases) == 4
    assert store.images.shape == (4 * 6, 128, 128, 3)
    assert not (out / "errors.csv").exists()  # no case could be skipped: none is listed
    with (dataset / "lesions.csv").open() as f:
        lesions = list(csv.DictReader(f))
    for record in store.cases:  # labels read as ISUP values (dataset.json): classes as generated
        expected = sorted(int(r["class"]) for r in lesions if r["case_id"] == record["case_id"])
        assert sorted(record["lesion_classes"]) == expected
        assert record["center_source"] == "mask"
    # Every generated lesion lands inside its case's crop slices with its class.
    for row in lesions:
        s, r, c = store.world_to_pixel(
            row["case_id"], float(row["x"]), float(row["y"]), float(row["z"])
        )
        start = store.case(row["case_id"])["start"]
        assert store.classes[start + int(round(s)), int(round(r)), int(round(c))] == int(
            row["class"]
        )
    capsys.readouterr()
    args = ["folds", "--store", str(out), "--num-folds", "2", "--out", str(tmp_path)]
    assert main([*args, "--list-cases"]) == 0
    printed = capsys.readouterr().out
    assert "fold" in printed and all(r["case_id"] in printed for r in store.cases)
    header, *lines = printed.splitlines()
    assert header.split()[:5] == ["fold", "patients", "cases", "slices", "annotated"]
    rows = [line.split() for line in lines if line.split()[0] in ("0", "1")]
    assert sum(int(row[3]) for row in rows) == len(store.annotated)
    assert sum(int(row[4]) for row in rows) == int(store.annotated.sum()) > 0
    assert (tmp_path / "fold-0.json").is_file() and (tmp_path / "fold-1.json").is_file()


def test_manifest_layout(dataset, tmp_path, capsys):
    manifest = tmp_path / "cases.csv"
    write_manifest(
        discover_picai(dataset / "images", dataset / "labels", dataset / "masks"), manifest
    )
    cases = read_manifest(manifest)
    assert len(cases) == 4 and cases[0].mask and cases[0].label
    out = tmp_path / "store"
    args = ["preprocess", "--layout", "manifest", "--manifest", str(manifest), "--out", str(out)]
    assert main([*args, "--slices", "annotated"]) == 0
    store = open_store(out)
    assert store.annotated.all() and store.settings["slices"] == "annotated"
    with (dataset / "lesions.csv").open() as f:
        lesions = list(csv.DictReader(f))
    # The lesion-free cases have no slice to keep: left out and counted, never stored as an
    # empty slice range (which evaluation refused as "holds no pixel", naming a prediction file).
    assert (
        store.case_ids
        == ["10002_1000002", "10003_1000003"]
        == sorted({r["case_id"] for r in lesions})
    )
    assert all(r["stop"] > r["start"] for r in store.cases)
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith(
            f"to {out}; 2 lesion-free cases left out (--slices annotated keeps the slices with a "
            "lesion)"
        )
    )
    free = tmp_path / "free.csv"
    write_manifest([c for c in cases if c.case_id not in store.case_ids], free)
    args = ["preprocess", "--layout", "manifest", "--manifest", str(free), "--slices", "annotated"]
    with pytest.raises(SystemExit, match=r"no case stored \(2 cases lesion-free\): --slices ann"):
        main([*args, "--out", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()
    for record in store.cases:  # a manifest's label value 1 is GS 3+3 (class 1)
        expected = sorted(int(r["class"]) for r in lesions if r["case_id"] == record["case_id"])
        assert sorted(record["lesion_classes"]) == expected
    # Missing column: named with the manifest.
    text = manifest.read_text().splitlines()
    header = text[0].split(",")
    drop = header.index("adc")
    rows = [",".join(v for i, v in enumerate(line.split(",")) if i != drop) for line in text]
    (tmp_path / "bad.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(SystemExit, match=r"bad.csv: missing column\(s\) \['adc'\]"):
        main(
            [
                "preprocess",
                "--layout",
                "manifest",
                "--manifest",
                str(tmp_path / "bad.csv"),
                "--out",
                str(tmp_path / "x"),
            ]
        )


def test_summary_names_the_components_stored_and_those_left_unread(dataset, tmp_path, capsys):
    # A manifest with hbv, dce, ... columns, or a PI-CAI folder with more series, preprocessed
    # without --components stored T2w and ADC only, and said nothing: the store's missing
    # components surfaced at training time, after the preprocessing.
    out = tmp_path / "picai"
    capsys.readouterr()
    assert main(picai_args(dataset, out)) == 0
    assert capsys.readouterr().out.strip() == (
        f"wrote 4 cases (24 slices of t2w, adc) to {out}; images not read: hbv "
        "(--components is t2w,adc)"
    )
    cases = discover_picai(dataset / "images", dataset / "labels", components=("t2w", "adc", "hbv"))
    write_manifest(cases, tmp_path / "cases.csv")
    args = ["preprocess", "--layout", "manifest", "--manifest", str(tmp_path / "cases.csv")]
    assert main([*args, "--out", str(tmp_path / "m"), "--components", "t2w,hbv"]) == 0
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith(
            "24 slices of t2w, hbv) to "
            f"{tmp_path / 'm'}; manifest columns not read: adc "
            "(--components is t2w,hbv)"
        )
    )
    assert main([*args, "--out", str(tmp_path / "all"), "--components", "t2w,adc,hbv"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"wrote 4 cases (24 slices of t2w, adc, hbv) to {tmp_path / 'all'}"
    )


def test_empty_input_folder(tmp_path):
    for folder in ("images", "labels", "masks"):
        (tmp_path / folder).mkdir()
    with pytest.raises(SystemExit, match="no cases found in .*images"):
        main(picai_args(tmp_path, tmp_path / "store"))
    assert not (tmp_path / "store").exists()


def _clone(root, src_case, new_patient):
    """Copy a case's files under a new patient id; returns (case id, file paths)."""
    src_patient = src_case.split("_")[0]
    case = f"{new_patient}_{src_case.split('_')[1]}"
    (root / "images" / new_patient).mkdir()
    files = {}
    for name in ("t2w", "adc", "hbv"):
        files[name] = root / "images" / new_patient / f"{case}_{name}.mha"
        shutil.copy(root / "images" / src_patient / f"{src_case}_{name}.mha", files[name])
    for kind in ("labels", "masks"):
        files[kind] = root / kind / f"{case}.nii.gz"
        shutil.copy(root / kind / f"{src_case}.nii.gz", files[kind])
    return case, files


def _rewrite(path, change):
    image = sitk.ReadImage(str(path))
    image = change(image)
    sitk.WriteImage(image, str(path), useCompression=True)


def _array_change(fn):
    def change(image):
        out = sitk.GetImageFromArray(fn(sitk.GetArrayFromImage(image)))
        out.CopyInformation(image)
        return out

    return change


def _shift(image):
    image.SetOrigin(tuple(o + 400.0 for o in image.GetOrigin()))
    return image


def _nan(a):
    a = a.astype(np.float32)
    a[2, 10, 10] = np.nan
    return a


BAD = {  # patient id -> (file to spoil, how, reason fragment)
    "90001": ("adc", "delete", "adc image missing: looked for 90001_"),
    "90002": ("t2w", "truncate", "unreadable or truncated"),
    "90003": ("adc", "2d", "expected a 3D image"),
    "90004": ("adc", _array_change(_nan), "NaN or Inf"),
    "90005": ("adc", _shift, "adc does not overlap the T2w field of view"),
    "90006": (
        "labels",
        _array_change(lambda a: np.where(a > 0, 9, 0).astype(np.uint8)),
        "outside the allowed set",
    ),
    "90007": ("labels", _shift, "label does not overlap the T2w field of view"),
    "90008": ("labels", "delete", "label missing: looked for 90008_"),
}


@pytest.fixture(scope="module")
def bad_dataset(dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    shutil.copytree(dataset, root, dirs_exist_ok=True)
    with (root / "lesions.csv").open() as f:
        source = next(csv.DictReader(f))["case_id"]  # a case with a lesion
    spoiled = {}
    for patient, (what, how, reason) in BAD.items():
        case, files = _clone(root, source, patient)
        path = files[what]
        if how == "delete":
            path.unlink()
            path = path.parent  # named by its folder
        elif how == "truncate":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 3])
        elif how == "2d":
            sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 32), np.float32)), str(path))
        else:
            _rewrite(path, how)
        spoiled[case] = (str(path), reason)
    return root, spoiled


def test_skip_bad_cases_writes_good_ones_and_errors_csv(bad_dataset, tmp_path):
    root, spoiled = bad_dataset
    out = tmp_path / "store"
    assert main(picai_args(root, out, "--skip-bad-cases")) == 0
    store = open_store(out)
    assert len(store.cases) == 4 and not set(store.case_ids) & set(spoiled)
    with (out / "errors.csv").open() as f:
        errors = {row["case"]: row for row in csv.DictReader(f)}
    assert set(errors) == set(spoiled)
    for case, (path, reason) in spoiled.items():
        assert errors[case]["file"] == path and reason in errors[case]["reason"], errors[case]


def test_skip_bad_cases_with_no_bad_case_writes_an_empty_errors_csv(dataset, tmp_path, capsys):
    """A run told to skip bad cases says that it skipped none: errors.csv holds its header only
    (as `predict --skip-bad-cases` does), and the closing line counts no bad case."""
    out = tmp_path / "store"
    assert main(picai_args(dataset, out, "--skip-bad-cases")) == 0
    assert len(open_store(out).cases) == 4
    assert (out / "errors.csv").read_text().splitlines() == ["case,file,reason"]
    assert "bad case" not in capsys.readouterr().out


def test_first_bad_case_stops_run_and_leaves_nothing(bad_dataset, tmp_path):
    root, spoiled = bad_dataset
    out = tmp_path / "store"
    with pytest.raises(SystemExit) as info:
        main(picai_args(root, out))
    first = sorted(spoiled)[0]
    path, reason = spoiled[first]
    message = str(info.value)
    assert first in message and path in message and reason in message
    assert list(tmp_path.iterdir()) == []


def test_one_patient_is_counted_in_the_singular_and_cannot_be_cross_validated(tmp_path, capfd):
    # A one-case dataset printed "wrote 1 synthetic cases", "wrote 1 cases (6 slices ...)", and
    # `folds` said "1 patients cannot be split into 5 folds; choose 2 <= num_folds <= 1".
    data, store = tmp_path / "data", tmp_path / "store"
    capfd.readouterr()
    assert main(["synth", "--out", str(data), "--cases", "1", "--seed", "3", "--small"]) == 0
    assert capfd.readouterr().out.splitlines()[-1] == f"wrote 1 synthetic case to {data}"
    assert main(picai_args(data, store)) == 0
    assert capfd.readouterr().out.startswith(f"wrote 1 case (6 slices of t2w, adc) to {store}")
    for argv in (
        ["folds", "--store", str(store)],
        ["folds", "--store", str(store), "--num-folds=2"],
    ):
        with pytest.raises(SystemExit) as raised:
            main(argv)
        assert raised.value.code == 2
        folds = 2 if "--num-folds=2" in argv else 5
        assert capfd.readouterr().err == (
            f"focalnet folds: error: store {store} holds 1 patient: cross-validation (num_folds "
            f"{folds}) needs at least 2 patients\n"
        )
    # Its T2w given as its gland mask (an image, not a label map), bad cases skipped: none left.
    (mask,) = (data / "masks").iterdir()
    sitk.WriteImage(sitk.ReadImage(str(next((data / "images").glob("*/*_t2w.mha")))), str(mask))
    with pytest.raises(SystemExit):
        main(picai_args(data, tmp_path / "none", "--skip-bad-cases"))
    err = capfd.readouterr().err.splitlines()[-1]
    assert err.startswith(
        f"focalnet preprocess: error: store {tmp_path / 'none'}: no case stored (1 case failed); "
    )
    assert "prostate mask holds" in err and "an image, not a label map" in err
