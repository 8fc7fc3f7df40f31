"""Manifest CSVs as spreadsheet programs and hand edits write them: byte-order mark, Windows line
endings, quoted paths holding commas, rows of empty cells, blank lines; and the malformed ones
(a row with more cells than columns, a column named twice, case or patient ids differing only in
case) that were read with shifted, dropped or split cells. `read_manifest` only: no image is
read."""

from __future__ import annotations

import pytest

from focalnet_jax.data.layouts import LayoutError, read_manifest
from focalnet_jax.data.picai_sources import read_marksheet
from focalnet_jax.errors import UserError

HEADER = "case_id,patient_id,t2w,adc,label"


def _manifest(tmp_path, *lines, bom=False):
    path = tmp_path / "cases.csv"
    text = "\r\n".join([HEADER, *lines, ""])  # Windows line endings
    path.write_bytes((("\ufeff" if bom else "") + text).encode())
    return path


def test_spreadsheet_manifest_reads_quoted_commas_and_skips_empty_rows(tmp_path):
    # Rows of empty cells (",,,,": a spreadsheet's formatted but empty rows) were refused as
    # "case id '' is empty"; a blank line shifted every later line number by one.
    path = _manifest(
        tmp_path,
        'c1,p1,"exams/a, b/t2w",exams/adc,l1.nii.gz',
        ",,,,",
        "",
        "c2,p2,t2w2,adc2,l2.mha",
        " , , , , ",
        bom=True,
    )
    cases = read_manifest(path)
    assert [c.case_id for c in cases] == ["c1", "c2"]
    assert cases[0].components == {"t2w": str(tmp_path / "exams/a, b/t2w"),
                                   "adc": str(tmp_path / "exams/adc")}  # fmt: skip
    assert cases[1].label == str(tmp_path / "l2.mha")
    path = _manifest(tmp_path, "c1,p1,t,a,l", ",,,,", "", "c 2,p2,t,a,l")
    with pytest.raises(UserError, match=r"line 5: case id 'c 2' contains ' '"):
        read_manifest(path)


def test_row_with_more_cells_than_columns_is_refused_naming_the_line(tmp_path):
    # A path with a comma, not in quotes: its cells shifted into the next columns (t2w 'exams/a',
    # adc ' b/t2w', label 'exams/adc') and the last one was dropped without a word.
    path = _manifest(tmp_path, "c1,p1,t,a,l", "c2,p2,exams/a, b/t2w,exams/adc,l2.nii.gz")
    with pytest.raises(LayoutError) as info:
        read_manifest(path)
    assert str(info.value) == (
        f"manifest {path}, line 3: 6 cells, but the header names 5 columns (a path holding a "
        "comma must be in double quotes)"
    )


def test_a_double_quote_never_closed_is_refused_naming_the_line_it_opens_on(tmp_path):
    # A notes cell (a column nothing reads) opening a quote it never closes: the lenient reader
    # read every later line into that cell, so 3 of 5 cases were left out without a word.
    path = _manifest(tmp_path, "c1,p1,t1,a,l", 'c2,p2,t2,a,"l2', "c3,p3,t3,a,l", "c4,p4,t4,a,l")
    with pytest.raises(LayoutError) as info:
        read_manifest(path)
    assert str(info.value) == (
        f"manifest {path}, line 3: not a well-formed CSV row: a cell opens a double quote that "
        "is never closed"
    )
    sheet = tmp_path / "marksheet.csv"
    sheet.write_text('patient_id,study_id,notes\n10000,1000000,"redone\n10001,1000001,ok\n')
    with pytest.raises(LayoutError, match=r"marksheet .*, line 2: .* never closed$"):
        read_marksheet(sheet)
    # Text after a closing quote is refused too; a quoted cell over two lines is read, and the
    # rows after it keep the lines they begin on.
    path = _manifest(tmp_path, 'c1,p1,"t1"x,a,l')
    with pytest.raises(LayoutError, match=r"line 2: not a well-formed CSV row: ',' expected"):
        read_manifest(path)
    path = _manifest(tmp_path, 'c1,p1,t1,a,"l1', 'still l1"', "c 2,p2,t2,a,l")
    with pytest.raises(UserError, match=r"line 4: case id 'c 2' contains ' '"):
        read_manifest(path)


