"""The PI-CAI marksheet: its csPCa flag (case columns, then the lesions') guards cases that have no
label file; a row repeated with float ids is one row, a control character in a cell is refused."""

from __future__ import annotations

import logging

import pytest
from picai_replica import replica

from focalnet_jax.data.io import CaseError
from focalnet_jax.data.layouts import LayoutError, discover_picai
from focalnet_jax.data.picai_sources import marksheet_cspca


def test_marksheet_csPCa_case_without_label_is_not_stored_lesion_free(tmp_path):
    """`--unlabelled negative` stored 10003_1000004 (case_csPCa YES, ISUP 4) as background when
    only the expert labels were given."""
    human, ai = replica(tmp_path)
    sheet = tmp_path / "marksheet.csv"
    with pytest.raises(CaseError) as info:
        discover_picai(tmp_path, human, unlabelled="negative", marksheet=sheet)
    message = str(info.value)
    assert "\n" not in message  # 10001_1000001 and 10002_1000002 (NO, no label) pass
    assert message.startswith(f"case '10003_1000004', file '{sheet}': the marksheet says csPCa")
    assert "--unlabelled skip" in message
    refused = []
    cases = discover_picai(tmp_path, human, unlabelled="negative", marksheet=sheet, errors=refused)
    # Listed with the marksheet as its file (it was the case's first image, unrelated).
    assert [r[:2] for r in refused] == [("10003_1000004", str(sheet))]
    assert "says csPCa (case_csPCa 'YES') but no label file is in" in refused[0][2]
    assert [c.case_id for c in cases] == [
        "10000_1000000", "10001_1000001", "10002_1000002", "10003_1000003"
    ]  # fmt: skip
    assert cases[0].meta["lesion_GS"] == "4+3,3+4" and cases[2].meta["lesion_ISUP"] == "N/A"
    filled = discover_picai(tmp_path, [human, ai], unlabelled="negative", marksheet=sheet)
    assert len(filled) == 5


def test_marksheet_cspca_reads_the_flag_then_the_case_isup():
    assert marksheet_cspca({"case_csPCa": "YES", "case_ISUP": "0"}) is True
    assert marksheet_cspca({"case_csPCa": "no", "case_ISUP": "3"}) is False
    assert marksheet_cspca({"case_ISUP": "2"}) is True
    assert marksheet_cspca({"case_ISUP": "1"}) is False  # GS 3+3 is not clinically significant
    assert marksheet_cspca({"case_ISUP": "N/A"}) is None and marksheet_cspca({}) is None
    # A spreadsheet's `2.0` said neither: --unlabelled negative stored the csPCa case lesion-free.
    assert marksheet_cspca({"case_ISUP": "2.0"}) is True
    assert marksheet_cspca({"case_ISUP": "1.0"}) is False
    assert (
        marksheet_cspca({"case_ISUP": "2.5"}) is None
        and marksheet_cspca({"case_ISUP": "nan"}) is None
    )


def test_marksheet_cspca_reads_the_lesions_where_the_case_columns_are_missing():
    """The marksheet as picai_labels first published it has `lesion_GS` alone (no case_ISUP,
    no case_csPCa): every row said neither, and a csPCa case without a label file was stored
    lesion-free by --unlabelled negative without a word."""
    assert marksheet_cspca({"lesion_GS": "3+4,4+4"}) is True
    assert marksheet_cspca({"lesion_GS": "4+4,N/A"}) is True  # one csPCa lesion tells
    assert marksheet_cspca({"lesion_GS": "3+3,0+0"}) is False  # every lesion below ISUP 2
    assert marksheet_cspca({"lesion_GS": "0+0,N/A"}) is None  # a lesion without histopathology
    assert (
        marksheet_cspca({"lesion_GS": "N/A"}) is None and marksheet_cspca({"lesion_GS": ""}) is None
    )
    assert marksheet_cspca({"lesion_GS": "3+4,x"}) is None  # not a score: tells nothing
    assert marksheet_cspca({"lesion_ISUP": "1,2"}) is True
    assert marksheet_cspca({"lesion_ISUP": "0,1"}) is False
    # The case's columns come first, then lesion_ISUP, then lesion_GS.
    assert marksheet_cspca({"case_ISUP": "1", "lesion_GS": "4+4"}) is False
    assert marksheet_cspca({"case_ISUP": "N/A", "lesion_ISUP": "0", "lesion_GS": "4+4"}) is False


def test_an_old_marksheet_refuses_an_unlabelled_cspca_case_and_warns_where_it_cannot_tell(
    tmp_path, caplog
):
    human, _ = replica(tmp_path)
    sheet = tmp_path / "old_marksheet.csv"
    rows = [
        ",patient_id,study_id,lesion_GS",
        '0,10000,1000000,"4+3,3+4"',
        "1,10001,1000001,0+0",
        "2,10002,1000002,N/A",
        '3,10003,1000003,"3+4,N/A"',
        '4,10003,1000004,"3+4,4+4"',
    ]
    sheet.write_text("\n".join(rows) + "\n")
    with pytest.raises(CaseError) as info:
        discover_picai(tmp_path, human, unlabelled="negative", marksheet=sheet)
    assert str(info.value).startswith(
        f"case '10003_1000004', file '{sheet}': the marksheet says csPCa (lesion_GS '3+4,4+4') "
        "but no label file is in"
    )
    sheet.write_text("patient_id,study_id,psa\n" + "".join(
        f"{case.replace('_', ',')},5\n" for case in
        ("10000_1000000", "10001_1000001", "10002_1000002", "10003_1000003", "10003_1000004")
    ))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="focalnet_jax.data.picai_sources"):
        assert len(discover_picai(tmp_path, human, unlabelled="negative", marksheet=sheet)) == 5
    assert f"marksheet {sheet}: no row says whether its case holds csPCa" in caplog.text


def test_a_marksheet_row_repeated_with_its_ids_as_floats_is_one_row(tmp_path):
    """`10000.0` is the id `10000` (a spreadsheet's float column): a row repeated so was refused
    as "with other values"."""
    from focalnet_jax.data.picai_sources import read_marksheet

    sheet = tmp_path / "marksheet.csv"
    sheet.write_text("patient_id,study_id,case_csPCa\n10000,1000000,YES\n10000.0,1000000.0,YES\n")
    assert read_marksheet(sheet) == {
        "10000_1000000": {"patient_id": "10000", "study_id": "1000000", "case_csPCa": "YES"}
    }


def test_a_control_character_in_a_marksheet_cell_is_refused(tmp_path):
    """Every cell of a marksheet is kept in the store: `YES\x01` read as no csPCa flag, and a
    csPCa case without a label was no longer refused."""
    from focalnet_jax.data.picai_sources import read_marksheet

    sheet = tmp_path / "marksheet.csv"
    sheet.write_text("patient_id,study_id,case_csPCa\n10000,1000000,YES\x01\n")
    with pytest.raises(LayoutError) as refused:
        read_marksheet(sheet)
    assert str(refused.value) == (
        f"marksheet {sheet}, line 2, column 'case_csPCa': cell holds control character U+0001; "
        "remove it"
    )
