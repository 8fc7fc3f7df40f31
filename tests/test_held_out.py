"""`evaluate --all-cases` refuses a test store that is not held out from the runs: a case a run
trained on, or another exam of a patient it trained on (the run's recorded `train_patients`)."""

from __future__ import annotations

import json
import logging

import pytest

from focalnet_jax.data.run_store import RECORD_FILE
from focalnet_jax.errors import UserError
from focalnet_jax.evaluation.run_predictions import check_held_out


def _run(path, **record):
    path.mkdir()
    (path / RECORD_FILE).write_text(json.dumps({"store": "s", "settings": {}, **record}))
    return path


@pytest.fixture
def runs(tmp_path):
    """Two fold runs of patients p1..p4 (p1 has two exams: a, a2)."""
    fold0 = _run(tmp_path / "fold0", train_cases=["a", "b"], train_patients=["p1", "p2"])
    fold1 = _run(tmp_path / "fold1", train_cases=["c", "d"], train_patients=["p3", "p4"])
    return [fold0, fold1]


def test_a_store_of_other_patients_passes(runs, caplog):
    with caplog.at_level(logging.WARNING, logger="focalnet_jax"):
        check_held_out(runs, {"x": "p9", "y": "p8"}, "test")
    assert not caplog.records


def test_a_training_case_is_refused_naming_the_run(runs):
    with pytest.raises(UserError) as raised:
        check_held_out(runs, {"x": "p9", "d": "p4"}, "test")
    assert str(raised.value) == (
        f"test store test: 1 of its 2 cases are training cases of run {runs[1]} (d); its metrics "
        "would be training-set numbers: evaluate on held-out cases"
    )


def test_another_exam_of_a_training_patient_is_refused(runs):
    """Case a2 was never trained on, but its patient p1 was (through case a)."""
    test = {"x": "p9", "a2": "p1", "e": "p4", "f": "p4", "g": "p3"}
    with pytest.raises(UserError) as raised:
        check_held_out(runs, test, "test")
    assert str(raised.value) == (
        f"test store test: 1 of its 5 cases are exams of patients run {runs[0]} trained on "
        "(a2 of patient p1); its metrics would not be held-out numbers: evaluate on held-out "
        "patients (if these patient ids name other people, pass --allow-training-cases)"
    )
    with pytest.raises(UserError, match=r"3 of its 4 cases .* \(e of patient p4, f of patient "
                       r"p4, g of patient p3\)"):  # fmt: skip
        check_held_out(runs[1:], {k: v for k, v in test.items() if k != "a2"}, "test")


def test_allowed_overlap_and_old_records_are_warned(runs, tmp_path, caplog):
    old = _run(tmp_path / "old", train_cases=["a"])
    none = _run(tmp_path / "none")
    with caplog.at_level(logging.WARNING, logger="focalnet_jax"):
        check_held_out([*runs, old, none], {"a2": "p1"}, "test", allow_training_cases=True)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert messages[0].startswith("test store test: 1 of its 1 cases are exams of patients run")
    assert messages[0].endswith("--allow-training-cases) (allowed)")
    assert messages[1:] == [
        f"run {old} recorded no training patients (trained before they were recorded): test "
        "store test checked by case id only",
        f"run {none} recorded no training cases: test store test not checked against them",
    ]