def test_column_named_twice_is_refused(tmp_path):
    # The second 't2w' column silently replaced the first.
    path = tmp_path / "cases.csv"
    path.write_text(HEADER + ",t2w\nc1,p1,t_first,a,l,t_second\n")
    with pytest.raises(LayoutError, match=r"column\(s\) \['t2w'\] named more than once"):
        read_manifest(path)


def test_case_ids_differing_only_in_case_are_refused(tmp_path):
    # 'Case1' and 'CASE1' name the same file on case-insensitive file systems (macOS, Windows):
    # one case's predictions would overwrite the other's.
    path = _manifest(tmp_path, "Case1,p1,t,a,l", "CASE1,p2,t,a,l")
    with pytest.raises(LayoutError, match=r"line 3: case_id 'CASE1' repeats 'Case1' \(line 2\)"):
        read_manifest(path)


def test_one_patients_id_written_two_ways_is_refused(tmp_path):
    # 'Pat01' and 'pat01' were two patients to the folds: with seed 1 and 2 folds, the
    # patient's two exams went to folds 0 and 1, trained on and validated on.
    path = _manifest(tmp_path, "c1,Pat01,t1,a,l", "c2,p2,t2,a,l", "c3,pat01,t3,a,l")
    with pytest.raises(LayoutError) as info:
        read_manifest(path)
    assert str(info.value) == (
        f"manifest {path}, line 4: patient_id 'pat01' is 'Pat01' (line 2) written another way; "
        "write each patient's id the same way on all its rows"
    )
    # '10003.0' (a spreadsheet's float column) and '10003' were two patients as well: with seed
    # 0 and 2 folds the patient's studies went to folds 0 and 1.
    path = _manifest(tmp_path, "c1,10003,t1,a,l", "c2,10003.0,t2,a,l")
    with pytest.raises(LayoutError, match=r"line 3: patient_id '10003.0' is '10003' \(line 2\) "):
        read_manifest(path)
    path = _manifest(tmp_path, "c1,10003.0,t1,a,l", "c2,10003.0,t2,a,l", "c3,10003.5,t3,a,l")
    assert [c.patient_id for c in read_manifest(path)] == ["10003.0", "10003.0", "10003.5"]
    # One spelling on every row is one patient, as before.
    path = _manifest(tmp_path, "c1,Pat01,t1,a,l", "c2,p2,t2,a,l", "c3,Pat01,t3,a,l")
    assert [c.patient_id for c in read_manifest(path)] == ["Pat01", "p2", "Pat01"]


def test_relative_paths_are_taken_from_the_manifest_folder_made_absolute(tmp_path, monkeypatch):
    # Given as a relative path ('cases.csv'), its relative cells stayed relative to the working
    # directory of the run ('exams/t2w'), and the store recorded them so.
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "cases.csv"
    path.write_text(HEADER + ",prostate_mask\nc1,p1,exams/t2w,/abs/adc,../l.nii.gz,\n")
    monkeypatch.chdir(tmp_path)
    (case,) = read_manifest("sub/cases.csv")
    assert case.components == {"t2w": str(tmp_path / "sub/exams/t2w"), "adc": "/abs/adc"}
    assert case.label == str(tmp_path / "l.nii.gz") and case.mask is None


