"""Manifest cells and columns that were read wrong without a word: `..` after a linked folder,
one exam's series chosen three ways, a NUL byte, a misspelt optional column, a blank line before
the header. `read_manifest` (and predict's summary) only: no image is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from focalnet_jax.data.dicom import list_series
from focalnet_jax.data.layouts import LayoutError, read_manifest, unread_inputs
from focalnet_jax.errors import UserError
from focalnet_jax.evaluation import batch_predict

HEADER = "case_id,patient_id,t2w,adc,label"


def test_dotdot_is_taken_beside_the_real_folder_of_a_linked_manifest_folder(tmp_path):
    # `abspath` dropped `..` as text: through the link `lists` -> `data/lists`, `../images/l.nii.gz`
    # was read beside the link (a decoy there silently), not beside `data/lists`.
    for folder in ("data/lists", "data/images", "images"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "data/images/l.nii.gz").write_bytes(b"real")
    (tmp_path / "images/l.nii.gz").write_bytes(b"decoy")
    (tmp_path / "lists").symlink_to(tmp_path / "data/lists")
    (tmp_path / "data/lists/cases.csv").write_text(
        f"{HEADER}\nc1,p1,../images/t2w,{tmp_path}/lists/../images/adc,../images/l.nii.gz\n"
    )
    (case,) = read_manifest(tmp_path / "lists/cases.csv")
    assert case.label == str(tmp_path / "data/images/l.nii.gz")
    assert Path(case.label).read_bytes() == b"real"
    assert case.components == {
        "t2w": str(tmp_path / "data/images/t2w"),
        "adc": f"{tmp_path}/lists/../images/adc",  # absolute: as given, `..` left to the system
    }


def test_one_series_chosen_three_ways_is_one_exam(prostatex_case_dir, tmp_path):
    # Keyed on the cell's text, an empty t2w_series cell, the SeriesDescription and the
    # SeriesInstanceUID of one folder's series were three exams, stored as three patients.
    (t2w,) = list_series(prostatex_case_dir / "t2w")
    path = tmp_path / "cases.csv"
    rows = [f"c{k},p{k},{prostatex_case_dir}/t2w,a{k},l{k},{s}" for k, s in
            enumerate(("", t2w.description, t2w.uid))]  # fmt: skip
    path.write_text("\n".join([HEADER + ",t2w_series", *rows, ""]))
    with pytest.raises(LayoutError) as info:
        read_manifest(path)
    assert str(info.value) == (
        f"manifest {path}, line 3: case 'c1' reads the T2w of case 'c0' (line 2), "
        f"{prostatex_case_dir}/t2w: one exam listed twice would be stored as two patients"
    )
    # Two series of one folder are two exams; a third row choosing the first again is refused.
    both = tmp_path / "both"
    both.mkdir()
    for component in ("t2w", "adc"):
        for file in (prostatex_case_dir / component).iterdir():
            (both / f"{component}-{file.name}").symlink_to(file)
    (adc,) = list_series(prostatex_case_dir / "adc")
    rows = [f"c0,p0,both,a0,l0,{t2w.uid}", f"c1,p1,both,a1,l1,{adc.description}"]
    path.write_text("\n".join([HEADER + ",t2w_series", *rows, ""]))
    assert [c.case_id for c in read_manifest(path)] == ["c0", "c1"]
    path.write_text("\n".join([HEADER + ",t2w_series", *rows, f"c2,p2,both,a,l,{t2w.description}"]))
    with pytest.raises(LayoutError, match=r"line 4: case 'c2' reads the T2w of case 'c0' \(line 2"):
        read_manifest(path)


@pytest.mark.parametrize("line", ["c1,p1,exams/t2\x00w,a,l", "c1,p1,t,a,l\x1b"])
def test_a_control_character_in_a_cell_is_refused_naming_line_and_column(tmp_path, line):
    # A NUL byte ended the run in `ValueError: embedded null byte` (os.path.realpath).
    path = tmp_path / "cases.csv"
    path.write_text(f"{HEADER}\nc0,p0,t0,a0,l0\n{line}\n")
    column, code = ("t2w", "0000") if "\x00" in line else ("label", "001B")
    with pytest.raises(LayoutError) as info:
        read_manifest(path)
    assert str(info.value) == (
        f"manifest {path}, line 3, column {column!r}: cell holds control character U+{code}; "
        "remove it"
    )


def test_a_control_character_in_a_column_nothing_reads_is_left_alone(tmp_path):
    from focalnet_jax.data.manifest_checks import unread_columns

    path = tmp_path / "cases.csv"
    path.write_text(f"{HEADER},notes\nc0,p0,t0,a0,l0,see\x01below\n")
    assert [c.case_id for c in read_manifest(path)] == ["c0"]
    assert unread_columns(path, ("t2w", "adc")) == ["notes"]  # as predict names them


def test_a_control_character_in_a_column_name_is_refused(tmp_path):
    """`label\x01` is no `label` column: with --unlabelled negative every case was stored
    lesion-free."""
    path = tmp_path / "cases.csv"
    path.write_text(f"{HEADER}\x01\nc0,p0,t0,a0,l0\n")
    with pytest.raises(LayoutError, match=r"line 1, column 'label\\x01': cell holds control"):
        read_manifest(path, unlabelled="negative")


@pytest.mark.parametrize(
    ("written", "expected"),
    [("Label", "label"), ("centre_x", "center_x"), ("Prostate_Mask", "prostate_mask"),
     ("ADC_series", "adc_series"), ("Center Space", "center_space")],
)  # fmt: skip
def test_a_misspelt_column_is_refused_naming_the_expected_name(tmp_path, written, expected):
    # `Label` with --unlabelled negative stored every case lesion-free, `centre_*` or a misspelt
    # `prostate_mask` centred every crop on the T2w volume: noted at most among unread columns.
    path = tmp_path / "cases.csv"
    path.write_text(f"case_id,patient_id,t2w,adc,{written}\nc1,p1,t,a,x\n")
    with pytest.raises(LayoutError) as info:
        read_manifest(path, unlabelled="negative")
    assert str(info.value) == (
        f"manifest {path}: column {written!r} is not read; name it {expected!r} (column names "
        "are matched exactly)"
    )


@pytest.mark.parametrize("extra", ["Patient ID", "Label", "T2W"])
def test_a_look_alike_beside_the_column_itself_is_a_column_of_its_own(tmp_path, extra):
    """`Patient ID` (a readable copy) beside `patient_id` was refused as a misspelling, and the
    advice (rename it `patient_id`) named a column already there."""
    path = tmp_path / "cases.csv"
    path.write_text(f"{HEADER},{extra}\nc0,p0,t0,a0,l0,x\n")
    assert [c.case_id for c in read_manifest(path)] == ["c0"]


def test_predict_names_the_manifest_columns_the_models_do_not_read(tmp_path, monkeypatch):
    # preprocess named them at the end of its summary; predict said nothing.
    path = tmp_path / "cases.csv"
    path.write_text("case_id,patient_id,t2w,adc,hbv,label\nc1,p1,t,a,h,\n")
    models = type("Models", (), {"components": ("t2w", "adc")})()

    def predict_cases(models, cases, out, errors=None, **options):
        return batch_predict.BatchSummary(Path(out), [c.case_id for c in cases], [])

    monkeypatch.setattr(batch_predict, "predict_cases", predict_cases)
    summary = batch_predict.predict_layout(models, "manifest", tmp_path / "out", manifest=path)
    assert summary.describe() == (
        f"wrote 1 case to {tmp_path / 'out'}; manifest columns not read: hbv (the models read "
        "t2w,adc)"
    )


def test_blank_lines_before_the_header_are_skipped(tmp_path):
    # The first, blank, line was taken as the header: "missing column(s) [...]; has []".
    path = tmp_path / "cases.csv"
    path.write_bytes(f"\r\n \r\n{HEADER},hbv\r\nc1,p1,t,a,l,h\r\n\r\nc 2,p2,t2,a,l,h\r\n".encode())
    with pytest.raises(UserError, match=r"line 6: case id 'c 2' contains ' '"):
        read_manifest(path)
    path.write_bytes(f"\n\n{HEADER},hbv\nc1,p1,t,a,l,h\n".encode())
    assert [c.case_id for c in read_manifest(path)] == ["c1"]
    assert unread_inputs("manifest", [], ("t2w", "adc"), path) == ["hbv"]
