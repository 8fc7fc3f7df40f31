"""Bad `focalnet synth | preprocess` arguments (components, --out, --workers, folders missing or
files, flags of the other layout) are one line on stderr naming the reason, exit status 2, and
leave nothing half-written."""

from __future__ import annotations

import csv
import shutil

import input_error_calls
import pytest
from input_error_calls import picai_cmd, user_error

from focalnet_jax.cli import main
from focalnet_jax.data.layouts import LayoutError, discover_picai, write_manifest

dataset = input_error_calls.dataset  # a module-scoped fixture


def test_picai_without_labels_needs_unlabelled(dataset, tmp_path, capfd):
    out = tmp_path / "store"
    err = user_error(capfd, picai_cmd(dataset, out))
    assert "no --labels folder" in err and "--unlabelled negative" in err
    assert not out.exists()
    err = user_error(capfd, [*picai_cmd(dataset, out), "--labels", str(tmp_path / "nowhere")])
    assert err.endswith(f"labels folder {tmp_path / 'nowhere'} does not exist")
    cases = discover_picai(dataset / "images", unlabelled="negative")
    assert len(cases) == 2 and all(c.label is None for c in cases)


@pytest.mark.parametrize("components", ["adc,t2w", "t2w,adc,adc"])
def test_components_must_start_with_t2w(dataset, tmp_path, capfd, components):
    argv = [*picai_cmd(dataset, tmp_path / "s"), "--labels", str(dataset / "labels")]
    err = user_error(capfd, [*argv, "--components", components])
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
    argv = [*picai_cmd(dataset, tmp_path / "s"), "--labels", str(dataset / "labels")]
    err = user_error(capfd, [*argv, "--components", f"t2w,{name}"])
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
    err = user_error(
        capfd, ["synth", "--out", str(out), "--cases", "1", "--components", components]
    )
    assert err == f"focalnet synth: error: components {components!r}: {reason}"
    assert not out.exists()


def test_synth_refuses_a_non_empty_out_unless_overwrite(tmp_path, capfd):
    out = tmp_path / "data"
    argv = ["synth", "--out", str(out), "--cases", "2", "--seed", "5", "--small"]
    assert main(argv) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert user_error(capfd, [*argv[:4], "1", "--seed", "6"]).endswith(
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
    err = user_error(capfd, ["synth", "--out", str(tmp_path / "file"), "--cases", "1"])
    assert err.endswith(f"--out {tmp_path / 'file'} exists and is not a folder")
    # --overwrite replaces only a synthetic dataset: a data folder is not deleted whole.
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    err = user_error(capfd, [*argv[:2], str(mine), *argv[3:], "--overwrite"])
    assert err.endswith(
        f"--out {mine} has no lesions.csv: it is not the output folder of an earlier focalnet "
        "synth, and --overwrite would delete it whole; choose a new folder"
    )
    assert (mine / "images").is_dir()
    # Nor a synthetic dataset holding what synth did not write (a store, notes): deleted whole.
    (out / "store").mkdir()
    (out / "store" / "cases.json").write_text("[]")
    err = user_error(capfd, [*argv[:4], "1", "--seed", "6", "--small", "--overwrite"])
    assert err.endswith(
        f"--out {out} holds 'store', which focalnet synth did not write: --overwrite would "
        f"delete it; move it out of {out} or choose a new folder"
    )
    assert (out / "store" / "cases.json").read_text() == "[]"


def test_marksheet_folder_and_bad_workers_are_one_line(dataset, tmp_path, capfd):
    argv = [*picai_cmd(dataset, tmp_path / "s"), "--labels", str(dataset / "labels")]
    err = user_error(capfd, [*argv, "--marksheet", str(tmp_path)])
    assert err.endswith(f"marksheet {tmp_path} is not a file")
    for workers in ("0", "-2"):
        err = user_error(capfd, [*argv, "--workers", workers])
        assert err.endswith(f"--workers {workers}: expected at least 1")


def test_misspelt_masks_folder_is_refused_and_missing_masks_named(dataset, tmp_path, capfd, caplog):
    # A --masks folder that does not exist was ignored: every crop silently centred on the T2w
    # volume centre instead of the gland.
    argv = [*picai_cmd(dataset, tmp_path / "s"), "--labels", str(dataset / "labels")]
    err = user_error(capfd, [*argv, "--masks", str(dataset / "mask")])
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
    err = user_error(capfd, [*picai_cmd(dataset, tmp_path / "s", images=archive), "--labels",
                              str(dataset / "labels")])  # fmt: skip
    assert err.endswith(
        f"images folder {archive} is a file, not a folder (an archive? extract it first)"
    )


def test_a_flag_of_the_other_layout_is_refused(dataset, tmp_path, capfd):
    # `--masks`, `--labels`, `--marksheet` or `--images` with a manifest, or `--manifest` with
    # the PI-CAI layout, were ignored without a word: no mask-centred crops, no marksheet checks.
    cases = discover_picai(dataset / "images", dataset / "labels")
    write_manifest(cases, tmp_path / "cases.csv")
    out = ["--out", str(tmp_path / "store")]
    manifest = ["preprocess", "--layout", "manifest", "--manifest", str(tmp_path / "cases.csv")]
    err = user_error(capfd, [*manifest, *out, "--masks", str(dataset / "masks")])
    assert err.endswith(
        "--masks is not read with --layout manifest, only with --layout picai; a manifest names "
        "each case's files in its columns"
    )
    err = user_error(capfd, [*manifest, *out, "--marksheet", str(dataset / "marksheet.csv")])
    assert "error: --marksheet is not read with --layout manifest, only with --layout picai" in err
    picai = [*picai_cmd(dataset, tmp_path / "store"), "--manifest", str(tmp_path / "cases.csv")]
    err = user_error(capfd, picai)
    assert err.endswith("--manifest is not read with --layout picai, only with --layout manifest")
    assert not (tmp_path / "store").exists()
    # `focalnet predict` finds its cases the same way.
    from focalnet_jax.evaluation.batch_predict import find_cases

    listed = {"manifest": tmp_path / "cases.csv"}
    with pytest.raises(LayoutError, match="^--masks is not read with --layout manifest"):
        find_cases("manifest", ("t2w", "adc"), **listed, masks=str(dataset / "masks"))
    assert len(find_cases("manifest", ("t2w", "adc"), **listed)) == len(cases)