def test_rows_without_a_patient_id_are_warned_about_once(tmp_path, caplog):
    """An empty patient_id makes each case its own patient: two exams of one patient could be
    split over folds without a word."""
    path = _manifest(tmp_path, "c1,p1,t1,a,l", "c2,,t2,a,l", "c3,,t3,a,l")
    with caplog.at_level("WARNING", logger="focalnet_jax.data.layouts"):
        cases = read_manifest(path)
    assert [c.patient_id for c in cases] == ["p1", "c2", "c3"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "2 row(s) without a patient_id (lines 3, 4)" in warnings[0]


def test_rows_with_an_empty_prostate_mask_cell_and_no_centre_are_warned_about_once(
    tmp_path, caplog
):
    """Such a case is centred on the T2w volume centre; the PI-CAI layout warned of a case
    without a mask, the manifest did not."""
    (tmp_path / "cases.csv").write_text(
        HEADER + ",prostate_mask,center_x,center_y,center_z\n"
        "c1,p1,t1,a,l,m1.nii.gz,,,\nc2,p2,t2,a,l,,,,\nc3,p3,t3,a,l,,1,2,3\nc4,p4,t4,a,l,,,,\n"
    )
    with caplog.at_level("WARNING", logger="focalnet_jax.data.layouts"):
        cases = read_manifest(tmp_path / "cases.csv")
    assert [c.mask is None for c in cases] == [False, True, True, True]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"manifest {tmp_path / 'cases.csv'}: 2 row(s) with an empty prostate_mask cell and no "
        "centre (lines 3, 5): their crops are centred on the T2w volume centre"
    ]
    # Rows that become no case (left out unlabelled, or listed as bad) are not named.
    (tmp_path / "cases.csv").write_text(
        HEADER + ",prostate_mask\nc1,p1,t1,a,l,\nc2,p2,t2,a,,\nc3,p3,t3,a,l,\nc/4,p4,t4,a,l,\n"
    )
    caplog.clear()
    errors = []
    with caplog.at_level("WARNING", logger="focalnet_jax.data.layouts"):
        cases = read_manifest(tmp_path / "cases.csv", unlabelled="skip", errors=errors)
    assert [c.case_id for c in cases] == ["c1", "c3"] and [e[0] for e in errors] == ["c/4"]
    assert "2 row(s) with an empty prostate_mask cell and no centre (lines 2, 4)" in caplog.text
    (tmp_path / "cases.csv").write_text(HEADER + "\nc1,p1,t1,a,l\n")
    caplog.clear()
    with caplog.at_level("WARNING", logger="focalnet_jax.data.layouts"):
        read_manifest(tmp_path / "cases.csv")
    assert not caplog.records  # no prostate_mask column: no masks were meant


def test_one_exam_on_two_rows_is_refused(tmp_path):
    """A row copied with its id edited and its paths not: one exam stored as two patients, one
    copy trained on while the other validated the same fold."""
    path = _manifest(tmp_path, "c0,P1,exams/t2w,a0,l0", "c1,P2,t1,a1,l1", "c2,P3,./exams/t2w,a2,l2")
    with pytest.raises(LayoutError) as info:
        read_manifest(path)
    assert str(info.value) == (
        f"manifest {path}, line 4: case 'c2' reads the T2w of case 'c0' (line 2), "
        f"{tmp_path / 'exams' / 't2w'}: one exam listed twice would be stored as two patients"
    )
    refused = []  # --skip-bad-cases: the second row listed, the first kept
    kept = read_manifest(path, errors=refused)
    assert [c.case_id for c in kept] == ["c0", "c1"] and [r[0] for r in refused] == ["c2"]
    # An inference manifest (predict) may list one exam twice.
    assert len(read_manifest(path, labels=False)) == 3


def test_marksheet_rows_of_one_study_must_agree(tmp_path):
    """Two rows of one study with other values: the last one won without a word."""
    sheet = tmp_path / "marksheet.csv"
    rows = ["patient_id,study_id,case_csPCa", "10000,1000000,YES", "10001,1000001,NO"]
    sheet.write_text("\n".join([*rows, "10000,1000000,YES", ""]))  # an exact repeat is harmless
    assert read_marksheet(sheet)["10000_1000000"]["case_csPCa"] == "YES"
    sheet.write_text("\n".join([*rows, "10000,1000000,NO", ""]))
    with pytest.raises(LayoutError, match=r"line 4: study 10000_1000000 is also on line 2, with "):
        read_marksheet(sheet)


def test_marksheet_row_without_a_study_id_is_refused_naming_its_line(tmp_path):
    """A row with an empty study_id was keyed '10000_' and matched no case: the study's values
    (its case_csPCa, case_ISUP) were lost without a word. Empty rows are still skipped."""
    sheet = tmp_path / "marksheet.csv"
    rows = ["patient_id,study_id,case_csPCa", "10000,1000000,YES", ",,", "10001,,NO", ""]
    sheet.write_text("\n".join(rows))
    with pytest.raises(LayoutError) as raised:
        read_marksheet(sheet)
    assert str(raised.value) == f"marksheet {sheet}, line 4: empty study_id"
    sheet.write_text("\n".join([*rows[:3], ",,YES", ""]))
    with pytest.raises(LayoutError, match=r"line 4: empty patient_id and study_id$"):
        read_marksheet(sheet)
    sheet.write_text("\n".join(rows[:3]) + "\n")
    assert list(read_marksheet(sheet)) == ["10000_1000000"]


def test_marksheet_rows_whose_cells_do_not_fit_the_header_are_refused(tmp_path):
    """An unquoted `lesion_GS` of two lesions (3+3,4+3, as a spreadsheet edit leaves it) shifted
    every later cell: case_csPCa read '3' passed the unlabelled check and a csPCa study was stored
    lesion-free. A column named twice kept its last value. Both were read without a word."""
    sheet = tmp_path / "marksheet.csv"
    header = "patient_id,study_id,lesion_GS,lesion_ISUP,case_ISUP,case_csPCa"
    sheet.write_text(f'{header}\n10000,1000000,"3+3,4+3","1,3",3,YES\n')
    assert read_marksheet(sheet)["10000_1000000"]["case_csPCa"] == "YES"  # quoted: read right
    sheet.write_text(f"{header}\n10000,1000000,3+3,4+3,1,3,3,YES\n")
    with pytest.raises(LayoutError) as raised:
        read_marksheet(sheet)
    assert str(raised.value) == (
        f"marksheet {sheet}, line 2: 8 cells, but the header names 6 columns (a value holding a "
        "comma, e.g. lesion_GS '3+3,4+3', must be in double quotes)"
    )
    sheet.write_text("patient_id,study_id,case_csPCa,case_csPCa\n10000,1000000,NO,YES\n")
    with pytest.raises(LayoutError, match=r"\['case_csPCa'\] named more than once$"):
        read_marksheet(sheet)


def test_rows_of_empty_case_ids_are_each_listed_when_bad_cases_are_skipped(tmp_path):
    """Two rows whose case id was left blank (a spreadsheet's half-filled rows): the second
    stopped `--skip-bad-cases` as a repeat of the first 'in letter case'."""
    path = _manifest(tmp_path, "c1,p1,t,a,l", ",p5,t5,a,l", ",p6,t6,a,l", "c2,p2,t2,a,l")
    errors = []
    assert [c.case_id for c in read_manifest(path, errors=errors)] == ["c1", "c2"]
    assert [(case, reason.split(": ", 1)[0]) for case, _, reason in errors] == [
        ("", f"manifest {path}, line 3"),
        ("", f"manifest {path}, line 4"),
    ]
    assert all("case id '' is empty" in reason for _, _, reason in errors)


def test_a_legacy_encoding_is_refused_naming_its_line_whatever_ends_the_lines(tmp_path):
    """Excel for Mac's "CSV (Macintosh)" ends lines in CR alone: the error said line 1 for a byte
    on line 3."""
    rows = ["c1,p1,t,a,l", "c2,p2,caf\u00e9,a,l"]
    for ending in ("\r", "\n", "\r\n"):
        path = tmp_path / "cases.csv"
        path.write_bytes(ending.join([HEADER, *rows, ""]).encode("mac_roman"))
        with pytest.raises(LayoutError, match=r", line 3: not UTF-8 text \(byte 0x8e\)"):
            read_manifest(path)


def test_a_model_of_components_named_in_capitals_still_reads_its_manifest(tmp_path):
    """New stores refuse an `ADC` component (`check_new_component_names`), but `predict` of a
    model trained on one reads its manifest as before (it cannot rename a model's input)."""
    (tmp_path / "cases.csv").write_text("case_id,patient_id,t2w,ADC\nc1,p1,t1,a1\n")
    (case,) = read_manifest(tmp_path / "cases.csv", components=("t2w", "ADC"), labels=False)
    assert case.components == {"t2w": str(tmp_path / "t1"), "ADC": str(tmp_path / "a1")}
